"""Training helpers shared by the trainers: distributed setup, seeding, batching,
LR schedule, crash-safe checkpoint I/O and RNG state capture for exact resume."""
import glob
import json
import math
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.data import BatchSampler, Sampler


# ---------------------------------------------------------------- distributed

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def Logger(content):
    if is_main_process():
        print(content, flush=True)


def init_distributed_mode(device="cpu"):
    """Join the process group when launched by torchrun; a no-op for plain `python`.
    The backend follows the training device (NCCL for cuda, gloo otherwise), not what the
    machine has: `--device cpu` on a GPU machine runs gloo.
    Returns the local rank (the GPU index on this node)."""
    if "RANK" not in os.environ:
        return 0
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("RANK is set but LOCAL_RANK is not; launch distributed runs with torchrun")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} under torchrun needs CUDA, which is not available; use --device cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before init, so NCCL binds each rank to its own GPU
    dist.init_process_group(backend=backend)
    return local_rank


def synced_time(device):
    """Wall time after the device's queued work has finished, so phase timings on CUDA are honest."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.time()


def setup_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------- batching and LR

class SkipBatchSampler(Sampler):
    """Batches of indices from `sampler`, minus the first `skip_batches` ones, so a resumed
    epoch continues where it stopped. Skipped batches are still drawn from the sampler so a
    seeded shuffle yields the same order as in the interrupted run."""

    def __init__(self, sampler, batch_size, skip_batches=0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.skip_batches = skip_batches

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip_batches:
                yield batch

    def __len__(self):
        return max(0, len(self.batches) - self.skip_batches)


def build_cosine_scheduler(optimizer, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Linear warmup (lr/warmup_steps ... lr), then cosine decay to lr*min_lr_ratio at total_steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = total_steps - warmup_steps

    # A plain function, not a callable object, so state_dict() holds only numbers.
    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------- file names

def _model_tag(weight, hidden_size, use_moe):
    return f"{weight}_{hidden_size}{'_moe' if use_moe else ''}"


def weight_path(save_dir, weight, hidden_size, use_moe):
    return os.path.join(save_dir, f"{_model_tag(weight, hidden_size, use_moe)}.pth")


def resume_path(checkpoint_dir, weight, hidden_size, use_moe):
    return os.path.join(checkpoint_dir, f"{_model_tag(weight, hidden_size, use_moe)}_resume.pth")


def hf_folder_path(save_dir, weight, hidden_size=None, use_moe=False):
    """{save_dir}/{weight}_hf: where a transformers policy is saved with save_pretrained. MiniMind's
    --save_hf export is named as its .pth is, with the model tag: {weight}_{hidden}[_moe]_hf."""
    return os.path.join(save_dir, f"{weight if hidden_size is None else _model_tag(weight, hidden_size, use_moe)}_hf")


# ---------------------------------------------------------------- crash-safe saving

def _remove_if_exists(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder):
    # Makes the renames themselves durable; some filesystems refuse fsync on a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(obj, path):
    """torch.save `obj` into a fully synced temp file beside `path`; returns the temp name.
    The temp lives in the same folder so the final os.replace is an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.tmp"  # *.tmp is git-ignored
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a process killed while saving
        _remove_if_exists(stale)
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as e:
        raise OSError(f"cannot write {path}: folder {folder} is not writable ({e.strerror or e})") from e
    try:
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _remove_if_exists(tmp)
        # torch reports a failed write (a full disk) as an opaque RuntimeError; the OSError behind it says why
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"cannot write {path} ({cause.strerror or cause}); "
                                       f"the file already there, if any, is left as it was") from e
        raise
    return tmp


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file at `path`: on any failure the
    previous file stays intact and no temp file is left behind."""
    path = os.fspath(path)
    tmp = _write_temp(obj, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_if_exists(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_hf_folder(model, tokenizer, folder):
    """save_pretrained (model and tokenizer) that never leaves a half-written folder: written beside
    it first, then swapped in, so `folder` always holds one complete save (the old one until the swap)."""
    tmp, old = f"{folder}.{os.getpid()}.tmp", f"{folder}.{os.getpid()}.old"
    for stale in glob.glob(glob.escape(folder) + ".*.tmp") + glob.glob(glob.escape(folder) + ".*.old"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        unwrap_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))


def unwrap_model(model):
    """The bare module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model, path, dtype=torch.float16):
    """Save the bare model's state dict like MiniMind's `full_sft_512.pth`: float tensors in
    `dtype` on CPU (integer buffers keep their type). Tied tensors (embedding and lm_head)
    keep both keys but share one converted copy, so the file stores them once."""
    converted, state = {}, {}
    for k, v in unwrap_model(model).state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if key not in converted:
            converted[key] = (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu()
        state[k] = converted[key]
    atomic_save(state, path)


def _first_line(error):
    # torch's unpickling errors run to several paragraphs; one line says what happened. When
    # weights_only=True refuses a file, that is the line naming what was refused, not the
    # opening advice to retry with weights_only=False (which lets the file run code).
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reason = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the doc"))), "")
        return f"not a plain tensor file; torch.load(weights_only=True) refused it ({reason})"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _strip_wrapper_prefixes(key):
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_state_dict_file(path):
    """Read a weight file into a CPU state dict. Accepts plain state dicts, MiniMind resume
    files (`{"model": state_dict, ...}`) and keys saved from DDP / compiled models."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({_first_line(e)})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a non-empty dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{path}: not a state dict; entry {bad[0]!r} is not a tensor")
    return {_strip_wrapper_prefixes(k): v for k, v in obj.items()}


# ---------------------------------------------------------------- models

def resolve_weight(weight, save_dir, hidden_size=None, use_moe=None):
    """A weight name becomes the one file {save_dir}/{name}_{hidden}{_moe}.pth, whatever its size:
    `--from_weight full_sft` finds full_sft_512.pth or full_sft_768_moe.pth alone in the folder.
    hidden_size and use_moe (when given) pick among several; anything that looks like a path is
    used as it is."""
    if weight.endswith(".pth") or os.sep in weight or os.path.isfile(weight):
        return weight
    pattern = re.compile(re.escape(weight) + r"_(\d+)(_moe)?\.pth")
    found = sorted(n for n in (os.listdir(save_dir) if os.path.isdir(save_dir) else []) if pattern.fullmatch(n))
    picked = [n for n in found if (hidden_size is None or int(pattern.fullmatch(n).group(1)) == hidden_size)
              and (use_moe is None or bool(pattern.fullmatch(n).group(2)) == bool(use_moe))]
    if len(picked) == 1:
        return os.path.join(save_dir, picked[0])
    wanted = _model_tag(weight, hidden_size or "<hidden>", use_moe)
    if not picked:
        raise FileNotFoundError(f"--from_weight {weight}: no {wanted}.pth in {os.path.abspath(save_dir)} (pattern "
                                f"{weight}_<hidden>[_moe].pth" + (f"; it holds {', '.join(found)}" if found else "")
                                + "); give a path, or the --save_dir that holds the file")
    raise ValueError(f"--from_weight {weight}: {len(picked)} files match in {os.path.abspath(save_dir)}: "
                     f"{', '.join(picked)}; pick one with --hidden_size and/or --use_moe, or give its path")


def is_hf_folder(path):
    """A transformers checkpoint folder (save_pretrained's config.json), as opposed to a MiniMind .pth."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def default_tokenizer_path(weight, minimind_tokenizer):
    """A transformers folder carries its own tokenizer; MiniMind weights use `minimind_tokenizer`."""
    return weight if is_hf_folder(weight) else minimind_tokenizer


def check_rope_base(folder, config, flag):
    """transformers 5 saves RoPE's base only in rope_parameters; 4.x reads a top-level rope_theta and,
    without one, silently uses its default base: refuse rather than run with the wrong positions."""
    raw = json.load(open(os.path.join(folder, "config.json")))
    rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and getattr(config, "rope_theta", rope_theta) != rope_theta:
        raise ValueError(f"{flag} {folder!r}: its config.json names RoPE base {rope_theta} only in "
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
        raise ValueError(f"{flag} {folder!r}: cannot read its config.json ({_first_line(e)})") from e
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        ok = any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        ok = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in \
            (getattr(config, "auto_map", None) or {})
    if not ok:
        raise ValueError(f"{flag} {folder!r}: its config.json describes {', '.join(architectures) or config.model_type}"
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
        raise ValueError(f"{flag} {folder!r}: cannot load it as AutoModelForCausalLM ({_first_line(e)})") from e
    takes = inspect.signature(model.forward).parameters
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in takes]
    if missing and "kwargs" not in takes:
        raise ValueError(f"{flag} {folder!r}: {type(model).__name__}.forward takes no {' or '.join(missing)}; "
                         f"the sampler and the PPO log-probs need both (transformers' own models do)")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{flag} {folder!r}: the tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but the "
                         f"model's embedding holds {rows}: ids past {rows - 1} would index nothing; use the "
                         f"tokenizer the model was trained with")
    return model


def load_hf_backbone(folder):
    """A transformers folder's base model (AutoModel: a causal LM's or a classifier's heads dropped),
    for a critic: its first output is the last hidden state, after the final norm."""
    from transformers import AutoModel
    try:
        return AutoModel.from_pretrained(folder, dtype=torch.float32,
                                         trust_remote_code=trusts_remote_code(folder, "critic"))
    except Exception as e:
        raise ValueError(f"--critic_weight {folder!r}: cannot load its backbone with AutoModel "
                         f"({_first_line(e)})") from e


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
        raise ValueError(f"--tokenizer_path {tokenizer_path!r}: cannot load a tokenizer ({_first_line(e)})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def tokenizer_fit(model, prompts_ids, pad_token_id, seed=0):
    """(mean negative log-likelihood per token of `prompts_ids` under `model`, the same with each
    prompt's tokens shuffled), in nats. A model reading the tokenizer it was trained with predicts
    text far better in its real order than shuffled; fed another tokenizer's ids, it reads both as
    noise. One left-padded forward each."""
    from dataset.lm_dataset import PromptCollator
    from model.sampling import position_ids_from_mask
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    result = []
    for shuffle in (False, True):
        rows = [torch.tensor(ids)[torch.randperm(len(ids), generator=generator)].tolist() if shuffle else ids
                for ids in prompts_ids]
        batch = PromptCollator(pad_token_id)([{"prompt": "", "prompt_ids": ids, "answer": ""} for ids in rows])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, :-1].float()
        nll = logits.logsumexp(-1) - logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
        scored = mask[:, :-1] * mask[:, 1:]  # predictions of real tokens from real tokens
        result.append(((nll * scored).sum() / scored.sum()).item())
    return tuple(result)


def check_tokenizer_fit(model, prompts_ids, pad_token_id, tokenizer_path, weight):
    """Stop with an error naming --tokenizer_path when the actor does not read this tokenizer's ids:
    it must predict the rendered prompts at least 1 nat/token better than the same tokens shuffled,
    and better than a uniform guess over its vocabulary. Returns the message of a passed check."""
    nll, shuffled = tokenizer_fit(model, prompts_ids, pad_token_id)
    uniform = math.log(model.config.vocab_size)
    numbers = (f"{nll:.2f} nats/token on {len(prompts_ids)} rendered prompts ({shuffled:.2f} with their tokens "
               f"shuffled, {uniform:.2f} for a uniform guess)")
    if nll < min(shuffled - 1.0, uniform):
        return f"tokenizer check: the actor reads --tokenizer_path: {numbers}"
    raise ValueError(f"--tokenizer_path {tokenizer_path!r} does not fit the actor {weight}: it scores {numbers}; "
                     f"a model reading its own tokenizer scores far below both. Weights only work with the exact "
                     f"tokenizer they were trained with: real MiniMind weights need the tokenizer folder of your "
                     f"MiniMind checkout (minimind/model). --check_tokenizer 0 skips this check")


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
                raise ValueError(f"--{flag} {value}: {weight} has {flag} {getattr(model.config, flag)}")
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
            raise ValueError(f"{path}: {e}") from e
        model = MiniMindForCausalLM(config)
        model.load_state_dict(state_dict, strict=True)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"holds {model.config.vocab_size}")
    return model.float().to(device), tokenizer


# ---------------------------------------------------------------- RNG state

def get_rng_state():
    """All RNG states, in types that torch.load(weights_only=True) accepts."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (version, tuple(mt_state), gauss),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    try:
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(mt_state), gauss))
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"invalid RNG state ({_first_line(e)})") from e
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the generators it has.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


# ---------------------------------------------------------------- resume files with rotation

def _numbered(path, index):
    """`x_resume.pth` -> `x_resume.1.pth`; index 0 is `path` itself."""
    if index == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{index}{ext}"


def _resume_candidates(path):
    """`path` and its numbered older copies that exist on disk, newest first."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    pattern = re.compile(re.escape(root) + r"\.(\d+)" + re.escape(ext))
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    indices = sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m and int(m.group(1)) > 0)
    return [c for c in [path] + [_numbered(path, i) for i in indices] if os.path.isfile(c)]


def save_resume(state, path, keep=2):
    """Write a resume checkpoint and keep the `keep - 1` previous ones as path.1, path.2, ...

    Order: (1) write the new file to a synced temp; (2) shift the old files one slot older,
    newest last, each an atomic rename, so every complete file always sits under some name;
    (3) rename the temp onto `path`; (4) drop files beyond `keep`. A crash at any point
    leaves all previously saved checkpoints loadable (load_resume falls back to path.1)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = os.fspath(path)
    tmp = _write_temp(state, path)
    try:
        for i in range(keep - 1, 0, -1):
            if os.path.isfile(_numbered(path, i - 1)):
                os.replace(_numbered(path, i - 1), _numbered(path, i))
        os.replace(tmp, path)
    except BaseException:
        _remove_if_exists(tmp)
        raise
    for stale in _resume_candidates(path)[keep:]:  # left over from a run with a larger `keep`
        _remove_if_exists(stale)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_resume(path, map_location="cpu"):
    """(state, file it came from) from the newest readable of path, path.1, ...;
    (None, None) when none exists. Corrupt files are skipped with a warning."""
    path = os.fspath(path)
    errors = []
    for candidate in _resume_candidates(path):
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"expected a dict, got {type(state).__name__}")
            return state, candidate
        except Exception as e:
            errors.append(f"{candidate} ({_first_line(e)})")
            Logger(f"warning: skipping unreadable resume file {errors[-1]}")
    if errors:
        raise ValueError("all resume files are unreadable: " + "; ".join(errors))
    return None, None
