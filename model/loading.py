"""Loading policies and tokenizers: MiniMind .pth files (by path or by name), any transformers causal LM
folder, a critic's backbone, and the start-up check that the tokenizer is the one the weights read."""
import json
import math
import os

import torch

from trainer_utils import InputError, first_line, is_hf_folder, load_state_dict_file, Logger, resolve_weight


def default_tokenizer_path(weight, minimind_tokenizer):
    """A transformers folder carries its own tokenizer; MiniMind weights use `minimind_tokenizer`."""
    return weight if is_hf_folder(weight) else minimind_tokenizer


def check_rope_base(folder, config, flag):
    """transformers 5 saves RoPE's base only in rope_parameters; 4.x reads a top-level rope_theta and,
    without one, silently uses its default base: refuse rather than run with the wrong positions."""
    raw = json.load(open(os.path.join(folder, "config.json")))
    rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and getattr(config, "rope_theta", rope_theta) != rope_theta:
        raise InputError(f"{flag} {folder!r}: its config.json names RoPE base {rope_theta} only in "
                         f"rope_parameters, which this transformers version ignores (it would use "
                         f"{config.rope_theta}); add \"rope_theta\": {rope_theta} to config.json")


def trusts_remote_code(folder, what):
    """A model's own Python files run only for a folder whose config.json asks for them (auto_map), and the
    run says so."""
    remote = "auto_map" in json.load(open(os.path.join(folder, "config.json")))
    if remote:
        Logger(f"note: trust_remote_code enabled for the {what} folder {folder} only")
    return remote


def load_causal_lm_config(folder, flag, remote):
    """The folder's config, checked to describe a causal LM (AutoModelForCausalLM), not a classifier."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    except Exception as e:
        raise InputError(f"{flag} {folder!r}: cannot read its config.json ({first_line(e)})") from e
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        ok = any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        ok = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in \
            (getattr(config, "auto_map", None) or {})
    if not ok:
        raise InputError(f"{flag} {folder!r}: its config.json describes {', '.join(architectures) or config.model_type}"
                         f", not a causal language model (AutoModelForCausalLM); the policy must generate text")
    check_rope_base(folder, config, flag)
    return config


def load_hf_causal_lm(folder, tokenizer, tokenizer_path, flag="--from_weight"):
    """AutoModelForCausalLM from a transformers folder in float32, checked to work with the sampler and to
    hold every id of `tokenizer`."""
    import inspect
    from transformers import AutoModelForCausalLM
    remote = trusts_remote_code(folder, "policy")
    config = load_causal_lm_config(folder, flag, remote)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                     trust_remote_code=remote)
    except Exception as e:
        raise InputError(f"{flag} {folder!r}: cannot load it as AutoModelForCausalLM ({first_line(e)})") from e
    takes = inspect.signature(model.forward).parameters
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in takes]
    if missing and "kwargs" not in takes:
        raise InputError(f"{flag} {folder!r}: {type(model).__name__}.forward takes no {' or '.join(missing)}; "
                         f"the sampler and the PPO log-probs need both (transformers' own models do)")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"{flag} {folder!r}: the tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but the "
                         f"model's embedding holds {rows}: ids past {rows - 1} would index nothing; use the "
                         f"tokenizer the model was trained with")
    return model


def load_hf_backbone(folder, tokenizer):
    """(base model, score head or None) of a transformers folder, for a critic: the base's first output is the
    last hidden state, after the final norm. A 1-label sequence classifier whose head is a linear layer on each
    position (a decoder reward model's `score`) also gives that head, as InstructGPT started its value function
    from the reward model; other folders load with AutoModel (heads dropped). It reads the policy's token ids,
    so its embedding must hold them all and its own tokenizer, if it ships one, must be the policy's."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    remote = trusts_remote_code(folder, "critic")
    head = None
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and \
                config.num_labels == 1:
            classifier = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                                            trust_remote_code=remote)
            backbone = getattr(classifier, classifier.base_model_prefix)
            score = getattr(classifier, "score", None)
            head = score if isinstance(score, torch.nn.Linear) and score.out_features == 1 else None
        else:
            backbone = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote)
    except Exception as e:
        raise InputError(f"--critic_weight {folder!r}: cannot load its backbone with AutoModel "
                         f"({first_line(e)})") from e
    rows = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"--critic_weight {folder!r}: the policy's tokenizer has {len(tokenizer)} tokens but the "
                         f"critic's embedding holds {rows}")
    try:
        own = AutoTokenizer.from_pretrained(folder)
    except Exception:  # a folder with weights only: nothing more to compare
        return backbone, head
    if own.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"--critic_weight {folder!r}: its tokenizer is not the policy's, so it would read the "
                         f"policy's token ids as other words; start the critic from a model of the same family")
    return backbone, head


def is_moe(model):
    """A mixture-of-experts model of any kind (MiniMind's, Mixtral, Qwen-MoE, ...): it has an `experts` module."""
    return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in model.named_modules())


def balance_loss_coef(model):
    """A transformers MoE policy returns its raw load-balancing loss only when asked (output_router_logits) and
    weighs it by config.router_aux_loss_coef in its own loss: that weight, or None for other models (MiniMind
    returns its loss already weighted by its generation's alpha)."""
    import inspect
    coef = getattr(model.config, "router_aux_loss_coef", None)
    return coef if coef is not None and "output_router_logits" in inspect.signature(model.forward).parameters \
        else None


def check_position_limit(model, max_seq_len, max_gen_len, flag="--from_weight", gen_flags=None):
    """Prompts of up to --max_seq_len tokens and --max_gen_len new ones reach position max_seq_len + max_gen_len - 1
    (`gen_flags`: how the flags make max_gen_len, when it is not --max_gen_len alone).
    A learned position table (GPT-2's wpe, OPT's embed_positions) shorter than that would be indexed past its end
    mid-run (an IndexError on CPU, a device-side assert on CUDA): refused. A RoPE model past its
    max_position_embeddings only extrapolates: a warning."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None or max_seq_len + max_gen_len <= limit:
        return None
    embeddings = model.get_input_embeddings()
    learned = [m.num_embeddings for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and m is not embeddings and limit <= m.num_embeddings <= limit + 2]
    message = (f"--max_seq_len {max_seq_len} + {gen_flags or f'--max_gen_len {max_gen_len}'} = "
               f"{max_seq_len + max_gen_len} positions, "
               f"but the policy ({type(model).__name__}) was trained on {limit}")
    if learned:
        raise InputError(f"{message}, and its position table ends there: lower the flags so that the sum "
                         f"is at most {limit}")
    return f"warning: {message} (max_position_embeddings); it extrapolates beyond them"


def model_signature(config):
    """What a resume file must agree on with the model it is loaded into."""
    return dict(model_type=config.model_type, hidden_size=config.hidden_size,
                num_hidden_layers=config.num_hidden_layers, use_moe=getattr(config, "use_moe", False),
                version=getattr(config, "version", None))


def load_tokenizer(tokenizer_path):
    """AutoTokenizer from the folder; one with no pad token pads with EOS (as TRL sets GPT-2's). That is
    safe because every mask comes from lengths, never from comparing ids with the pad id."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as e:
        raise InputError(f"--tokenizer_path {tokenizer_path!r}: cannot load a tokenizer ({first_line(e)})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def tokenizer_fit(policy, prompts_ids, pad_token_id, seed=0):
    """(mean negative log-likelihood per token of `prompts_ids` under `policy` (a model.policy.Policy: its
    chunked log-probs, never the logits of every position at once), the same with each prompt's tokens
    shuffled), in nats. A model reading the tokenizer it was trained with predicts text far better in its
    real order than shuffled; fed another tokenizer's ids, it reads both as noise. One left-padded forward
    each."""
    from dataset.lm_dataset import PromptCollator
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    result = []
    for shuffle in (False, True):
        rows = [torch.tensor(ids)[torch.randperm(len(ids), generator=generator)].tolist() if shuffle else ids
                for ids in prompts_ids]
        batch = PromptCollator(pad_token_id)([{"prompt": "", "prompt_ids": ids, "answer": ""} for ids in rows])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        nll = -policy(ids, mask, ids.shape[1] - 1)[0]  # [B, T - 1]: every token but the first
        scored = mask[:, :-1] * mask[:, 1:]  # predictions of real tokens from real tokens
        result.append(((nll * scored).sum() / scored.sum()).item())
    return tuple(result)


def check_tokenizer_fit(policy, prompts_ids, pad_token_id, tokenizer_path, weight):
    """Stop with an error naming --tokenizer_path when the actor does not read this tokenizer's ids:
    it must predict the rendered prompts at least 1 nat/token better than the same tokens shuffled,
    and better than a uniform guess over its vocabulary. Returns the message of a passed check."""
    nll, shuffled = tokenizer_fit(policy, prompts_ids, pad_token_id)
    uniform = math.log(policy.config.vocab_size)
    numbers = (f"{nll:.2f} nats/token on {len(prompts_ids)} rendered prompts ({shuffled:.2f} with their tokens "
               f"shuffled, {uniform:.2f} for a uniform guess)")
    if nll < min(shuffled - 1.0, uniform):
        return f"tokenizer check: the actor reads --tokenizer_path: {numbers}"
    where = (f"a transformers model reads the tokenizer saved with it, in its own folder ({weight}; the default "
             f"when --tokenizer_path is not given)" if is_hf_folder(weight) else
             "real MiniMind weights need the tokenizer folder of your MiniMind checkout (minimind/model)")
    raise InputError(f"--tokenizer_path {tokenizer_path!r} does not fit the actor {weight}: it scores {numbers}; "
                     f"a model reading its own tokenizer scores far below both. Weights only work with the exact "
                     f"tokenizer they were trained with: {where}. --check_tokenizer 0 skips this check")


def init_model(weight, save_dir, tokenizer_path, device, hidden_size=None, num_hidden_layers=None, use_moe=None):
    """Tokenizer + policy in float32 on `device`: MiniMindForCausalLM from a .pth, or any
    AutoModelForCausalLM from a transformers folder (one with config.json).

    The config is read off the weights (sizes given here are only checked against them);
    `weight="none"` builds a random MiniMind from the given sizes (benchmarks, tests).
    """
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, config_from_state_dict
    tokenizer = load_tokenizer(tokenizer_path)
    if is_hf_folder(weight):
        model = load_hf_causal_lm(weight, tokenizer, tokenizer_path)
        for flag, value in [("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)]:
            if value is not None and value != getattr(model.config, flag):
                raise InputError(f"--{flag} {value}: {weight} has {flag} {getattr(model.config, flag)}")
        return model.to(device), tokenizer
    if weight == "none":
        config = MiniMindConfig(hidden_size=hidden_size or 512, num_hidden_layers=num_hidden_layers or 8,
                                use_moe=bool(use_moe))
        model, state_dict = MiniMindForCausalLM(config), None
    else:
        path = resolve_weight(weight, save_dir, hidden_size, use_moe)
        state_dict = load_state_dict_file(path)
        try:
            config = config_from_state_dict(state_dict, hidden_size=hidden_size,
                                            num_hidden_layers=num_hidden_layers, use_moe=use_moe)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from e
        model = MiniMindForCausalLM(config)
        model.load_state_dict(state_dict, strict=True)
    if len(tokenizer) > model.config.vocab_size:
        raise InputError(f"tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"holds {model.config.vocab_size}")
    return model.float().to(device), tokenizer
