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
    """GAE over response tokens; all [B, T]. Returns (advantages, returns), zero past each row's end.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = sum_l (gamma * lam)^l delta_{t+l}, computed
    as one matmul with the discount matrix instead of a Python loop over tokens.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = (token_rewards + gamma * next_values - values) * mask
    T = deltas.shape[1]
    idx = torch.arange(T, device=deltas.device)
    power = (idx[None, :] - idx[:, None]).to(deltas.dtype)  # [T, T]: j - i
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = (deltas @ discount.T) * mask
    return advantages, (advantages + values) * mask


def group_advantages(scores, groups, estimator):
    """One advantage per response [B] of the critic-free estimators (PPO_FACTS), from its score [B] (the reward
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


# how a minibatch's per-token policy losses l [B, R] become one number (PPO_FACTS "Loss aggregation"); every
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


def policy_loss_per_token(logprobs, old_logprobs, advantages, clip_eps, dual_clip_c=0.0):
    """Clipped surrogate (and dual clip for A < 0); returns (loss [B, T], ratio [B, T]).

    The log-ratio is clamped to +-20 before exp (as verl and OpenRLHF): one token with a huge
    ratio and A < 0 would otherwise dominate the loss with |A| * e^25.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    if dual_clip_c > 0:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip_c * advantages), loss)
    return loss, ratio


def value_loss_per_token(values, old_values, returns, clip_range):
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
