"""train_ppo end to end on tiny models: files written, resume, ratio == 1, DDP equivalence."""
import json
import os
import shutil

import torch

import train_ppo
from conftest import tiny_run_args
from trainer_utils import load_resume, load_state_dict_file


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def read_metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]


def test_import_does_not_train():
    assert callable(train_ppo.main) and hasattr(train_ppo, "compute_advantages")


def test_end_to_end_writes_metrics_weights_and_resume(tiny_kit, tmp_path):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "3", "--save_hf", "1"))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["reward", "reward_format", "reward_tags", "reward_rm", "kl_ref", "approx_kl", "clipfrac",
                "policy_loss", "value_loss", "entropy", "value_explained_var", "advantage_mean", "advantage_std",
                "avg_response_len", "eos_rate", "actor_lr", "critic_lr", "rollout_tokens_per_s",
                "time_rollout_s", "time_reward_s", "time_update_s"]:
        assert all(key in m for m in metrics), key
    assert metrics[0]["optimizer_steps"] == 2 * 2  # ppo_epochs x minibatches
    assert metrics[0]["actor_lr"] < 5e-5  # cosine decay has started
    weights = load_state_dict_file(tmp_path / "ppo_actor_64.pth")
    assert all(v.dtype == torch.float16 for v in weights.values())
    state, _ = load_resume(str(tmp_path / "checkpoints" / "ppo_actor_64_resume.pth"))
    assert state["global_step"] == 3 and state["step"] == 3 and state["world_size"] == 1
    for key in ["model", "critic_model", "old_actor", "optimizer", "critic_optimizer", "scheduler",
                "critic_scheduler", "rng_states", "kl_coef", "wandb_id", "epoch"]:
        assert key in state, key
    assert (tmp_path / "run_args.json").exists() and (tmp_path / "train_ppo.py").exists()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_actor_64_hf")
    assert torch.allclose(hf.model.norm.weight.half(), weights["model.norm.weight"])


def test_resume_continues_where_it_stopped(tiny_kit, tmp_path):
    """Resuming from the step-2 checkpoint of a 4-step run reproduces its steps 3 and 4 exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_run_args(tiny_kit, full, "--max_steps", "4"))  # saves at steps 2 and 4, keeps both
    os.makedirs(part / "checkpoints")
    shutil.copy(full / "checkpoints" / "ppo_actor_64_resume.1.pth", part / "checkpoints" / "ppo_actor_64_resume.pth")
    run(tiny_run_args(tiny_kit, part, "--max_steps", "4", "--from_resume", "1"))
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [3, 4]
    for ma, mb in zip(a[2:], b):  # same data position, RNG, optimizer and scheduler state
        for key in ["reward", "kl_ref", "policy_loss", "value_loss", "actor_lr", "avg_response_len"]:
            assert ma[key] == mb[key], (ma["step"], key)
    wa = load_state_dict_file(full / "ppo_actor_64.pth")
    wb = load_state_dict_file(part / "ppo_actor_64.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_starts_fresh(tiny_kit, tmp_path, capsys):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_resume", "1"))
    assert "starting fresh" in capsys.readouterr().out
    assert len(read_metrics(tmp_path)) == 1


def test_first_ratio_is_exactly_one(tiny_kit):
    """With old actor == actor, the first minibatch's log-probs equal pi_old bit for bit."""
    args = train_ppo.parse_args(tiny_run_args(tiny_kit, "unused"))
    actor, tokenizer = train_ppo.init_model(args.from_weight, "", args.tokenizer_path, "cpu")
    old_actor, ref = train_ppo.frozen_copy(actor), train_ppo.frozen_copy(actor)
    critic = train_ppo.build_critic(actor)
    rm, rm_tok = train_ppo.load_reward_model(args.reward_model_path, "cpu", torch.float32)
    from dataset.lm_dataset import PromptCollator, RLAIFDataset
    ds = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len)
    batch = PromptCollator(tokenizer.pad_token_id)([ds[i] for i in range(4)])
    torch.manual_seed(0)
    orders = [torch.randperm(4) for _ in range(args.ppo_epochs)]
    import contextlib
    rollout = train_ppo.collect_rollout(batch, old_actor, ref, critic, rm, rm_tok, tokenizer, 0.02, orders, args,
                                        contextlib.nullcontext())
    R = rollout["response_mask"].shape[1]
    first = train_ppo.micro_batches(orders[0], args.mini_batch_size, args.accumulation_steps)[0][0]
    logprobs, _, _ = train_ppo.response_logprobs(actor, rollout["input_ids"][first], rollout["attention_mask"][first],
                                                 R, args.temperature)
    ratio = torch.exp(logprobs - rollout["old_logprobs"][first])
    assert torch.equal(ratio, torch.ones_like(ratio))
    # and the sampler's own log-probs describe the same distribution
    assert rollout["sampler_gap"] < 1e-5


def test_early_stop_takes_no_optimizer_step(tiny_kit, tmp_path):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "2", "--early_stop_kl", "1e-12", "--learning_rate", "1e-2"))
    metrics = read_metrics(tmp_path)
    # step 1: the first minibatch has approx_kl 0 (ratio 1) -> one step; the second exceeds 1e-12 -> stop
    assert metrics[0]["optimizer_steps"] == 1 and metrics[0]["early_stopped"] == 1


def test_plot_metrics_writes_png(tmp_path):
    import numpy as np
    from scripts.plot_metrics import main as plot_main, moving_average
    assert np.allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    keys = ["reward", "reward_format", "reward_tags", "reward_rm", "kl_ref", "entropy", "avg_response_len",
            "policy_loss", "value_loss"]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, **{k: step * 0.1 for k in keys}}) + "\n")
    plot_main([str(tmp_path / "metrics.jsonl")])
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
