"""Any transformers causal LM as the policy: tiny GPT-2 (learned positions), Qwen2 and Llama built offline
from configs, checked against transformers' own generate, trained, saved, killed and resumed."""
import json
import os
import re
import shutil
import signal
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

import train_ppo
from children import assert_same_run, finish, read_metrics, start, torchrun, wait_for
from conftest import ROOT
from hf_models import ARCHITECTURES, save_tiny_hf_model, tiny_hf_model
from model.critic import build_critic
from model.policy import Policy
from model.sampling import position_ids_from_mask, sample_responses
from trainer_utils import load_resume
from transformers import LlamaModel

TOKENIZER = str(ROOT / "model")


def left_padded_prompts(lengths=(7, 3, 5, 1), pad_id=0, seed=0):
    """Random prompts of the given lengths, left-padded as PromptCollator pads them: ids, mask [B, P]."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids, mask = torch.full((len(lengths), P), pad_id), torch.zeros(len(lengths), P, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, P - n:] = torch.randint(3, 6400, (n,), generator=g)
        mask[row, P - n:] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_sampling_equals_transformers_generate_on_left_padded_prompts(arch):
    model = tiny_hf_model(arch).eval()
    ids, mask = left_padded_prompts()
    P, N = ids.shape[1], 12
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=0)
    row1 = free[1, P:].tolist()
    stop = next(j for j in range(1, N) if row1[j] not in row1[:j])  # row 1's first new token after its first
    eos = row1[stop]  # row 1 stops there, the others where this token comes up, if ever
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=0,
                          eos_token_id=eos)[:, P:]
    got, got_mask, _ = sample_responses(model, ids, mask, N, eos, 0, greedy=True)
    assert got_mask[1].sum() == stop + 1 < N
    for row in range(len(ids)):
        n = int(got_mask[row].sum())
        assert got[row, :n].tolist() == want[row, :n].tolist(), row
        assert n == N or want[row, n - 1] == eos
    if arch == "gpt2":  # the comparison means something: without generate's position ids GPT-2 reads pads as text
        plain = model(ids, attention_mask=mask).logits[:, -1]
        placed = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        assert (plain - placed).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_logprobs_equal_the_scoring_forward(arch, dtype):
    """The log-probs the sampler drew with are the ones PPO's scoring forward computes (static cache in
    float32, dynamic cache under autocast)."""
    model = tiny_hf_model(arch).eval()
    ids, mask = left_padded_prompts(seed=1)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        response, response_mask, sampled = sample_responses(model, ids, mask, 10, 2, 0, temperature=0.7,
                                                            generator=torch.Generator().manual_seed(0))
        scored = Policy(model)(torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1),
                               response.shape[1], 0.7)[0]
    gap = ((sampled - scored).abs() * response_mask).max().item()
    assert gap < (1e-5 if dtype == torch.float32 else 0.1), gap
    assert response_mask.sum() > 20


def plain_prompts(path, n=16):
    """Plain-text rows for base models, as TRL's sentiment example queries with review openings."""
    openings = ["The movie was", "I think this film", "Honestly, the plot", "The actors in it", "This story is",
                "My friends said it", "The ending felt", "Watching it again"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": openings[i % len(openings)] + f" {i}"}) + "\n")
    return str(path)


def length_reward(tmp_path):
    path = tmp_path / "length_reward.py"
    path.write_text("def reward(prompts, responses, answers):\n    return [len(r) / 20 for r in responses]\n")
    return f"{path}:reward"


def hf_run_args(folder, save_dir, data, *extra):
    return ["--from_weight", folder, "--data_path", data, "--save_dir", str(save_dir), "--batch_size", "4",
            "--mini_batch_size", "2", "--max_gen_len", "8", "--max_seq_len", "32", "--device", "cpu",
            "--seed", "1", "--check_tokenizer", "0", *extra]


def gpt2_kit(tmp_path):
    """A base GPT-2 folder as real ones come (no chat template, no pad token), plain prompts, a rule reward."""
    folder = save_tiny_hf_model("gpt2", tmp_path / "gpt2", TOKENIZER, chat=False, pad=False)
    return folder, plain_prompts(tmp_path / "plain.jsonl"), ["--reward_model_path", "none", "--reward_fn",
                                                              length_reward(tmp_path)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ppo_trains_and_saves_a_folder_transformers_loads(arch, tiny_kit, tmp_path):
    if arch == "gpt2":
        folder, data, reward = gpt2_kit(tmp_path)
    else:  # a chat model: the project's ChatML template, conversation rows, a reward model
        folder, data = save_tiny_hf_model(arch, tmp_path / arch, TOKENIZER), tiny_kit["data"]
        reward = ["--reward_model_path", tiny_kit["reward_model"]]
    save_dir = tmp_path / "run"
    train_ppo.main(train_ppo.parse_args(hf_run_args(folder, save_dir, data, "--max_steps", "3", *reward)))
    steps = [m for m in read_metrics(save_dir) if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["first_minibatch_ratio_dev"] == 0.0 and m["sampler_logprob_gap"] < 1e-5 for m in steps)
    assert all(m["approx_kl"] > 0 for m in steps)  # the policy moved
    assert not [n for n in os.listdir(save_dir) if n.endswith(".pth")]  # saved as a folder, not a MiniMind .pth
    state, _ = load_resume(str(save_dir / "checkpoints" / "ppo_actor_32_resume.pth"))
    saved = AutoModelForCausalLM.from_pretrained(save_dir / "ppo_actor_hf").eval()
    assert type(saved).__name__ == type(tiny_hf_model(arch)).__name__
    assert all(torch.equal(v, state["model"][k]) for k, v in saved.state_dict().items())
    tokenizer = AutoTokenizer.from_pretrained(save_dir / "ppo_actor_hf")
    enc = tokenizer(["The movie was"], return_tensors="pt")
    out = saved.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)


def test_sigkill_then_resume_is_bit_exact(forkserver, tmp_path):
    """GPT-2 (learned positions, no pad token, plain prompts): a run SIGKILLed after its 3rd step and
    resumed ends with the metrics and weights of an uninterrupted run."""
    folder, data, reward = gpt2_kit(tmp_path)
    argv = lambda save_dir, *extra: hf_run_args(folder, save_dir, data, "--max_steps", "6", "--save_interval", "1",
                                                *reward, *extra)
    log = tmp_path / "ref.log"
    assert finish(start(forkserver, argv(tmp_path / "ref"), log), log) == 0, open(log).read()[-3000:]
    log = tmp_path / "killed.log"
    proc = start(forkserver, argv(tmp_path / "run"), log)
    wait_for(proc, log, lambda: re.search(r"^step 3/6 \|", open(log).read(), re.M), "step 3")
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    log = tmp_path / "resumed.log"
    assert finish(start(forkserver, argv(tmp_path / "run", "--from_resume", "1"), log), log) == 0
    assert "resumed from" in open(log).read()
    assert_same_run(tmp_path / "run", tmp_path / "ref", 6, "checkpoints/ppo_actor_32_resume.pth")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert open(tmp_path / "run" / "ppo_actor_hf" / name, "rb").read() == \
            open(tmp_path / "ref" / "ppo_actor_hf" / name, "rb").read(), name


def test_critic_is_the_backbone_with_a_zero_value_head_or_another_folder(encoder_rms, tmp_path):
    actor = tiny_hf_model("gpt2")
    critic = build_critic(actor)
    assert type(critic.model).__name__ == "GPT2Model"  # base_model_prefix "transformer"
    assert all(torch.equal(p, q) and p is not q for p, q in zip(critic.model.parameters(),
                                                                actor.transformer.parameters()))
    ids, mask = left_padded_prompts()
    values = train_ppo.critic_values(critic, ids, mask, 3)
    assert values.shape == (4, 3) and torch.equal(values, torch.zeros(4, 3))
    folder = save_tiny_hf_model("llama", tmp_path / "llama_critic", TOKENIZER, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    critic = build_critic(actor, folder, tokenizer)
    want = tiny_hf_model("llama", seed=3).model
    assert isinstance(critic.model, LlamaModel)
    assert all(torch.equal(a, b) for a, b in zip(critic.model.state_dict().values(), want.state_dict().values()))
    # a critic of another family reads the policy's ids as other words: refused, naming the folder
    with pytest.raises(ValueError, match=re.escape(repr(encoder_rms["bert"])) + ".*has 6400 tokens but the critic's"):
        build_critic(actor, encoder_rms["bert"], tokenizer)
    other = save_tiny_hf_model("llama", tmp_path / "other_family", TOKENIZER)
    AutoTokenizer.from_pretrained(encoder_rms["bert"]).save_pretrained(other)  # 6400 rows, another vocabulary
    with pytest.raises(ValueError, match=re.escape(repr(other)) + ".*its tokenizer is not the policy's"):
        build_critic(actor, other, tokenizer)


def test_a_classifier_folder_or_a_too_large_tokenizer_stops_the_run(tiny_kit, tmp_path):
    classifier = tmp_path / "distilbert"
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=6400, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64)).save_pretrained(classifier)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(classifier)
    small = save_tiny_hf_model("llama", tmp_path / "small_vocab", TOKENIZER, vocab_size=1000)
    for folder, message in [(classifier, r"DistilBertForSequenceClassification, not a causal language model"),
                            (small, r"has 6400 tokens but the model's embedding holds 1000")]:
        save_dir = tmp_path / f"run_{os.path.basename(folder)}"
        with pytest.raises(ValueError, match=re.escape(repr(str(folder))) + ".*" + message):
            train_ppo.main(train_ppo.parse_args(hf_run_args(str(folder), save_dir, tiny_kit["data"],
                                                            "--reward_model_path", "none")))
        assert not os.path.exists(save_dir / "metrics.jsonl")


# ----------------------------------------------------------------------------- the README's commands
def readme_commands(start, page="README.md"):
    import shlex
    text = open(ROOT / page, encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines]  # a comment may hold an apostrophe
    return [cmd for cmd in commands if cmd[:len(start)] == start]


def test_readme_gpt2_sentiment_command_runs_on_stand_ins(encoder_rms, tmp_path, monkeypatch):
    """The README's gpt2-sentiment command, verbatim, in a folder where gpt2 and distilbert-imdb are tiny
    random stand-ins (a base GPT-2 folder: no chat template, no pad token; DistilBERT NEGATIVE/POSITIVE),
    for one rollout."""
    (command,) = readme_commands(["python", "train_ppo.py", "--from_weight", "gpt2"])
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("gpt2", tmp_path / "gpt2", TOKENIZER, chat=False, pad=False)
    shutil.copytree(encoder_rms["distilbert"], tmp_path / "distilbert-imdb")
    plain_prompts(tmp_path / "imdb_prompts.jsonl", n=64)
    args = train_ppo.parse_args(command[2:] + ["--max_steps", "1", "--device", "cpu", "--check_tokenizer", "0"])
    assert (args.tokenizer_path, args.reward_label, args.reward_input) == ("gpt2", "POSITIVE", "auto")
    train_ppo.main(args)
    (step,) = read_metrics(tmp_path / "out")
    assert step["first_minibatch_ratio_dev"] == 0.0 and "reward_rm" in step and "reward_format" not in step
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ppo_actor_hf").config.model_type == "gpt2"
    # the README's comparison of the two with scripts/eval_policy.py, verbatim
    text = " ".join(open(ROOT / "README.md", encoding="utf-8").read().split())
    (evaluation,) = re.findall(r"`python scripts/eval_policy.py (--base gpt2 [^`]*)`", text)
    from scripts import eval_policy
    results = eval_policy.main(evaluation.split() + ["--device", "cpu", "--max_gen_len", "8", "--limit", "8"])
    assert set(results) == {"base", "trained"} and all("reward_rm" in r for r in results.values())


def test_readme_two_gpu_qwen_command_places_the_models_as_documented(tmp_path, monkeypatch):
    (command,) = [c for c in readme_commands(["python", "train_ppo.py", "--from_weight", "Qwen2.5-0.5B-Instruct"],
                                             "docs/distributed.md") if "--critic_device" in c]
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("qwen2", tmp_path / "Qwen2.5-0.5B-Instruct", TOKENIZER)
    args = train_ppo.parse_args(command[2:])
    assert (args.device, args.critic_device, args.reward_device) == ("cuda:0", "cuda:1", "cuda:1")
    assert args.tokenizer_path == "Qwen2.5-0.5B-Instruct" and args.reward_rules is None


LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                   "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                   "<|end_header_id|>\n\n{% endif %}")


def test_the_reward_model_reads_the_datas_chat_whatever_the_template(tmp_path):
    """A non-ChatML template (Llama 3's layout): the reward model gets the data row's chat, not the rendered
    text as one user message; ChatML prompts are read back as before."""
    from conftest import reward_of
    from dataset.lm_dataset import PromptCollator, RLAIFDataset
    rows = [{"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "无"}]},
            {"conversations": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "无"}]}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Recorder(torch.nn.Module):
        def get_scores(self, tokenizer, chats):
            seen.extend(chats)
            return [0.0] * len(chats)

    for template in (LLAMA3_TEMPLATE, None):  # None: the project's ChatML template
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        tokenizer.chat_template = template or tokenizer.chat_template
        dataset = RLAIFDataset(tmp_path / "chats.jsonl", tokenizer)
        batch = PromptCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
        assert ("<|start_header_id|>" in batch["prompts"][0]) == (template is not None)
        seen.clear()
        reward_of(Recorder(), rules="none")(batch["prompts"], ["Hello.", "4"], batch["answers"], batch["messages"])
        assert seen[0][:2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        assert seen[0][2:] == [{"role": "assistant", "content": "Hello."}]
        assert seen[1][-2:] == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_and_own_devices_with_a_transformers_policy(tiny_kit, tmp_path, dtype):
    """CPU autocast (float16 with its loss scaler), the critic and the reward model on devices of their own:
    the first ratio is still exactly 1 and the sampler's log-probs are the scoring forward's to autocast's
    precision."""
    folder = save_tiny_hf_model("llama", tmp_path / "llama", TOKENIZER)
    save_dir = tmp_path / "run"
    train_ppo.main(train_ppo.parse_args(hf_run_args(
        folder, save_dir, tiny_kit["data"], "--max_steps", "2", "--dtype", dtype, "--critic_device", "cpu",
        "--reward_device", "cpu", "--reward_model_path", tiny_kit["reward_model"])))
    steps = [m for m in read_metrics(save_dir) if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["first_minibatch_ratio_dev"] == 0.0 for m in steps)
    assert all(0 < m["sampler_logprob_gap"] < 0.05 for m in steps)  # autocast rounding, not another distribution
    assert ("loss_scale" in steps[0]) == (dtype == "float16") and all(m["skipped_steps"] == 0 for m in steps)


def test_two_ranks_train_a_transformers_policy_identically(tmp_path):
    """GPT-2 under torchrun (gloo): identical actor and critic weights on both ranks after every step."""
    folder, data, reward = gpt2_kit(tmp_path)
    torchrun("train", tmp_path, *hf_run_args(folder, tmp_path / "run", data, "--max_steps", "2", *reward))
    for rank in range(2):
        assert json.load(open(tmp_path / f"checks_rank{rank}.json")) == [True, True]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_sampling_stops_at_any_of_the_models_eos_ids():
    """A generation config listing two EOS ids (Llama 3's <|eot_id|> beside <|end_of_text|>): the sampler stops at
    the second as transformers' generate does; masks and the EOS flag follow."""
    from model.loading import load_tokenizer
    from model.sampling import ends_with_stop, stop_token_ids
    model = tiny_hf_model("llama").eval()
    ids, mask = left_padded_prompts()
    P, N = ids.shape[1], 12
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=0)[:, P:]
    row1 = free[1].tolist()
    stop = next(j for j in range(2, N) if row1[j] not in row1[:j])
    model.generation_config.eos_token_id = [2, row1[stop]]  # the tokenizer's EOS, and the end-of-turn token
    tokenizer = load_tokenizer(TOKENIZER)
    stop_ids = stop_token_ids(model, tokenizer)
    assert stop_ids.tolist() == sorted({2, row1[stop]})
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=0)[:, P:]
    got, got_mask, _ = sample_responses(model, ids, mask, N, stop_ids, 0, greedy=True)
    assert got_mask[1].sum() == stop + 1
    for row in range(len(ids)):
        n = int(got_mask[row].sum())
        assert got[row, :n].tolist() == want[row, :n].tolist(), row
    assert ends_with_stop(got, got_mask, stop_ids)[1] and not ends_with_stop(got, got_mask, torch.tensor([2]))[1]


def test_a_position_table_too_short_is_refused_and_rope_past_its_range_warned(tiny_kit, tmp_path, capsys):
    """GPT-2's learned positions end at n_positions: prompts + responses longer than that would index past the
    table mid-run, so the run stops at start-up naming the flags and the limit; a RoPE model only warns."""
    folder, data, reward = gpt2_kit(tmp_path)
    save_tiny_hf_model("gpt2", folder, TOKENIZER, chat=False, pad=False, positions=32)
    with pytest.raises(ValueError, match=r"--max_seq_len 32 \+ --max_gen_len 8 = 40 positions, but the policy "
                                         r"\(GPT2LMHeadModel\) was trained on 32, and its position table ends there"):
        train_ppo.main(train_ppo.parse_args(hf_run_args(folder, tmp_path / "run", data, "--max_steps", "1", *reward)))
    train_ppo.main(train_ppo.parse_args(hf_run_args(folder, tmp_path / "run", data, "--max_steps", "1",
                                                    "--max_seq_len", "24", *reward)))  # 24 + 8 fits
    llama = save_tiny_hf_model("llama", tmp_path / "llama", TOKENIZER, positions=32)
    capsys.readouterr()
    train_ppo.main(train_ppo.parse_args(hf_run_args(llama, tmp_path / "run2", tiny_kit["data"], "--max_steps", "1",
                                                    "--reward_model_path", tiny_kit["reward_model"])))
    assert "warning: --max_seq_len 32 + --max_gen_len 8 = 40 positions, but the policy (LlamaForCausalLM) was " \
           "trained on 32 (max_position_embeddings); it extrapolates beyond them" in capsys.readouterr().out


def test_a_transformers_moe_policy_adds_its_balance_loss_at_its_own_weight():
    """transformers returns Mixtral's raw balance loss and weighs it by router_aux_loss_coef in its own loss: the
    trainer's MoE loss term equals transformers' loss minus the cross-entropy, not the raw loss (1/coef larger)."""
    model = tiny_hf_model("mixtral", router_aux_loss_coef=0.02).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 6400, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with_balance = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        plain = model(ids, attention_mask=mask, labels=ids)
        aux = Policy(model)(ids, mask, 4, 1.0)[2]
    assert with_balance.aux_loss > 0.5  # the raw loss, ~1 for balanced routing
    assert aux.item() == pytest.approx((with_balance.loss - plain.loss).item(), rel=1e-4)
    assert aux.item() == pytest.approx(0.02 * with_balance.aux_loss.item(), rel=1e-4)


def test_two_ranks_train_a_moe_policy_whose_expert_gets_no_token(tiny_kit, tmp_path):
    """DDP with an expert that no token reaches (top-1 routing; expert 3's router row is the mean of experts 0 and
    1, so its logit is never the largest): with transformers 4.57's per-expert modules its weights get no
    gradient, which DDP refuses at the second step unless told to look for unused parameters."""
    model = tiny_hf_model("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = (layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe).gate  # transformers 5 / 4.57
            gate.weight[3] = (gate.weight[0] + gate.weight[1]) / 2
    folder = tmp_path / "mixtral"
    model.save_pretrained(folder)
    from model.loading import load_tokenizer
    load_tokenizer(TOKENIZER).save_pretrained(folder)
    torchrun("train", tmp_path, *hf_run_args(str(folder), tmp_path / "run", tiny_kit["data"], "--max_steps", "2",
                                             "--reward_model_path", tiny_kit["reward_model"]))
    for rank in range(2):
        assert json.load(open(tmp_path / f"checks_rank{rank}.json")) == [True, True]


@pytest.mark.parametrize("arch", ["llama", "minimind"])
def test_sampling_passes_the_cache_as_this_transformers_version_wants(arch, capfd):
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name is removed in 5.40): no deprecation
    warning under the newest 5.x, nor under 4.57 (where `past_key_values` is the name), for a transformers
    policy or MiniMind (whose output class is transformers')."""
    import warnings
    import transformers.utils.logging as hf_logging
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    hf_logging.warning_once.cache_clear()  # a warning already shown by another test would hide this one
    model = tiny_hf_model(arch) if arch != "minimind" else MiniMindForCausalLM(MiniMindConfig(hidden_size=32,
                                                                                             num_hidden_layers=1))
    ids, mask = left_padded_prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response, response_mask, _ = sample_responses(model.eval(), ids, mask, 6, 2, 0)
    assert response_mask.sum() > 0
    messages = [str(w.message) for w in caught] + capfd.readouterr().err.splitlines()
    assert not [m for m in messages if "deprecated" in m.lower()], messages


def test_the_closing_hint_runs_as_printed_after_a_transformers_run_on_plain_prompts(tmp_path, capsys):
    """The `next:` command of a GPT-2 run on plain prompts with a reward function runs as printed: eval_policy
    reads the run's data, reward and lengths from its run_args.json, shows only the metrics that apply (no
    MiniMind2 format), and reproduces the trainer's own final evaluation."""
    from scripts import eval_policy
    folder, data, reward = gpt2_kit(tmp_path)
    train_ppo.main(train_ppo.parse_args(hf_run_args(folder, tmp_path / "run", data, "--max_steps", "2",
                                                    "--eval_data_path", data, *reward)))
    hint = capsys.readouterr().out.split("next: ")[1].splitlines()[0].split()
    assert hint[:2] == ["python", str(ROOT / "scripts" / "eval_policy.py")]  # works from any folder
    results = eval_policy.main(hint[2:])
    final = [m for m in read_metrics(tmp_path / "run") if "eval_eos_rate" in m][-1]
    assert "format" not in results["trained"] and "eval_format" not in final
    assert results["trained"]["response_len"] <= 8  # the run's --max_gen_len, not eval_policy's own default
    for key in ("reward", "response_len", "eos_rate"):
        assert results["trained"][key] == pytest.approx(final[f"eval_{key}"], rel=1e-5), key
    # a MiniMind base beside the transformers policy: each scored as the trainer would score it (the run has a
    # --reward_fn, so no rules for either unless named)
    both = eval_policy.main(["--base", str(ROOT / "demo" / "full_sft_128.pth"), "--trained", hint[5], "--limit", "4"])
    assert (both["base"]["rules"], both["trained"]["rules"]) == ("none", "none")
    alone = eval_policy.main(hint[2:] + ["--limit", "4"])["trained"]
    assert both["trained"]["reward"] == pytest.approx(alone["reward"])


def test_readme_download_and_data_commands_run_after_the_readmes_install():
    """Every `hf` and `python -c` line of the README's shell blocks can run after `pip install -r requirements.txt`:
    the Hub CLI knows the subcommand and its flags (checked offline with --help), and the one-liners compile and
    import only installed packages."""
    import ast
    import importlib.util
    import shlex
    import subprocess
    text = open(ROOT / "README.md", encoding="utf-8").read()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    hub = [shlex.split(line) for line in lines if line.startswith("hf ")]
    one_liners = [shlex.split(line)[2] for line in lines if line.startswith("python -c ")]
    assert hub and one_liners
    cli = "import sys; from huggingface_hub.cli.hf import main; sys.argv[0] = 'hf'; sys.exit(main())"
    for command in hub:  # the `hf` of this interpreter's huggingface_hub (a venv's bin/ may not be on PATH)
        help_text = subprocess.run([sys.executable, "-c", cli, command[1], "--help"], capture_output=True, text=True,
                                   timeout=60)
        assert help_text.returncode == 0, help_text.stderr
        assert all(flag in help_text.stdout for flag in command if flag.startswith("--")), command
    for code in one_liners:
        tree = ast.parse(code)
        modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert modules and all(importlib.util.find_spec(m) for m in modules), modules


def test_the_tokenizer_check_speaks_to_a_transformers_user_of_their_own_folder(tiny_kit, tmp_path):
    """A transformers policy that does not read the given tokenizer (a random one reads none): the message points at
    the tokenizer saved in the model's own folder, not at a MiniMind checkout."""
    folder = save_tiny_hf_model("llama", tmp_path / "llama", TOKENIZER)
    flags = hf_run_args(folder, tmp_path / "run", tiny_kit["data"], "--max_steps", "1", "--reward_model_path",
                        tiny_kit["reward_model"])
    with pytest.raises(ValueError, match=r"a transformers model reads the tokenizer saved with it, in its own folder "
                                         r"\(\S+llama; the default when --tokenizer_path is not given\)") as error:
        train_ppo.main(train_ppo.parse_args([f for f in flags if f not in ("--check_tokenizer", "0")]))
    assert "MiniMind" not in str(error.value)
