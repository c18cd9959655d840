"""The policy losses (PPO with clip-higher, CISPO, GSPO, SAPO), rollout correction and DAPO's data-side helpers of
core_algos: against what verl 0.9.1's own functions computed (tests/fixtures/verl_core_algos.pt, made by
make_verl_fixtures.py), MiniMind-3's CISPO formula, brute-force gradients of a softmax policy, and cases by hand."""
import math
from pathlib import Path

import pytest
import torch

from core_algos import (aggregate_loss, cispo_loss, groups_with_signal, LOSS_AGG_MODES, overlong_penalty, policy_loss,
                        POLICY_LOSSES, policy_loss_per_token, ppo_loss, rollout_correction, rollout_mismatch_metrics,
                        sapo_loss)

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "verl_core_algos.pt", weights_only=True)


def close(actual, expected, dtype):
    """~1e-6 relative in float32, tighter in float64 (verl adds 1e-8 to its token counts; we do not)."""
    tol = 1e-6 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


def loss_kwargs(params):
    p = dict(params)
    return dict(clip_low=p.pop("clip_low", 0.2), clip_high=p.pop("clip_high", 0.2), **p)


def case_id(case):
    return f"{case['mode']}-{'-'.join(f'{v:g}' for v in case['params'].values())}-{tuple(case['mask'].shape)}"


# ----------------------------------------------------------------------------- against verl 0.9.1
def test_fixture_is_verl_0_9_1():
    assert FIXTURE["verl_version"] == "0.9.1"
    assert {c["mode"] for c in FIXTURE["losses"]} == set(POLICY_LOSSES)
    assert {(c["level"], c["mode"]) for c in FIXTURE["rollout"]} == {
        (level, mode) for level in ("token", "sequence") for mode in ("truncate", "mask")}


@pytest.mark.parametrize("case", FIXTURE["losses"], ids=case_id)
def test_policy_loss_matches_verl(case):
    """Per-token losses, verl's aggregated loss under each loss_agg_mode it was run with (all four; sapo: verl always
    uses seq-mean-token-mean) through our aggregate_loss, its gradient w.r.t. logprobs, and verl's clip fraction."""
    mask, dtype = case["mask"], case["logprobs"].dtype
    for agg, want in case["agg"].items():
        logprobs = case["logprobs"].clone().requires_grad_(True)
        loss, ratio, clipped = policy_loss(case["mode"], logprobs, case["old_logprobs"], case["advantages"], mask,
                                           **loss_kwargs(case["params"]))
        assert loss.shape == ratio.shape == clipped.shape == mask.shape and loss.dtype == dtype
        total = aggregate_loss(loss, mask, agg, mask.sum(), case["n_responses"], mask.shape[1])
        total.backward()
        close(total, want["loss"], dtype)
        close(logprobs.grad, want["grad"], dtype)
    close(loss.detach() * mask, case["token_loss"], dtype)
    verl_clipfrac = case["metrics"]["pg_clipfrac"] + case["metrics"]["pg_clipfrac_lower"]
    assert ((clipped * mask).sum() / mask.sum()).item() == pytest.approx(verl_clipfrac, abs=1e-6)
    assert set(clipped.unique().tolist()) <= {0.0, 1.0}


def rollout_id(case):
    return f"{case['level']}-{case['mode']}-{case['verl_threshold']}-{tuple(case['mask'].shape)}"


@pytest.mark.parametrize("case", FIXTURE["rollout"], ids=rollout_id)
def test_rollout_correction_matches_verl(case):
    """Weights of verl's compute_rollout_correction_weights and the metrics both report: mean, ESS, max/min of the
    applied weights, the share truncated (token level: verl's ratio_fraction_high) or masked (verl's oob_ratio), the
    sequence ratio's max/min (verl's sequence-level rollout_is_max/min) and verl's off-policy kl."""
    old, sampler, mask = case["old_logprobs"], case["sampler_logprobs"], case["mask"]
    dtype, want = old.dtype, case["metrics"]
    weights, metrics = rollout_correction(old, sampler, mask, case["level"], case["mode"], case["high"], case["low"])
    close(weights, case["weights"], dtype)
    assert not weights.requires_grad and (weights[mask == 0] == 0).all()
    close(metrics["is_mean"], want["rollout_is_mean"], dtype)
    close(metrics["is_ess"], want["rollout_is_eff_sample_size"], dtype)
    close(metrics["kl"], want["kl"], dtype)
    prefix = "rollout_is_" if case["level"] == "token" else "rollout_is_seq_"  # every row has tokens here
    close(metrics["is_max"], want[prefix + "max"], dtype)
    close(metrics["is_min"], want[prefix + "min"], dtype)
    if case["mode"] == "mask":
        close(metrics["is_share_masked"], want["rollout_is_oob_ratio"], dtype)
    elif case["level"] == "token":
        close(metrics["is_share_truncated"], want["rollout_is_ratio_fraction_high"], dtype)
    else:  # verl counts sequences there; ours is the share of tokens, read off verl's weights
        share = ((case["weights"] >= case["high"]).to(dtype) * mask).sum() / mask.sum()
        close(metrics["is_share_truncated"], share, dtype)
    if case["level"] == "sequence":
        close(metrics["seq_ratio_max"], want["rollout_is_max"], dtype)
        close(metrics["seq_ratio_min"], want["rollout_is_min"], dtype)


@pytest.mark.parametrize("case", FIXTURE["overlong"], ids=lambda c: f"{c['max_len']}-{c['buffer_len']}")
def test_overlong_penalty_matches_verl(case):
    penalty = overlong_penalty(case["response_lengths"], case["max_len"], case["buffer_len"], case["penalty_factor"])
    torch.testing.assert_close(penalty.double(), case["penalty"], rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- CISPO as MiniMind-3 writes it
def test_cispo_equals_minimind3_formula():
    """docs/minimind.md "MiniMind-3's GRPO and CISPO defaults": per_token_loss = -(min(r, epsilon_high).detach() * A * logp), epsilon_high 5.0, each
    sequence's token mean over its mask, then the mean over sequences; value and gradient."""
    g = torch.Generator().manual_seed(5)
    B, T, epsilon_high = 6, 10, 5.0
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in [10, 3, 7, 1, 9, 5]], dtype=torch.float64)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = old + 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios from ~0.01 to well above 5
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)

    theirs = logp.clone().requires_grad_(True)
    r = torch.exp(theirs - old)
    per_token_loss = -(torch.min(r, torch.full_like(r, epsilon_high)).detach() * adv * theirs)
    minimind = ((per_token_loss * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    minimind.backward()

    ours = logp.clone().requires_grad_(True)
    loss, ratio, clipped = cispo_loss(ours, old, adv, epsilon_high)
    total = aggregate_loss(loss, mask, "seq-mean-token-mean", mask.sum(), B, T)
    total.backward()
    assert ((ratio > 5.0) & (mask > 0)).any() and ((ratio < 0.8) & (mask > 0)).any()
    torch.testing.assert_close(total, minimind, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(clipped, (ratio.detach() > 5.0).double())


# ----------------------------------------------------------------------------- gradients of a softmax policy
def softmax_policy(seed):
    """N tokens, each drawn from its own softmax over V = 5 with logits z [N, V] as the parameters."""
    g = torch.Generator().manual_seed(seed)
    N, V = 6, 5
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (N,), generator=g)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.3], dtype=torch.float64)
    return z, actions, advantages


def token_logprobs(z, actions):
    return torch.log_softmax(z, -1).gather(1, actions[:, None])[:, 0][None]  # [1, N]


def brute_force_gradient(z, actions, advantages, weights):
    """d/dz of -sum_t w_t A_t log pi(a_t), written out: -w_t A_t (onehot(a_t) - softmax(z_t))."""
    N, V = z.shape
    grad = torch.zeros(N, V, dtype=torch.float64)
    for t in range(N):
        exps = [math.exp(z[t, v].item()) for v in range(V)]
        for v in range(V):
            grad[t, v] = -weights[t] * advantages[t].item() * ((v == actions[t].item()) - exps[v] / sum(exps))
    return grad


@pytest.mark.parametrize("mode", ["ppo", "cispo"])
def test_gradient_inside_the_clip_is_reinforce_with_ratio(mode):
    """Ratio inside [1 - eps, 1 + eps] on every token: both losses give grad = -sum_t r_t A_t grad log pi(a_t)."""
    z, actions, advantages = softmax_policy(0)
    old_z = z + 0.02 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    old = token_logprobs(old_z, actions)
    z = z.clone().requires_grad_(True)
    logp = token_logprobs(z, actions)
    loss, ratio, clipped = policy_loss(mode, logp, old, advantages[None], torch.ones(1, 6), 0.2, 0.28)
    assert ((ratio > 0.8) & (ratio < 1.28)).all() and not clipped.any()
    loss.sum().backward()
    r = ratio.detach()[0].tolist()
    torch.testing.assert_close(z.grad, brute_force_gradient(z.detach(), actions, advantages, r), rtol=1e-10, atol=1e-12)
    if mode == "ppo":  # and the surrogate's finite differences agree
        eps, fd = 1e-6, torch.zeros_like(z)
        for t in range(z.shape[0]):
            for v in range(z.shape[1]):
                bumped = []
                for sign in (1, -1):
                    zz = z.detach().clone()
                    zz[t, v] += sign * eps
                    bumped.append(ppo_loss(token_logprobs(zz, actions), old, advantages[None], 0.2, 0.28)[0].sum())
                fd[t, v] = (bumped[0] - bumped[1]) / (2 * eps)
        torch.testing.assert_close(z.grad, fd, rtol=1e-6, atol=1e-8)


def test_tokens_outside_the_clip_lose_their_gradient_in_ppo_not_in_cispo():
    z, actions, advantages = softmax_policy(2)
    old_logp = token_logprobs(z, actions).detach()
    # push tokens 0 (A > 0) up and 1 (A < 0) down past the clip; keep the others near ratio 1
    old = old_logp - torch.tensor([[0.7, -0.7, 0.01, -0.01, 0.02, 2.5]], dtype=torch.float64)
    outside = torch.tensor([True, True, False, False, False, False])
    z = z.clone().requires_grad_(True)
    logp = token_logprobs(z, actions)
    ppo, ratio, ppo_clipped = ppo_loss(logp, old, advantages[None], 0.2, 0.28)
    ppo.sum().backward()
    ppo_grad, z.grad = z.grad.clone(), None
    assert torch.equal(ppo_clipped[0].bool(), outside)  # token 5: A < 0 and r = e^2.5, unclipped (no dual clip)
    assert (ppo_grad[outside] == 0).all() and (ppo_grad[~outside].abs().sum(1) > 0).all()

    cispo, _, cispo_clipped = cispo_loss(token_logprobs(z, actions), old, advantages[None], 5.0)
    cispo.sum().backward()
    r = ratio.detach()[0]
    weights = r.clamp(max=5.0).tolist()
    torch.testing.assert_close(z.grad, brute_force_gradient(z.detach(), actions, advantages, weights),
                               rtol=1e-10, atol=1e-12)
    assert (z.grad.abs().sum(1) > 0).all() and torch.equal(cispo_clipped[0].bool(), r > 5.0)
    assert cispo_clipped[0, 5] == 1 and weights[5] == 5.0  # e^2.5 = 12.2 capped at 5


# ----------------------------------------------------------------------------- hand-computed cases
def test_ppo_loss_with_equal_clips_is_policy_loss_per_token():
    g = torch.Generator().manual_seed(3)
    logp, old, adv = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for c in (0.0, 3.0):
        loss, ratio, _ = ppo_loss(logp, old, adv, 0.2, 0.2, dual_clip_c=c)
        want_loss, want_ratio = policy_loss_per_token(logp, old, adv, 0.2, dual_clip_c=c)
        assert torch.equal(loss, want_loss) and torch.equal(ratio, want_ratio)


def test_clip_higher_and_dual_clip_by_hand():
    ratio = torch.tensor([1.25, 1.35, 0.85, 0.75, 5.0, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
    loss, r, clipped = ppo_loss(ratio.log(), torch.zeros(6), adv, 0.2, 0.28, dual_clip_c=3.0)
    # 1.25 < 1.28 kept; 1.35 capped at 1.28; A < 0: 0.85 kept, 0.75 floored at 0.8; 5 dual-clipped to 3; A > 0, r < 1
    assert torch.allclose(loss, torch.tensor([-1.25, -1.28, 0.85, 0.8, 3.0, -0.5]))
    assert clipped.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0] and torch.allclose(r, ratio)


def test_gspo_ratio_is_the_sequence_geometric_mean():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4])
    old = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logp = (old + 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0], [-2.0], [1.0]], dtype=torch.float64).expand(3, 4)
    loss, ratio, clipped = policy_loss("gspo", logp, old, adv, mask, 0.5, 0.5)
    s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1)).detach()
    assert torch.allclose(ratio.detach(), s[:, None].expand(3, 4)) and ratio[2, 0].item() == 1.0  # empty row: 1
    (loss * mask).sum().backward()
    # inside the clip, d/dlogp_t of -A s_it is -A s_i on each real token alone
    assert torch.allclose(logp.grad, -adv * s[:, None] * mask) and not clipped.any()


def test_sapo_gate():
    """f(1) = 2/tau and f'(1) = 1: at r = 1 the gradient is the plain policy gradient -A grad logp."""
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    loss, ratio, clipped = sapo_loss(logp, torch.zeros(1, 2, dtype=torch.float64), adv, tau_pos=1.0, tau_neg=1.05)
    assert torch.allclose(loss, torch.tensor([[-1.5 * 2 / 1.0, 2.0 * 2 / 1.05]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv) and not clipped.any()
    # far from 1 the gate saturates: the gradient fades instead of stopping at a hard edge
    far = torch.tensor([[3.0, -3.0]], dtype=torch.float64, requires_grad=True)
    sapo_loss(far, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))[0].sum().backward()
    assert (far.grad.abs() < 0.1).all() and (far.grad != 0).all()


@pytest.mark.parametrize("mode", POLICY_LOSSES)
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_every_loss_with_every_aggregation(mode, agg):
    """Finite, with a finite gradient that is 0 on padding, whatever sits past each row's end."""
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 5])
    old = torch.where(mask > 0, -torch.rand(3, 5, generator=g), -30.0)
    logp = torch.where(mask > 0, old + torch.randn(3, 5, generator=g), 30.0).requires_grad_(True)
    adv = torch.randn(3, 5, generator=g)
    loss, _, _ = policy_loss(mode, logp, old, adv, mask, 0.2, 0.28, dual_clip_c=3.0)
    total = aggregate_loss(loss, mask, agg, mask.sum(), 2, 5)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logp.grad).all() and (logp.grad[mask == 0] == 0).all()


def test_unknown_modes_are_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="policy loss"):
        policy_loss("grpo", x, x, x, x + 1, 0.2, 0.2)
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_correction(x, x, x + 1, "token", "clip", 2.0)
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_correction(x, x, x + 1, "geometric", "mask", 2.0)


def test_rollout_correction_by_hand():
    """log rho = [ln 3, ln 0.5, 25 | ln 1.5, pad] and an empty row."""
    old = torch.tensor([[math.log(3.0), math.log(0.5), 25.0], [math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]],
                       dtype=torch.float64)
    sampler = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.inf, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    m = rollout_mismatch_metrics(old, sampler, mask)
    assert m["token_ratio_max"].item() == pytest.approx(math.exp(20.0)) and m["token_ratio_min"].item() == 0.5
    assert m["seq_ratio_max"].item() == pytest.approx(math.exp(20.0)) and m["seq_ratio_min"].item() == 1.5
    assert m["log_ratio_abs_mean"].item() == pytest.approx((math.log(3) + math.log(2) + 25 + math.log(1.5)) / 4)
    assert m["kl"].item() == pytest.approx(-(math.log(3) - math.log(2) + 25 + math.log(1.5)) / 4)

    w, m = rollout_correction(old, sampler, mask, "token", "truncate", 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 2.0], [1.5, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert m["is_share_truncated"].item() == 0.5 and m["is_max"].item() == 2.0 and m["is_min"].item() == 0.5
    assert m["is_ess"].item() == pytest.approx(1 / (((w / w.sum() * 4) ** 2 * mask).sum() / 4).item())
    w, _ = rollout_correction(old, sampler, mask, "token", "truncate", 2.0, low=0.8)  # TRL's clip_min
    assert torch.allclose(w[0], torch.tensor([2.0, 0.8, 2.0], dtype=torch.float64)) and (w[2] == 0).all()
    w, m = rollout_correction(old, sampler, mask, "token", "mask", 2.0)  # no lower bound
    assert torch.allclose(w, torch.tensor([[0, 0.5, 0], [1.5, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert m["is_share_masked"].item() == 0.5
    w, _ = rollout_correction(old, sampler, mask, "token", "mask", 2.0, low=0.6)
    assert torch.allclose(w[0], torch.zeros(3, dtype=torch.float64)) and w[1, 0].item() == 1.5
    # sequence level: row 0's sum ln 3 + ln 0.5 + 25 is clamped at 20 after summing (verl)
    w, m = rollout_correction(old, sampler, mask, "sequence", "truncate", 2.0)
    assert torch.allclose(w, torch.tensor([[2.0] * 3, [1.5, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert m["is_share_truncated"].item() == 0.75
    w, m = rollout_correction(old, sampler, mask, "sequence", "mask", 1.2, low=0.5)
    assert (w == 0).all() and m["is_ess"].item() == 0.0 and m["is_mean"].item() == 0.0  # verl divides by zero here


def test_overlong_penalty_by_hand():
    # max_len 10, buffer 4: no penalty up to 6, then -1/4 per token (factor 1) down to -1 at 10
    lengths = torch.tensor([0, 5, 6, 7, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths.double(), 10, 4, 2.0).tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -2.0]


def test_groups_with_signal_by_hand():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 5.0, 0.5, 0.5, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1])
    groups = torch.tensor([7, 7, 7, 3, 3, 42, 9, 9, 0, 0, 0, 0, 0, 0])  # labels, not positions; 42 is alone
    # group 7 mixed: signal; 3 all 1.0: none; 42 a group of one: kept (verl keeps len 1); 9 all 0.5: none;
    # 0: six equal 1.1, none (verl's np.std([1.1] * 6) == 0 test says 2.2e-16 and keeps it)
    want = [True] * 3 + [False] * 2 + [True] + [False] * 2 + [False] * 6
    assert groups_with_signal(scores, groups).tolist() == want
    assert groups_with_signal(torch.tensor([2.0]), torch.tensor([0])).tolist() == [True]
