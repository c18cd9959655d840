"""Evaluate MiniMind policies on a prompt file with greedy decoding, side by side.

    python scripts/eval_policy.py --base demo/full_sft_128.pth --trained out/ppo_actor_128.pth

Per model: format compliance (the trainer's FORMAT regex), tag completeness (each of the four
reasoning tags exactly once), mean reward exactly as train_ppo computes it (total and the
reward-model part), EOS rate, mean response length and, when the prompt file has "answer"
fields, answer accuracy (the stripped <answer> content equals the ground truth).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from torch.utils.data import DataLoader, Subset

from dataset.lm_dataset import PromptCollator, RLAIFDataset
from model.model_minimind import sample_responses
from train_ppo import ANSWER, FORMAT, calculate_rewards, load_reward_model
from trainer_utils import init_model

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# table rows: (key, label, shown as a percentage?, decimals); accuracy only when the prompts carry answers
ROWS = [("format", "format compliance", True, 1), ("tags", "all 4 tags exactly once", True, 1),
        ("accuracy", "answer accuracy", True, 1), ("reward", "mean reward (total)", False, 3),
        ("reward_rm", "mean reward (RM part)", False, 3), ("eos", "EOS rate", True, 1),
        ("length", "mean response length (tokens)", False, 1)]


# ----------------------------------------------------------------------------- metrics of one response
def format_ok(response):
    return any(f.match(response) for f in FORMAT)


def tags_complete(response):
    return all(response.count(tag) == 1 for tag in TAGS)


def extract_answer(response):
    """Stripped content of the first <answer>...</answer> span, or None."""
    match = ANSWER.search(response)
    return match.group(1).strip() if match else None


def answer_correct(response, answer):
    return extract_answer(response) == answer.strip()


# ----------------------------------------------------------------------------- generation and scoring
@torch.no_grad()
def generate(model, tokenizer, dataset, batch_size, max_gen_len, device, temperature=0.0, seed=0):
    """Responses to every prompt (greedy when temperature is 0), decoded as the trainer decodes them.
    Returns (responses, has_eos [N] bool, lengths [N] tokens including the EOS)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=PromptCollator(tokenizer.pad_token_id))
    responses, has_eos, lengths = [], [], []
    for batch in loader:
        ids, mask, _ = sample_responses(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        max_gen_len, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                        temperature=temperature or 1.0, greedy=temperature == 0,
                                        generator=generator)
        responses += tokenizer.batch_decode(ids * mask, skip_special_tokens=True)
        has_eos.append(((ids == tokenizer.eos_token_id) & mask.bool()).any(1).cpu())
        lengths.append(mask.sum(1).cpu())
    return responses, torch.cat(has_eos), torch.cat(lengths).float()


def evaluate(model, tokenizer, dataset, reward_model=None, reward_tokenizer=None, batch_size=64, max_gen_len=48,
             device="cpu", temperature=0.0):
    """(metrics dict, responses) of one policy on a prompt dataset."""
    responses, has_eos, lengths = generate(model, tokenizer, dataset, batch_size, max_gen_len, device, temperature)
    samples = [dataset[i] for i in range(len(dataset))]
    metrics = dict(n=len(responses),
                   format=sum(map(format_ok, responses)) / len(responses),
                   tags=sum(map(tags_complete, responses)) / len(responses),
                   eos=has_eos.float().mean().item(), length=lengths.mean().item())
    if all(s["answer"] for s in samples):
        metrics["accuracy"] = sum(answer_correct(r, s["answer"]) for r, s in zip(responses, samples)) / len(samples)
    if reward_model is not None:
        reward_args = argparse.Namespace(reasoning=1, rm_clip=3.0, reward_batch_size=batch_size)  # train_ppo's defaults
        total, parts = [], []
        for i in range(0, len(samples), batch_size):
            t, p = calculate_rewards([s["prompt"] for s in samples[i:i + batch_size]], responses[i:i + batch_size],
                                     reward_model, reward_tokenizer, reward_args)
            total.append(t)
            parts.append(p["rm"])
        metrics["reward"], metrics["reward_rm"] = torch.cat(total).mean().item(), torch.cat(parts).mean().item()
    return metrics, responses


def markdown_table(results):
    """results: {model name: metrics}. One row per metric, one column per model, plus a delta column for two."""
    names = list(results)
    header = ["metric"] + [f"{name} ({results[name]['path']})" for name in names] + (["delta"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, percent, decimals in ROWS:
        if not all(key in results[name] for name in names):
            continue
        values = [results[name][key] * (100 if percent else 1) for name in names]
        cells = [label] + [f"{v:.{decimals}f}{'%' if percent else ''}" for v in values]
        if len(values) == 2:
            cells.append(f"{values[1] - values[0]:+.{decimals}f}{' pt' if percent else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Greedy evaluation of one or two MiniMind policies on a prompt file.")
    p.add_argument("--base", default=None, help="weights before training (a .pth path or a name in --save_dir)")
    p.add_argument("--trained", default=None, help="weights after training")
    p.add_argument("--save_dir", default="out", help="where bare weight names are resolved")
    p.add_argument("--data_path", default=os.path.join(ROOT, "dataset", "rlaif-eval.jsonl"))
    p.add_argument("--reward_model_path", default=os.path.join(ROOT, "demo", "reward_model"),
                   help="'none' skips the reward columns")
    p.add_argument("--tokenizer_path", default=os.path.join(ROOT, "model"))
    p.add_argument("--max_seq_len", type=int, default=64, help="max prompt tokens, as in train_ppo")
    p.add_argument("--max_gen_len", type=int, default=48, help="max new tokens, as in train_ppo")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, seeded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (0 = all)")
    p.add_argument("--show", type=int, default=0, help="print the first N prompts and each model's response")
    p.add_argument("--json_out", default=None, help="also write the metrics here")
    args = p.parse_args(argv)
    if not (args.base or args.trained):
        p.error("give --base and/or --trained")
    return args


def main(argv=None):
    args = parse_args(argv)
    reward_model = reward_tokenizer = None
    if args.reward_model_path.lower() != "none":
        reward_model, reward_tokenizer = load_reward_model(args.reward_model_path, args.device, torch.float32)
    results, responses, dataset = {}, {}, None
    for name, weight in (("base", args.base), ("trained", args.trained)):
        if not weight:
            continue
        model, tokenizer = init_model(weight, args.save_dir, args.tokenizer_path, args.device)
        if dataset is None:
            dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len)
            if args.limit:
                dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        metrics, responses[name] = evaluate(model, tokenizer, dataset, reward_model, reward_tokenizer,
                                            args.batch_size, args.max_gen_len, args.device, args.temperature)
        results[name] = dict(path=weight, **metrics)
        del model
    print(f"{len(dataset)} prompts from {args.data_path}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, "
          f"max {args.max_gen_len} new tokens\n")
    print(markdown_table(results))
    for i in range(min(args.show, len(dataset))):
        sample = dataset[i]
        print(f"\n--- prompt {i}: {sample['prompt']!r}" + (f" (answer {sample['answer']})" if sample["answer"] else ""))
        for name in results:
            print(f"[{name}] {responses[name][i]!r}")
    if args.json_out:
        with open(args.json_out + ".tmp", "w") as f:
            json.dump(dict(data_path=args.data_path, temperature=args.temperature, models=results), f, indent=2)
        os.replace(args.json_out + ".tmp", args.json_out)
    return results


if __name__ == "__main__":
    main()
