"""Critic-free advantage estimators (GRPO, Dr.GRPO, RLOO, REINFORCE++ and its baseline) and loss aggregation,
against hand-computed groups and minibatches; N ranks take the step one process takes; resume stays exact."""
import json
import math
import os

import pytest
import torch

import train_ppo
from children import assert_resume_from_step_2_is_exact, torchrun
from conftest import tiny_run_args
from core_algos import aggregate_loss, group_advantages, LOSS_AGG_MODES
from train_ppo import add_advantages, Experience


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def read_metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- advantages, by hand
# scores of three groups: [1, 2, 3, 6] (mean 3, unbiased std sqrt(14/3)), [5, 5] (equal), [4] (a group of one)
SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 4.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2])
STD = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)


@pytest.mark.parametrize("estimator,want", [
    ("grpo", [-2 / (STD + 1e-6), -1 / (STD + 1e-6), 0.0, 3 / (STD + 1e-6), 0.0, 0.0, 4 / (1 + 1e-6)]),
    ("dr_grpo", [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 4.0]),
    # the mean of the OTHER responses: 1 - (2+3+6)/3, 2 - (1+3+6)/3, ...; a group of one has no baseline
    ("rloo", [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0.0, 0.0, 4.0]),
    ("reinforce_pp_baseline", [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 4.0]),
])
def test_group_advantages_hand_computed(estimator, want):
    got = group_advantages(SCORES, GROUPS, estimator)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), got
    shuffled = torch.randperm(7, generator=torch.Generator().manual_seed(0))  # groups need not be contiguous
    assert torch.allclose(group_advantages(SCORES[shuffled], GROUPS[shuffled], estimator), got[shuffled])


def experience(token_rewards, mask, scores=None, groups=None):
    return Experience(input_ids=None, attention_mask=None, response_mask=mask, old_logprobs=None, ref_logprobs=None,
                      values=torch.zeros_like(mask), token_rewards=token_rewards, scores=scores, groups=groups)


def test_estimators_on_ragged_responses():
    """Each response's one advantage goes to each of its tokens, none past its end; reinforce_pp_baseline's are
    then whitened over the batch's tokens; reinforce_pp whitens the returns-to-go of the token rewards."""
    lengths = [3, 1, 4, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in lengths])
    scores, groups = torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1])
    token_rewards = torch.zeros(4, 4)
    for row, n in enumerate(lengths):
        token_rewards[row, :n] = -0.1  # a KL penalty per token
        token_rewards[row, n - 1] += scores[row]  # the score at the last real token
    exp = experience(token_rewards, mask, scores, groups)
    add_advantages(exp, "dr_grpo", 1.0, 0.95)
    assert torch.equal(exp.advantages, torch.tensor([[-1.0] * 3 + [0.0], [1.0, 0, 0, 0], [0.0] * 4, [0.0] * 4]))
    add_advantages(exp, "reinforce_pp_baseline", 1.0, 0.95)
    raw = torch.tensor([-1.0, -1, -1, 1, 0, 0, 0, 0, 0, 0])  # each response's r - mean_g, on its 10 tokens
    whitened = (raw - raw.mean()) / math.sqrt(raw.var(unbiased=True) + 1e-8)
    assert torch.allclose(exp.advantages[mask.bool()], whitened, atol=1e-6)
    assert torch.equal(exp.raw_advantages[mask.bool()], raw)
    add_advantages(exp, "reinforce_pp", 0.9, 0.95)  # gamma 0.9; lambda does not apply
    returns = torch.zeros(4, 4)
    for row, n in enumerate(lengths):  # returns-to-go by a loop: G_t = r_t + gamma * G_{t+1}
        later = 0.0
        for t in reversed(range(n)):
            later = token_rewards[row, t].item() + 0.9 * later
            returns[row, t] = later
    assert torch.allclose(exp.raw_advantages, returns, atol=1e-6)
    real = returns[mask.bool()]
    assert torch.allclose(exp.advantages[mask.bool()], (real - real.mean()) / math.sqrt(real.var() + 1e-8), atol=1e-5)
    assert (exp.advantages[~mask.bool()] == 0).all()


# ----------------------------------------------------------------------------- loss aggregation, by hand
LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 6.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
HAND = {  # over the whole minibatch of 4 responses, 10 tokens, max length 4
    "token-mean": (6 + 4 + 4 + 8) / 10,
    "seq-mean-token-mean": (6 / 3 + 4 / 1 + 4 / 4 + 8 / 2) / 4,
    "seq-mean-token-sum": (6 + 4 + 4 + 8) / 4,
    "seq-mean-token-sum-norm": (6 + 4 + 4 + 8) / (4 * 4),
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_aggregation_split_over_micro_batches_and_ranks_is_the_minibatch_loss(mode):
    """Two ranks with two micro-batches of one response each: the parts each rank backpropagates (its share times
    the world size, averaged by DDP) add up to the hand-computed loss of the whole minibatch."""
    world, total = 2, 0.0
    for rank in range(world):
        for micro in ([rank * 2], [rank * 2 + 1]):
            total += world * aggregate_loss(LOSS[micro], MASK[micro], mode, n_tokens=10, n_responses=4, max_len=4)
    assert total / world == pytest.approx(HAND[mode])
    assert aggregate_loss(LOSS, MASK, mode, 10, 4, 4) == pytest.approx(HAND[mode])


@pytest.mark.parametrize("flags", [["--adv_estimator", "grpo"], ["--adv_estimator", "rloo", "--loss_agg_mode",
                                                                   "seq-mean-token-mean"],
                                   ["--adv_estimator", "reinforce_pp_baseline", "--loss_agg_mode",
                                    "seq-mean-token-sum-norm"], ["--loss_agg_mode", "seq-mean-token-sum"]])
def test_two_ranks_take_the_step_of_one_process_with_groups(tmp_path, flags):
    """Responses in groups of 2 (each group on one rank), two gloo ranks with two micro-batches each: one
    update equals one process's on the whole batch, for critic-free estimators and loss aggregations."""
    from ddp_worker import fixed_rollout, one_update, tiny_models, update_args
    torchrun("update", tmp_path, "minimind", *flags)
    ddp = torch.load(tmp_path / "ddp_update.pt", weights_only=True)
    actor, critic = tiny_models("minimind")
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    actor_sd, critic_sd = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5), update_args(4, 1, *flags))
    assert max((actor_sd[k] - before[k]).abs().max().item() for k in before) > 1e-4
    assert (critic_sd is None) == ("--adv_estimator" in flags) == (ddp["critic"] is None)
    for name, ref, got in [("actor", actor_sd, ddp["actor"]), ("critic", critic_sd or {}, ddp["critic"] or {})]:
        for k in ref:
            assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=1e-5), (name, k)


# ----------------------------------------------------------------------------- in the trainer
def test_grpo_run_builds_no_critic_logs_what_each_sample_was_credited_with_and_resumes_exactly(tiny_kit, tmp_path,
                                                                                                capsys):
    flags = ["--adv_estimator", "grpo", "--n_samples_per_prompt", "2", "--batch_size", "2", "--mini_batch_size", "2",
             "--max_steps", "4", "--log_samples", "4"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_run_args(tiny_kit, full, *flags))
    out = capsys.readouterr().out
    assert "trained parameters (actor; grpo: no critic)" in out and "x 2 responses (grpo, ppo loss)" in out
    metrics = read_metrics(full)
    assert all("value_loss" not in m and "value_explained_var" not in m and "critic_lr" not in m for m in metrics)
    samples = [json.loads(line) for line in open(full / "samples.jsonl")]
    for step in range(1, 5):
        rows = [s for s in samples if s["step"] == step]
        assert [s["group"] for s in rows] == [0, 0, 1, 1]  # each prompt twice, side by side
        assert rows[0]["prompt"] == rows[1]["prompt"] and rows[2]["prompt"] == rows[3]["prompt"]
        for pair in (rows[:2], rows[2:]):  # the advantage is the group's normalised score, by hand
            a, b = pair[0]["reward"], pair[1]["reward"]
            std = abs(a - b) / math.sqrt(2)
            want = 0.0 if a == b else (a - (a + b) / 2) / (std + 1e-6)
            assert pair[0]["advantage"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    state = torch.load(full / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    assert state["critic_model"] is None and state["n_samples_per_prompt"] == 2
    # stopped after 2 steps and resumed: the run that would have happened
    assert_resume_from_step_2_is_exact(run, tiny_run_args(tiny_kit, part, *flags), full, part, metrics)
    with pytest.raises(ValueError, match="resume file was written with --n_samples_per_prompt 2, this run has "
                                         "--n_samples_per_prompt 1"):
        run(tiny_run_args(tiny_kit, part, "--max_steps", "4", "--batch_size", "2", "--mini_batch_size", "2",
                          "--from_resume", "1"))


def test_estimator_flags_are_checked(capsys):
    for argv, message in [
        (["--adv_estimator", "grpo"], "--adv_estimator grpo compares the responses to a prompt with each other: it "
                                      "needs --n_samples_per_prompt >= 2, got 1"),
        (["--adv_estimator", "rloo", "--n_samples_per_prompt", "2", "--kl_mode", "reward"],
         "--kl_mode reward with --adv_estimator rloo"),
        (["--n_samples_per_prompt", "3", "--batch_size", "8", "--mini_batch_size", "16"],
         "--mini_batch_size 16 must divide the 24 responses of a rollout"),
        (["--adv_estimator", "grpo", "--n_samples_per_prompt", "2", "--critic_warmup_steps", "2"],
         "that estimator has no critic"),
    ]:
        with pytest.raises(SystemExit):
            train_ppo.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    args = train_ppo.parse_args(["--adv_estimator", "grpo", "--n_samples_per_prompt", "4", "--batch_size", "8"])
    assert (args.kl_mode, args.kl_estimator) == ("loss", "k3")  # verl's placement for GRPO
