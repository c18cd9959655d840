"""PPO for MiniMind: actor, old actor, reference, critic and a reward model, token-level PPO.

Read top to bottom: flags -> models -> PPO maths -> rollout -> update -> logging and
checkpoints -> stop signals -> main. The reward lives in reward.py, the held-out evaluation in
evaluation.py, the model and its sampler in model/. Run with `python train_ppo.py` (one process) or
`torchrun --nproc_per_node N train_ppo.py` (DDP; NCCL on GPUs, gloo on CPU).
Formulas follow "The N Implementation Details of RLHF with PPO" (Huang et al.) and
TRL / verl / OpenRLHF, as summarised in the project's PPO notes.
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dataset.lm_dataset import THINKING_FLAGS, PromptCollator, RLAIFDataset, decode_responses, thinking_flag
from model.sampling import position_ids_from_mask, sample_responses
from evaluation import evaluation_sums, markdown_table, means
from reward import (REWARD_INPUTS, REWARD_RULES, default_reward_rules, NonFiniteRolloutError, Reward, RewardFunction,
                    load_reward_model)
from trainer_utils import (build_cosine_scheduler, check_tokenizer_fit, default_tokenizer_path, get_rank,
                           get_rng_state, get_world_size, hf_folder_path, init_distributed_mode, init_model,
                           is_hf_folder, is_main_process, load_hf_backbone, load_resume, load_state_dict_file,
                           load_tokenizer, Logger, model_signature, resolve_weight, resume_path, save_hf_folder,
                           save_resume, save_weights, set_rng_state, setup_seed, SkipBatchSampler, synced_time,
                           unwrap_model, weight_path)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "dataset", "rlaif-mini.jsonl")
DEMO_EVAL_DATA = os.path.join(ROOT, "dataset", "rlaif-eval.jsonl")


# ----------------------------------------------------------------------------- flags
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PPO (RLHF) for MiniMind. With no flags: the shipped demo kit on CPU.")
    a = p.add_argument
    # files
    a("--save_dir", default="out", help="weights, metrics.jsonl, args and a copy of this script go here")
    a("--save_weight", default="ppo_actor", help="saved as {save_dir}/{save_weight}_{hidden}{_moe}.pth")
    a("--checkpoint_dir", default=None, help="resume files (default: {save_dir}/checkpoints)")
    a("--from_weight", default=os.path.join(ROOT, "demo", "full_sft_128.pth"),
      help="actor init: a MiniMind .pth path, a name resolved as the one {save_dir}/{name}_<hidden>[_moe].pth "
           "(--hidden_size and --use_moe pick among several), a transformers folder with config.json (any "
           "AutoModelForCausalLM: GPT-2, Qwen2, Llama...; saved back to {save_dir}/{save_weight}_hf), or 'none' "
           "(a random MiniMind)")
    a("--critic_weight", default=None,
      help="critic init: a MiniMind critic or actor .pth, or a transformers folder (its backbone); a fresh value "
           "head unless a saved critic; default: the actor's backbone")
    a("--tokenizer_path", default=None,
      help="the tokenizer the weights were trained with (real MiniMind weights: your MiniMind checkout's "
           "minimind/model); its chat template renders the prompts. Default: the --from_weight folder for "
           "transformers models, else the project's model/")
    a("--check_tokenizer", type=int, default=1, choices=[0, 1],
      help="at start-up, stop if the actor does not read --tokenizer_path's ids (skipped for --from_weight none)")
    a("--thinking_ratio", type=float, default=None,
      help="share of prompts rendered with the think block open, for templates with a thinking switch "
           "(minimind-3's open_thinking, 2025-10's enable_thinking); default 0.9 with such a template")
    a("--data_path", default=DEMO_DATA)
    a("--reward_model_path", default=os.path.join(ROOT, "demo", "reward_model"),
      help="local folder: a get_score() model (internlm2-reward style) or a sequence classifier (decoder or "
           "encoder); 'none': rules, --correctness_reward and --reward_fn only")
    a("--reward_input", default="auto", choices=list(REWARD_INPUTS),
      help="how the reward model reads (query, response): chat = its tokenizer's chat template, pair = "
           "tokenizer(query, response), text = tokenizer(query + response), both with special tokens; auto: "
           "get_score models through their API, then chat if the tokenizer has a template, else pair (1 label) "
           "or text (--reward_label)")
    a("--reward_label", default=None, help="score with the raw logit of this label (name or index), as TRL's "
                                           "sentiment example takes POSITIVE; required for multi-label models")
    a("--correctness_reward", type=float, default=0.0,
      help="W: add W when the answer (the <answer> content, or the stripped response without tags) equals the "
           "data row's `answer`")
    a("--reward_fn", action="append", default=[], metavar="FILE.py:FUNCTION",
      help="a reward function function(prompts, responses, answers) -> one float per response, added as the part "
           "custom (several: custom_<function>); may be repeated")
    a("--reward_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="auto: float32 on CPU; on CUDA the model's own dtype when its config names one, else bfloat16 "
           "where the GPU supports it, else float32")
    a("--reward_batch_size", type=int, default=32, help="chats per reward-model forward (get_scores calls too)")
    a("--reward_device", default=None, help="device for the reward model (default: --device)")
    a("--critic_device", default=None,
      help="device for the critic (default: --device); with --reward_device, the two-GPU layout: policy and "
           "reference on cuda:0, critic and reward model on cuda:1 (one process)")
    # held-out evaluation and logged samples
    a("--eval_data_path", default=None,
      help="prompts evaluated greedily at step 0, every --eval_interval rollouts and at the end (default: "
           "dataset/rlaif-eval.jsonl when training on the demo's dataset/rlaif-mini.jsonl, else none; 'none' = off)")
    a("--eval_interval", type=int, default=20, help="rollouts between evaluations")
    a("--eval_limit", type=int, default=0, help="evaluate only the first N prompts of --eval_data_path (0 = all)")
    a("--log_samples", type=int, default=4, help="samples per rollout written to {save_dir}/samples.jsonl (0 = off)")
    # model size: read off the weights; give them only to check or to build a random model
    a("--hidden_size", type=int, default=None, help="default: from the weights (512 to resolve a name)")
    a("--num_hidden_layers", type=int, default=None)
    a("--use_moe", type=int, default=None, choices=[0, 1])
    a("--max_seq_len", type=int, default=64, help="max prompt tokens (longer prompts lose their left part)")
    a("--max_gen_len", type=int, default=48, help="max new tokens per response")
    # schedule
    a("--epochs", type=int, default=10, help="passes over --data_path (the demo: 10 x 14 rollouts)")
    a("--max_steps", type=int, default=0, help="stop after this many rollouts (0 = run all epochs)")
    a("--batch_size", type=int, default=32, help="prompts per rollout per process")
    a("--mini_batch_size", type=int, default=16, help="rollout rows per optimizer step (per process)")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per minibatch")
    a("--ppo_epochs", type=int, default=2)
    a("--learning_rate", type=float, default=5e-5)
    a("--critic_learning_rate", type=float, default=2e-4)
    a("--warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")
    a("--grad_clip", type=float, default=1.0)
    # rollout
    a("--temperature", type=float, default=1.0)
    a("--top_k", type=int, default=0, help="0 = off. When on, the sampling distribution is truncated while "
                                           "pi_old is scored untruncated: the ratio then is not exact")
    a("--top_p", type=float, default=1.0, help="1.0 = off; same caveat as --top_k")
    a("--update_old_actor_freq", type=int, default=1, help="sync the old actor every N rollouts (1 = standard)")
    a("--critic_warmup_steps", type=int, default=0,
      help="the first N rollouts train only the critic: the actor, its optimizer and its schedule are untouched")
    # reward
    a("--reasoning", type=int, default=1, choices=[0, 1], help="1: the rules of --reward_rules + RM; 0: RM only")
    a("--reward_rules", default=None, choices=list(REWARD_RULES),
      help="minimind2: format + tags, RM blended whole/answer-only; minimind3: length + thinking + repetition, "
           "RM of (history as one user message, answer); none: no rules, RM of the whole chat. Default: the "
           "generation of MiniMind weights, none for other models")
    a("--rm_clip", type=float, default=3.0)
    a("--missing_eos_penalty", type=float, default=0.0, help="subtracted when a response hits --max_gen_len")
    # PPO
    a("--clip_epsilon", type=float, default=0.2)
    a("--dual_clip_c", type=float, default=0.0, help="dual clip for A<0: 0 = off, else a value > 1 (verl: 3.0)")
    a("--cliprange_value", type=float, default=0.2)
    a("--vf_coef", type=float, default=0.5)
    a("--entropy_coef", type=float, default=0.0)
    a("--kl_coef", type=float, default=0.02)
    a("--kl_estimator", default="k3", choices=["k1", "k2", "k3"])
    a("--kl_mode", default="reward", choices=["reward", "loss"], help="KL to ref as per-token reward or as loss")
    a("--target_kl_ctl", type=float, default=0.0,
      help="adaptive KL target in nats per response: the controller compares it with kl_ref_per_response, the "
           "mean over responses of the summed per-token KL estimate (TRL's convention, e.g. 6); 0 = fixed --kl_coef")
    a("--kl_horizon", type=int, default=10000)
    a("--gamma", type=float, default=1.0)
    a("--lam", type=float, default=0.95)
    a("--early_stop_kl", type=float, default=0.0, help="stop this rollout's updates when approx_kl exceeds it")
    # system
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
      help="autocast precision (default: bfloat16 on CUDA, float32 on CPU). On CPU, bfloat16/float16 run under "
           "torch.autocast('cpu') (float16 with a loss scaler) to check the mixed-precision path: slow on CPUs "
           "without bf16/fp16 instructions")
    a("--num_workers", type=int, default=0)
    a("--seed", type=int, default=42)
    a("--log_interval", type=int, default=1)
    a("--save_interval", type=int, default=50)
    a("--keep_checkpoints", type=int, default=2)
    a("--max_bad_steps", type=int, default=5, help="abort after this many consecutive non-finite steps")
    a("--from_resume", type=int, default=0, choices=[0, 1])
    a("--save_hf", type=int, default=0, choices=[0, 1],
      help="MiniMind: also export the actor with save_pretrained (transformers policies always are)")
    a("--use_swanlab", "--use_wandb", dest="use_swanlab", action="store_true",
      help="log metrics, evaluations and samples to swanlab (--use_wandb: MiniMind's name)")
    a("--swanlab_project", "--wandb_project", dest="swanlab_project", default="MiniMind-PPO")
    a("--swanlab_mode", default="offline", choices=["offline", "local", "cloud", "disabled"],
      help="offline (default): written under {save_dir}/swanlog, no login, no network; `swanlab sync` uploads it")
    args = p.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.save_dir, "checkpoints")
    args.tokenizer_path = args.tokenizer_path or default_tokenizer_path(args.from_weight, os.path.join(ROOT, "model"))
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.eval_data_path is None:
        args.eval_data_path = DEMO_EVAL_DATA if os.path.abspath(args.data_path) == DEMO_DATA else None
    elif args.eval_data_path.lower() == "none":
        args.eval_data_path = None
    if args.batch_size % args.mini_batch_size:
        p.error(f"--mini_batch_size {args.mini_batch_size} must divide --batch_size {args.batch_size}")
    if args.mini_batch_size % args.accumulation_steps:
        p.error(f"--accumulation_steps {args.accumulation_steps} must divide --mini_batch_size {args.mini_batch_size}")
    if args.dual_clip_c != 0 and not args.dual_clip_c > 1:
        p.error(f"--dual_clip_c must be 0 (off) or > 1, got {args.dual_clip_c}: a value <= 1 would cap the loss "
                f"of every negative-advantage token at ratio ~1 and zero its gradient")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    for flag in ("batch_size", "mini_batch_size", "accumulation_steps", "ppo_epochs", "log_interval",
                 "save_interval", "keep_checkpoints", "max_bad_steps", "update_old_actor_freq", "max_gen_len",
                 "reward_batch_size", "eval_interval"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.thinking_ratio is not None and not 0 <= args.thinking_ratio <= 1:
        p.error(f"--thinking_ratio must be in [0, 1], got {args.thinking_ratio}")
    for flag in ("eval_limit", "log_samples", "critic_warmup_steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    return args


# ----------------------------------------------------------------------------- models
class CriticModel(nn.Module):
    """A causal LM's backbone (its final norm included) + a zero-initialised scalar value head.

    The backbone is `getattr(lm, lm.base_model_prefix)`: MiniMindModel, or a transformers model's
    base (GPT2Model, LlamaModel, ...), whose first output is the last hidden state.
    """

    def __init__(self, backbone, hidden_size):
        super().__init__()
        self.model = backbone
        backbone.config.use_cache = False  # training forwards: no key/value cache to build
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
        return self.value_head(hidden).squeeze(-1)  # [B, T]


def build_critic(actor, critic_weight=None):
    """The actor's backbone + a fresh value head; or, with `critic_weight`, a saved critic / actor .pth
    (MiniMind) or a transformers folder, whose backbone (AutoModel: the heads dropped) is used."""
    if critic_weight and is_hf_folder(critic_weight):
        backbone = load_hf_backbone(critic_weight)
        return CriticModel(backbone, backbone.config.hidden_size)
    critic = CriticModel(copy.deepcopy(getattr(actor, actor.base_model_prefix)), actor.config.hidden_size)
    if not critic_weight:
        return critic
    state = load_state_dict_file(critic_weight)
    try:
        if "value_head.weight" in state:  # a saved critic
            critic.load_state_dict(state, strict=True)
        else:  # an actor file: its backbone, with a fresh value head
            critic.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                                         strict=True)
    except RuntimeError as e:
        raise ValueError(f"--critic_weight {critic_weight}: does not fit the actor "
                         f"(hidden {actor.config.hidden_size}, {actor.config.num_hidden_layers} layers): "
                         f"{str(e).splitlines()[0]}") from e
    return critic


def frozen_copy(model):
    copy_ = copy.deepcopy(model).eval()
    copy_.requires_grad_(False)
    return copy_


# ----------------------------------------------------------------------------- PPO maths
def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1) if dim is not None else (x * mask).sum() / mask.sum().clamp(min=1)


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_dict(sums):
    """{name: 0-d tensor} summed over ranks, as {name: float}; every rank has the same names."""
    names = sorted(sums)
    return dict(zip(names, all_reduce_sum(torch.stack([sums[k] for k in names])).tolist()))


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


class AdaptiveKLController:
    """beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)  (Ziegler et al.)."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- rollout
def response_logprobs(model, input_ids, attention_mask, response_len, temperature):
    """Log-probs [B, R] of the last R tokens of `input_ids`, with their logits [B, R, V] and the MoE aux loss.

    Position ids are the sampler's (position_ids_from_mask), so pi_old here is the sampling
    distribution even for models with learned positions. Only the R positions that predict response tokens reach lm_head (logits_to_keep), and the
    log-prob is gather - logsumexp, never a full log_softmax tensor. Every log-prob that
    enters the PPO ratio (old, ref, actor) comes through here, under the same precision.
    """
    T = input_ids.shape[1]
    predicting = torch.arange(T - response_len - 1, T - 1, device=input_ids.device)  # positions before each response token
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, logits_to_keep=predicting)
    logits = out.logits.float()  # [B, R, V]
    if temperature != 1.0:  # x / 1 == x: skip a full-vocab pass and its backward
        logits = logits / temperature
    logprobs = logits.gather(-1, input_ids[:, -response_len:, None]).squeeze(-1) - logits.logsumexp(-1)
    return logprobs, logits, getattr(out, "aux_loss", None)  # MoE balance loss: MiniMind's; None elsewhere


def critic_values(critic, input_ids, attention_mask, response_len):
    """V [B, R] at the positions that predict the response tokens, on the critic's own device."""
    device = next(critic.parameters()).device
    attention_mask = attention_mask.to(device)
    values = critic(input_ids.to(device), attention_mask, position_ids_from_mask(attention_mask))
    return values[:, -response_len - 1:-1].float()


def entropy_from_logits(logits):
    """H = logsumexp(z) - sum(softmax(z) * z) per position; a -inf logit (p = 0) adds nothing."""
    p = logits.softmax(-1)
    return logits.logsumexp(-1) - torch.where(p > 0, p * logits, 0.0).sum(-1)


def micro_batches(order, mini_batch_size, accumulation_steps):
    """Split a row order into minibatches, each a list of micro-batch index tensors."""
    micro = mini_batch_size // accumulation_steps
    return [[order[m + k:m + k + micro] for k in range(0, mini_batch_size, micro)]
            for m in range(0, len(order), mini_batch_size)]


@torch.no_grad()
def collect_rollout(batch, old_actor, ref_model, critic, reward, tokenizer, kl_coef, orders, args, autocast):
    """Sample responses with the old actor, score them, and turn scores into token rewards.

    pi_old, pi_ref and V are computed on the very micro-batches that the first PPO epoch
    uses (orders[0]), so with old actor == actor the first ratio is exactly 1. No collective
    runs in here (pass the bare critic, not its DDP wrapper): a rank can drop its rollout on a
    stop signal without leaving the others waiting.
    """
    device = args.device
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    t0 = synced_time(device)
    with autocast:
        response_ids, response_mask, sampler_logprobs = sample_responses(
            old_actor, prompt_ids, prompt_mask, args.max_gen_len, tokenizer.eos_token_id, tokenizer.pad_token_id,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t1 = synced_time(device)
    B, R = response_ids.shape
    input_ids = torch.cat([prompt_ids, response_ids], 1)  # [B, P+R]
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    mask = response_mask.float()
    old_logprobs, ref_logprobs, values = (torch.zeros(B, R, device=device) for _ in range(3))
    for minibatch in micro_batches(orders[0], args.mini_batch_size, args.accumulation_steps):
        for rows in minibatch:
            ids, am = input_ids[rows], attention_mask[rows]
            with autocast:
                old_logprobs[rows] = response_logprobs(old_actor, ids, am, R, args.temperature)[0]
                ref_logprobs[rows] = response_logprobs(ref_model, ids, am, R, args.temperature)[0]
                values[rows] = critic_values(critic, ids, am, R).to(device)
    t2 = synced_time(device)
    responses = decode_responses(tokenizer, response_ids, response_mask)
    bad = (~torch.isfinite(values)).any(1).nonzero()
    if len(bad):  # padding included (NaN * 0 is NaN); whitening would spread it to every advantage
        row = int(bad[0])
        raise NonFiniteRolloutError(f"critic returned a non-finite value for sample {row} "
                                    f"(response {responses[row][:80]!r})")
    scores, parts = reward(batch["prompts"], responses, batch["answers"], batch["messages"])
    has_eos = ((response_ids == tokenizer.eos_token_id) & response_mask.bool()).any(1)
    scores = scores - args.missing_eos_penalty * (~has_eos).float().cpu()
    t3 = synced_time(device)
    # token-level reward: -beta * KL at every token (reward mode), plus the score at the last real token
    kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask
    token_rewards = -kl_coef * kl if args.kl_mode == "reward" else torch.zeros_like(kl)
    last = (response_mask.sum(1) - 1).clamp(min=0)
    token_rewards[torch.arange(B, device=device), last] += scores.to(device)
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=mask, old_logprobs=old_logprobs,
                ref_logprobs=ref_logprobs, values=values * mask, token_rewards=token_rewards, scores=scores,
                parts=parts, kl=kl, has_eos=has_eos, responses=responses,
                sampler_gap=((sampler_logprobs - old_logprobs).abs() * mask).sum() / mask.sum(),
                time_generate=t1 - t0, time_forward=t2 - t1, time_reward=t3 - t2)


# ----------------------------------------------------------------------------- update
def ppo_update(actor, critic, actor_opt, critic_opt, actor_sched, critic_sched, rollout, advantages, returns,
               orders, kl_coef, args, autocast, scaler=None, train_actor=True):
    """PPO epochs over one rollout: clipped policy + value loss, one optimizer step per minibatch.

    Losses are token means over the whole minibatch of every rank: each rank divides its sum by
    the global token count times the world size, and DDP averages, so N ranks take the same
    step as one process on the global batch. With train_actor=False (critic warm-up) only the
    value loss is computed and only the critic steps. Returns (global token-mean statistics,
    optimizer steps taken, steps skipped as non-finite, early-stopped?). With a float16 loss
    scaler, steps whose gradients overflowed are the scaler's business (it lowers the scale):
    they are counted as `scaler_skipped_steps`, not as skipped.
    """
    R = rollout["response_mask"].shape[1]
    world = get_world_size()
    optimizers = [actor_opt, critic_opt] if train_actor else [critic_opt]
    models = [actor, critic] if train_actor else [critic]
    totals = {}  # token sums over every minibatch evaluated
    steps = skipped = scaler_skipped = 0
    first_ratio_dev = None
    early_stopped = False
    for epoch in range(args.ppo_epochs):
        for minibatch in micro_batches(orders[epoch], args.mini_batch_size, args.accumulation_steps):
            n_tokens = all_reduce_sum(rollout["response_mask"][torch.cat(minibatch)].sum()).item()
            sums = {}
            for k, micro in enumerate(minibatch):
                mask = rollout["response_mask"][micro]
                ids, am = rollout["input_ids"][micro], rollout["attention_mask"][micro]
                # gradients are all-reduced only on the last micro-batch of a minibatch
                sync = _no_sync(*models) if world > 1 and k < len(minibatch) - 1 else contextlib.nullcontext()
                with sync, autocast:
                    values = critic_values(critic, ids, am, R).to(ids.device)
                    v_loss = value_loss_per_token(values, rollout["values"][micro], returns[micro],
                                                  args.cliprange_value)
                    token_loss, aux_loss, token_stats = args.vf_coef * v_loss, None, {"value_loss": v_loss}
                    if train_actor:
                        logprobs, logits, aux_loss = response_logprobs(actor, ids, am, R, args.temperature)
                        # the entropy's backward costs a full-vocab softmax: only pay it when it is in the loss
                        entropy = entropy_from_logits(logits if args.entropy_coef else logits.detach())
                        pg_loss, ratio = policy_loss_per_token(logprobs, rollout["old_logprobs"][micro],
                                                               advantages[micro], args.clip_epsilon, args.dual_clip_c)
                        kl_ref = kl_penalty(logprobs, rollout["ref_logprobs"][micro], args.kl_estimator)
                        token_loss = token_loss + pg_loss - args.entropy_coef * entropy
                        if args.kl_mode == "loss":
                            token_loss = token_loss + kl_coef * kl_ref
                        log_ratio = (logprobs - rollout["old_logprobs"][micro]).detach()
                        token_stats.update(approx_kl=0.5 * log_ratio ** 2, policy_loss=pg_loss, entropy=entropy,
                                           clipfrac=((ratio - 1).abs() > args.clip_epsilon).float(),
                                           kl_actor_ref=kl_ref, ratio_dev=(ratio - 1).abs())
                    loss = (token_loss * mask).sum() / n_tokens * world
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
            norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip) for m in models]
            finite_loss = sums["non_finite_loss"] == 0
            if finite_loss and all(bool(torch.isfinite(n)) for n in norms):
                for opt in optimizers:
                    scaler.step(opt) if scaler else opt.step()
                for sched in ([actor_sched, critic_sched] if train_actor else [critic_sched]):
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
    return stats, steps, skipped, early_stopped


def _no_sync(*ddp_models):
    stack = contextlib.ExitStack()
    for m in ddp_models:
        stack.enter_context(m.no_sync())
    return stack


# ----------------------------------------------------------------------------- logging and checkpoints
def rollout_metrics(rollout, advantages, returns):
    """Rollout statistics averaged over ranks."""
    mask, values = rollout["response_mask"], rollout["values"]
    err = returns - values
    explained_var = 1 - masked_mean((err - masked_mean(err, mask)) ** 2, mask) / \
        masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8)
    local = {
        "reward": rollout["scores"].mean(),
        **{f"reward_{name}": values.mean() for name, values in rollout["parts"].items()},
        "kl_ref": masked_mean(rollout["kl"], mask), "kl_ref_per_response": rollout["kl"].sum(1).mean(),
        "value_explained_var": explained_var,
        "advantage_mean": masked_mean(advantages, mask),
        "advantage_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt(),
        "avg_response_len": mask.sum(1).mean(), "eos_rate": rollout["has_eos"].float().mean(),
        "sampler_logprob_gap": rollout["sampler_gap"],
    }
    values_ = all_reduce_sum(torch.stack([v.detach().double().cpu() for v in local.values()]).to(mask.device))
    return dict(zip(local, (values_ / get_world_size()).tolist()))


def gather_rng_states(state):
    """Every rank's RNG `state`, gathered to all ranks (rank 0 writes them)."""
    if not dist.is_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def policy_path(args, config):
    """Where the trained policy is saved: a transformers policy as a save_pretrained folder
    ({save_weight}_hf), MiniMind as its fp16 .pth ({save_weight}_{hidden}[_moe].pth)."""
    if is_hf_folder(args.from_weight):
        return hf_folder_path(args.save_dir, args.save_weight)
    return weight_path(args.save_dir, args.save_weight, config.hidden_size, config.use_moe)


def save_checkpoint(args, models, optimizers, schedulers, progress, tokenizer, rng_state):
    """The actor (policy_path) + a resume file with everything needed to continue.
    `rng_state` is this rank's RNG state at the start of the next step to run."""
    actor, critic, old_actor = models
    rng_states = gather_rng_states(rng_state)  # collective: every rank calls it
    if is_main_process():
        config = unwrap_model(actor).config
        hidden, moe = config.hidden_size, getattr(config, "use_moe", False)
        if is_hf_folder(args.from_weight):
            save_hf_folder(actor, tokenizer, policy_path(args, config))
        else:
            save_weights(actor, policy_path(args, config))
            if args.save_hf:
                save_hf_folder(actor, tokenizer, hf_folder_path(args.save_dir, args.save_weight, hidden, moe))
        state = dict(model=unwrap_model(actor).state_dict(), critic_model=unwrap_model(critic).state_dict(),
                     old_actor=old_actor.state_dict(), optimizer=optimizers[0].state_dict(),
                     critic_optimizer=optimizers[1].state_dict(), scheduler=schedulers[0].state_dict(),
                     critic_scheduler=schedulers[1].state_dict(), world_size=get_world_size(),
                     batch_size=args.batch_size, rng_states=rng_states,
                     model_config=model_signature(config),
                     **progress)
        save_resume(state, resume_path(args.checkpoint_dir, args.save_weight, hidden, moe), keep=args.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


def restore_checkpoint(state, args, models, optimizers, schedulers, steps_per_epoch, scaler=None):
    """Load a resume file into the models, optimizers and loss scaler; return (epoch, step, global_step).

    Under another world size every counter is re-derived from the prompts consumed: the data
    position, the global step (so the run still trains every remaining prompt) and the
    schedulers' step counts (so the LR continues where a fresh run at that world size would be).
    """
    actor, critic, old_actor = models
    have = model_signature(actor.config)
    for key, value in state["model_config"].items():
        if have[key] != value:
            raise ValueError(f"resume file was written with {key}={value}, but this run has {key}={have[key]}")
    if state["batch_size"] != args.batch_size:
        raise ValueError(f"resume file was written with --batch_size {state['batch_size']}, "
                         f"this run has --batch_size {args.batch_size}")
    actor.load_state_dict(state["model"])
    critic.load_state_dict(state["critic_model"])
    old_actor.load_state_dict(state["old_actor"])
    for obj, key in zip(optimizers + schedulers, ["optimizer", "critic_optimizer", "scheduler", "critic_scheduler"]):
        obj.load_state_dict(state[key])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    world, saved_world = get_world_size(), state["world_size"]
    epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
    if saved_world != world:
        # the global data order does not depend on the world size: keep the number of prompts consumed
        consumed = step * args.batch_size * saved_world
        step = min(consumed // (args.batch_size * world), steps_per_epoch)
        global_step = epoch * steps_per_epoch + step
        for sched in schedulers:  # the same share of optimizer steps as of rollouts
            sched.last_epoch = round(sched.last_epoch * global_step / state["global_step"]) - 1 \
                if state["global_step"] else -1
            sched.step()
        Logger(f"resume: world size {saved_world} -> {world}; data position {consumed} prompts -> step {step}, "
               f"global step {state['global_step']} -> {global_step}"
               + ("" if consumed % (args.batch_size * world) == 0 else
                  f" ({consumed % (args.batch_size * world)} prompts of this epoch are revisited)"))
    if step >= steps_per_epoch:
        epoch, step = epoch + 1, 0
    rng = state["rng_states"]
    if get_rank() < len(rng) and saved_world == world:
        set_rng_state(rng[get_rank()])
    else:
        setup_seed(args.seed + get_rank() + 1000 * global_step)
        Logger("resume: RNG states reseeded (world size changed)")
    return epoch, step, global_step


def append_jsonl(path, record, swanlab_run=None):
    """One JSON line in `path` (rank 0 writes); the same record to swanlab."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if swanlab_run is not None:
        swanlab_run.log(record, step=record["step"])


def log_step(metrics, metrics_path, swanlab_run, total_rollouts, eta_s, args):
    """Append the step's metrics to metrics.jsonl (and swanlab); print a line every --log_interval."""
    append_jsonl(metrics_path, metrics, swanlab_run)
    if metrics["step"] % args.log_interval == 0 or metrics["step"] == total_rollouts:
        policy = f"policy {metrics['policy_loss']:.4f}" if "policy_loss" in metrics else "critic warm-up"
        parts = " ".join(f"{k[len('reward_'):]} {v:.2f}" for k, v in metrics.items() if k.startswith("reward_"))
        Logger(f"step {metrics['step']}/{total_rollouts} | reward {metrics['reward']:.3f} ({parts}) | "
               f"kl_ref {metrics['kl_ref']:.4f} | "
               f"{policy} value {metrics['value_loss']:.4f} | "
               f"len {metrics['avg_response_len']:.1f} eos {metrics['eos_rate']:.2f} | "
               f"{metrics['time_step_s']:.1f}s/step, eta {eta_s / 60:.1f} min")


def evaluate_policy(actor, tokenizer, eval_samples, reward, args, autocast):
    """Greedy evaluation of the actor on the held-out prompts: each rank takes every world-th prompt
    and the sums are reduced. Returns {eval_<metric>: value} (evaluation.METRICS)."""
    with_accuracy = all(s["answer"] for s in eval_samples)
    sums, _ = evaluation_sums(unwrap_model(actor), tokenizer, eval_samples[get_rank()::get_world_size()],
                              reward, args.batch_size, args.max_gen_len, args.device, with_accuracy,
                              autocast=autocast)
    totals = all_reduce_dict({k: torch.tensor(v, dtype=torch.float64, device=args.device) for k, v in sums.items()})
    return {f"eval_{k}": v for k, v in means(totals).items()}


def log_eval(record, metrics_path, swanlab_run):
    """An evaluation as one metrics.jsonl line (and swanlab), printed as one line."""
    append_jsonl(metrics_path, record, swanlab_run)
    accuracy = f" accuracy {record['eval_accuracy']:.1%}" if "eval_accuracy" in record else ""
    rm = f" (rm {record['eval_reward_rm']:.3f})" if "eval_reward_rm" in record else ""
    reward = f" | reward {record['eval_reward']:.3f}{rm}" if "eval_reward" in record else ""
    Logger(f"eval step {record['step']} | format {record['eval_format']:.1%} tags {record['eval_tags']:.1%}"
           f"{accuracy}{reward} | len {record['eval_response_len']:.1f} eos {record['eval_eos_rate']:.1%}")


def log_samples(step, prompts, rollout, n, samples_path, swanlab_run):
    """The first n samples of the rollout, each with its reward and every reward part, to samples.jsonl
    (and to swanlab as text)."""
    rows = [dict(step=step, prompt=prompts[i], response=rollout["responses"][i], reward=rollout["scores"][i].item(),
                 **{f"reward_{part}": values[i].item() for part, values in rollout["parts"].items()})
            for i in range(min(n, len(prompts)))]
    with open(samples_path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if swanlab_run is not None:
        import swanlab
        swanlab_run.log({"samples": [swanlab.Text(json.dumps(row, ensure_ascii=False, indent=1)) for row in rows]},
                        step=step)


def eval_table(metrics_path):
    """The first and the last evaluation of metrics.jsonl side by side (markdown), or None."""
    evals = [r for r in map(json.loads, open(metrics_path, encoding="utf-8")) if "eval_format" in r]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    return markdown_table({f"step {r['step']}": {k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_")}
                           for r in ([first, last] if last is not first else [first])})


def truncate_metrics(path, last_step):
    """On resume, keep only the lines of steps <= last_step: later steps are run (and logged) again."""
    if not os.path.exists(path):
        return
    lines = open(path).readlines()
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not JSON; fix or move the file before resuming")
            Logger(f"{path}:{lineno}: dropping a torn last line (the previous run died while writing it)")
            continue
        if record["step"] <= last_step:
            kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- stop signals
class RolloutInterrupted(BaseException):
    """Raised by the stop-signal handler inside a rollout. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` in model or tokenizer code swallows it."""


class StopSignal:
    """SIGTERM / SIGINT. Inside a rollout (generation, scoring: nothing has changed yet) the handler
    raises RolloutInterrupted at once, so the rollout is dropped and the state after the last
    finished step is saved: torchrun SIGKILLs its workers 30 s after forwarding SIGTERM, less than
    one real-size step. Elsewhere (the update, a save) it only records the signal: the update
    finishes, the step is saved, and the run exits."""

    def __init__(self):
        self.signum, self.in_rollout, self.previous = None, False, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        self.signum = signum
        if self.in_rollout:
            raise RolloutInterrupted(signum)

    def interruptible(self, fn, *args):
        """fn(*args), or None when a stop signal comes in meanwhile (fn must change no state and run
        no collective). Other exceptions pass through."""
        try:
            try:
                self.in_rollout = True
                return fn(*args)
            finally:  # a signal landing here, before the flag is down, is caught below too
                self.in_rollout = False
        except RolloutInterrupted:
            return None


# ----------------------------------------------------------------------------- main
def main(args):
    local_rank = init_distributed_mode(args.device)
    if dist.is_initialized() and args.critic_device:
        raise ValueError("--critic_device is for one process (the two-GPU layout); under torchrun each rank "
                         "keeps its models on its own GPU")
    rank, world = get_rank(), get_world_size()
    if dist.is_initialized() and args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    setup_seed(args.seed + rank)  # each rank samples its own responses
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
    if device_type == "cpu" and dtype != torch.float32:
        Logger(f"note: --dtype {args.dtype} on CPU runs under torch.autocast('cpu') to check the mixed-precision "
               f"path; it is slow on CPUs without {args.dtype} instructions")

    # the tokenizer and the data first: what does not fit stops here, before any model is built
    tokenizer = load_tokenizer(args.tokenizer_path)
    if args.thinking_ratio is not None and thinking_flag(tokenizer) is None:
        raise ValueError(f"--thinking_ratio {args.thinking_ratio}: the chat template of --tokenizer_path "
                         f"{args.tokenizer_path!r} has no thinking switch ({' or '.join(THINKING_FLAGS)})")
    if args.thinking_ratio is None:
        args.thinking_ratio = 0.9 if thinking_flag(tokenizer) else 0.0
    reward_functions = [RewardFunction(spec) for spec in args.reward_fn]  # loading errors name file and function
    # every rank sees its own shard of one global shuffled order (below); bad lines stop the run here
    dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len, thinking_ratio=args.thinking_ratio,
                           seed=args.seed)
    eval_samples = []
    if args.eval_data_path:
        eval_samples = RLAIFDataset(args.eval_data_path, tokenizer, max_length=args.max_seq_len,
                                    thinking_ratio=args.thinking_ratio, seed=args.seed).samples  # epoch 0's draws
        eval_samples = eval_samples[:args.eval_limit or None]

    # models: actor (trained), old actor (samples, gives pi_old), ref (KL anchor), critic, reward model
    actor, tokenizer = init_model(args.from_weight, args.save_dir, args.tokenizer_path, args.device,
                                  hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                  use_moe=None if args.use_moe is None else bool(args.use_moe))
    # dropout off (eval mode) everywhere, as TRL disables it: PPO's ratio compares two forwards of one policy,
    # and dropout masks would make them differ (no first ratio of 1, noisy log-probs and KL)
    actor.eval()
    old_actor, ref_model = frozen_copy(actor), frozen_copy(actor)
    critic = build_critic(actor, args.critic_weight).to(args.critic_device or args.device).eval()
    reward_model = None if args.reward_model_path.lower() == "none" else load_reward_model(
        args.reward_model_path, args.reward_device or args.device, args.reward_dtype, args.reward_input,
        args.reward_label)
    args.reward_rules = args.reward_rules or default_reward_rules(actor.config)  # MiniMind: the weights' generation
    reward = Reward(reward_model, args.reward_rules, bool(args.reasoning), args.rm_clip, args.reward_batch_size,
                    args.correctness_reward, reward_functions)
    config = actor.config
    kind = f"MiniMind v{config.version}" if config.model_type == "minimind" else type(actor).__name__
    Logger(f"actor: {sum(p.numel() for p in actor.parameters()) / 1e6:.2f}M params "
           f"({kind}, hidden {config.hidden_size}, {config.num_hidden_layers} layers"
           f"{', MoE' if getattr(config, 'use_moe', False) else ''}); reward model: {args.reward_model_path}; reward rules: "
           f"{args.reward_rules if args.reasoning else 'none (--reasoning 0)'}"
           + (f"; think block open in {args.thinking_ratio:.0%} of prompts ({thinking_flag(tokenizer)})"
              if thinking_flag(tokenizer) else ""))

    if args.check_tokenizer and args.from_weight != "none":
        Logger(check_tokenizer_fit(actor, [dataset[i]["prompt_ids"] for i in range(min(8, len(dataset)))],
                                   tokenizer.pad_token_id, args.tokenizer_path, args.from_weight))
    if args.correctness_reward and not any(dataset.answers):
        raise ValueError(f"--correctness_reward {args.correctness_reward}: {args.data_path} has no `answer` field")
    if len(dataset) < args.batch_size * world:
        raise ValueError(f"--batch_size {args.batch_size} x {world} processes needs {args.batch_size * world} "
                         f"prompts, but {args.data_path} has {len(dataset)}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size  # a last partial batch is left out (like drop_last)
    total_rollouts = steps_per_epoch * args.epochs
    if args.max_steps:
        total_rollouts = min(total_rollouts, args.max_steps)
    opt_steps_per_rollout = args.ppo_epochs * (args.batch_size // args.mini_batch_size)
    total_opt_steps = total_rollouts * opt_steps_per_rollout
    if args.critic_warmup_steps >= total_rollouts:
        raise ValueError(f"--critic_warmup_steps {args.critic_warmup_steps} leaves none of the {total_rollouts} "
                         f"rollouts to train the actor")

    # fused: one pass over each parameter instead of ~10 elementwise kernels; the step is
    # memory-bound, so on CPU this cuts it ~4x (hidden 512: 110 -> 24 ms per optimizer step)
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=args.learning_rate, fused=True)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate, fused=True)
    # the actor's schedule spans only the rollouts after the critic warm-up
    actor_sched = build_cosine_scheduler(actor_opt, total_opt_steps - args.critic_warmup_steps * opt_steps_per_rollout,
                                         args.warmup_steps)
    critic_sched = build_cosine_scheduler(critic_opt, total_opt_steps, args.warmup_steps)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl_ctl, args.kl_horizon)

    if is_main_process():  # fail now rather than at the first save, after the training it was meant to keep
        for flag, folder in [("--save_dir", args.save_dir), ("--checkpoint_dir", args.checkpoint_dir)]:
            try:
                os.makedirs(folder, exist_ok=True)
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as e:
                raise OSError(f"{flag} {folder!r} is not writable ({e.strerror or e})") from e

    metrics_path = os.path.join(args.save_dir, "metrics.jsonl")
    samples_path = os.path.join(args.save_dir, "samples.jsonl")
    start_epoch, start_step, global_step, bad_streak, run_id, resumed = 0, 0, 0, 0, None, False
    if args.from_resume:
        path = resume_path(args.checkpoint_dir, args.save_weight, config.hidden_size, getattr(config, "use_moe", False))
        state, loaded_from = load_resume(path)
        if state is None:
            # the file name holds the model size: a resume file for another size must not mean "start fresh"
            names = os.listdir(args.checkpoint_dir) if os.path.isdir(args.checkpoint_dir) else []
            others = sorted(n for n in names
                            if re.fullmatch(re.escape(args.save_weight) + r"_\d+(_moe)?_resume(\.\d+)?\.pth", n))
            if others:
                raise ValueError(f"--from_resume 1: no resume file for this actor ({os.path.basename(path)}), but "
                                 f"{args.checkpoint_dir} holds {', '.join(others)} from another model size; "
                                 f"resume with the actor they were written for, or use another --checkpoint_dir")
            Logger(f"--from_resume 1: no checkpoint at {path}; starting fresh")
        else:
            start_epoch, start_step, global_step = restore_checkpoint(
                state, args, (actor, critic, old_actor), (actor_opt, critic_opt), (actor_sched, critic_sched),
                steps_per_epoch, scaler)
            bad_streak, run_id, kl_ctl.value = state["bad_streak"], state["wandb_id"], state["kl_coef"]
            resumed = True
            Logger(f"resumed from {loaded_from}: epoch {start_epoch + 1}, step {start_step}, global step {global_step}")
            if is_main_process():
                truncate_metrics(metrics_path, global_step)
                truncate_metrics(samples_path, global_step)
            del state

    if dist.is_initialized():  # every loss-bearing forward goes through these wrappers
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank by
        # construction; broadcasting them costs ~17 MB per forward at hidden 512
        ddp_kw = dict(device_ids=[local_rank] if device_type == "cuda" else None,
                      find_unused_parameters=getattr(config, "use_moe", False), broadcast_buffers=False)
        actor, critic = DistributedDataParallel(actor, **ddp_kw), DistributedDataParallel(critic, **ddp_kw)

    if is_main_process():
        os.makedirs(args.save_dir, exist_ok=True)
        with open(os.path.join(args.save_dir, "run_args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=2)
        shutil.copy(os.path.abspath(__file__), os.path.join(args.save_dir, "train_ppo.py"))
    swanlab_run = None
    if args.use_swanlab and is_main_process():  # a resumed run continues the same swanlab run (its id)
        import swanlab
        swanlab_run = swanlab.init(project=args.swanlab_project, mode={"cloud": "online"}.get(args.swanlab_mode,
                                   args.swanlab_mode), id=run_id, resume="allow" if run_id else None,
                                   log_dir=os.path.join(args.save_dir, "swanlog"), config=vars(args))
        run_id = swanlab_run.id

    def progress(epoch, next_step):  # what the resume file holds beyond weights, optimizers and RNG
        return dict(epoch=epoch, step=next_step, global_step=global_step, kl_coef=kl_ctl.value, wandb_id=run_id,
                    bad_streak=bad_streak, grad_scaler=scaler.state_dict() if scaler else None)

    def evaluate_and_log(step):  # every rank evaluates its share; rank 0 writes
        record = dict(step=step, **evaluate_policy(actor, tokenizer, eval_samples, reward, args, autocast))
        if is_main_process():
            log_eval(record, metrics_path, swanlab_run)

    models = (actor, critic, old_actor)
    t_start, steps_this_run, stopped = time.time(), 0, False
    Logger(f"training: {total_rollouts} rollouts of {args.batch_size * world} prompts, "
           f"{total_opt_steps} optimizer steps, device {args.device} ({args.dtype}), {world} process(es)")
    with StopSignal() as stop:
        if eval_samples and not resumed:
            evaluate_and_log(0)  # the policy before any update
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            first = start_step if epoch == start_epoch else 0
            loader = DataLoader(dataset, batch_sampler=SkipBatchSampler(sampler, args.batch_size, first),
                                collate_fn=PromptCollator(tokenizer.pad_token_id), num_workers=args.num_workers,
                                generator=torch.Generator())  # its seed draw must not touch the global RNG
            for step, batch in enumerate(loader, start=first):
                if step >= steps_per_epoch or global_step >= total_rollouts:
                    break
                t0 = synced_time(args.device)
                rng_before_step = get_rng_state()  # what a stop during this rollout saves: the step never ran
                # rollout: old actor samples; old/ref log-probs, values and token rewards
                orders = [torch.randperm(args.batch_size).to(args.device) for _ in range(args.ppo_epochs)]
                try:
                    rollout, non_finite = stop.interruptible(
                        collect_rollout, batch, old_actor, ref_model, unwrap_model(critic), reward, tokenizer,
                        kl_ctl.value, orders, args, autocast), False
                except NonFiniteRolloutError as e:
                    print(f"warning: step {global_step + 1}{f' (rank {rank})' if world > 1 else ''}: {e}", flush=True)
                    rollout, non_finite = None, True
                # every rank agrees: one that updated alone would wait forever for the others' gradients
                any_non_finite, stopped = (all_reduce_sum(torch.tensor(
                    [float(non_finite), float(stop.signum is not None)], device=args.device)) > 0).tolist()
                if stopped:  # before the update nothing has changed: drop the rollout, save the last finished step
                    Logger(f"stop signal during the rollout of step {global_step + 1}: rollout dropped")
                    save_checkpoint(args, models, (actor_opt, critic_opt), (actor_sched, critic_sched),
                                    progress(epoch, step), tokenizer, rng_before_step)
                    break
                global_step += 1
                steps_this_run += 1
                n_skipped = 0
                if any_non_finite:
                    Logger(f"step {global_step}: non-finite reward or value; no update for this rollout")
                else:
                    # advantages: GAE on token rewards, returns before whitening
                    mask = rollout["response_mask"]
                    advantages, returns = compute_advantages(rollout["token_rewards"], rollout["values"], mask,
                                                             args.gamma, args.lam)
                    advantages = masked_whiten(advantages, mask)
                    # PPO update of actor and critic (the critic alone during its warm-up)
                    train_actor = global_step > args.critic_warmup_steps
                    t1 = synced_time(args.device)
                    update_stats, n_steps, n_skipped, early_stopped = ppo_update(
                        actor, critic, actor_opt, critic_opt, actor_sched, critic_sched, rollout, advantages,
                        returns, orders, kl_ctl.value, args, autocast, scaler, train_actor)
                    t2 = synced_time(args.device)
                    if n_skipped:
                        Logger(f"step {global_step}: {n_skipped} optimizer step(s) skipped "
                               f"(non-finite loss or gradient)")
                    metrics = rollout_metrics(rollout, advantages, returns)
                    kl_coef_used = kl_ctl.value
                    kl_ctl.update(metrics["kl_ref_per_response"], args.batch_size * world)  # nats per response

                    # logging
                    tokens = all_reduce_sum(mask.sum()).item()
                    metrics.update(update_stats, step=global_step, epoch=epoch, kl_coef=kl_coef_used,
                                   actor_lr=actor_sched.get_last_lr()[0], critic_lr=critic_sched.get_last_lr()[0],
                                   optimizer_steps=n_steps, skipped_steps=n_skipped,
                                   early_stopped=int(early_stopped), critic_warmup=int(not train_actor),
                                   rollout_tokens_per_s=tokens / max(rollout["time_generate"], 1e-9),
                                   time_rollout_s=rollout["time_generate"], time_forward_s=rollout["time_forward"],
                                   time_reward_s=rollout["time_reward"], time_update_s=t2 - t1, time_step_s=t2 - t0)
                    if is_main_process():
                        eta = (time.time() - t_start) / steps_this_run * (total_rollouts - global_step)
                        log_step(metrics, metrics_path, swanlab_run, total_rollouts, eta, args)
                        if args.log_samples:
                            log_samples(global_step, batch["prompts"], rollout, args.log_samples, samples_path,
                                        swanlab_run)
                if (global_step % args.update_old_actor_freq) == 0:
                    old_actor.load_state_dict(unwrap_model(actor).state_dict())
                bad_streak = bad_streak + 1 if any_non_finite or n_skipped else 0
                if bad_streak >= args.max_bad_steps:
                    raise RuntimeError(f"aborting at step {global_step}: {bad_streak} consecutive rollouts with "
                                       f"non-finite rewards, values, losses or gradients (--max_bad_steps "
                                       f"{args.max_bad_steps}); the last good checkpoint is kept in "
                                       f"{args.checkpoint_dir}")

                done = global_step >= total_rollouts
                if eval_samples and (global_step % args.eval_interval == 0 or done):
                    evaluate_and_log(global_step)

                # checkpoints; a signal during the update stops here, after the step, agreed by every rank
                stopped = all_reduce_sum(torch.tensor(float(stop.signum is not None), device=args.device)).item() > 0
                # no periodic save inside a bad streak: it would rotate the last good checkpoint out
                if (global_step % args.save_interval == 0 and not bad_streak) or done or stopped:
                    save_checkpoint(args, models, (actor_opt, critic_opt), (actor_sched, critic_sched),
                                    progress(epoch, step + 1), tokenizer, get_rng_state())
                if stopped:
                    break
            if stopped or global_step >= total_rollouts:
                break

    if stopped:
        Logger(f"stopped by signal at step {global_step}; resume file written. "
               f"Continue with the same command plus --from_resume 1")
    elif is_main_process():
        out = policy_path(args, config)
        table = eval_table(metrics_path) if eval_samples else None
        if table:
            Logger(f"held-out evaluation ({len(eval_samples)} prompts of {args.eval_data_path}, greedy):\n{table}")
        base = "" if args.from_weight == "none" else f"--base {args.from_weight} " if is_hf_folder(args.from_weight) \
            else f"--base {resolve_weight(args.from_weight, args.save_dir, args.hidden_size, args.use_moe)} "
        Logger(f"done in {(time.time() - t_start) / 60:.1f} min. actor weights: {out}; metrics: {metrics_path}; "
               f"samples: {samples_path}; resume: {args.checkpoint_dir}\nnext: python scripts/eval_policy.py "
               f"{base}--trained {out}\n      python scripts/plot_metrics.py {metrics_path}")
    if swanlab_run is not None:
        swanlab_run.finish()
    if dist.is_initialized():
        # free the DDP wrappers while the group lives: a reducer freed after destroy_process_group holds the
        # group's last reference, and gloo's destructor then waits on a worker thread that waits for the GIL
        actor = critic = models = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
