"""What lets real sizes fit: gradient checkpointing, LoRA through peft (reference = the base with the adapter
off), no copy of the old actor, log-probs by chunks of the LM head, a critic started from a reward model."""
import copy
import json
import os

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import train_ppo
from children import finish, read_metrics, start, timeless, torchrun, wait_for
from conftest import ROOT, tiny_run_args
from hf_models import save_tiny_hf_model, tiny_hf_model
from model import policy as policy_module
from model.critic import build_critic
from model.lora import add_lora, adapter_layers, enable_gradient_checkpointing, keep_frozen_in, merged_state_dict
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.policy import Policy
from model.sampling import sample_responses
from trainer_utils import load_resume, load_state_dict_file, unwrap_model

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

TOKENIZER = str(ROOT / "model")


def tiny_lm(arch, seed=0):
    torch.manual_seed(seed)
    lm = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)) if arch == "minimind" \
        else tiny_hf_model(arch, seed=seed)
    return lm.eval()


def batch(seed=0, B=3, T=14, R=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 6400, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask, R


def loss_and_grads(policy, critic, ids, mask, R):
    """A PPO-shaped loss through the policy's log-probs and entropy and the critic's values; the gradients."""
    logprobs, entropy, _ = policy(ids, mask, R, 0.8, "grad")
    values = critic(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))[:, -R - 1:-1]
    (logprobs.sum() - 0.1 * entropy.sum() + (values ** 2).sum()).backward()
    return {n: p.grad.clone() for m in (policy, critic) for n, p in m.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("arch", ["minimind", "llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    lm = tiny_lm(arch)
    critic = build_critic(lm).eval()
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    lm2, critic2 = copy.deepcopy(lm), copy.deepcopy(critic)
    enable_gradient_checkpointing(lm2)
    enable_gradient_checkpointing(critic2.model)
    ids, mask, R = batch()
    plain = loss_and_grads(Policy(lm), critic, ids, mask, R)
    recomputed = {}

    class CountCheckpoints(TorchDispatchMode):  # the recomputation really happens: more forwards than blocks
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            recomputed[func] = recomputed.get(func, 0) + 1
            return func(*args, **(kwargs or {}))
    with CountCheckpoints():
        checkpointed = loss_and_grads(Policy(lm2), critic2, ids, mask, R)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name
    mm = sum(n for f, n in recomputed.items() if "mm" in str(f))
    with CountCheckpoints():
        recomputed.clear()
        loss_and_grads(Policy(lm), critic, ids, mask, R)
    assert mm > sum(n for f, n in recomputed.items() if "mm" in str(f))  # the blocks ran again in the backward


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "opt"])
def test_gradient_checkpointing_leaves_sampling_and_scoring_as_they_were(arch):
    """Checkpointing acts in the update's backward only: the tokens and log-probs of sampling, and the log-probs
    of the scoring forwards (without grad) and of the update's (with grad), equal the model's without it, exactly,
    and no module leaves eval mode. (Blocks flagged as training made transformers drop the key/value cache while
    sampling, and turned OPT's functional dropout on.)"""
    lm = tiny_lm(arch)
    lm2 = copy.deepcopy(lm)
    enable_gradient_checkpointing(lm2)
    assert not any(m.training for m in lm2.modules())
    ids, mask, R = batch()
    sampled = [sample_responses(model, ids, mask, 12, [2], 0, generator=torch.Generator().manual_seed(3))
               for model in (lm, lm2)]
    for plain, recomputed in zip(*sampled):
        assert torch.equal(plain, recomputed)
    full = torch.cat([ids, sampled[0][0]], 1)
    full_mask = torch.cat([mask, sampled[0][1]], 1)
    with torch.no_grad():
        assert torch.equal(Policy(lm)(full, full_mask, 12)[0], Policy(lm2)(full, full_mask, 12)[0])
    assert torch.equal(Policy(lm)(full, full_mask, 12)[0], Policy(lm2)(full, full_mask, 12)[0])


def test_gradient_checkpointing_keeps_a_transformers_run_on_policy(tmp_path, tiny_kit):
    """A run of OPT (dropout 0.1 in its config) with --gradient_checkpointing 1: the sampler's log-probs are the
    scoring forward's and the first ratio is exactly 1."""
    folder = save_tiny_hf_model("opt", tmp_path / "opt", TOKENIZER)
    train_ppo.main(train_ppo.parse_args([
        "--from_weight", folder, "--reward_model_path", tiny_kit["reward_model"], "--data_path", tiny_kit["data"],
        "--save_dir", str(tmp_path / "out"), "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "8",
        "--max_steps", "2", "--device", "cpu", "--check_tokenizer", "0", "--gradient_checkpointing", "1"]))
    for step in read_metrics(tmp_path / "out"):
        assert step["sampler_logprob_gap"] < 1e-6 and step["first_minibatch_ratio_dev"] == 0.0, step


def test_gradient_checkpointing_resume_is_exact(tiny_kit, tmp_path):
    """A checkpointed run stopped after 2 steps and resumed ends as the uninterrupted one, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ["--max_steps", "4", "--gradient_checkpointing", "1"]
    train_ppo.main(train_ppo.parse_args(tiny_run_args(tiny_kit, full, *flags)))
    os.makedirs(part / "checkpoints")
    os.link(full / "checkpoints" / "ppo_actor_64_resume.1.pth", part / "checkpoints" / "ppo_actor_64_resume.pth")
    train_ppo.main(train_ppo.parse_args(tiny_run_args(tiny_kit, part, *flags, "--from_resume", "1")))
    a, b = load_state_dict_file(full / "ppo_actor_64.pth"), load_state_dict_file(part / "ppo_actor_64.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- log-probs that fit
@pytest.mark.parametrize("arch", ["minimind", "llama", "gpt2"])
def test_chunked_logprobs_equal_the_full_computation_and_never_hold_all_logits(arch, monkeypatch):
    """Log-probs, entropy and their gradients by chunks of 2 positions equal those of full logits [B, R, V]
    through autograd in float64 (to float32 rounding), and no float tensor as large as [B, R, V] is ever made,
    forward or backward."""
    lm = tiny_lm(arch)
    ids, mask, R = batch(B=4, T=30, R=24)  # B * R > hidden: one [B, R, V] tensor outweighs a weight's gradient
    policy = Policy(lm)
    assert policy.chunked
    reference = copy.deepcopy(lm).double()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits = reference(ids, attention_mask=mask, position_ids=positions).logits[:, -R - 1:-1] / 0.8
    want_logp = logits.log_softmax(-1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    want_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    (want_logp.sum() - 0.1 * want_entropy.sum()).backward()
    want_grads = {n: p.grad for n, p in reference.named_parameters()}
    V = lm.get_output_embeddings().out_features
    monkeypatch.setattr(policy_module, "CHUNK_ELEMENTS", 4 * 2 * V)  # 2 positions per chunk
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t) and t.is_floating_point():
                    sizes.append(t.numel())
            return out
    with Sizes():
        logp, entropy, _ = policy(ids, mask, R, 0.8, "grad")
        (logp.sum() - 0.1 * entropy.sum()).backward()
    assert torch.allclose(logp.double(), want_logp, atol=1e-5) and torch.allclose(entropy.double(), want_entropy,
                                                                                  atol=1e-5)
    for n, p in lm.named_parameters():  # float32 autograd itself is 3e-6 to 7e-6 away from float64 here
        assert torch.allclose(p.grad.double(), want_grads[n], atol=2e-5, rtol=1e-4), n
    assert max(sizes) < 4 * R * V, (max(sizes), 4 * R * V)  # never one [B, R, V] tensor


@pytest.mark.parametrize("arch", ["minimind", "llama"])
def test_logits_within_the_budget_are_one_plain_head_with_the_same_numbers(arch, monkeypatch):
    """Where a micro-batch's float32 logits fit CHUNK_ELEMENTS, the head runs once and nothing is checkpointed
    (the backward recomputes no head); log-probs, entropy and gradients equal the chunked computation's."""
    ids, mask, R = batch(B=4, T=30, R=24)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = []
    for budget in (None, 4 * 2):  # the default budget (the logits fit), then 2 positions per chunk
        lm = tiny_lm(arch)
        V = lm.get_output_embeddings().out_features
        monkeypatch.setattr(policy_module, "CHUNK_ELEMENTS", budget * V if budget else policy_module.CHUNK_ELEMENTS)
        assert (4 * R * V <= policy_module.CHUNK_ELEMENTS) == (budget is None)
        calls.clear()
        logp, entropy, _ = Policy(lm)(ids, mask, R, 0.8, "grad")
        (logp.sum() - 0.1 * entropy.sum()).backward()
        results.append((logp, entropy, {n: p.grad for n, p in lm.named_parameters()}, len(calls)))
    (plain_logp, plain_entropy, plain_grads, plain_calls), (logp, entropy, grads, chunk_calls) = results
    assert plain_calls == 0 and chunk_calls == R // 2
    assert torch.allclose(plain_logp, logp, atol=1e-6) and torch.allclose(plain_entropy, entropy, atol=1e-5)
    for n in grads:
        assert torch.allclose(plain_grads[n], grads[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("entropy", ["none", "value", "grad"])
@pytest.mark.parametrize("temperature, dtype", [(1.0, torch.float32), (0.7, torch.float32), (1.0, torch.bfloat16)])
def test_token_logprobs_backward_is_autograds_with_one_full_vocab_tensor(entropy, temperature, dtype):
    """token_logprobs' log-probs, entropy and gradients through a frozen LM head equal float64 log_softmax through
    autograd (a banned -inf logit included), while its backward makes no [B, R, V] tensor beyond the saved softmax
    it writes the gradient into (one more with the entropy in the loss); a second backward fails loudly."""
    g = torch.Generator().manual_seed(0)
    B, R, H, V = 3, 5, 16, 1000
    head = torch.nn.Linear(H, V).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias[7] = float("-inf")  # a banned token: p = 0
    head.to(dtype)
    hidden = torch.randn(B, R, H, generator=g).to(dtype)
    targets = torch.randint(8, V, (B, R), generator=g)
    weights, entropy_weights = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)

    reference = hidden.double().requires_grad_()
    log_p = (torch.nn.functional.linear(reference, head.weight.double(), head.bias.double()) / temperature
             ).log_softmax(-1)
    want_logp = log_p.gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    ((weights * want_logp).sum() + (entropy_weights * want_entropy).sum() * (entropy == "grad")).backward()

    full_vocab = []

    class FullVocab(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a)}
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t) and t.numel() == B * R * V and t.is_floating_point() \
                        and t.untyped_storage().data_ptr() not in inputs:  # a new tensor, not an in-place result
                    full_vocab.append(func)
            return out
    ours = hidden.clone().requires_grad_()
    logits = head(ours)
    with FullVocab():
        logp, ent = policy_module.token_logprobs(logits, torch.nn.Identity(), targets, temperature, entropy)
    del logits
    # the forward: z, the logits' float32 copy or tempered copy where there is one (a copy is tempered in place),
    # and p (z - shift, exponentiated and normalised in place), made in z's storage where z is a copy the backward
    # does not need; the entropy's sum is taken by eighths of the vocabulary
    cast = [torch.ops.aten._to_copy.default] if dtype != torch.float32 else []
    tempered = [torch.ops.aten.div.Tensor] if temperature != 1.0 and dtype == torch.float32 else []
    p_in_z = bool(cast + tempered) and entropy != "grad"
    assert full_vocab == cast + tempered + ([] if p_in_z else [torch.ops.aten.sub.Tensor]), full_vocab
    assert (ent is None) == (entropy == "none") and (ent is None or ent.requires_grad == (entropy == "grad"))
    loss = (weights * logp).sum() + ((entropy_weights * ent).sum() if entropy == "grad" else 0.0)
    full_vocab.clear()
    with FullVocab():
        loss.backward(retain_graph=True)
    expected = {"none": [], "value": [], "grad": [torch.ops.aten.sub.Tensor]}[entropy]  # z - E_p[z]
    assert full_vocab == expected + cast, full_vocab  # cast: the float32 gradient back to the head's dtype
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert torch.allclose(logp.double(), want_logp, **tol)
    if ent is not None:
        assert torch.isfinite(ent).all() and torch.allclose(ent.double(), want_entropy, **tol)
    assert ours.grad.dtype == dtype and torch.isfinite(ours.grad).all()
    assert torch.allclose(ours.grad.double(), reference.grad, **tol)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved softmax was consumed


# ----------------------------------------------------------------------------- LoRA
def lora_flags(kit, save_dir, *extra):
    return tiny_run_args(kit, save_dir, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-3", *extra)


def llama_lora_flags(folder, kit, save_dir, *extra):
    return ["--from_weight", folder, "--data_path", kit["data"], "--reward_model_path", kit["reward_model"],
            "--save_dir", str(save_dir), "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "8",
            "--max_seq_len", "80", "--device", "cpu", "--seed", "1", "--check_tokenizer", "0", "--lora_rank", "4",
            "--lora_alpha", "8", "--learning_rate", "5e-3", *extra]


def test_lora_trains_the_adapter_only_and_the_reference_is_the_base(tiny_kit, tmp_path, capsys):
    """The reference is the actor's own LM with its adapter off (no copy); the old actor is the actor itself;
    two forwards agree (no adapter dropout); the start-up line counts the trained parameters; the base weights
    are unchanged by training; the adapter moved."""
    run = train_ppo.build_run(train_ppo.parse_args(lora_flags(tiny_kit, tmp_path, "--max_steps", "2")))
    actor = unwrap_model(run.learner.actor)
    assert run.ref_model.lm is actor.lm and run.ref_model.adapters_off and run.old_actor is actor
    trained = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    out = capsys.readouterr().out
    n_trained = sum(p.numel() for m in (actor, run.learner.critic) for p in m.parameters() if p.requires_grad)
    assert f"LoRA rank 4); trained parameters (actor + critic): {n_trained / 1e6:.2f}M" in out
    ids, mask, R = batch()
    base = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
    base.load_state_dict(load_state_dict_file(tiny_kit["actor"]))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(run.ref_model(ids, mask, R)[0], Policy(base)(ids, mask, R)[0])
        assert torch.equal(actor(ids, mask, R)[0], actor(ids, mask, R)[0])  # no dropout
    train_ppo.finish(run, train_ppo.train(run))
    merged = merged_state_dict(actor.lm)
    assert merged.keys() == base_state.keys()  # MiniMind's own key names
    moved = [k for k in merged if not torch.equal(merged[k], base_state[k].float())]
    assert moved and all(k.endswith("_proj.weight") for k in moved)  # only adapted layers differ
    state = actor.lm.state_dict()
    for k, v in base_state.items():  # the base itself untouched
        assert torch.equal(state[k.replace("_proj.weight", "_proj.base_layer.weight")], v.float()), k


@pytest.mark.parametrize("arch", ["minimind", "llama", "mixtral"])
def test_lora_saves_an_adapter_peft_loads_and_the_merged_policy(arch, tiny_kit, tmp_path):
    """{save_weight}_lora/ loaded onto the base with peft gives the trainer's logits; the merged policy (MiniMind's
    .pth with MiniMind's keys, MiniMind's --save_hf export, or the transformers folder) equals base + adapter.
    Mixtral: under transformers 5 peft wraps its fused experts and routers as single parameters (ParamWrapper),
    merged and saved too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    if arch == "minimind":
        flags = lora_flags(tiny_kit, tmp_path / "run", "--max_steps", "2", "--save_hf", "1")
        base_path = tiny_kit["actor"]
    else:
        base_path = save_tiny_hf_model(arch, tmp_path / arch, TOKENIZER)
        flags = llama_lora_flags(base_path, tiny_kit, tmp_path / "run", "--max_steps", "2")
    run = train_ppo.build_run(train_ppo.parse_args(flags))
    train_ppo.finish(run, train_ppo.train(run))
    ids, mask, R = batch()
    lm = unwrap_model(run.learner.actor).lm
    with torch.no_grad():
        want = lm(ids, attention_mask=mask).logits

        def fresh_base():
            if arch != "minimind":
                return AutoModelForCausalLM.from_pretrained(base_path).eval()
            model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
            model.load_state_dict(load_state_dict_file(base_path))
            return model.float()
        saved = json.load(open(tmp_path / "run" / "ppo_actor_lora" / "adapter_config.json"))
        assert saved["task_type"] == (None if arch == "minimind" else "CAUSAL_LM")
        adapter = PeftModel.from_pretrained(fresh_base(), tmp_path / "run" / "ppo_actor_lora").eval()
        assert torch.allclose(adapter(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)
        if arch == "minimind":
            merged = fresh_base()
            merged.load_state_dict({k: v.float() for k, v in load_state_dict_file(tmp_path / "run" /
                                                                                 "ppo_actor_64.pth").items()})
            tolerance = 5e-2  # the .pth is float16, as MiniMind's
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo_actor_64_hf").eval()  # float32
            assert (exported(ids, attention_mask=mask).logits - want).abs().max() < 1e-5
        else:
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo_actor_hf").eval()
            tolerance = 1e-5
        assert (merged(ids, attention_mask=mask).logits - want).abs().max() < tolerance
        assert (fresh_base()(ids, attention_mask=mask).logits - want).abs().max() > 2 * tolerance  # it trained


def test_lora_sigkill_then_resume_is_bit_exact(tiny_kit, forkserver, tmp_path):
    argv = lambda save_dir, *extra: lora_flags(tiny_kit, save_dir, "--max_steps", "5", "--save_interval", "1", *extra)
    reference, log = tmp_path / "reference", tmp_path / "log_ref"
    assert finish(start(forkserver, argv(reference), log), log) == 0, open(log).read()[-2000:]
    save_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(forkserver, argv(save_dir), log)
    wait_for(proc, log, lambda: (save_dir / "metrics.jsonl").exists() and len(read_metrics(save_dir)) >= 3,
             "3 steps")
    proc.kill()
    finish(proc, log)
    log = tmp_path / "log2"
    assert finish(start(forkserver, argv(save_dir, "--from_resume", "1"), log), log) == 0, open(log).read()[-2000:]
    assert list(map(timeless, read_metrics(save_dir))) == list(map(timeless, read_metrics(reference)))
    a, _ = load_resume(str(save_dir / "checkpoints" / "ppo_actor_64_resume.pth"))
    b, _ = load_resume(str(reference / "checkpoints" / "ppo_actor_64_resume.pth"))
    assert a["model"].keys() == b["model"].keys() and all(".lora_" in k for k in a["model"])  # adapters only
    for key in ("model", "critic_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    assert json.load(open(save_dir / "ppo_actor_lora" / "adapter_config.json"))["r"] == 4


@pytest.mark.parametrize("flag, value", [("--lora_alpha", "16"), ("--lora_target_modules", "q_proj,v_proj"),
                                         ("--lora_critic", "0")])
def test_resume_refuses_a_changed_lora_flag(tiny_kit, tmp_path, flag, value):
    """The adapters' scale and places change the function trained: a resume with another value stops, naming it
    (a changed --lora_alpha used to rescale every update silently)."""
    run = train_ppo.build_run(train_ppo.parse_args(lora_flags(tiny_kit, tmp_path, "--max_steps", "1")))
    train_ppo.finish(run, train_ppo.train(run))
    saved = json.load(open(tmp_path / "run_args.json"))[flag[2:]]
    with pytest.raises(ValueError, match=rf"resume file was written with {flag} {saved}, this run has {flag} "
                                         rf"{type(saved)(value)}"):
        train_ppo.build_run(train_ppo.parse_args(lora_flags(tiny_kit, tmp_path, "--max_steps", "2",
                                                            "--from_resume", "1", flag, value)))


def storages(*models):
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}


def test_a_lora_critic_and_the_old_actor_share_the_actors_frozen_base(tiny_kit, tmp_path):
    """With LoRA, actor, reference, old actor (--update_old_actor_freq 2) and critic hold one base: the
    parameter storages of all of them are the actor's plus the critic's adapters and value head, and the old
    actor's adapters."""
    run = train_ppo.build_run(train_ppo.parse_args(lora_flags(tiny_kit, tmp_path, "--max_steps", "1",
                                                              "--update_old_actor_freq", "2")))
    actor, critic, old = unwrap_model(run.learner.actor), unwrap_model(run.learner.critic), run.old_actor
    trained_critic = [p for p in critic.parameters() if p.requires_grad]
    old_adapters = [p for n, p in old.named_parameters() if ".lora_" in n]
    assert len(storages(actor, run.ref_model, critic, old)) == \
        len(storages(actor)) + len(trained_critic) + len(old_adapters)
    assert all(not p.requires_grad for n, p in critic.model.named_parameters() if ".lora_" not in n)
    train_ppo.finish(run, train_ppo.train(run))  # and it trains


def test_a_critic_on_the_shared_base_computes_what_a_copied_one_does():
    """share_base changes where the critic's base lives, not what it computes: values and gradients (adapters,
    value head, and none for the frozen base) equal those of a critic on a copy of the base."""
    results = []
    for share in (False, True):
        lm = tiny_lm("minimind")
        critic = build_critic(lm, share_base=share).eval()
        torch.manual_seed(1)
        add_lora(lm, 4, 8)
        add_lora(critic.model, 4, 8)
        torch.manual_seed(2)
        for model in (lm, critic):
            for name, p in model.named_parameters():
                if "lora_B" in name or "value_head" in name:
                    torch.nn.init.normal_(p, std=0.05)
        results.append(loss_and_grads(Policy(lm), critic, *batch()))
    plain, shared = results
    assert plain.keys() == shared.keys() and all(".lora_" in k or "value_head" in k for k in plain)
    for name in plain:
        assert torch.equal(plain[name], shared[name]), name


def test_a_copy_of_a_checkpointed_model_runs_its_own_weights():
    """Gradient checkpointing wraps each block's forward; a deep copy (the old actor with
    --update_old_actor_freq > 1) must run the copy's blocks, not the original's."""
    lm = tiny_lm("minimind")
    enable_gradient_checkpointing(lm)
    old = train_ppo.frozen_copy(lm)
    ids, mask, R = batch()
    with torch.no_grad():
        before = Policy(lm)(ids, mask, R)[0]
        for p in lm.parameters():
            p.add_(0.01)
        assert torch.equal(Policy(old)(ids, mask, R)[0], before)
        assert not torch.allclose(Policy(lm)(ids, mask, R)[0], before)


def test_lora_under_two_ranks_equals_one_process(tmp_path):
    """One PPO update of a LoRA policy (and LoRA critic) on two gloo ranks equals the update of one process on
    the whole batch."""
    from ddp_worker import fixed_rollout, one_update, tiny_models, update_args
    torchrun("update", tmp_path, "minimind-lora")
    ddp = torch.load(tmp_path / "ddp_update.pt", weights_only=True)
    actor, critic = tiny_models("minimind-lora")
    actor_sd, critic_sd = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5), update_args(4))
    lora_keys = [k for k in actor_sd if ".lora_" in k]
    assert lora_keys and any(not torch.equal(actor_sd[k], tiny_models("minimind-lora")[0].state_dict()[k])
                             for k in lora_keys if "lora_B" in k)  # the update moved the adapter
    for name, ref, got in [("actor", actor_sd, ddp["actor"]), ("critic", critic_sd, ddp["critic"])]:
        for k in ref:
            assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=1e-5), (name, k)


@pytest.mark.parametrize("arch", ["minimind", "gpt2", "qwen2", "llama"])
def test_frozen_weights_in_the_compute_precision_give_the_policy_exactly(arch):
    """keep_frozen_in (CUDA with --dtype bfloat16; here under CPU autocast, which casts the same ops): a frozen
    reference with its linear layers in bfloat16 gives the float32 policy's log-probs bit for bit, so the first
    KL is exactly 0; embeddings (a tied head: Qwen2, MiniMind), norms and trained parameters stay float32."""
    lm = tiny_lm(arch)
    reference = keep_frozen_in(copy.deepcopy(lm).requires_grad_(False), torch.bfloat16)
    low = [n for n, p in reference.named_parameters() if p.dtype == torch.bfloat16]
    assert low and all("norm" not in n and "embed" not in n and "wte" not in n and "wpe" not in n for n in low)
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    ids, mask, R = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(Policy(reference)(ids, mask, R)[0], Policy(lm)(ids, mask, R)[0])


def test_lora_merged_in_float32_keeps_a_small_update_over_a_bfloat16_base():
    """With the LoRA base in bfloat16 (keep_frozen_in), the merged weights are base + B A summed in float32 and
    returned in float32: an update far below bfloat16's resolution survives (in bfloat16 it rounds away)."""
    lm = tiny_lm("llama")
    add_lora(lm, 4, 8)
    keep_frozen_in(lm, torch.bfloat16)
    for layer in adapter_layers(lm):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=1e-4)
    merged = merged_state_dict(lm)
    assert all(v.dtype == torch.float32 for v in merged.values() if v.is_floating_point())
    layer = lm.model.layers[0].self_attn.q_proj
    base, delta = layer.base_layer.weight, layer.get_delta_weight("default")
    assert base.dtype == torch.bfloat16
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"] - base.float(), delta, atol=1e-7)
    kept_in_bf16 = (base + delta.to(torch.bfloat16)).float() - base.float()
    assert (kept_in_bf16 == 0).float().mean() > 0.3  # what merging in bfloat16 did


def test_merged_straight_into_float16_keeps_tied_weights_one_tensor():
    """MiniMind's float16 .pth: merged_state_dict(dtype=float16) gives the float32 merge cast to float16, and a
    tied embedding and head stay one tensor (the file stores them once, as before)."""
    lm = tiny_lm("minimind")
    add_lora(lm, 4, 8)
    for layer in adapter_layers(lm):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    full, half = merged_state_dict(lm), merged_state_dict(lm, torch.float16)
    assert full.keys() == half.keys()
    for k in full:
        assert half[k].dtype == (torch.float16 if full[k].is_floating_point() else full[k].dtype)
        assert torch.equal(half[k], full[k].to(half[k].dtype)), k
    assert half["lm_head.weight"] is half["model.embed_tokens.weight"]


def test_reference_fingerprint_by_chunks_is_the_float64_sum():
    from checkpoint import tensor_sums
    t = torch.randn(1000, 37)
    want = torch.tensor([t.double().sum().item(), t.double().abs().sum().item()], dtype=torch.float64)
    assert torch.allclose(tensor_sums(t, chunk=1000), want, rtol=1e-12, atol=1e-9)
    assert torch.allclose(tensor_sums(t.to(torch.bfloat16)), torch.tensor(
        [t.to(torch.bfloat16).double().sum().item(), t.to(torch.bfloat16).double().abs().sum().item()],
        dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_transformers_folders_are_written_in_bounded_shards(tmp_path, monkeypatch):
    """save_hf_folder writes shards of at most MAX_SHARD_SIZE (safetensors serialises a shard at once: the save's
    transient is one shard, not the model); transformers loads the sharded folder back to the same model."""
    import trainer_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = tiny_lm("llama")
    monkeypatch.setattr(trainer_utils, "MAX_SHARD_SIZE", "200KB")
    trainer_utils.save_hf_folder(lm, AutoTokenizer.from_pretrained(TOKENIZER), tmp_path / "out")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    largest = max(v.numel() * v.element_size() for v in lm.state_dict().values())  # a tensor is never split
    assert max((tmp_path / "out" / name).stat().st_size for name in shards) < max(200_000, largest) + 50_000
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, lm(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_a_lora_policy_is_saved_merged_one_weight_at_a_time(arch, tmp_path, monkeypatch):
    """save_hf_folder of a LoRA model writes what peft's merge_and_unload + save_pretrained write: the same keys,
    dtypes and values (float32 rounding), in several shards, and from_pretrained loads it to the merged model's
    logits. Llama (untied), Qwen2 (tied embedding and head) and GPT-2 (Conv1D, stored transposed) are patched in
    place, with no merged state dict of the model (merged_state_dict is never called); where save_pretrained
    writes an adapted weight under other names (transformers 5 splits Mixtral's fused experts) the folder is
    written from merged_state_dict instead."""
    import safetensors.torch
    import model.lora as lora
    import trainer_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = tiny_lm(arch)
    peft_model = add_lora(lm, 4, 8)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    reference = copy.deepcopy(peft_model).merge_and_unload()  # peft's own merge
    monkeypatch.setattr(trainer_utils, "MAX_SHARD_SIZE", "50KB")
    calls, real = [], lora.merged_state_dict
    monkeypatch.setattr(lora, "merged_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer_utils.save_hf_folder(lm, AutoTokenizer.from_pretrained(TOKENIZER), tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft", max_shard_size="50KB")

    def tensors(folder):
        files = sorted(folder.glob("*.safetensors"))
        return len(files), {k: v for f in files for k, v in safetensors.torch.load_file(f).items()}
    (n_ours, ours), (_, theirs) = tensors(tmp_path / "ours"), tensors(tmp_path / "peft")
    assert n_ours > 2 and ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
    renamed = not set(lora.lora_layers(lm)) <= set(theirs)
    assert bool(calls) == renamed and renamed == (arch == "mixtral" and TRANSFORMERS_5)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits,
                              atol=1e-5)


# ----------------------------------------------------------------------------- a critic from a reward model
def test_a_critic_from_a_reward_model_starts_at_its_scores():
    """--critic_weight naming a reward-model folder: the backbone and its score head become the critic, so its first
    values are the reward model's scores of each prefix (InstructGPT's initialisation)."""
    from transformers import AutoModelForSequenceClassification
    from model.loading import load_tokenizer
    folder = ROOT / "demo" / "reward_model"
    rm = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    actor = MiniMindForCausalLM(MiniMindConfig(hidden_size=128, num_hidden_layers=4))
    critic = build_critic(actor, str(folder), load_tokenizer(TOKENIZER)).eval()
    ids = torch.randint(3, 6400, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = critic(ids, mask, (mask.cumsum(-1) - 1))
        scores = torch.stack([rm(ids[:, :t + 1], attention_mask=mask[:, :t + 1]).logits[:, 0] for t in range(9)], 1)
    assert torch.allclose(values, scores, atol=1e-5)
    assert values.abs().max() > 0.1  # not a zero head
