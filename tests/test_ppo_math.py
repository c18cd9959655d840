"""The algorithm's core against brute-force loops and hand-computed cases."""
import math

import pytest
import torch

from conftest import reward_of
from reward import RewardModel, resolve_reward_dtype
from core_algos import compute_advantages, kl_penalty, masked_whiten, policy_loss_per_token, value_loss_per_token
from train_ppo import AdaptiveKLController, micro_batches, parse_args


def gae_brute_force(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_brute_force_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 13
    lengths = [13, 1, 7, 0, 10]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)  # garbage past the end must be ignored
    adv, ret = compute_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_brute_force(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5)
    assert torch.allclose(ret, ref_ret, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_computed():
    # one row, 2 tokens, gamma 1, lam 0.5: r = [0, 1], V = [0.5, 0.25]
    # delta1 = 1 - 0.25 = 0.75; delta0 = 0 + 0.25 - 0.5 = -0.25; A0 = -0.25 + 0.5 * 0.75 = 0.125
    adv, ret = compute_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]),
                                  torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 1.0]]))


def test_policy_loss_clipping_cases():
    eps = 0.2
    old = torch.zeros(6)
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0, 5.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -1.0])
    loss, r = policy_loss_per_token(ratio.log(), old, adv, eps)
    # A>0: min(r, 1+eps) * A taken pessimistically; A<0: max(r, 1-eps) * |A|
    expected = torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.0, 5.0])
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(r, ratio)
    dual, _ = policy_loss_per_token(ratio.log(), old, adv, eps, dual_clip_c=3.0)
    # dual clip caps the A<0 loss at c * |A|: only the ratio-5 token changes (5 -> 3)
    assert torch.allclose(dual, torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.0, 3.0]), atol=1e-6)


def test_log_ratio_is_clamped_before_exp():
    """ratio e^25 with A < 0: the loss is |A| * e^20 (log-ratio clamped to +-20, as verl/OpenRLHF), not e^25."""
    loss, ratio = policy_loss_per_token(torch.tensor([25.0, -25.0]), torch.zeros(2), torch.tensor([-2.0, 1.0]), 0.2)
    assert loss[0].item() == pytest.approx(2.0 * math.exp(20.0), rel=1e-6)
    assert ratio[0].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    assert ratio[1].item() == pytest.approx(math.exp(-20.0), rel=1e-6)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("value", ["0.5", "1", "1.0", "-3"])
def test_dual_clip_c_between_0_and_1_is_a_flag_error(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dual_clip_c", value])
    assert f"--dual_clip_c must be 0 (off) or > 1, got {float(value)}" in capsys.readouterr().err
    assert parse_args(["--dual_clip_c", "3"]).dual_clip_c == 3.0 and parse_args([]).dual_clip_c == 0.0


def test_value_loss_clipping_cases():
    old = torch.tensor([0.0, 0.0, 1.0])
    new = torch.tensor([1.0, 0.1, 0.0])
    ret = torch.tensor([1.0, 1.0, 0.0])
    loss = value_loss_per_token(new, old, ret, 0.2)
    # 0: unclipped err 0, clipped V 0.2 -> err 0.64 -> max 0.64 -> 0.32
    # 1: within range, both (0.9)^2 -> 0.405 ; 2: unclipped 0, clipped V 0.8 -> 0.64 -> 0.32
    assert torch.allclose(loss, torch.tensor([0.32, 0.405, 0.32]), atol=1e-6)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = torch.tensor([0.5, -1.0, 0.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), d)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * d ** 2)
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    assert torch.allclose(kl_penalty(logp, ref, "k3"), k3, atol=1e-6)
    huge = kl_penalty(torch.tensor([0.0]), torch.tensor([100.0]), "k3")
    assert torch.isfinite(huge).all() and huge.item() == 10.0  # clamped as verl does
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()


def test_masked_whiten_is_exact_when_the_mean_dwarfs_the_spread():
    """|mean| / std = 1000 in float32: E[x^2] - mean^2 lost the variance (0.13 off); two passes keep it."""
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(4, 64, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 64, generator=g) < 0.8).double()
    real = x[mask.bool()]
    want = ((x - real.mean()) / real.std()) * mask  # float64 reference
    got = masked_whiten(x.float(), mask.float())
    assert (got.double() - want).abs().max() < 1e-3
    assert got[mask.bool()].std().item() == pytest.approx(1.0, abs=1e-3)


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.allclose(w[mask.bool()], (real - real.mean()) / real.std(), atol=1e-6)
    assert (w[~mask.bool()] == 0).all()


def test_micro_batches_split_order():
    order = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    mbs = micro_batches(order, 4, 2)
    assert [[m.tolist() for m in mb] for mb in mbs] == [[[5, 2], [7, 0]], [[1, 3], [6, 4]]]


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10 / 100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    fixed = AdaptiveKLController(0.1, target=0.0, horizon=100)
    fixed.update(50.0, 10)
    assert fixed.value == 0.1


def test_reward_dtype_auto():
    """auto: float32 on CPU; on CUDA the config's own dtype, else bf16 where supported, else float32."""
    assert resolve_reward_dtype("auto", {"torch_dtype": "float16"}, "cpu") == torch.float32
    assert resolve_reward_dtype("auto", {"torch_dtype": "bfloat16"}, "cuda:0", bf16_supported=False) == torch.bfloat16
    assert resolve_reward_dtype("auto", {"dtype": "float32"}, "cuda", bf16_supported=True) == torch.float32
    assert resolve_reward_dtype("auto", {"torch_dtype": "float16"}, "cuda", bf16_supported=True) == torch.float16
    assert resolve_reward_dtype("auto", {}, "cuda", bf16_supported=True) == torch.bfloat16
    assert resolve_reward_dtype("auto", {}, "cuda", bf16_supported=False) == torch.float32
    assert resolve_reward_dtype("float16", {"torch_dtype": "bfloat16"}, "cuda") == torch.float16


class FakeBatchedRewardModel:
    """get_scores() interface (internlm2-reward): records the size of every padded batch it is given."""

    def __init__(self):
        self.calls = []

    def get_scores(self, tokenizer, chats):
        self.calls.append(len(chats))
        return [float(len(c[-1]["content"])) for c in chats]


def test_get_scores_is_called_in_chunks_of_reward_batch_size():
    rm = FakeBatchedRewardModel()
    chats = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * n}] for n in range(10)]
    scores = RewardModel(rm, None, "get_score").score(chats, batch_size=4)
    assert rm.calls == [4, 4, 2] and scores.tolist() == [float(n) for n in range(10)]
    # reasoning mode scores whole and answer-only chats: 2 x 3 responses in chunks of 4
    rm = FakeBatchedRewardModel()
    reward_of(rm, batch_size=4)([PROMPT] * 3, [GOOD] * 3)
    assert rm.calls == [4, 2]


class FakeRewardModel:
    """get_score() interface (internlm2-reward style): a score looked up from the reply text."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def get_score(self, tokenizer, chat):
        self.seen.append(chat)
        return self.table.get(chat[-1]["content"], 0.0)


PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
GOOD = "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"
GOOD_BLANK = "<think>\nadd\n</think>\n\n<answer>\n12\n</answer>"
NO_NEWLINE = "<think>7 + 5 = 12</think><answer>12</answer>"
DOUBLE_THINK = "<think>\n<think>\n</think>\n<answer>\n12\n</answer>"
PLAIN = "The answer is 12."
TRAILING = GOOD + " extra"


def test_reward_rules_and_blend():
    rm = FakeRewardModel({GOOD: 1.0, "12": 2.0, GOOD_BLANK: -1.0, NO_NEWLINE: 0.5, PLAIN: 10.0, TRAILING: 0.0,
                          DOUBLE_THINK: 0.0})
    responses = [GOOD, GOOD_BLANK, NO_NEWLINE, DOUBLE_THINK, PLAIN, TRAILING]
    total, parts = reward_of(rm)([PROMPT] * 6, responses)
    # the format regex is MiniMind's: a doubled <think> still fits it, the tag rule catches it
    assert parts["format"].tolist() == [0.5, 0.5, 0.0, 0.5, 0.0, 0.0]
    assert parts["tags"].tolist() == [1.0, 1.0, 1.0, 0.75, 0.0, 1.0]
    # answer span present: 0.4 * clip(full) + 0.6 * clip(answer-only "12" -> 2.0)
    expected_rm = [0.4 * 1.0 + 1.2, 0.4 * -1.0 + 1.2, 0.4 * 0.5 + 1.2, 0.0 + 1.2, 3.0, 0.0 + 1.2]
    assert torch.allclose(parts["rm"], torch.tensor(expected_rm), atol=1e-6)
    assert torch.allclose(total, parts["format"] + parts["tags"] + parts["rm"])
    # the chat given to the RM is recovered from the ChatML prompt
    assert rm.seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"},
                          {"role": "assistant", "content": GOOD}]
    assert rm.seen[-1][-1] == {"role": "assistant", "content": "12"}  # an answer-only chat


def test_reward_without_reasoning_is_clipped_rm_only():
    rm = FakeRewardModel({GOOD: -7.0, PLAIN: 1.5})
    total, parts = reward_of(rm, reasoning=False)([PROMPT] * 2, [GOOD, PLAIN])
    assert total.tolist() == [-3.0, 1.5]
    assert set(parts) == {"rm"} and len(rm.seen) == 2  # no rule parts, no answer-only scoring


def test_non_finite_reward_names_the_sample():
    rm = FakeRewardModel({PLAIN: float("nan")})
    with pytest.raises(ValueError, match=r"sample 1 .*'The answer is 12.'"):
        reward_of(rm)([PROMPT] * 2, [GOOD, PLAIN])


def test_entropy_of_the_scored_logits():
    from model.policy import token_logprobs

    def entropy(logits):
        return token_logprobs(logits, torch.nn.Identity(), torch.zeros(logits.shape[:-1], dtype=torch.long), 1.0,
                              "value")[1]
    uniform = torch.zeros(2, 3, 10)
    assert torch.allclose(entropy(uniform), torch.full((2, 3), math.log(10)))
    p = torch.tensor([0.7, 0.2, 0.1])
    assert torch.allclose(entropy(p.log()[None]), -(p * p.log()).sum(), atol=1e-6)
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])  # a banned token contributes nothing, not NaN
    assert torch.allclose(entropy(masked), torch.tensor(math.log(2)))


# ----------------------------------------------------------------------------- where the KL penalty goes
def expected_kl_gradient(logits, ref_logprobs, kl_mode, estimator, beta=0.1):
    """The expected gradient of the trainer's KL penalty over one token drawn from pi = softmax(logits), by exact
    enumeration of the vocabulary: the PPO loss at ratio 1 (pi_old = pi), each token weighted by pi(a).

    reward mode: token reward -beta * k(old, ref), turned into an advantage by GAE (no critic, gamma = lam = 1)
    and trained through the clipped surrogate, where it is a constant; loss mode: beta * k(logp, ref)
    differentiated by autograd, as ppo_update adds it."""
    theta = logits.clone().requires_grad_(True)
    logp = theta.log_softmax(-1)  # [V]: log pi(a) for every token a
    weights = logp.detach().exp()  # pi(a), the sampling probabilities
    old = logp.detach()
    if kl_mode == "reward":
        token_rewards = -beta * kl_penalty(old, ref_logprobs, estimator)[:, None]  # [V, 1]: one response per token
        zeros, ones = torch.zeros_like(token_rewards), torch.ones_like(token_rewards)
        advantages, _ = compute_advantages(token_rewards, zeros, ones, 1.0, 1.0)
        loss, _ = policy_loss_per_token(logp[:, None], old[:, None], advantages, 0.2)
    else:
        loss = beta * kl_penalty(logp, ref_logprobs, estimator)[:, None]
    (weights[:, None] * loss).sum().backward()
    return theta.grad


def kl_gradient(logits, ref_logprobs, reverse=False):
    """grad KL(pi||ref) (or KL(ref||pi)) with respect to the logits, by autograd of the exact sum."""
    theta = logits.clone().requires_grad_(True)
    logp = theta.log_softmax(-1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum() if reverse else (logp.exp() * (logp - ref_logprobs)).sum()
    kl.backward()
    return theta.grad


def cosine(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("kl_mode,estimator", [("reward", "k1"), ("loss", "k2"), ("loss", "k3")])
def test_sound_kl_placements_follow_the_gradient_of_a_kl(kl_mode, estimator):
    """By exact enumeration over an 8-token vocabulary: k1 in the reward and k2 in the loss give exactly
    beta * grad KL(pi||ref); k3 in the loss gives beta * grad KL(ref||pi), a divergence too, parallel to
    grad KL(pi||ref) to first order near the reference."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ref = torch.randn(8, generator=g, dtype=torch.float64).log_softmax(-1)
        # near the reference, and farther (within k3's clamp of 10, where its gradient is cut)
        logits = ref + torch.randn(8, generator=g, dtype=torch.float64) * (0.05 if trial < 10 else 0.7)
        got = expected_kl_gradient(logits, ref, kl_mode, estimator)
        forward = kl_gradient(logits, ref)
        if estimator == "k3":
            assert torch.allclose(got, 0.1 * kl_gradient(logits, ref, reverse=True), atol=1e-12)
            if trial < 10:  # near the reference the two KLs' gradients agree
                assert cosine(got, forward) > 0.99
            assert cosine(got, forward) > 0  # always a descent direction of KL(pi||ref) here
        else:
            assert torch.allclose(got, 0.1 * forward, atol=1e-12), (got, forward)


def test_k3_in_the_reward_does_not_follow_a_kl():
    """Why k2 / k3 in the reward get a warning: the expected gradient is not grad KL(pi||ref), and for some
    distributions it points away from the reference (the score-function term alone survives)."""
    g = torch.Generator().manual_seed(1)
    cosines = []
    for _ in range(200):
        ref = (torch.randn(8, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
        logits = ref + torch.randn(8, generator=g, dtype=torch.float64)
        cosines.append(cosine(expected_kl_gradient(logits, ref, "reward", "k3"), kl_gradient(logits, ref)))
    assert min(cosines) < 0 and max(cosines) < 0.9999  # neither parallel nor even always a descent direction


def test_unsound_kl_placements_are_refused_or_warned(capsys):
    from train_ppo import kl_placement_warning
    with pytest.raises(SystemExit):
        parse_args(["--kl_mode", "loss", "--kl_estimator", "k1"])
    err = capsys.readouterr().err
    assert "zero expected gradient" in err and "Sound pairs: k1 in the reward" in err and "k2 / k3 in the loss" in err
    for estimator in ("k2", "k3"):
        warning = kl_placement_warning("reward", estimator, 0.02)
        assert warning.startswith("warning:") and f"--kl_estimator {estimator} in the reward is biased" in warning
        assert "Sound pairs" in warning
    assert kl_placement_warning("reward", "k1", 0.02) is None
    assert kl_placement_warning("loss", "k3", 0.02) is None
    assert kl_placement_warning("reward", "k3", 0.0) is None  # no penalty, no bias


def test_advantage_mean_and_std_are_logged_before_whitening():
    """advantage_mean / advantage_std describe the raw GAE advantages (whitened ones are ~0 and ~1 by
    construction and say nothing): checked against the brute-force GAE loop."""
    from train_ppo import add_advantages, Experience, rollout_metrics
    g = torch.Generator().manual_seed(3)
    lengths = [5, 2, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    rewards, values = torch.randn(3, 5, generator=g) * mask + 2 * mask, torch.randn(3, 5, generator=g) * mask
    exp = Experience(input_ids=None, attention_mask=None, response_mask=mask, old_logprobs=None, ref_logprobs=None,
                     values=values, token_rewards=rewards, kl=torch.zeros(3, 5), scores=torch.zeros(3),
                     reward_parts={}, has_eos=torch.ones(3, dtype=torch.bool), sampler_gap=torch.tensor(0.0))
    add_advantages(exp, "gae", 1.0, 0.95)
    raw, _ = gae_brute_force(rewards, values, lengths, 1.0, 0.95)
    real = raw[mask.bool()]
    metrics = rollout_metrics(exp)
    assert metrics["advantage_mean"] == pytest.approx(real.mean().item(), rel=1e-5)
    assert metrics["advantage_std"] == pytest.approx(real.std(unbiased=False).item(), rel=1e-5)
    assert abs(metrics["advantage_mean"]) > 0.5  # visibly not the whitened mean


def test_the_default_kl_placement_is_a_sound_pair():
    """k1 in the reward, or k2 / k3 in the loss: whatever the estimator, the defaults pull towards the reference."""
    sound = {("reward", "k1"), ("loss", "k2"), ("loss", "k3")}
    for flags in ([], ["--adv_estimator", "reinforce_pp"], ["--adv_estimator", "grpo", "--n_samples_per_prompt", "2"],
                  ["--kl_mode", "reward"], ["--kl_mode", "loss"]):
        args = parse_args(flags)
        assert (args.kl_mode, args.kl_estimator) in sound, flags
    assert (parse_args([]).kl_mode, parse_args([]).kl_estimator) == ("loss", "k3")
