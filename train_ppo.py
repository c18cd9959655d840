"""PPO for language models: actor, old actor, frozen reference, critic and a reward, token-level PPO (and the
critic-free estimators GRPO, Dr.GRPO, RLOO, REINFORCE++ one flag away).

The policy is MiniMind or any transformers causal LM. Read top to bottom: PPO maths (KL placement, advantage
estimators; the tensor maths itself, the policy losses and rollout correction are in core_algos.py) -> rollout
(sample and reward, dynamic sampling, score: an Experience) -> update -> building the run -> one training
step -> the loop -> the flags -> main. What is not the algorithm lives in its own room: the reward in reward.py
and reward_functions.py, the data in dataset/, the held-out evaluation in evaluation.py, the models in model/
(the Policy's log-probs, the sampler, the critic, loading, LoRA and checkpointing), the run's state and
checkpoints in checkpoint.py, sharding in fsdp.py, distributed, logging and file helpers in trainer_utils.py.
Run with `python train_ppo.py` (one process) or `torchrun --nproc_per_node N train_ppo.py` (DDP, or FSDP with
--fsdp 1; NCCL on GPUs, gloo on CPU). Formulas follow "The N Implementation Details of RLHF with PPO" (Huang
et al.), TRL, verl and OpenRLHF.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from checkpoint import check_outputs, Learner, policy_path, Progress, resume_if_asked, Run, save_checkpoint
from core_algos import (aggregate_loss, compute_advantages, group_advantages, groups_with_signal, kl_penalty,
                        LOSS_AGG_MODES, masked_mean, masked_whiten, overlong_penalty, policy_loss, POLICY_LOSSES,
                        ROLLOUT_CORRECTION_LEVELS, ROLLOUT_CORRECTION_MODES, rollout_correction,
                        rollout_mismatch_metrics, value_loss_per_token)
from dataset.lm_dataset import PromptCollator, RLAIFDataset, decode_responses, thinking_flag, tool_name
from evaluation import evaluate_on_ranks, eval_table, log_eval
from fsdp import check_flags, full_tensor, shard_models, sharded_grad_scaler, unsharded
from model.critic import build_critic
from model.loading import (check_position_limit, check_tokenizer_fit, default_tokenizer_path, init_model, is_moe,
                           load_tokenizer)
from model.lora import copy_sharing, fit_models
from model.policy import Policy
from model.sampling import ends_with_stop, position_ids_from_mask, sample_responses, stop_token_ids
from multi_turn import check_tool_template, sample_with_tools
from tools import add_tool_flags, check_tool_flags, ToolRunner
from reward import add_reward_flags, build_reward, default_reward_model, reward_model_from_flags
from reward_functions import check_labels, NonFiniteRolloutError, RewardFunction
from trainer_utils import (all_names, all_reduce_dict, all_reduce_sum, build_cosine_scheduler, get_rank, get_rng_state,
                           get_world_size, init_distributed_mode, InputError, is_main_process, log_samples, log_step,
                           lora_folder_path,
                           Logger, no_sync, resolve_weight, setup_seed, SkipBatchSampler, StopSignal, synced_time,
                           unwrap_model, user_errors)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "dataset", "rlaif-mini.jsonl")
DEMO_EVAL_DATA = os.path.join(ROOT, "dataset", "rlaif-eval.jsonl")


# ----------------------------------------------------------------------------- PPO maths
# the tensor maths itself (KL estimators, GAE, group advantages, loss aggregation, the policy and value losses)
# is in core_algos.py; what is here decides how the trainer uses it

# the critic-free estimators that credit each response with one advantage from its score alone, compared with
# the other responses to its prompt (docs/algorithms.md "Critic-free estimators")
OUTCOME_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
DEFAULT_KL_MODE = "loss"  # k3 in the loss for every estimator (measured on the demo against k1 in the reward: README)


# What each placement of the KL penalty optimises, with tokens sampled from pi (docs/algorithms.md "KL estimators and where the KL goes"):
# in the reward PPO keeps only the score-function term E[k * grad log pi], which is grad KL(pi||ref) for k1
# alone; in the loss autograd differentiates k itself: k2 gives grad KL(pi||ref), k3 grad KL(ref||pi)
# (close near the reference), k1 nothing (E_pi[grad log pi] = 0).
SOUND_KL_PAIRS = ("Sound pairs: k1 in the reward (--kl_mode reward --kl_estimator k1), or k2 / k3 in the loss "
                  "(--kl_mode loss --kl_estimator k2|k3)")


def kl_placement_warning(kl_mode, kl_estimator, kl_coef):
    """The start-up warning for a biased placement (k2 or k3 in the reward), or None."""
    if kl_mode != "reward" or kl_estimator == "k1" or kl_coef == 0:
        return None
    return (f"warning: --kl_estimator {kl_estimator} in the reward is biased: PPO treats a token reward as a "
            f"constant, so only E[{kl_estimator} * grad log pi] survives, and that is not grad KL(pi||ref) (the "
            f"dropped term E_pi[grad {kl_estimator}] is not zero): the penalty can push the policy away from the "
            f"reference. {SOUND_KL_PAIRS}")


class AdaptiveKLController:
    """beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)  (Ziegler et al.)."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- rollout
@dataclass
class Experience:
    """One rollout of B prompts: [B, T] over prompt + response, [B, R] over the response tokens.

    Filled by collect_rollout; advantages and returns by add_advantages, before the update."""
    input_ids: torch.Tensor  # [B, T] left-padded prompts, then the responses
    attention_mask: torch.Tensor  # [B, T]
    # float: 1 on the policy's own tokens, up to and including each row's EOS; with --tools every turn's, not
    # the tool results between them (in attention_mask only: read by the forwards, not trained or penalised)
    response_mask: torch.Tensor  # [B, R]
    old_logprobs: torch.Tensor  # [B, R] log pi_old: the distribution the tokens were sampled from
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref
    values: torch.Tensor  # [B, R] V(s_t), 0 past each row's end (0 everywhere without a critic)
    token_rewards: torch.Tensor  # [B, R] -beta * KL per token (reward mode) + the score at the last token
    groups: torch.Tensor = None  # [B] the index of each response's prompt in the rollout (CPU)
    advantages: torch.Tensor = None  # [B, R] --adv_estimator's (GAE whitened), add_advantages
    raw_advantages: torch.Tensor = None  # [B, R] before whitening (for the logs)
    returns: torch.Tensor = None  # [B, R] GAE + V: the critic's targets (add_advantages; gae only)
    # the policy loss's tokens: response_mask, less the truncated responses with --mask_truncated_responses
    loss_mask: torch.Tensor = None  # [B, R] (None: response_mask)
    rollout_weights: torch.Tensor = None  # [B, R] rollout-correction weights on the policy loss (None: off)
    # for the logs
    kl: torch.Tensor = None  # [B, R] per-token KL estimate to the reference
    scores: torch.Tensor = None  # [B] total reward per response (CPU)
    reward_parts: dict = None  # {part: [B]} the reward's parts, summing to scores
    has_eos: torch.Tensor = None  # [B] the response ended with EOS
    responses: list = None  # B decoded responses
    prompts: list = None  # B rendered prompts
    sampler_gap: torch.Tensor = None  # mean |sampler log-prob - old_logprobs| over real tokens
    rollout_stats: dict = None  # sampler/trainer mismatch (0-d tensors), dynamic sampling's counts, tool use's
    transcripts: list = None  # --tools: B lists of the turns' messages (assistant turns, tool results)
    seconds: dict = None  # generate, forward, reward
    scored_positions: int = 0  # token positions in one scoring pass over the rollout, padding included


def critic_values(critic, input_ids, attention_mask, response_len):
    """V [B, R] at the positions that predict the response tokens, on the critic's own device."""
    device = next(critic.parameters()).device
    attention_mask = attention_mask.to(device)
    values = critic(input_ids.to(device), attention_mask, position_ids_from_mask(attention_mask))
    return values[:, -response_len - 1:-1].float()


def micro_batches(order, mini_batch_size, accumulation_steps, prompt_lens=None, response_lens=None, max_tokens=0):
    """Split a row order into minibatches, each a list of micro-batch index tensors: --accumulation_steps equal
    ones, or, with a token budget `max_tokens` (--max_tokens_per_micro_batch), rows of similar length packed
    together so that each micro-batch's padded size (rows x its longest prompt + its longest response, see
    unpadded) stays within the budget: short rows share a forward, long ones do not pad each other."""
    minibatches = [order[m:m + mini_batch_size] for m in range(0, len(order), mini_batch_size)]
    if not max_tokens:
        micro = mini_batch_size // accumulation_steps
        return [[rows[k:k + micro] for k in range(0, mini_batch_size, micro)] for rows in minibatches]
    packed = []
    for rows in minibatches:
        groups, current, width_p, width_r = [], [], 0, 0
        for row in sorted(rows.tolist(), key=lambda r: (prompt_lens[r] + response_lens[r], r)):
            p, r = max(width_p, prompt_lens[row]), max(width_r, response_lens[row])
            if current and (len(current) + 1) * (p + r) > max_tokens:
                groups.append(current)
                current, p, r = [], prompt_lens[row], response_lens[row]
            current, width_p, width_r = current + [row], p, r
        packed.append([torch.tensor(g, device=order.device) for g in groups + [current]])
    return packed


def rollout_micro_batches(order, attention_mask, response_mask, args):
    """micro_batches of a rollout's rows in `order`, by the rows' own prompt and response lengths (tool results
    included: the attention mask's): the same split for the scoring of pi_old and for the update (the first
    ratio is then exactly 1)."""
    P = attention_mask.shape[1] - response_mask.shape[1]
    return micro_batches(order, args.mini_batch_size, args.accumulation_steps, attention_mask[:, :P].sum(1).tolist(),
                         attention_mask[:, P:].sum(1).tolist(), args.max_tokens_per_micro_batch)


def unpadded(input_ids, attention_mask, response_mask, rows):
    """(input ids, attention mask, response length R') of `rows` cut to their own longest prompt and longest
    response (with --tools: every turn and tool result, the attention mask's real tokens): prompts are
    left-padded and responses right-padded, so the columns cut hold only padding and the forwards compute
    nothing on them; results for the kept R' response positions are the same (to rounding)."""
    R = response_mask.shape[1]
    am, P = attention_mask[rows], input_ids.shape[1] - R
    first = P - int(am[:, :P].sum(1).max())  # the longest prompt's first token
    R_kept = max(int(am[:, P:].sum(1).max()), 1)
    return input_ids[rows][:, first:P + R_kept], am[:, first:P + R_kept], R_kept


@dataclass
class Samples:
    """What the old actor sampled for a batch of prompts and what the reward gave it, before any scoring forward:
    N rows (each prompt's n_samples_per_prompt responses on consecutive rows, its group)."""
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    response_ids: torch.Tensor  # [N, R] right-padded
    response_mask: torch.Tensor  # [N, R] 1 on every real token, up to and including each row's EOS
    action_mask: torch.Tensor  # [N, R] 1 on the policy's own tokens (== response_mask without --tools)
    sampler_logprobs: torch.Tensor  # [N, R] the sampler's own log-probs of its tokens (0 on tool results)
    scores: torch.Tensor  # [N] total reward (CPU)
    reward_parts: dict  # {part: [N]}
    has_eos: torch.Tensor  # [N] bool
    responses: list  # N decoded responses
    prompts: list  # N rendered prompts
    groups: torch.Tensor  # [N] the index of each response's prompt (CPU)
    seconds: dict  # generate, reward
    transcripts: list = None  # --tools: N lists of the turns' messages
    tool_stats: dict = None  # --tools: {tool_calls, tool_errors, unfinished, turns: [N] (CPU)}

    def select(self, rows):
        """The rows `rows` ([k] indices, CPU), in that order."""
        on, picked = rows.to(self.prompt_ids.device), rows.tolist()
        return Samples(self.prompt_ids[on], self.prompt_mask[on], self.response_ids[on], self.response_mask[on],
                       self.action_mask[on], self.sampler_logprobs[on], self.scores[rows],
                       {k: v[rows] for k, v in self.reward_parts.items()}, self.has_eos[on],
                       [self.responses[i] for i in picked], [self.prompts[i] for i in picked], self.groups[rows],
                       self.seconds, self.transcripts and [self.transcripts[i] for i in picked],
                       self.tool_stats and {k: v[rows] for k, v in self.tool_stats.items()})


def concat_samples(parts, pad_token_id):
    """Several Samples as one: prompts left-padded and responses right-padded to the widest again, groups
    renumbered in order of first appearance; the first one's seconds."""
    P, R = (max(s.prompt_ids.shape[1] for s in parts), max(s.response_ids.shape[1] for s in parts))
    left = lambda t, value: F.pad(t, (P - t.shape[1], 0), value=value)  # noqa: E731
    right = lambda t, value: F.pad(t, (0, R - t.shape[1]), value=value)  # noqa: E731
    groups, offset = [], 0
    for s in parts:
        groups.append(s.groups + offset)
        offset += int(s.groups.max()) + 1 if len(s.groups) else 0
    _, groups = torch.cat(groups).unique_consecutive(return_inverse=True)
    return Samples(torch.cat([left(s.prompt_ids, pad_token_id) for s in parts]),
                   torch.cat([left(s.prompt_mask, 0) for s in parts]),
                   torch.cat([right(s.response_ids, pad_token_id) for s in parts]),
                   torch.cat([right(s.response_mask, 0) for s in parts]),
                   torch.cat([right(s.action_mask, 0) for s in parts]),
                   torch.cat([right(s.sampler_logprobs, 0.0) for s in parts]), torch.cat([s.scores for s in parts]),
                   {k: torch.cat([s.reward_parts[k] for s in parts]) for k in parts[0].reward_parts},
                   torch.cat([s.has_eos for s in parts]), [r for s in parts for r in s.responses],
                   [q for s in parts for q in s.prompts], groups, parts[0].seconds,
                   parts[0].transcripts and [t for s in parts for t in s.transcripts],
                   parts[0].tool_stats and {k: torch.cat([s.tool_stats[k] for s in parts]) for k in parts[0].tool_stats})


@torch.no_grad()
def sample_and_reward(batch, old_actor, reward, tokenizer, args, autocast, tool_runner=None):
    """The old actor's responses to a batch of prompts and their reward (with DAPO's overlong shaping, the part
    `overlong`, when --overlong_buffer_len is set): Samples. With a `tool_runner` (--tools) each response is a
    conversation of up to --max_turns turns with the tools' results between them (multi_turn.sample_with_tools);
    its text is every turn and result as rendered, and the reward also gets the turns as messages."""
    device = args.device
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    stop_ids = stop_token_ids(old_actor.lm, tokenizer)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    transcripts = tool_stats = None
    t0 = synced_time(device)
    with autocast, unsharded(old_actor):  # sharded (--fsdp 1): gathered once, no collective per decoded token
        if tool_runner is None:
            response_ids, response_mask, sampler_logprobs = sample_responses(
                old_actor.lm, prompt_ids, prompt_mask, args.max_gen_len, stop_ids, tokenizer.pad_token_id, **sampling)
            action_mask, has_eos = response_mask, ends_with_stop(response_ids, response_mask, stop_ids)
        else:
            rollout = sample_with_tools(old_actor.lm, tokenizer, prompt_ids, prompt_mask, batch["messages"],
                                        batch["tools"], batch["template_kwargs"], tool_runner, args.max_turns,
                                        args.max_gen_len, stop_ids, **sampling)
            response_ids, response_mask, action_mask = rollout.response_ids, rollout.response_mask, rollout.action_mask
            sampler_logprobs, has_eos, transcripts = rollout.logprobs, rollout.has_eos, rollout.transcripts
            tool_stats = dict(tool_calls=rollout.tool_calls.cpu(), tool_errors=rollout.tool_errors.cpu(),
                              unfinished=rollout.unfinished.cpu(),
                              turns=torch.tensor([sum(m["role"] == "assistant" for m in t) for t in transcripts]))
    t1 = synced_time(device)
    responses = decode_responses(tokenizer, response_ids, response_mask)
    turns = {} if transcripts is None else dict(transcripts=transcripts, unfinished=tool_stats["unfinished"],
                                                tools=batch["tools"])
    scores, parts = reward(batch["prompts"], responses, batch["answers"], batch["messages"], has_eos, batch["rows"],
                           **turns)
    if args.overlong_buffer_len:
        parts["overlong"] = overlong_penalty(response_mask.sum(1).cpu(), args.max_gen_len, args.overlong_buffer_len,
                                             args.overlong_penalty)
        scores = scores + parts["overlong"]
    return Samples(prompt_ids, prompt_mask, response_ids, response_mask, action_mask, sampler_logprobs, scores, parts,
                   has_eos, responses, list(batch["prompts"]), batch["groups"],
                   dict(generate=t1 - t0, reward=synced_time(device) - t1), transcripts, tool_stats)


def dynamic_sampling(batch, next_batch, sample, args, pad_token_id):
    """DAPO's dynamic sampling (Yu et al. 2025; verl's algorithm.filter_groups): the groups whose responses all
    scored the same give a group estimator no signal (every advantage 0), so they are left out and more batches
    are drawn (`next_batch()`, None when the epoch has none left; at most --max_filter_batches) until the rollout
    holds --batch_size prompts with signal; still short, it is topped up with groups without signal, so every
    rank updates on the same number of rows. Every rank draws as long as one needs to (one collective per draw;
    a reward error on one rank stops every rank's drawing and is raised after). Returns (Samples, stats)."""
    kept, spare, drawn, error, seconds = [], [], 0, None, {}
    while True:
        try:
            samples = sample(batch)
            seconds = {k: seconds.get(k, 0.0) + v for k, v in samples.seconds.items()}
            signal = groups_with_signal(samples.scores, samples.groups)
            kept.append(samples.select(signal.nonzero()[:, 0]))
            spare.append(samples.select((~signal).nonzero()[:, 0]))
        except NonFiniteRolloutError as e:
            error = e
        drawn += 1
        with_signal = sum(len(s.responses) for s in kept) // args.n_samples_per_prompt
        short, failed = all_reduce_sum(torch.tensor([float(with_signal < args.batch_size), float(error is not None)],
                                                    device=args.device)).tolist()
        if failed or not short or drawn > args.max_filter_batches:
            break
        batch = next_batch()  # the same answer on every rank: their shards are equally long
        if batch is None:
            break
    if error is not None:
        raise error
    rows = args.batch_size * args.n_samples_per_prompt
    samples = concat_samples(kept + spare, pad_token_id).select(torch.arange(rows))  # groups with signal first
    samples.seconds = seconds  # every draw's, once
    return samples, dict(filter_groups_kept=min(with_signal, args.batch_size), filter_batches_drawn=drawn,
                         filter_groups_drawn=drawn * args.batch_size)


@torch.no_grad()
def score_rollout(samples, old_actor, ref_model, critic, kl_coef, orders, args, autocast):
    """Score the samples and turn their scores into token rewards: an Experience. old_actor and ref_model are
    model.policy.Policy modules: policy(ids, mask, R, temperature) gives the log-probs [B, R] of the last R
    tokens (with their entropy and the MoE balance loss).

    pi_old, pi_ref and V (critic None: no values, for the critic-free estimators) are computed on
    the very micro-batches that the first PPO epoch uses (orders[0]), so with old actor == actor the
    first ratio is exactly 1. The sampler's own log-probs against pi_old give the rollout-correction weights
    (--rollout_is) and the mismatch metrics. No collective runs in here (pass the bare critic, not its DDP
    wrapper): a rank can drop its rollout on a stop signal without leaving the others waiting.
    """
    device = args.device
    t0 = synced_time(device)
    B, R = samples.response_ids.shape
    input_ids = torch.cat([samples.prompt_ids, samples.response_ids], 1)  # [B, P+R]
    attention_mask = torch.cat([samples.prompt_mask, samples.response_mask], 1)  # tool results included
    mask = samples.action_mask.float()  # the policy's own tokens: what is scored, penalised and trained
    old_logprobs, ref_logprobs, values = (torch.zeros(B, R, device=device) for _ in range(3))
    scored = 0  # token positions through each scoring forward, padding included
    for minibatch in rollout_micro_batches(orders[0], attention_mask, mask, args):
        for rows in minibatch:
            ids, am, R_kept = unpadded(input_ids, attention_mask, mask, rows)  # [b, P' + R'], no all-pad columns
            scored += ids.numel()
            with autocast:
                old_logprobs[rows, :R_kept] = old_actor(ids, am, R_kept, args.temperature)[0]
                ref_logprobs[rows, :R_kept] = ref_model(ids, am, R_kept, args.temperature)[0]
                if critic is not None:
                    values[rows, :R_kept] = critic_values(critic, ids, am, R_kept).to(device)
    bad = (~torch.isfinite(values)).any(1).nonzero()
    if len(bad):  # padding included (NaN * 0 is NaN); whitening would spread it to every advantage
        row = int(bad[0])
        raise NonFiniteRolloutError(f"critic returned a non-finite value for sample {row} "
                                    f"(response {samples.responses[row][:80]!r})")
    # token-level reward: -beta * KL at every token (reward mode), plus the score at the last real token
    kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask
    token_rewards = -kl_coef * kl if args.kl_mode == "reward" else torch.zeros_like(kl)
    last = last_token(mask)  # the policy's last token (a tool's result may not end the row)
    token_rewards[torch.arange(B, device=device), last] += samples.scores.to(device)
    loss_mask, rollout_weights, mismatch = policy_loss_weights(old_logprobs, samples.sampler_logprobs, mask,
                                                               samples.has_eos, args)
    return Experience(input_ids=input_ids, attention_mask=attention_mask, response_mask=mask,
                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values * mask, kl=kl,
                      token_rewards=token_rewards, scores=samples.scores, reward_parts=samples.reward_parts,
                      groups=samples.groups, has_eos=samples.has_eos, responses=samples.responses,
                      prompts=samples.prompts, loss_mask=loss_mask, rollout_weights=rollout_weights,
                      rollout_stats=mismatch | tool_use_metrics(samples.tool_stats),
                      transcripts=samples.transcripts, sampler_gap=mismatch["log_ratio_abs_mean"],
                      seconds=dict(samples.seconds, forward=synced_time(device) - t0), scored_positions=scored)


def last_token(mask):
    """[B] the index of each row's last 1 in mask [B, R] (0 for a row without one)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0) * positions).amax(1).sub(1).clamp(min=0)


def tool_use_metrics(tool_stats):
    """Tool use over a rollout (0-d tensors; none without --tools): the share of responses that called a tool, calls
    per response, the share of calls answered with an error, the share still calling at the last turn, turns."""
    if not tool_stats:
        return {}
    calls = tool_stats["tool_calls"].double()
    return dict(tool_call_rate=(calls > 0).double().mean(), tool_calls_per_response=calls.mean(),
                tool_error_rate=tool_stats["tool_errors"].double().sum() / calls.sum().clamp(min=1),
                unfinished_rate=tool_stats["unfinished"].double().mean(), turns=tool_stats["turns"].double().mean())


def policy_loss_weights(old_logprobs, sampler_logprobs, mask, has_eos, args):
    """Which tokens carry the policy loss and with what weight: (loss_mask [B, R], rollout-correction weights
    [B, R] or None, the sampler/trainer mismatch metrics). DAPO: with --mask_truncated_responses a response cut
    at --max_gen_len carries no policy loss (it is unfinished, not wrong). --rollout_is: pi_old / sampler
    importance weights, truncated or masked (core_algos.rollout_correction)."""
    loss_mask = mask * has_eos.to(mask.device)[:, None] if args.mask_truncated_responses else mask
    if args.rollout_is == "none":
        return loss_mask, None, rollout_mismatch_metrics(old_logprobs, sampler_logprobs, mask)
    weights, mismatch = rollout_correction(old_logprobs, sampler_logprobs, mask, args.rollout_is, args.rollout_is_mode,
                                           args.rollout_is_threshold, args.rollout_is_threshold_low)
    return loss_mask, weights, mismatch


def collect_rollout(batch, next_batch, old_actor, ref_model, critic, reward, tokenizer, kl_coef, orders, args,
                    autocast, tool_runner=None):
    """One rollout: sample and reward a batch (with --filter_groups, more batches until the groups with signal fill
    it: dynamic_sampling), then score it (score_rollout). Returns an Experience."""
    sample = lambda b: sample_and_reward(b, old_actor, reward, tokenizer, args, autocast, tool_runner)  # noqa: E731
    if args.filter_groups:
        samples, filter_stats = dynamic_sampling(batch, next_batch, sample, args, tokenizer.pad_token_id)
    else:
        samples, filter_stats = sample(batch), {}
    experience = score_rollout(samples, old_actor, ref_model, critic, kl_coef, orders, args, autocast)
    experience.rollout_stats.update(filter_stats)
    return experience


def add_advantages(experience, estimator, gamma, lam):
    """The advantages of --adv_estimator, and the raw ones (before whitening) for the logs.
    gae: GAE on the token rewards, whitened; returns (the critic's targets) taken before whitening.
    reinforce_pp: returns-to-go of the token rewards (GAE with no critic and lambda 1), whitened.
    grpo, dr_grpo, rloo, reinforce_pp_baseline: one advantage per response (group_advantages), given to each
    of its tokens; reinforce_pp_baseline's whitened over the batch."""
    exp, mask = experience, experience.response_mask
    if estimator == "gae":
        raw, exp.returns = compute_advantages(exp.token_rewards, exp.values, mask, gamma, lam)
    elif estimator == "reinforce_pp":
        raw, _ = compute_advantages(exp.token_rewards, torch.zeros_like(mask), mask, gamma, 1.0)
    else:
        raw = group_advantages(exp.scores, exp.groups.cpu(), estimator).to(mask.device)[:, None] * mask
    whiten = estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline")
    exp.raw_advantages, exp.advantages = raw, masked_whiten(raw, mask) if whiten else raw


# ----------------------------------------------------------------------------- update
@dataclass
class UpdateResult:
    stats: dict  # token means over every minibatch evaluated, by name (value_loss, policy_loss, approx_kl, ...)
    optimizer_steps: int
    skipped_steps: int  # non-finite loss or gradient: no step, weights untouched
    early_stopped: bool


def ppo_update(learner, experience, orders, kl_coef, args, autocast, train_actor=True):
    """PPO epochs over one rollout: clipped policy + value loss, one optimizer step per minibatch.

    The policy loss is aggregated by --loss_agg_mode (aggregate_loss), the value loss is a token mean;
    every normaliser counts the whole minibatch of every rank and each rank's share is multiplied by the
    world size, which DDP's all-reduce (FSDP's reduce-scatter) averages again, so N ranks take the same
    step as one process on the global batch. With train_actor=False (critic warm-up) only the value loss is
    computed and only the critic steps; without a critic (the critic-free estimators) only the policy. With a
    float16 loss scaler, steps whose gradients overflowed are the scaler's business (it lowers the scale): they
    are counted as `scaler_skipped_steps`, not as skipped.
    """
    exp, scaler = experience, learner.scaler
    world = get_world_size()
    loss_mask = exp.loss_mask if exp.loss_mask is not None else exp.response_mask
    trained = ([(learner.actor, learner.actor_opt, learner.actor_sched)] if train_actor else []) + \
        ([(learner.critic, learner.critic_opt, learner.critic_sched)] if learner.critic is not None else [])
    models, optimizers, schedulers = (list(column) for column in zip(*trained))
    totals = {}  # token sums over every minibatch evaluated
    steps = skipped = scaler_skipped = 0
    first_ratio_dev = None
    early_stopped = False
    for epoch in range(args.ppo_epochs):
        for minibatch in rollout_micro_batches(orders[epoch], exp.attention_mask, exp.response_mask, args):
            rows = torch.cat(minibatch)
            # normalisers over the whole minibatch of every rank: the value loss's tokens, the policy loss's
            # tokens and responses (fewer with --mask_truncated_responses)
            n_tokens, n_loss_tokens, n_responses = all_reduce_sum(torch.stack([
                exp.response_mask[rows].sum(), loss_mask[rows].sum(), (loss_mask[rows].sum(1) > 0).sum().float()
            ])).tolist()
            n_loss_tokens, n_responses = max(n_loss_tokens, 1.0), max(n_responses, 1.0)  # all masked: a zero loss
            sums = {}
            for k, micro in enumerate(minibatch):
                ids, am, R_kept = unpadded(exp.input_ids, exp.attention_mask, exp.response_mask, micro)
                take = lambda t: t[micro, :R_kept]  # noqa: E731  [b, R']: the micro-batch's response columns
                mask = take(exp.response_mask)
                # gradients are all-reduced only on the last micro-batch of a minibatch
                sync = no_sync(*models) if world > 1 and k < len(minibatch) - 1 else contextlib.nullcontext()
                with sync, autocast:
                    loss, aux_loss, token_stats = 0.0, None, {}
                    if learner.critic is not None:
                        values = critic_values(learner.critic, ids, am, R_kept).to(ids.device)
                        v_loss = value_loss_per_token(values, take(exp.values), take(exp.returns), args.cliprange_value)
                        loss, token_stats["value_loss"] = args.vf_coef * (v_loss * mask).sum() / n_tokens, v_loss
                    if train_actor:
                        # the entropy's backward costs a full-vocab softmax: only pay it when it is in the loss
                        logprobs, entropy, aux_loss = learner.actor(ids, am, R_kept, args.temperature,
                                                                    "grad" if args.entropy_coef else "value")
                        pg_loss, ratio, clipped = policy_loss(
                            args.policy_loss, logprobs, take(exp.old_logprobs), take(exp.advantages), mask,
                            args.clip_epsilon, args.clip_epsilon_high, args.dual_clip_c,
                            ratio_cap=args.clip_epsilon_high, tau_pos=args.sapo_tau_pos, tau_neg=args.sapo_tau_neg)
                        if exp.rollout_weights is not None:  # rollout correction: on the policy-gradient term only
                            pg_loss = pg_loss * take(exp.rollout_weights)
                        kl_ref = kl_penalty(logprobs, take(exp.ref_logprobs), args.kl_estimator)
                        actor_loss = pg_loss - args.entropy_coef * entropy
                        if args.kl_mode == "loss":
                            actor_loss = actor_loss + kl_coef * kl_ref
                        loss = loss + aggregate_loss(actor_loss, take(loss_mask), args.loss_agg_mode, n_loss_tokens,
                                                     n_responses, args.max_gen_len)
                        log_ratio = (logprobs - take(exp.old_logprobs)).detach()
                        token_stats.update(approx_kl=0.5 * log_ratio ** 2, policy_loss=pg_loss, entropy=entropy,
                                           clipfrac=clipped, kl_actor_ref=kl_ref, ratio_dev=(ratio - 1).abs())
                    loss = loss * world  # this rank's share of the global mean; DDP (FSDP) averages over the ranks
                    if aux_loss is not None:
                        loss = loss + aux_loss / len(minibatch)
                    (scaler.scale(loss) if scaler else loss).backward()
                with torch.no_grad():
                    for name, value in token_stats.items():
                        sums[name] = sums.get(name, 0.0) + (value.detach() * mask).sum().double()
                    sums["tokens"] = sums.get("tokens", 0.0) + mask.sum().double()
                    sums["non_finite_loss"] = sums.get("non_finite_loss", 0.0) + (~torch.isfinite(loss)).double()
            sums = all_reduce_dict(sums)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
            if first_ratio_dev is None and train_actor:  # 0 exactly when the old actor is the actor
                first_ratio_dev = sums["ratio_dev"] / n_tokens
            if args.early_stop_kl > 0 and train_actor and sums["approx_kl"] / n_tokens > args.early_stop_kl:
                # a real stop: gradients dropped, no optimizer step, no further minibatches or epochs
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                early_stopped = True
                break
            if scaler:
                for opt in optimizers:
                    scaler.unscale_(opt)
            # the norm is computed either way (a non-finite one skips the step); max_norm inf clips nothing
            # (over sharded gradients too: FSDP's norm is a DTensor, its full value the same on every rank)
            norms = [full_tensor(torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip or math.inf))
                     for m in models]
            finite_loss = sums["non_finite_loss"] == 0
            if finite_loss and all(bool(torch.isfinite(n)) for n in norms):
                for opt in optimizers:
                    scaler.step(opt) if scaler else opt.step()
                for sched in schedulers:
                    sched.step()
                steps += 1
            elif finite_loss and scaler:  # float16 gradients overflowed: the scaler lowers its scale
                scaler_skipped += 1
            else:  # non-finite loss or gradient: skip the step, weights untouched
                skipped += 1
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
        if early_stopped:
            break
    n = max(totals["tokens"], 1.0)
    stats = {name: totals[name] / n for name in totals if name not in ("tokens", "non_finite_loss", "ratio_dev")}
    stats["scaler_skipped_steps"] = scaler_skipped
    if first_ratio_dev is not None:
        stats["first_minibatch_ratio_dev"] = first_ratio_dev
    if scaler:
        stats["loss_scale"] = scaler.get_scale()
    return UpdateResult(stats, steps, skipped, early_stopped)


def rollout_metrics(experience):
    """Rollout statistics averaged over ranks (the value's explained variance only where there is a critic; the
    sampler/trainer mismatch as rollout_<name>, whose extremes are the extremes over ranks)."""
    exp = experience
    mask, advantages = exp.response_mask, exp.raw_advantages
    local = {
        "reward": exp.scores.mean(),
        **{f"reward_{name}": values.mean() for name, values in exp.reward_parts.items()},
        "kl_ref": masked_mean(exp.kl, mask), "kl_ref_per_response": exp.kl.sum(1).mean(),
        "advantage_mean": masked_mean(advantages, mask),
        "advantage_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt(),
        "avg_response_len": mask.sum(1).mean(), "eos_rate": exp.has_eos.float().mean(),
        "sampler_logprob_gap": exp.sampler_gap,
    }
    if exp.returns is not None:
        err = exp.returns - exp.values
        local["value_explained_var"] = 1 - masked_mean((err - masked_mean(err, mask)) ** 2, mask) / \
            masked_mean((exp.returns - masked_mean(exp.returns, mask)) ** 2, mask).clamp(min=1e-8)
    stats = {f"rollout_{k}" if k.startswith(("token", "seq", "log", "kl", "is_")) else k: v
             for k, v in (exp.rollout_stats or {}).items()}
    extremes = {k: v for k, v in stats.items() if k.endswith(("_max", "_min"))}
    local.update({k: v for k, v in stats.items() if k not in extremes})
    # a reward function's diagnostics (custom/<key>) may come back on some ranks only
    local = {k: local.get(k, torch.zeros(())) for k in all_names(local)}
    values_ = all_reduce_sum(torch.stack([torch.as_tensor(v).detach().double().cpu() for v in local.values()]).to(
        mask.device))
    metrics = dict(zip(local, (values_ / get_world_size()).tolist()))
    if extremes:  # max over ranks; a min is minus the max of minus
        signs = torch.tensor([1.0 if k.endswith("_max") else -1.0 for k in extremes], dtype=torch.float64)
        top = torch.stack([torch.as_tensor(v).detach().double().cpu() for v in extremes.values()]) * signs
        if dist.is_initialized():
            top = top.to(mask.device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        metrics.update(zip(extremes, (top.cpu() * signs).tolist()))
    return metrics


# ----------------------------------------------------------------------------- building the run
def load_data(args, tokenizer, reward_functions, tool_runner=None):
    """The training prompts and the held-out ones: what does not fit stops here, before any model is built.
    With a tool_runner (--tools) each prompt lists its tools."""
    # every rank sees its own shard of one global shuffled order (build_run); bad lines stop the run here
    if args.max_seq_len is None and os.path.abspath(args.data_path) == DEMO_DATA:
        args.max_seq_len = 64
    keys = dict(prompt_key=args.prompt_key, label_key=args.label_key, max_length=args.max_seq_len,
                thinking_ratio=args.thinking_ratio, seed=args.seed, overlong=args.overlong_prompts,
                apply_chat_template=bool(args.apply_chat_template),
                tools=tool_runner.schemas if tool_runner else None)
    dataset = RLAIFDataset(args.data_path, tokenizer, **keys)
    eval_set = RLAIFDataset(args.eval_data_path, tokenizer, **keys) if args.eval_data_path else None
    if args.max_seq_len is None:  # fit the data: no prompt left out
        args.max_seq_len = max(data.longest for data in (dataset, eval_set) if data is not None)
        Logger(f"--max_seq_len {args.max_seq_len}: the longest prompt of --data_path"
               f"{' and --eval_data_path' if eval_set else ''} (give it to leave longer prompts out)")
    eval_samples = []
    if eval_set:
        check_labels(eval_set, reward_functions, 0.0)  # routing and what the functions need, as below
        eval_samples = eval_set.samples[:args.eval_limit or None]  # epoch 0's draws
    # what the rewards need from each row (a label, a routed data_source); last, as it binds each function to
    # the training file's label column
    check_labels(dataset, reward_functions, args.correctness_reward)
    args.thinking_ratio = dataset.thinking_ratio  # the share drawn (None: the template's own default)
    return dataset, eval_samples


def trained_parameters(model):
    """What the optimizer steps: every parameter, or with LoRA the adapters (and the critic's value head)."""
    return [p for p in model.parameters() if p.requires_grad]


def frozen_copy(model):
    """A frozen copy of `model` (the reference, the old actor); the weights it already holds frozen (a LoRA base)
    are shared, not copied."""
    copy_ = copy_sharing(model, lambda p: not p.requires_grad).eval()
    copy_.requires_grad_(False)
    return copy_


def build_models(args, reward_functions):
    """Actor (trained), old actor (samples, gives pi_old), reference (KL anchor), critic (None for the critic-free
    estimators: one model less) and the reward; and peft's model around the actor's LM when it trains a LoRA
    adapter (None otherwise)."""
    build_device = "cpu" if args.fsdp else args.device  # --fsdp 1: each rank moves only its shards to its GPU
    lm, tokenizer = init_model(args.from_weight, args.save_dir, args.tokenizer_path, build_device,
                               hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                               use_moe=None if args.use_moe is None else bool(args.use_moe))
    # a too-short table is refused (with --tools: every turn's tokens; the tools' results come on top)
    warning = check_position_limit(lm, args.max_seq_len, args.max_gen_len * (args.max_turns or 1),
                                   gen_flags=args.tools and f"--max_gen_len {args.max_gen_len} x --max_turns "
                                                            f"{args.max_turns}")
    if warning:
        Logger(warning)
    # dropout off (eval mode) everywhere, as TRL disables it: PPO's ratio compares two forwards of one policy,
    # and dropout masks would make them differ (no first ratio of 1, noisy log-probs and KL)
    lm.eval()
    # a LoRA critic on a LoRA actor: one frozen base for both (and the reference), each with its own adapters
    share_base = bool(args.lora_rank and args.lora_critic and not args.critic_weight and not args.fsdp
                      and (args.critic_device or build_device) == build_device)
    critic = build_critic(lm, args.critic_weight, tokenizer, share_base).to(args.critic_device or build_device).eval() \
        if args.adv_estimator == "gae" else None
    # the reference: a frozen copy, or, for a LoRA policy, the policy itself with its adapters off (no copy)
    reference = None if args.lora_rank else frozen_copy(lm)
    # LoRA adapters, recomputed activations, compiled blocks, frozen weights in the compute precision
    actor_peft = fit_models(args, lm, critic, reference)
    actor = Policy(lm)
    # with a sync every rollout the old actor is the actor itself: it samples and scores pi_old before the update
    old_actor = actor if args.update_old_actor_freq == 1 else Policy(frozen_copy(lm))
    ref_model = Policy(lm, adapters_off=True) if args.lora_rank else Policy(reference)
    reward = build_reward(args, lm.config, reward_model_from_flags(args, args.reward_device or args.device),
                          reward_functions)
    config = lm.config
    kind = f"MiniMind v{config.version}" if config.model_type == "minimind" else type(lm).__name__
    trained = sum(p.numel() for m in (lm, critic) if m is not None for p in m.parameters() if p.requires_grad)
    Logger(f"actor: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M params "
           f"({kind}, hidden {config.hidden_size}, {config.num_hidden_layers} layers"
           f"{', MoE' if getattr(config, 'use_moe', False) else ''}"
           f"{f', LoRA rank {args.lora_rank}' if args.lora_rank else ''}); trained parameters "
           f"({'actor + critic' if critic is not None else f'actor; {args.adv_estimator}: no critic'}): "
           f"{trained / 1e6:.2f}M"
           + (("; think block as the template's default renders it (--thinking_ratio draws "
               f"{thinking_flag(tokenizer)})" if args.thinking_ratio is None else
               f"; think block open in {args.thinking_ratio:.0%} of prompts ({thinking_flag(tokenizer)})")
              if thinking_flag(tokenizer) else "") + f"\nreward = {reward.describe()}")
    return actor, old_actor, ref_model, critic, reward, tokenizer, actor_peft


def check_tools(dataset, tool_runner, tokenizer, stop_ids, args):
    """Before any rollout: the chat template carries a tool conversation however the prompts are rendered
    (multi_turn.check_tool_template), and the tools rows declare exist in --tools (else say how many rows
    name tools the file lacks: their calls will be answered with an error)."""
    stop_texts = [tokenizer.decode([i]) for i in stop_ids.tolist()]
    for kwargs in {json.dumps(dataset[i]["template_kwargs"]) for i in range(min(len(dataset), 64))}:
        check_tool_template(tokenizer, dataset.tools[0], json.loads(kwargs), stop_texts,
                            f"--tools {args.tools} with --tokenizer_path {args.tokenizer_path}")
    known = set(tool_runner.names)
    missing = [i for i, tools in enumerate(dataset.tools) if any(tool_name(t) not in known for t in tools)]
    if missing:
        names = sorted({tool_name(t) for i in missing for t in dataset.tools[i]} - known)
        Logger(f"warning: {len(missing)} of {len(dataset)} prompts of {args.data_path} declare tools that {args.tools} "
               f"does not define ({', '.join(names[:8])}; first: {dataset.wheres[missing[0]]}); the policy's calls to "
               f"them are answered with an error")


def plan_steps(args, dataset, rank, world):
    """This rank's shard of one global shuffled order, the rollouts per epoch and in all."""
    if len(dataset) < args.batch_size * world:
        raise InputError(f"--batch_size {args.batch_size} x {world} processes needs {args.batch_size * world} "
                         f"prompts, but {args.data_path} has {len(dataset)}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size  # a last partial batch is left out (like drop_last)
    total_rollouts = steps_per_epoch * args.epochs
    if args.max_steps:
        total_rollouts = min(total_rollouts, args.max_steps)
    if args.critic_warmup_steps >= total_rollouts:
        raise InputError(f"--critic_warmup_steps {args.critic_warmup_steps} leaves none of the {total_rollouts} "
                         f"rollouts to train the actor")
    return sampler, steps_per_epoch, total_rollouts


def build_run(args):
    """Models, optimizers, LR schedules, data and the resume state: a Run ready for train()."""
    local_rank = init_distributed_mode(args.device)
    if dist.is_initialized() and args.critic_device:
        raise InputError("--critic_device is for one process (the two-GPU layout); under torchrun each rank "
                         "keeps its models on its own GPU")
    check_flags(args)  # --fsdp 1 with what it cannot serve
    rank, world = get_rank(), get_world_size()
    if dist.is_initialized() and args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    setup_seed(args.seed + rank)  # each rank samples its own responses
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if device_type == "cpu" and dtype != torch.float32:
        Logger(f"note: --dtype {args.dtype} on CPU runs under torch.autocast('cpu') to check the mixed-precision "
               f"path; it is slow on CPUs without {args.dtype} instructions")
    warning = kl_placement_warning(args.kl_mode, args.kl_estimator, args.kl_coef)
    if warning:
        Logger(warning)

    # everything that needs no model is checked first: a bad flag, file or folder stops the run in seconds
    tokenizer = load_tokenizer(args.tokenizer_path)
    reward_functions = [RewardFunction(spec) for spec in args.reward_fn]  # loading errors name file and function
    tool_runner = ToolRunner(args.tools, args.tool_timeout, args.tool_max_chars) if args.tools else None
    dataset, eval_samples = load_data(args, tokenizer, reward_functions, tool_runner)
    sampler, steps_per_epoch, total_rollouts = plan_steps(args, dataset, rank, world)
    check_outputs(args)
    actor, old_actor, ref_model, critic, reward, tokenizer, actor_peft = build_models(args, reward_functions)
    if tool_runner:  # a template that cannot carry the tool conversation stops the run here
        check_tools(dataset, tool_runner, tokenizer, stop_token_ids(actor.lm, tokenizer), args)
    if args.fsdp:  # in place, before the optimizers: they hold the shards
        shard_models(args, actor, old_actor, ref_model, critic)
    if args.check_tokenizer and args.from_weight != "none":
        Logger(check_tokenizer_fit(ref_model, [dataset[i]["prompt_ids"] for i in range(min(8, len(dataset)))],
                                   tokenizer.pad_token_id, args.tokenizer_path, args.from_weight))
    opt_steps_per_rollout = args.ppo_epochs * (args.batch_size * args.n_samples_per_prompt // args.mini_batch_size)
    total_opt_steps = total_rollouts * opt_steps_per_rollout
    # fused: one pass over each parameter instead of ~10 elementwise kernels; the step is
    # memory-bound, so on CPU this cuts it ~4x (hidden 512: 110 -> 24 ms per optimizer step)
    fused = not (args.fsdp and dtype == torch.float16)  # (torch 2.13's fused AdamW takes no loss scaler over shards)
    actor_opt = torch.optim.AdamW(trained_parameters(actor), lr=args.learning_rate, fused=fused)
    critic_opt = torch.optim.AdamW(trained_parameters(critic), lr=args.critic_learning_rate, fused=fused) \
        if critic is not None else None
    learner = Learner(actor, critic, actor_opt, critic_opt,
                      # the actor's schedule spans only the rollouts after the critic warm-up
                      build_cosine_scheduler(actor_opt, total_opt_steps - args.critic_warmup_steps *
                                             opt_steps_per_rollout, args.warmup_steps),
                      build_cosine_scheduler(critic_opt, total_opt_steps, args.warmup_steps) if critic_opt else None,
                      (sharded_grad_scaler if args.fsdp else torch.amp.GradScaler)(device_type)
                      if dtype == torch.float16 else None, actor_peft)
    run = Run(args, tokenizer, dataset, sampler, eval_samples, learner, old_actor, ref_model, reward, autocast,
              AdaptiveKLController(args.kl_coef, args.target_kl_ctl, args.kl_horizon), Progress(), steps_per_epoch,
              total_rollouts, tools=tool_runner)
    if args.from_resume:
        resume_if_asked(run)
    if dist.is_initialized() and not args.fsdp:  # every loss-bearing forward goes through these wrappers
        # broadcast_buffers=False: the only buffers are RoPE tables (or the like), identical on every rank by
        # construction; broadcasting them costs ~17 MB per forward at hidden 512
        # find_unused_parameters for MoE models: an expert that received no token has no gradient
        learner.actor, learner.critic = (DistributedDataParallel(
            m, device_ids=[local_rank] if device_type == "cuda" else None, find_unused_parameters=is_moe(m),
            broadcast_buffers=False) if m is not None else None for m in (actor, critic))
    if is_main_process():
        start_logging(run)
    return run


def start_logging(run):
    """The run's flags and this script beside its weights; swanlab (a resumed run continues its swanlab run)."""
    args = run.args
    os.makedirs(args.save_dir, exist_ok=True)
    with open(os.path.join(args.save_dir, "run_args.json"), "w") as f:
        json.dump(vars(args) | {"world_size": get_world_size()}, f, indent=2)
    shutil.copy(os.path.abspath(__file__), os.path.join(args.save_dir, "train_ppo.py"))
    if args.use_swanlab:
        import swanlab
        run_id = run.progress.swanlab_id
        run.swanlab_run = swanlab.init(project=args.swanlab_project, mode={"cloud": "online"}.get(
            args.swanlab_mode, args.swanlab_mode), id=run_id, resume="allow" if run_id else None,
            log_dir=os.path.join(args.save_dir, "swanlog"), config=vars(args))
        run.progress.swanlab_id = run.swanlab_run.id


# ----------------------------------------------------------------------------- one training step
def train_step(run, batch, stop, next_batch=lambda: None):
    """One PPO step: rollout -> advantages -> update -> log. `next_batch()` draws another batch of the epoch (None
    when none is left), for dynamic sampling. Returns False, having changed nothing, when a stop signal came
    during the rollout (every rank agrees); True otherwise."""
    args, learner, p = run.args, run.learner, run.progress
    t0 = synced_time(args.device)
    # rollout: the old actor samples; old/ref log-probs, values and token rewards
    rows = args.batch_size * args.n_samples_per_prompt  # responses in this rank's rollout
    orders = [torch.randperm(rows).to(args.device) for _ in range(args.ppo_epochs)]
    try:
        experience, non_finite = stop.interruptible(
            collect_rollout, batch, next_batch, run.old_actor, run.ref_model, unwrap_model(learner.critic), run.reward,
            run.tokenizer, run.kl_ctl.value, orders, args, run.autocast, run.tools), False
    except NonFiniteRolloutError as e:
        print(f"warning: step {p.global_step + 1}{f' (rank {get_rank()})' if get_world_size() > 1 else ''}: {e}",
              flush=True)
        experience, non_finite = None, True
    # every rank agrees: one that updated alone would wait forever for the others' gradients
    any_non_finite, stopped = (all_reduce_sum(torch.tensor(
        [float(non_finite), float(stop.signum is not None)], device=args.device)) > 0).tolist()
    if stopped:
        return False
    p.global_step += 1
    skipped = 0
    if any_non_finite:
        Logger(f"step {p.global_step}: non-finite reward or value; no update for this rollout")
    else:
        add_advantages(experience, args.adv_estimator, args.gamma, args.lam)
        train_actor = p.global_step > args.critic_warmup_steps  # the critic alone during its warm-up
        t1 = synced_time(args.device)
        update = ppo_update(learner, experience, orders, run.kl_ctl.value, args, run.autocast, train_actor)
        t2 = synced_time(args.device)
        skipped = update.skipped_steps
        if skipped:
            Logger(f"step {p.global_step}: {skipped} optimizer step(s) skipped (non-finite loss or gradient)")
        log_update(run, experience, update, train_actor, t0, t1, t2)
    if p.global_step % args.update_old_actor_freq == 0 and run.old_actor is not unwrap_model(learner.actor):
        run.old_actor.load_state_dict(unwrap_model(learner.actor).state_dict())
    p.bad_streak = p.bad_streak + 1 if any_non_finite or skipped else 0
    if p.bad_streak >= args.max_bad_steps:
        raise RuntimeError(f"aborting at step {p.global_step}: {p.bad_streak} consecutive rollouts with non-finite "
                           f"rewards, values, losses or gradients (--max_bad_steps {args.max_bad_steps}); the last "
                           f"good checkpoint is kept in {args.checkpoint_dir}")
    return True


def log_update(run, experience, update, train_actor, t0, t1, t2):
    """The step's metrics (rollout, update, LR, timings) to metrics.jsonl and swanlab, a printed line, the
    logged samples; and the adaptive KL coefficient's update."""
    args, learner, p = run.args, run.learner, run.progress
    metrics = rollout_metrics(experience)
    kl_coef_used = run.kl_ctl.value
    run.kl_ctl.update(metrics["kl_ref_per_response"], len(experience.responses) * get_world_size())  # nats/response
    tokens, real, scored = all_reduce_sum(torch.stack([experience.response_mask.sum(), experience.attention_mask.sum(
    ).float(), torch.tensor(float(experience.scored_positions), device=args.device)])).tolist()
    seconds = experience.seconds
    metrics.update(update.stats, step=p.global_step, epoch=p.epoch, kl_coef=kl_coef_used,
                   actor_lr=learner.actor_sched.get_last_lr()[0],
                   **({"critic_lr": learner.critic_sched.get_last_lr()[0]} if learner.critic_sched else {}),
                   optimizer_steps=update.optimizer_steps, skipped_steps=update.skipped_steps,
                   early_stopped=int(update.early_stopped), critic_warmup=int(not train_actor),
                   rollout_tokens_per_s=tokens / max(seconds["generate"], 1e-9), time_rollout_s=seconds["generate"],
                   # the scoring forwards: the share of the positions they computed that were padding, and speed
                   forward_padding_share=1 - real / max(scored, 1), forward_tokens_per_s=real / max(seconds["forward"],
                                                                                                     1e-9),
                   time_forward_s=seconds["forward"], time_reward_s=seconds["reward"], time_update_s=t2 - t1,
                   time_step_s=t2 - t0)
    if is_main_process():
        steps_done = p.global_step - run.first_step
        eta = (time.time() - run.started) / steps_done * (run.total_rollouts - p.global_step)
        log_step(metrics, list(experience.reward_parts), run.metrics_path, run.swanlab_run, run.total_rollouts, eta,
                 args)
        if args.log_samples:
            # what each sample was credited with: GAE's advantage of its first token before whitening, or the
            # one advantage of the response (critic-free), and the index of its prompt in the rollout (its group)
            credited = experience.raw_advantages if args.adv_estimator == "gae" else experience.advantages
            log_samples(p.global_step, experience.prompts, experience.responses, experience.scores,
                        experience.reward_parts, args.log_samples, run.samples_path, run.swanlab_run,
                        advantages=credited[:, 0].tolist(), groups=experience.groups.tolist(),
                        lengths=experience.response_mask.sum(1).long().tolist(), transcripts=experience.transcripts)


# ----------------------------------------------------------------------------- the loop
def evaluate_and_log(run):
    """The held-out evaluation at run.progress.global_step: every rank evaluates its share; rank 0 writes."""
    args, policy = run.args, unwrap_model(run.learner.actor)
    with unsharded(policy):  # each rank decodes its own share of the prompts: no collective inside
        record = dict(step=run.progress.global_step, **evaluate_on_ranks(
            policy.lm, run.tokenizer, run.eval_samples, run.reward, args.batch_size, args.max_gen_len, args.device,
            run.autocast, run.tools, args.max_turns or 1))
    if is_main_process():
        log_eval(record, run.metrics_path, run.swanlab_run)


def train(run, after_step=None):
    """Epochs of PPO steps with evaluations, checkpoints and stop signals; `after_step(run)` (optional) is
    called after every step. Returns True when a stop signal ended the run (a resume file is written)."""
    args, p = run.args, run.progress
    run.started, run.first_step, stopped = time.time(), p.global_step, False
    rows = args.batch_size * args.n_samples_per_prompt
    Logger(f"training: {run.total_rollouts} rollouts of {args.batch_size * get_world_size()} prompts"
           f"{f' x {args.n_samples_per_prompt} responses' if args.n_samples_per_prompt > 1 else ''} "
           f"({args.adv_estimator}, {args.policy_loss} loss), {run.total_rollouts * args.ppo_epochs * (rows // args.mini_batch_size)} "
           f"optimizer steps, "
           f"device {args.device} ({args.dtype}), {get_world_size()} process(es)")
    # sharded (--fsdp 1) or with dynamic sampling's collectives, a rollout ends before the agreed stop
    with StopSignal(interrupt_rollouts=not (args.fsdp or args.filter_groups)) as stop:
        if run.eval_samples and not run.resumed:
            evaluate_and_log(run)  # the policy before any update
        saved_step = None  # the global step whose state the newest resume file holds
        while p.epoch < args.epochs and p.global_step < run.total_rollouts and not stopped:
            run.sampler.set_epoch(p.epoch)
            run.dataset.set_epoch(p.epoch)
            loader = DataLoader(run.dataset, batch_sampler=SkipBatchSampler(run.sampler, args.batch_size, p.step),
                                collate_fn=PromptCollator(run.tokenizer.pad_token_id, args.n_samples_per_prompt),
                                num_workers=args.num_workers,
                                generator=torch.Generator())  # its seed draw must not touch the global RNG
            batches, extra = iter(loader), []  # extra: the batches the step drew beyond its own

            def next_batch():
                if p.step + 1 + len(extra) >= run.steps_per_epoch:
                    return None
                extra.append(next(batches))
                return extra[-1]

            for batch in batches:
                extra.clear()
                if p.step >= run.steps_per_epoch or p.global_step >= run.total_rollouts:
                    break
                # a signal that came between rollouts (during a save, an evaluation, the data fetch) stops the
                # run here, before a rollout that would only be dropped
                if stop.agreed(args.device):
                    if saved_step != p.global_step:
                        save_checkpoint(run, get_rng_state())
                    stopped = True
                    break
                rng_before_step = get_rng_state()  # what a stop during the rollout saves: the step never ran
                if not train_step(run, batch, stop, next_batch):  # nothing changed: save the last finished step
                    Logger(f"stop signal during the rollout of step {p.global_step + 1}: rollout dropped")
                    if saved_step != p.global_step:
                        save_checkpoint(run, rng_before_step)
                    stopped = True
                    break
                p.step += 1 + len(extra)
                if after_step:
                    after_step(run)
                done = p.global_step >= run.total_rollouts
                if run.eval_samples and (p.global_step % args.eval_interval == 0 or done):
                    evaluate_and_log(run)
                # checkpoints; a signal during the update stops here, after the step, agreed by every rank
                stopped = stop.agreed(args.device)
                # no periodic save inside a bad streak: it would rotate the last good checkpoint out
                if (p.global_step % args.save_interval == 0 and not p.bad_streak) or done or stopped:
                    save_checkpoint(run, get_rng_state())
                    saved_step = p.global_step
                if stopped:
                    break
            if not stopped:
                p.epoch, p.step = p.epoch + 1, 0
    return stopped


def finish(run, stopped):
    """The closing report (the first evaluation against the last, where the weights are, what to run
    next), swanlab closed, the process group taken down."""
    args = run.args
    if stopped:
        Logger(f"stopped by signal at step {run.progress.global_step}; resume file written. "
               f"Continue with the same command plus --from_resume 1")
    elif is_main_process():
        out = policy_path(args, run.ref_model.config)
        table = eval_table(run.metrics_path) if run.eval_samples else None
        if table:
            Logger(f"held-out evaluation ({len(run.eval_samples)} prompts of {args.eval_data_path}, greedy):\n{table}")
        base = "" if args.from_weight == "none" else \
            f"--base {os.path.abspath(resolve_weight(args.from_weight, args.save_dir, args.hidden_size, args.use_moe))} "
        # eval_policy reads the run's settings (evaluation data, reward, lengths) from run_args.json beside `out`
        adapter = f"; LoRA adapter (peft): {os.path.abspath(lora_folder_path(args.save_dir, args.save_weight))}" \
            if args.lora_rank else ""
        out, scripts = os.path.abspath(out), os.path.join(ROOT, "scripts")  # the commands work from any folder
        Logger(f"done in {(time.time() - run.started) / 60:.1f} min. actor weights: {out}{adapter}; metrics: "
               f"{os.path.abspath(run.metrics_path)}; samples: {os.path.abspath(run.samples_path)}; resume: "
               f"{os.path.abspath(args.checkpoint_dir)}\nnext: python {os.path.join(scripts, 'eval_policy.py')} "
               f"{base}--trained {out}\n      python {os.path.join(scripts, 'plot_metrics.py')} "
               f"{os.path.abspath(run.metrics_path)}")
    if run.swanlab_run is not None:
        run.swanlab_run.finish()
    if run.tools is not None:
        run.tools.close()
    if dist.is_initialized():
        # free the DDP wrappers while the group lives: a reducer freed after destroy_process_group holds the
        # group's last reference, and gloo's destructor then waits on a worker thread that waits for the GIL
        run.learner = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- flags
# every knob of the run, checked before any work is done; at the end of the file so that the algorithm comes first
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, unless the help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one `error: ...` line, not the usage of 80 flags (--help shows them)."""

    def error(self, message):
        """A mistyped flag is answered with the closest ones (--lerning_rate: did you mean --learning_rate?)."""
        import difflib
        flags = [o for action in self._actions for o in action.option_strings]
        typos = [w.split("=")[0] for w in message.partition("unrecognized arguments: ")[2].split() if w.startswith("--")]
        hints = [f"{typo}: did you mean {' or '.join(close)}?" for typo in typos
                 if (close := difflib.get_close_matches(typo, flags, n=2, cutoff=0.75))]
        hint = f"; {'; '.join(hints)}" if hints else ""
        self.exit(2, f"error: {message}{hint} (python {self.prog} --help lists the flags)\n")


def parse_args(argv=None):
    p = ArgumentParser(description="PPO (RLHF) for MiniMind and any transformers causal LM. With no flags: "
                                            "the shipped demo kit on CPU.",
                                formatter_class=HelpFormatter)
    files = p.add_argument_group("files and models")
    files.add_argument("--save_dir", default="out",
                       help="weights, metrics.jsonl, args and a copy of this script go here")
    files.add_argument("--save_weight", default="ppo_actor",
                       help="saved as {save_dir}/{save_weight}_{hidden}{_moe}.pth")
    files.add_argument("--checkpoint_dir", default=None, help="resume files (default: {save_dir}/checkpoints)")
    files.add_argument("--from_weight", default=os.path.join(ROOT, "demo", "full_sft_128.pth"),
                       help="actor init: a MiniMind .pth path, a name resolved as the one "
                            "{save_dir}/{name}_<hidden>[_moe].pth (--hidden_size and --use_moe pick among several), "
                            "a transformers folder with config.json (any AutoModelForCausalLM: GPT-2, Qwen2, "
                            "Llama...; saved back to {save_dir}/{save_weight}_hf), or 'none' (a random MiniMind)")
    files.add_argument("--critic_weight", default=None,
                       help="critic init: a MiniMind critic or actor .pth, or a transformers folder (its backbone); "
                            "a fresh value head unless a saved critic; default: the actor's backbone")
    files.add_argument("--tokenizer_path", default=None,
                       help="the tokenizer the weights were trained with (real MiniMind weights: your MiniMind "
                            "checkout's minimind/model); its chat template renders the prompts. Default: the "
                            "--from_weight folder for transformers models, else the project's model/")
    files.add_argument("--check_tokenizer", type=int, default=1, choices=[0, 1],
                       help="at start-up, stop if the actor does not read --tokenizer_path's ids (skipped for "
                            "--from_weight none)")
    files.add_argument("--thinking_ratio", type=float, default=None,
                       help="share of prompts rendered with the think block open, for templates with a thinking "
                            "switch (minimind-3's open_thinking, 2025-10's enable_thinking); default: 0.9 on "
                            "MiniMind's data (a 'conversations' column), as minimind-3; on other data the "
                            "template's own default")
    files.add_argument("--data_path", default=DEMO_DATA,
                       help="training prompts: jsonl, json, parquet, or a folder written by datasets' save_to_disk")
    files.add_argument("--prompt_key", default=None,
                       help="the column holding the prompt: a string (a plain prompt) or a list of chat messages "
                            "(rendered by the chat template); default: the first of conversations, messages, prompt. "
                            "A 'prompt' chat ending with an assistant message is continued, as TRL does")
    files.add_argument("--apply_chat_template", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                       help="render plain-string prompts as one user message with the chat template (OpenRLHF's "
                            "flag; a bare --apply_chat_template means 1); chat rows are always rendered")
    files.add_argument("--label_key", default=None,
                       help="the column holding the ground truth (a dotted path for nested fields, e.g. "
                            "reward_model.ground_truth); default: reward_model.ground_truth for verl's rows (a "
                            "reward_model column), else the one of answer, ground_truth, solution the rows have")
    files.add_argument("--reward_device", default=None, help="device for the reward model (default: --device)")
    files.add_argument("--critic_device", default=None,
                       help="device for the critic (default: --device); with --reward_device, the two-GPU layout: "
                            "policy and reference on cuda:0, critic and reward model on cuda:1 (one process)")
    watch = p.add_argument_group("held-out evaluation and logged samples")
    watch.add_argument("--eval_data_path", default=None,
                       help="prompts evaluated greedily at step 0, every --eval_interval rollouts and at the end "
                            "(default: dataset/rlaif-eval.jsonl when training on the demo's "
                            "dataset/rlaif-mini.jsonl, else none; 'none' = off)")
    watch.add_argument("--eval_interval", type=int, default=20, help="rollouts between evaluations")
    watch.add_argument("--eval_limit", type=int, default=0,
                       help="evaluate only the first N prompts of --eval_data_path (0 = all)")
    watch.add_argument("--log_samples", type=int, default=4,
                       help="samples per rollout written to {save_dir}/samples.jsonl (0 = off)")
    size = p.add_argument_group("model size", "read off the weights; give it only to check them or to build a "
                                                 "random model")
    size.add_argument("--hidden_size", type=int, default=None, help="default: from the weights (512 to resolve a name)")
    size.add_argument("--num_hidden_layers", type=int, default=None,
                      help="default: from the weights (8 for a random MiniMind)")
    size.add_argument("--use_moe", type=int, default=None, choices=[0, 1],
                      help="MiniMind's mixture of experts; default: from the weights (a name picks the one file)")
    size.add_argument("--max_seq_len", type=int, default=None,
                      help="max prompt tokens; a longer prompt is never cut (see --overlong_prompts). Default: 64 "
                           "for the demo's data, else the longest prompt of --data_path and --eval_data_path")
    size.add_argument("--overlong_prompts", default="drop", choices=["drop", "error"],
                      help="prompts longer than --max_seq_len: drop = leave their rows out and say how many at "
                           "start-up (verl's filter_overlong_prompts); error = stop, naming the first")
    size.add_argument("--max_gen_len", type=int, default=48, help="max new tokens per response")
    schedule = p.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=10, help="passes over --data_path (the demo: 10 x 14 rollouts)")
    schedule.add_argument("--max_steps", type=int, default=0, help="stop after this many rollouts (0 = run all epochs)")
    schedule.add_argument("--batch_size", type=int, default=32, help="prompts per rollout per process")
    schedule.add_argument("--mini_batch_size", type=int, default=16,
                          help="rollout rows per optimizer step (per process)")
    schedule.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per minibatch")
    schedule.add_argument("--max_tokens_per_micro_batch", type=int, default=0,
                          help="instead of --accumulation_steps equal micro-batches, pack each minibatch's rows by "
                               "length into micro-batches of at most this many tokens, padding included (verl's "
                               "ppo_max_token_len_per_gpu); 0 = off. The loss is normalised as without it")
    schedule.add_argument("--ppo_epochs", type=int, default=2, help="passes over each rollout")
    schedule.add_argument("--learning_rate", type=float, default=5e-5,
                          help="the actor's peak learning rate (AdamW, cosine decay to a tenth)")
    schedule.add_argument("--critic_learning_rate", type=float, default=2e-4, help="the critic's peak learning rate")
    schedule.add_argument("--warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")
    schedule.add_argument("--grad_clip", type=float, default=1.0,
                          help="max gradient norm per model (actor, critic); 0 = no clipping")
    memory = p.add_argument_group("memory: what fits on one GPU")
    memory.add_argument("--gradient_checkpointing", type=int, default=0, choices=[0, 1],
                        help="actor and critic recompute each decoder block's activations in the backward pass "
                             "(MiniMind per block, transformers models through their own gradient_checkpointing)")
    memory.add_argument("--lora_rank", type=int, default=0,
                        help="train a LoRA adapter of this rank (peft) instead of the whole policy; the reference is "
                             "the same base with the adapter off (no copy); 0 = off")
    memory.add_argument("--lora_alpha", type=float, default=16,
                        help="LoRA scale alpha (the update is alpha / rank * BA)")
    memory.add_argument("--lora_target_modules", default="all-linear",
                        help="the modules that get adapters: all-linear (every linear layer of the decoder blocks; "
                             "not the embedding, the LM head or the value head) or names, comma-separated "
                             "(q_proj,v_proj)")
    memory.add_argument("--fsdp", type=int, default=0, choices=[0, 1],
                        help="under torchrun: shard actor, critic (with their AdamW states), reference and old actor "
                             "over the ranks per decoder block (FSDP2; bf16 compute, fp32 reduction on CUDA), so each "
                             "GPU holds 1/N of them; resume files become sharded checkpoint folders. 0 = DDP (every "
                             "rank holds everything)")
    memory.add_argument("--lora_critic", type=int, default=1, choices=[0, 1],
                        help="with --lora_rank: 1 = the critic trains its own adapter on its backbone and its value "
                             "head in full; 0 = a full critic")
    rollout = p.add_argument_group("rollout")
    rollout.add_argument("--temperature", type=float, default=1.0,
                         help="sampling temperature; the PPO log-probs divide the logits by it too")
    rollout.add_argument("--top_k", type=int, default=0,
                         help="0 = off. When on, the sampling distribution is truncated while pi_old is scored "
                              "untruncated: the ratio then is not exact")
    rollout.add_argument("--top_p", type=float, default=1.0, help="1.0 = off; same caveat as --top_k")
    rollout.add_argument("--update_old_actor_freq", type=int, default=1,
                         help="sync the old actor every N rollouts (1 = standard)")
    rollout.add_argument("--critic_warmup_steps", type=int, default=0,
                         help="the first N rollouts train only the critic: the actor, its optimizer and its schedule "
                              "are untouched")
    rollout.add_argument("--filter_groups", type=int, default=0, choices=[0, 1],
                         help="DAPO's dynamic sampling: leave out the groups whose responses all scored the same (no "
                              "signal for a group estimator) and sample more batches to fill the rollout")
    rollout.add_argument("--max_filter_batches", type=int, default=10,
                         help="with --filter_groups: extra batches a rollout may draw (0 = none); still short, it is "
                              "topped up with groups without signal")
    rollout.add_argument("--overlong_buffer_len", type=int, default=0,
                         help="DAPO's overlong shaping: a response in the last L tokens before --max_gen_len gets a "
                              "penalty growing linearly to --overlong_penalty (the reward part `overlong`); 0 = off")
    rollout.add_argument("--overlong_penalty", type=float, default=1.0, help="the overlong penalty at --max_gen_len")
    rollout.add_argument("--mask_truncated_responses", type=int, default=0, choices=[0, 1],
                         help="1: responses cut at --max_gen_len (no EOS) carry no policy loss (DAPO; TRL's "
                              "mask_truncated_completions); the critic still learns from them")
    rollout.add_argument("--rollout_is", default="none", choices=["none", *ROLLOUT_CORRECTION_LEVELS],
                         help="rollout correction: importance weights pi_old / sampler per token or per sequence on "
                              "the policy loss, for a sampler that differs from the scoring forward (bf16, other "
                              "kernels); the mismatch is logged either way")
    rollout.add_argument("--rollout_is_mode", default="truncate", choices=list(ROLLOUT_CORRECTION_MODES),
                         help="truncate: weights capped at the threshold (TIS); mask: weight 0 outside "
                              "[threshold_low, threshold] (MIS)")
    rollout.add_argument("--rollout_is_threshold", type=float, default=2.0, help="the upper threshold (verl's)")
    rollout.add_argument("--rollout_is_threshold_low", type=float, default=None,
                         help="the lower threshold; default: none (truncate), 1 / threshold (mask)")
    add_tool_flags(p)
    add_reward_flags(p)
    ppo = p.add_argument_group("PPO")
    ppo.add_argument("--policy_loss", default="ppo", choices=list(POLICY_LOSSES),
                     help="ppo: the clipped surrogate; cispo: REINFORCE weighted by the ratio capped at "
                          "--clip_epsilon_high (minimind-3's default, MiniMax-M1); gspo: the clipped surrogate on the "
                          "sequence's ratio; sapo: a soft gate instead of the clip (docs/algorithms.md)")
    ppo.add_argument("--clip_epsilon", type=float, default=None,
                     help="the ratio's clip range: below 1 - eps (default 0.2; gspo: 3e-4, as verl's GSPO recipe)")
    ppo.add_argument("--clip_epsilon_high", "--epsilon_high", type=float, default=None,
                     help="ppo and gspo: the clip above, 1 + eps_high (DAPO's clip-higher; default --clip_epsilon, "
                          "gspo: 4e-4); cispo: the cap on the ratio itself (default 5.0, as minimind-3 and TRL)")
    ppo.add_argument("--sapo_tau_pos", type=float, default=1.0, help="sapo: the gate's temperature for A > 0")
    ppo.add_argument("--sapo_tau_neg", type=float, default=1.05, help="sapo: the gate's temperature for A < 0")
    ppo.add_argument("--dual_clip_c", type=float, default=0.0,
                     help="dual clip for A<0: 0 = off, else a value > 1 (verl: 3.0)")
    ppo.add_argument("--cliprange_value", type=float, default=0.2,
                     help="the value's clip range around the rollout's values")
    ppo.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss")
    ppo.add_argument("--entropy_coef", type=float, default=0.0, help="weight of the entropy bonus (0 = none)")
    ppo.add_argument("--kl_coef", type=float, default=0.02,
                     help="beta, the weight of the KL penalty to the reference (initial value with --target_kl_ctl)")
    ppo.add_argument("--kl_estimator", default=None, choices=["k1", "k2", "k3"],
                     help="per-token KL estimate from d = log pi - log ref: k1 = d, k2 = d^2 / 2, "
                          "k3 = exp(-d) - 1 + d; default: k1 in the reward, k3 in the loss (the sound pairs)")
    ppo.add_argument("--kl_mode", default=None, choices=["reward", "loss"],
                     help=f"the KL to the reference as a per-token reward or as a loss term; default: "
                          f"{DEFAULT_KL_MODE} for every estimator (the only placement the estimators that score a "
                          f"response by its reward alone take: {', '.join(OUTCOME_ESTIMATORS)})")
    ppo.add_argument("--adv_estimator", default="gae", choices=["gae", "reinforce_pp", *OUTCOME_ESTIMATORS],
                     help="gae: PPO with the critic; grpo, dr_grpo, rloo, reinforce_pp_baseline: per-response "
                          "advantages from the group of --n_samples_per_prompt responses to a prompt; reinforce_pp: "
                          "whitened returns-to-go. All but gae build and train no critic")
    ppo.add_argument("--n_samples_per_prompt", type=int, default=1,
                     help="responses sampled per prompt in a rollout (a group, kept on one rank); --batch_size "
                          "counts prompts, --mini_batch_size responses")
    ppo.add_argument("--loss_agg_mode", default="token-mean", choices=list(LOSS_AGG_MODES),
                     help="how the policy loss of a minibatch is averaged (its normaliser always over the whole "
                          "minibatch of every rank): token-mean; seq-mean-token-mean (GRPO's); seq-mean-token-sum; "
                          "seq-mean-token-sum-norm (Dr.GRPO's: divided by responses x --max_gen_len). The value loss "
                          "is a token mean")
    ppo.add_argument("--target_kl_ctl", type=float, default=0.0,
                     help="adaptive KL target in nats per response: the controller compares it with "
                          "kl_ref_per_response, the mean over responses of the summed per-token KL estimate (TRL's "
                          "convention, e.g. 6); 0 = fixed --kl_coef")
    ppo.add_argument("--kl_horizon", type=int, default=10000, help="the adaptive KL controller's horizon (responses)")
    ppo.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    ppo.add_argument("--early_stop_kl", type=float, default=0.0,
                     help="stop this rollout's updates when approx_kl exceeds it")
    system = p.add_argument_group("system, checkpoints and logging")
    system.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (under torchrun each rank takes its local GPU)")
    system.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="autocast precision (default: bfloat16 on CUDA, float32 on CPU). On CPU, "
                             "bfloat16/float16 run under torch.autocast('cpu') (float16 with a loss scaler) to check "
                             "the mixed-precision path: slow on CPUs without bf16/fp16 instructions")
    system.add_argument("--compile", type=int, default=0, choices=[0, 1],
                        help="torch.compile each decoder block (dynamic shapes) of the policy, reference and critic: "
                             "sampling, scoring and training; meant for GPUs (not measured there yet), slower on a CPU")
    system.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    system.add_argument("--seed", type=int, default=42, help="rank r seeds with seed + r")
    system.add_argument("--log_interval", type=int, default=1, help="rollouts between printed lines")
    system.add_argument("--save_interval", type=int, default=50,
                        help="rollouts between saves of the policy and a resume file")
    system.add_argument("--keep_checkpoints", type=int, default=2, help="resume files kept (newest first)")
    system.add_argument("--max_bad_steps", type=int, default=5,
                        help="abort after this many consecutive non-finite steps")
    system.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                        help="1: continue from the newest readable resume file in --checkpoint_dir (else start fresh)")
    system.add_argument("--save_hf", type=int, default=0, choices=[0, 1],
                        help="MiniMind: also export the actor with save_pretrained (transformers policies always "
                             "are)")
    system.add_argument("--use_swanlab", "--use_wandb", dest="use_swanlab", action="store_true",
                        help="log metrics, evaluations and samples to swanlab (--use_wandb: MiniMind's name)")
    system.add_argument("--swanlab_project", "--wandb_project", dest="swanlab_project", default="MiniMind-PPO",
                        help="swanlab project name")
    system.add_argument("--swanlab_mode", default="offline", choices=["offline", "local", "cloud", "disabled"],
                        help="offline (default): written under {save_dir}/swanlog, no login, no network; `swanlab "
                             "sync` uploads it")
    args = p.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.save_dir, "checkpoints")
    args.tokenizer_path = args.tokenizer_path or default_tokenizer_path(args.from_weight, os.path.join(ROOT, "model"))
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    demo_data = os.path.abspath(args.data_path) == DEMO_DATA
    default_reward_model(args, demo_data)
    if args.eval_data_path is None:
        args.eval_data_path = DEMO_EVAL_DATA if demo_data else None
    elif args.eval_data_path.lower() == "none":
        args.eval_data_path = None
    if args.n_samples_per_prompt < 1:
        p.error(f"--n_samples_per_prompt must be >= 1, got {args.n_samples_per_prompt}")
    if args.adv_estimator in OUTCOME_ESTIMATORS and args.n_samples_per_prompt < 2:
        p.error(f"--adv_estimator {args.adv_estimator} compares the responses to a prompt with each other: it needs "
                f"--n_samples_per_prompt >= 2, got {args.n_samples_per_prompt}")
    if args.kl_mode == "reward" and args.adv_estimator in OUTCOME_ESTIMATORS:
        p.error(f"--kl_mode reward with --adv_estimator {args.adv_estimator}: that estimator credits each response "
                f"with one advantage from its score alone, so a per-token KL reward would be dropped; put the KL in "
                f"the loss (--kl_mode loss, k3 or k2), as verl does for GRPO")
    args.kl_mode = args.kl_mode or ("loss" if args.adv_estimator in OUTCOME_ESTIMATORS else DEFAULT_KL_MODE)
    args.kl_estimator = args.kl_estimator or ("k1" if args.kl_mode == "reward" else "k3")
    if args.adv_estimator != "gae" and args.critic_warmup_steps:
        p.error(f"--critic_warmup_steps with --adv_estimator {args.adv_estimator}: that estimator has no critic")
    rows = args.batch_size * args.n_samples_per_prompt  # responses per rollout per process
    if rows % args.mini_batch_size:
        p.error(f"--mini_batch_size {args.mini_batch_size} must divide the {rows} responses of a rollout "
                f"(--batch_size {args.batch_size} x --n_samples_per_prompt {args.n_samples_per_prompt})")
    if args.mini_batch_size % args.accumulation_steps:
        p.error(f"--accumulation_steps {args.accumulation_steps} must divide --mini_batch_size {args.mini_batch_size}")
    gspo = args.policy_loss == "gspo"
    args.clip_epsilon = args.clip_epsilon if args.clip_epsilon is not None else 3e-4 if gspo else 0.2
    if args.clip_epsilon_high is None:
        args.clip_epsilon_high = {"cispo": 5.0, "gspo": 4e-4}.get(args.policy_loss, args.clip_epsilon)
    if not (args.clip_epsilon > 0 and args.clip_epsilon_high > 0):
        p.error(f"--clip_epsilon and --clip_epsilon_high must be > 0, got {args.clip_epsilon}, {args.clip_epsilon_high}")
    if args.dual_clip_c and args.policy_loss != "ppo":
        p.error(f"--dual_clip_c is the ppo loss's; --policy_loss {args.policy_loss} takes none")
    if args.filter_groups and args.n_samples_per_prompt < 2:
        p.error("--filter_groups compares the responses to a prompt: it needs --n_samples_per_prompt >= 2")
    if args.max_filter_batches < 0 or args.overlong_buffer_len < 0:
        p.error("--max_filter_batches and --overlong_buffer_len must be >= 0")
    if args.overlong_buffer_len >= args.max_gen_len:
        p.error(f"--overlong_buffer_len {args.overlong_buffer_len} must be below --max_gen_len {args.max_gen_len}")
    if args.rollout_is_mode == "mask" and args.rollout_is_threshold_low is None:
        args.rollout_is_threshold_low = 1 / args.rollout_is_threshold
    low = args.rollout_is_threshold_low
    if not args.rollout_is_threshold > 0 or (low is not None and not 0 <= low < args.rollout_is_threshold):
        p.error(f"--rollout_is_threshold must be > 0 and --rollout_is_threshold_low in [0, threshold), got "
                f"{args.rollout_is_threshold}, {low}")
    if args.dual_clip_c != 0 and not args.dual_clip_c > 1:
        p.error(f"--dual_clip_c must be 0 (off) or > 1, got {args.dual_clip_c}: a value <= 1 would cap the loss "
                f"of every negative-advantage token at ratio ~1 and zero its gradient")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if not args.grad_clip >= 0:
        p.error(f"--grad_clip must be 0 (no clipping) or a positive norm, got {args.grad_clip}")
    if args.kl_mode == "loss" and args.kl_estimator == "k1":
        p.error(f"--kl_mode loss --kl_estimator k1: k1 = log pi - log ref has zero expected gradient in the loss "
                f"(E_pi[grad log pi] = 0), so it does not pull the policy towards the reference. {SOUND_KL_PAIRS}")
    for flag in ("batch_size", "mini_batch_size", "accumulation_steps", "ppo_epochs", "log_interval",
                 "save_interval", "keep_checkpoints", "max_bad_steps", "update_old_actor_freq", "max_gen_len",
                 "reward_batch_size", "eval_interval"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.thinking_ratio is not None and not 0 <= args.thinking_ratio <= 1:
        p.error(f"--thinking_ratio must be in [0, 1], got {args.thinking_ratio}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        p.error(f"--max_seq_len must be >= 1, got {args.max_seq_len}")
    check_tool_flags(args, p.error)
    if args.tools:
        if args.overlong_buffer_len:
            p.error("--overlong_buffer_len with --tools: DAPO's overlong shaping measures one turn against "
                    "--max_gen_len, and a tool response has several")
    for flag in ("eval_limit", "log_samples", "critic_warmup_steps", "lora_rank", "max_tokens_per_micro_batch"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    return args


def main(args):
    run = build_run(args)
    finish(run, train(run))


if __name__ == "__main__":
    with user_errors():  # a bad flag, file, data or model: one `error: ...` line (PPO_TRACEBACK=1: the traceback)
        main(parse_args())
