"""The pure tensor maths of PPO and its critic-free relatives: tensors in, tensors out, no models, no flags.

train_ppo.py holds the loop (rollout, update) and calls these. Each function says which formula it follows;
the derivations, in this project's words, are in docs/algorithms.md. Masks are float [B, T] with 1 on real
response tokens; reductions marked "every rank" are collectives under torch.distributed (a no-op otherwise).
"""
import math

import torch
import torch.nn.functional as F

from trainer_utils import all_reduce_sum


def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over every real token of every rank (unbiased variance, as TRL).

    Two passes with float64 sums: E[x^2] - mean^2 cancels catastrophically when |mean| >> std.
    """
    x64, mask64 = x.double(), mask.double()
    total, n = all_reduce_sum(torch.stack([(x64 * mask64).sum(), mask64.sum()])).tolist()
    mean = total / n
    squares = all_reduce_sum(((x64 - mean) ** 2 * mask64).sum()).item()
    var = squares / max(n - 1, 1)
    return ((x - mean) / math.sqrt(var + eps)) * mask


def kl_penalty(logprobs, ref_logprobs, estimator):
    """Per-token KL(pi || ref) estimate from delta = logp - ref (Schulman's k1/k2/k3)."""
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta ** 2
    delta = delta.clamp(-20, 20)  # k3 = exp(-d) - 1 + d >= 0, clamped as verl does
    return (torch.exp(-delta) - 1 + delta).clamp(-10, 10)


def compute_advantages(token_rewards, values, response_mask, gamma, lam):
    """GAE over response tokens; all [B, T]. Returns (advantages, returns), zero off the mask.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = sum_l (gamma * lam)^l delta_{t+l}, computed
    as one matmul with the discount matrix instead of a Python loop over tokens. t runs over the mask's
    tokens only: with gaps (multi-turn: tool results between the policy's turns) the step after a turn's
    last token is the next turn's first, as if the tool's text were not there; it is the environment's
    answer, not a decision of the policy, and carries no reward or value of its own.
    """
    mask = response_mask.to(values.dtype)
    # the mask's tokens first, in order (a stable sort): gaps closed, so t + 1 is the policy's next token
    order = torch.sort((mask == 0).long(), dim=1, stable=True).indices  # [B, T]
    rewards, mask = token_rewards.gather(1, order), mask.gather(1, order)
    values = values.gather(1, order) * mask
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = (rewards + gamma * next_values - values) * mask
    T = deltas.shape[1]
    idx = torch.arange(T, device=deltas.device)
    power = (idx[None, :] - idx[:, None]).to(deltas.dtype)  # [T, T]: j - i
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = (deltas @ discount.T) * mask
    returns = (advantages + values) * mask
    back = lambda x: torch.zeros_like(x).scatter_(1, order, x)  # noqa: E731  to the original positions
    return back(advantages), back(returns)


def group_advantages(scores, groups, estimator):
    """One advantage per response [B] of the critic-free estimators (docs/algorithms.md "Critic-free estimators"), from its score [B] (the reward
    without the KL part) and the group [B] of responses to the same prompt (group ids: any labels):
    grpo: (r - mean_g) / (std_g + 1e-6), unbiased std; dr_grpo: r - mean_g; rloo: r - the mean of the OTHER
    responses = n / (n - 1) * (r - mean_g); reinforce_pp_baseline: r - mean_g (whitened later, by the caller).
    A group of one has mean 0 and std 1 (verl's convention): its advantage is its score."""
    advantages = torch.empty_like(scores)
    for g in groups.unique():
        rows = groups == g
        r, n = scores[rows], int(rows.sum())
        mean, std = (r.mean(), r.std()) if n > 1 else (torch.zeros(()), torch.ones(()))
        if estimator == "grpo":
            advantages[rows] = (r - mean) / (std + 1e-6)
        elif estimator == "rloo":
            advantages[rows] = (r - mean) * n / (n - 1) if n > 1 else r
        else:  # dr_grpo, reinforce_pp_baseline
            advantages[rows] = r - mean
    return advantages


# how a minibatch's per-token policy losses l [B, R] become one number (docs/algorithms.md "Loss aggregation"); every
# normaliser is over the whole minibatch of every rank (tokens, responses), never per micro-batch
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(token_loss, mask, mode, n_tokens, n_responses, max_len):
    """This micro-batch's share of the minibatch loss: token-mean sum(m l) / tokens; seq-mean-token-mean
    sum_i (sum_t m l / sum_t m) / responses; seq-mean-token-sum sum(m l) / responses; seq-mean-token-sum-norm
    sum(m l) / (responses * max_len). n_tokens and n_responses count the whole minibatch of every rank."""
    if mode == "token-mean":
        return (token_loss * mask).sum() / n_tokens
    if mode == "seq-mean-token-mean":
        return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_responses
    if mode == "seq-mean-token-sum":
        return (token_loss * mask).sum() / n_responses
    return (token_loss * mask).sum() / (n_responses * max_len)


def _log_ratio(logprobs, old_logprobs):
    """log r = logp - old, clamped to +-20 before any exp (verl, OpenRLHF): one token with a huge ratio and A < 0
    would otherwise dominate the loss with |A| * e^25."""
    return (logprobs - old_logprobs).clamp(-20.0, 20.0)


def ppo_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip_c=0.0):
    """PPO's clipped surrogate (Schulman et al. 2017) with DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476),
    as verl's compute_policy_loss_vanilla: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0 and
    dual_clip_c = c > 0 also min(., -c A) (dual clip, Ye et al. 2020). Returns (loss, ratio, clipped), all [B, T];
    clipped = 1 where the clip or the dual clip took the token's gradient away (verl's pg_clipfrac + _lower)."""
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))  # [B, T]
    surrogate = -advantages * ratio
    clipped_surrogate = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.max(surrogate, clipped_surrogate)
    clipped = clipped_surrogate > surrogate
    if dual_clip_c > 0:
        floor = -dual_clip_c * advantages
        dual = (advantages < 0) & (loss > floor)
        loss = torch.where(advantages < 0, torch.min(loss, floor), loss)
        clipped = clipped | dual
    return loss, ratio, clipped.to(loss.dtype)


def policy_loss_per_token(logprobs, old_logprobs, advantages, clip_eps, dual_clip_c=0.0):
    """The symmetric clip of ppo_loss (clip_low = clip_high = clip_eps); returns (loss [B, T], ratio [B, T])."""
    loss, ratio, _ = ppo_loss(logprobs, old_logprobs, advantages, clip_eps, clip_eps, dual_clip_c)
    return loss, ratio


def cispo_loss(logprobs, old_logprobs, advantages, ratio_cap):
    """CISPO (MiniMax-M1, arXiv 2506.13585), in MiniMind-3's and TRL's (loss_type="cispo") form:
    loss = -sg(min(r, ratio_cap)) * A * logp, the cap on r itself (TRL's epsilon_high, MiniMind-3's 5.0; verl's
    compute_policy_loss_cispo clips to [1 - clip_ratio_low, 1 + clip_ratio_high] instead). The capped ratio only
    weights the REINFORCE term, so every token keeps a gradient. Returns (loss, ratio, clipped = r > cap), [B, T]."""
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))  # [B, T]
    weight = ratio.detach().clamp(max=ratio_cap)
    loss = -weight * advantages * logprobs
    return loss, ratio, (ratio.detach() > ratio_cap).to(loss.dtype)


def gspo_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), as verl's compute_policy_loss_gspo: the sequence log-ratio
    log s_i = sum_t m (logp - old) / |y_i|, in the token-wise form log s_it = logp_t - sg(logp_t) + sg(log s_i)
    (value s_i, gradient that of logp_t), clamped at max 10; then the clipped surrogate on s_it. Returns
    (loss, ratio = s_i broadcast to the tokens, clipped), all [B, T]."""
    mask = mask.to(logprobs.dtype)
    log_s = ((logprobs - old_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
    ratio = torch.exp((logprobs - logprobs.detach() + log_s.detach()[:, None]).clamp(max=10.0))  # [B, T]
    surrogate = -advantages * ratio
    clipped_surrogate = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.max(surrogate, clipped_surrogate)
    return loss, ratio, (clipped_surrogate > surrogate).to(loss.dtype)


def sapo_loss(logprobs, old_logprobs, advantages, tau_pos=1.0, tau_neg=1.05):
    """SAPO (Gao et al. 2025, arXiv 2511.20347), as verl's compute_policy_loss_sapo and TRL's loss_type="sapo":
    loss = -f(r) * A with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A > 0 else tau_neg.
    The gradient flows through r: -A * 4 sigma (1 - sigma) * r * grad logp, the plain policy gradient at r = 1,
    fading smoothly instead of a hard clip. Nothing is clipped: returns (loss, ratio, clipped = 0), all [B, T]."""
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))  # [B, T]
    tau = torch.where(advantages > 0, advantages.new_tensor(tau_pos), advantages.new_tensor(tau_neg))
    loss = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * advantages
    return loss, ratio, torch.zeros_like(loss)


POLICY_LOSSES = ("ppo", "cispo", "gspo", "sapo")


def policy_loss(mode, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip_c=0.0,
                ratio_cap=5.0, tau_pos=1.0, tau_neg=1.05):
    """Per-token policy loss of one of POLICY_LOSSES: (loss, ratio, clipped), all [B, T]; aggregate_loss reduces."""
    if mode == "ppo":
        return ppo_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip_c)
    if mode == "cispo":
        return cispo_loss(logprobs, old_logprobs, advantages, ratio_cap)
    if mode == "gspo":
        return gspo_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    if mode == "sapo":
        return sapo_loss(logprobs, old_logprobs, advantages, tau_pos, tau_neg)
    raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {mode!r}")


# rollout correction: the sampler (KV-cached decode, other kernels or dtype) is not exactly the trainer's pi_old;
# log rho = old - sampler per token (docs/algorithms.md "Rollout correction")
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTION_MODES = ("truncate", "mask")


def _masked_extremes(x, live):
    """(max, min) of x over the True entries of live; 0 when there are none."""
    any_live = live.any()
    hi = torch.where(any_live, x.masked_fill(~live, -math.inf).max(), 0.0)
    lo = torch.where(any_live, x.masked_fill(~live, math.inf).min(), 0.0)
    return hi, lo


def rollout_mismatch_metrics(old_logprobs, sampler_logprobs, mask):
    """How far the sampler is from the trainer, cheap enough to log every step (0-d tensors, no host sync):
    token_ratio_max/min of rho_t, seq_ratio_max/min of prod_t rho_t over non-empty rows (maxima clamped at e^20, as
    verl's rollout_is_max), log_ratio_abs_mean = mean |log rho|, and kl = mean(sampler - old), verl's
    rollout_corr/kl (the k1 estimate of KL(sampler || trainer)); means over the real tokens."""
    live = mask.bool()
    log_rho = torch.where(live, old_logprobs - sampler_logprobs, 0.0).detach()  # [B, T]
    n = live.sum().clamp(min=1)
    token_max, token_min = _masked_extremes(log_rho, live)
    seq_max, seq_min = _masked_extremes(log_rho.sum(1), live.any(1))
    return dict(token_ratio_max=torch.exp(token_max.clamp(max=20.0)), token_ratio_min=torch.exp(token_min),
                seq_ratio_max=torch.exp(seq_max.clamp(max=20.0)), seq_ratio_min=torch.exp(seq_min),
                log_ratio_abs_mean=log_rho.abs().sum() / n, kl=-log_rho.sum() / n)


def rollout_correction(old_logprobs, sampler_logprobs, mask, level, mode, high, low=None):
    """Importance weights w [B, T] that correct the sampler/trainer mismatch, as verl's rollout_corr_helper
    (compute_rollout_correction_weights) and TRL's vllm_importance_sampling_correction; they multiply the per-token
    policy loss. token: w_t = exp(clamp(log rho_t, +-20)); sequence: w_i = exp(clamp(sum_t m log rho_t, +-20)) on
    every token of row i (the sum taken before the clamp, as verl). truncate (TIS, Yao et al. 2025): w = min(w, high)
    (and max(w, low) when low is given, TRL's clip_min); mask (MIS / IcePop): w = 0 outside [low, high] (low None:
    no lower bound, as TRL). Weights are detached and 0 past each row's end.
    Returns (w, metrics): rollout_mismatch_metrics plus is_mean, is_max, is_min of w over the real tokens,
    is_share_truncated or is_share_masked (share of real tokens whose weight was changed) and is_ess, verl's
    effective sample size 1 / mean((w / mean(w))^2), 0 when every w is 0; all 0-d tensors."""
    if level not in ROLLOUT_CORRECTION_LEVELS or mode not in ROLLOUT_CORRECTION_MODES:
        raise ValueError(f"rollout correction: level in {ROLLOUT_CORRECTION_LEVELS} and mode in "
                         f"{ROLLOUT_CORRECTION_MODES}, got {level!r}, {mode!r}")
    live = mask.bool()
    mask = mask.to(old_logprobs.dtype)
    log_rho = torch.where(live, old_logprobs - sampler_logprobs, 0.0).detach()  # [B, T]
    if level == "token":
        log_w = log_rho.clamp(-20.0, 20.0)
    else:
        log_w = log_rho.sum(1, keepdim=True).clamp(-20.0, 20.0).expand_as(log_rho)
    raw = torch.exp(log_w) * mask  # [B, T]
    if mode == "truncate":
        weights = raw.clamp(min=low, max=high) * mask
        changed = (raw > high) | (raw < low if low is not None else False)
    else:
        keep = (raw <= high) & (raw >= low if low is not None else True)
        weights, changed = torch.where(keep, raw, 0.0), ~keep
    n = live.sum().clamp(min=1)
    mean = (weights * mask).sum() / n
    square_mean = ((weights / (mean + 1e-8)) ** 2 * mask).sum() / n
    is_max, is_min = _masked_extremes(weights, live)
    metrics = rollout_mismatch_metrics(old_logprobs, sampler_logprobs, mask)
    share = "is_share_truncated" if mode == "truncate" else "is_share_masked"
    metrics.update({"is_mean": mean, "is_max": is_max, "is_min": is_min, share: (changed & live).sum() / n,
                    "is_ess": torch.where(square_mean > 0, 1 / square_mean.clamp(min=1e-30), 0.0)})
    return weights, metrics


# DAPO's data-side pieces (Yu et al. 2025, arXiv 2503.14476; docs/algorithms.md "Dynamic sampling and overlong shaping")
def overlong_penalty(response_lengths, max_len, buffer_len, penalty_factor):
    """DAPO's soft overlong punishment, as verl's DAPORewardManager: a response of length L in the last buffer_len
    tokens before max_len gets min(-(L - (max_len - buffer_len)) / buffer_len * penalty_factor, 0), added to its
    score: 0 up to max_len - buffer_len, falling linearly to -penalty_factor at max_len. [B] -> [B]."""
    lengths = response_lengths if response_lengths.is_floating_point() else response_lengths.float()
    expected = max_len - buffer_len
    return (-(lengths - expected) / buffer_len * penalty_factor).clamp(max=0.0)


def groups_with_signal(scores, groups):
    """DAPO's dynamic sampling filter (verl algorithm.filter_groups): True [B] for the responses of every group
    whose scores are not all equal, and for a group of one (verl keeps those: its std is 0 but its size is 1);
    False for a group of two or more with one score for all, whose GRPO advantages are all 0."""
    _, index = groups.unique(return_inverse=True)  # [B]
    n = int(index.max()) + 1 if index.numel() else 0
    top = scores.new_full((n,), -math.inf).scatter_reduce(0, index, scores, "amax")
    bottom = scores.new_full((n,), math.inf).scatter_reduce(0, index, scores, "amin")
    size = torch.bincount(index, minlength=n)
    return (top > bottom)[index] | (size == 1)[index]


def value_loss_per_token(values, old_values, returns, clip_range):
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
