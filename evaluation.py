"""Held-out evaluation of a policy: greedy responses to a prompt file, and what they score.

One implementation for the trainer's periodic evaluation (evaluate_on_ranks: each rank takes
its share of the prompts and the sums are reduced; log_eval, eval_table) and for
scripts/eval_policy.py. Metrics, where they apply: format compliance and all four reasoning tags
exactly once (MiniMind2's rules), answer accuracy (when every prompt has an `answer`: reward.is_correct,
the correctness reward's definition), mean reward (total and reward-model part, computed exactly as in
training), mean response length in tokens (EOS included) and the share of responses that end their turn.
With tools (--tools) the held-out responses are tool conversations too (multi_turn.sample_with_tools): the
answer is the final turn's, and the share of responses that called a tool, the calls per response, the calls
answered with an error per response and the share still calling at the last turn are reported.
"""
import contextlib
import json

import torch
from torch.utils.data import DataLoader

from dataset.lm_dataset import PromptCollator, decode_responses
from model.sampling import ends_with_stop, sample_responses, stop_token_ids
from multi_turn import sample_with_tools
from reward import format_ok, is_correct, scored_turn, tags_complete
from trainer_utils import all_names, all_reduce_dict, append_jsonl, get_rank, get_world_size, Logger, unwrap_model

# metric -> (table label, shown as a percentage?, decimals), in table order; logged as eval_<metric>
METRICS = {
    "format": ("format compliance", True, 1),
    "tags": ("all 4 tags exactly once", True, 1),
    "accuracy": ("answer accuracy", True, 1),
    "reward": ("mean reward (total)", False, 3),
    "reward_rm": ("mean reward (RM part)", False, 3),
    "eos_rate": ("EOS rate", True, 1),
    "response_len": ("mean response length (tokens)", False, 1),
    "tool_call_rate": ("responses that call a tool", True, 1),
    "tool_calls": ("tool calls per response", False, 2),
    "tool_errors": ("tool calls answered with an error, per response", False, 2),
    "unfinished_rate": ("still calling tools at the last turn", True, 1),
}


@torch.no_grad()
def generate(model, tokenizer, samples, batch_size, max_gen_len, device, temperature=0.0, seed=0,
             autocast=contextlib.nullcontext(), tool_runner=None, max_turns=1):
    """Responses to `samples` (RLAIFDataset items), greedy when temperature is 0, decoded as the trainer
    decodes them; with a `tool_runner`, conversations of up to `max_turns` turns as the trainer samples them.
    Returns (responses, has_eos [N] bool, lengths [N] the policy's tokens including the EOS, tool use: None
    without tools, else {transcripts: N lists of messages, tool_calls, tool_errors, unfinished: [N]})."""
    generator = torch.Generator(device=device).manual_seed(seed)
    loader = DataLoader(samples, batch_size=batch_size, collate_fn=PromptCollator(tokenizer.pad_token_id),
                        generator=torch.Generator())  # its seed draw must not touch the global RNG
    responses, has_eos, lengths, tool_use = [], [], [], None
    stop_ids = stop_token_ids(model, tokenizer)
    sampling = dict(temperature=temperature or 1.0, greedy=temperature == 0, generator=generator)
    for batch in loader:
        prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast:
            if tool_runner is None:
                ids, mask, _ = sample_responses(model, prompt_ids, prompt_mask, max_gen_len, stop_ids,
                                                tokenizer.pad_token_id, **sampling)
                own, ended = mask, ends_with_stop(ids, mask, stop_ids)
            else:
                rollout = sample_with_tools(model, tokenizer, prompt_ids, prompt_mask, batch["messages"],
                                            batch["tools"], batch["template_kwargs"], tool_runner, max_turns,
                                            max_gen_len, stop_ids, **sampling)
                ids, mask, own, ended = rollout.response_ids, rollout.response_mask, rollout.action_mask, \
                    rollout.has_eos
                tool_use = tool_use or dict(transcripts=[], tool_calls=[], tool_errors=[], unfinished=[])
                tool_use["transcripts"] += rollout.transcripts
                for key in ("tool_calls", "tool_errors", "unfinished"):
                    tool_use[key].append(getattr(rollout, key).cpu())
        responses += decode_responses(tokenizer, ids, mask)
        has_eos.append(ended.cpu())
        lengths.append(own.sum(1).cpu())
    if tool_use:
        tool_use.update({k: torch.cat(tool_use[k]) for k in ("tool_calls", "tool_errors", "unfinished")})
    return responses, torch.cat(has_eos), torch.cat(lengths).float(), tool_use


def with_accuracy(samples, reward):
    """Whether the project's answer rule (reward.is_correct) is a held-out metric: when every prompt has a ground
    truth and no reward function from a file defines correctness (its own score and keys are reported instead),
    or when that rule is part of the reward (--correctness_reward)."""
    has_truth = bool(samples) and all(s["answer"] for s in samples)
    return has_truth and (reward is None or not reward.function_parts or bool(reward.correctness))


def evaluation_sums(model, tokenizer, samples, reward, batch_size, max_gen_len, device, with_accuracy,
                    temperature=0.0, autocast=contextlib.nullcontext(), tool_runner=None, max_turns=1):
    """Sums of every metric over `samples`, plus their count `n`: what ranks add up before dividing
    (see `means`). `reward` is the trainer's Reward (or None): its total and every part it gives (a reward
    function's score and the keys it returns, e.g. `reward_custom/acc`). Returns (sums, responses).
    `with_accuracy` must be the same on every rank; the parts of a reward function's diagnostics may not be
    (see evaluate_on_ranks)."""
    layout = reward is not None and reward.reasoning and reward.rules == "minimind2"  # MiniMind2's tag layout
    keys = ["n", *(["format", "tags"] if layout else []), *(["accuracy"] if with_accuracy else []),
            *(["reward"] if reward else []), "eos_rate", "response_len",
            *(["tool_call_rate", "tool_calls", "tool_errors", "unfinished_rate"] if tool_runner else [])]
    if not samples:  # a rank with no share of a short eval file still joins the reduction
        return dict.fromkeys(keys, 0.0), []
    texts, has_eos, lengths, tool_use = generate(model, tokenizer, samples, batch_size, max_gen_len, device,
                                                 temperature, autocast=autocast, tool_runner=tool_runner,
                                                 max_turns=max_turns)
    sums = dict(n=len(samples), eos_rate=has_eos.sum().item(), response_len=lengths.sum().item())
    responses, turn_kwargs = texts, {}
    if tool_use:  # the answer is the final turn's; reward functions read the whole text (Reward)
        responses = [t[-1]["content"] for t in tool_use["transcripts"]]
        calls = tool_use["tool_calls"]
        sums.update(tool_call_rate=(calls > 0).sum().item(), tool_calls=calls.sum().item(),
                    tool_errors=tool_use["tool_errors"].sum().item(), unfinished_rate=tool_use["unfinished"].sum().item())
    if layout:  # the rules score the full assistant turn (scored_turn), and so do these metrics
        turns = [scored_turn(s["prompt"], r) for s, r in zip(samples, responses)]
        sums.update(format=sum(map(format_ok, turns)), tags=sum(map(tags_complete, turns)))
    if with_accuracy:
        sums["accuracy"] = sum(is_correct(r, s["answer"]) for r, s in zip(responses, samples))
    if reward:
        sums["reward"] = 0.0
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            if tool_use:
                turn_kwargs = dict(transcripts=tool_use["transcripts"][i:i + batch_size],
                                   unfinished=tool_use["unfinished"][i:i + batch_size],
                                   tools=[s.get("tools") for s in chunk])
            total, parts = reward([s["prompt"] for s in chunk], texts[i:i + batch_size],
                                  [s["answer"] for s in chunk], [s.get("messages") for s in chunk],
                                  has_eos[i:i + batch_size], [s.get("row") for s in chunk], **turn_kwargs)
            sums["reward"] += total.sum().item()
            for name, values in parts.items():
                sums[f"reward_{name}"] = sums.get(f"reward_{name}", 0.0) + values.sum().item()
    parts = sorted(k for k in sums if k.startswith("reward_"))
    return {k: float(sums[k]) for k in keys + parts}, texts


def means(sums):
    return {k: v / max(sums["n"], 1) for k, v in sums.items() if k != "n"}


def evaluate(model, tokenizer, samples, reward=None, batch_size=64, max_gen_len=48, device="cpu", temperature=0.0,
             autocast=contextlib.nullcontext(), tool_runner=None, max_turns=1):
    """(metrics with their count `n`, responses) of one policy on a list of prompts, in one process."""
    samples = list(samples)
    sums, responses = evaluation_sums(model, tokenizer, samples, reward, batch_size, max_gen_len, device,
                                      with_accuracy(samples, reward), temperature, autocast, tool_runner, max_turns)
    return dict(n=int(sums["n"]), **means(sums)), responses


def markdown_table(results):
    """results: {column name: metrics}. One row per metric, one column per result, and a delta column for two."""
    names = list(results)
    header = ["metric", *names] + (["delta"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    parts = {k: (f"mean reward part {k[len('reward_'):]}", False, 3) for r in results.values() for k in r
             if k.startswith("reward_") and k not in METRICS}  # a reward function's score and its keys
    for key, (label, percent, decimals) in {**METRICS, **dict(sorted(parts.items()))}.items():
        if not all(key in results[name] for name in names):
            continue
        values = [results[name][key] * (100 if percent else 1) for name in names]
        cells = [label] + [f"{v:.{decimals}f}{'%' if percent else ''}" for v in values]
        if len(values) == 2:
            cells.append(f"{values[1] - values[0]:+.{decimals}f}{' pt' if percent else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_on_ranks(model, tokenizer, samples, reward, batch_size, max_gen_len, device, autocast, tool_runner=None,
                      max_turns=1):
    """The trainer's greedy evaluation: each rank takes every world-th prompt and the sums are reduced.
    Returns {eval_<metric>: value} (METRICS)."""
    sums, _ = evaluation_sums(unwrap_model(model), tokenizer, samples[get_rank()::get_world_size()], reward,
                              batch_size, max_gen_len, device, with_accuracy(samples, reward), autocast=autocast,
                              tool_runner=tool_runner, max_turns=max_turns)
    sums = {k: sums.get(k, 0.0) for k in all_names(sums)}  # a function's diagnostics may come on some ranks only
    totals = all_reduce_dict({k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in sums.items()})
    return {f"eval_{k}": v for k, v in means(totals).items()}


def log_eval(record, metrics_path, swanlab_run):
    """An evaluation as one metrics.jsonl line (and swanlab), printed as one line."""
    append_jsonl(metrics_path, record, swanlab_run)
    accuracy = f" accuracy {record['eval_accuracy']:.1%}" if "eval_accuracy" in record else ""
    parts = " ".join(f"{k[len('eval_reward_'):]} {v:.3f}" for k, v in record.items() if k.startswith("eval_reward_"))
    rm = f" ({parts})" if parts else ""
    reward = f" | reward {record['eval_reward']:.3f}{rm}" if "eval_reward" in record else ""
    layout = f" | format {record['eval_format']:.1%} tags {record['eval_tags']:.1%}" if "eval_format" in record else ""
    Logger(f"eval step {record['step']}{layout}{accuracy}{reward} | len {record['eval_response_len']:.1f} "
           f"eos {record['eval_eos_rate']:.1%}")


def is_eval_record(record):
    """An evaluation line of metrics.jsonl (the others are PPO steps)."""
    return "eval_eos_rate" in record


def eval_table(metrics_path):
    """The first and the last evaluation of metrics.jsonl side by side (markdown), or None."""
    evals = [r for r in map(json.loads, open(metrics_path, encoding="utf-8")) if is_eval_record(r)]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    return markdown_table({f"step {r['step']}": {k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_")}
                           for r in ([first, last] if last is not first else [first])})
