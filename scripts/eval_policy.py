"""Evaluate MiniMind policies on a prompt file with greedy decoding, side by side.

    python scripts/eval_policy.py --base demo/full_sft_128.pth --trained out/ppo_actor_128.pth

Per model, the metrics of evaluation.py, the same the trainer logs as eval_*: format
compliance, all four reasoning tags exactly once, answer accuracy (when the prompt file has
"answer" fields), mean reward exactly as train_ppo computes it (total and the reward-model
part), EOS rate and mean response length.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from torch.utils.data import Subset

from dataset.lm_dataset import RLAIFDataset
from evaluation import evaluate, markdown_table
from reward import default_reward_rules, Reward, REWARD_RULES, load_reward_model
from model.loading import default_tokenizer_path, init_model


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Greedy evaluation of one or two MiniMind policies on a prompt file.")
    p.add_argument("--base", default=None, help="weights before training (a .pth path or a name in --save_dir)")
    p.add_argument("--trained", default=None, help="weights after training")
    p.add_argument("--save_dir", default="out", help="where bare weight names are resolved")
    p.add_argument("--data_path", default=os.path.join(ROOT, "dataset", "rlaif-eval.jsonl"))
    p.add_argument("--reward_model_path", default=os.path.join(ROOT, "demo", "reward_model"),
                   help="'none': the rules alone (no reward-model column)")
    p.add_argument("--reward_input", default="auto", help="as train_ppo")
    p.add_argument("--reward_label", default=None, help="as train_ppo")
    p.add_argument("--tokenizer_path", default=None,
                   help="default: a transformers folder's own tokenizer, else the project's model/")
    p.add_argument("--max_seq_len", type=int, default=64, help="max prompt tokens, as in train_ppo")
    p.add_argument("--max_gen_len", type=int, default=48, help="max new tokens, as in train_ppo")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generation batch (train_ppo's evaluation "
                                                              "uses its --batch_size)")
    p.add_argument("--reasoning", type=int, default=1, choices=[0, 1], help="reward rules, as train_ppo")
    p.add_argument("--rm_clip", type=float, default=3.0, help="as train_ppo")
    p.add_argument("--reward_rules", default=None, choices=list(REWARD_RULES),
                   help="as train_ppo (default: the first model's generation)")
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
    reward_model = None if args.reward_model_path.lower() == "none" else load_reward_model(
        args.reward_model_path, args.device, "auto", args.reward_input, args.reward_label)
    results, responses, dataset, reward = {}, {}, None, None
    for name, weight in (("base", args.base), ("trained", args.trained)):
        if not weight:
            continue
        tokenizer_path = args.tokenizer_path or default_tokenizer_path(weight, os.path.join(ROOT, "model"))
        model, tokenizer = init_model(weight, args.save_dir, tokenizer_path, args.device)
        if dataset is None:
            rules = args.reward_rules or default_reward_rules(model.config)
            reward = Reward(reward_model, rules, bool(args.reasoning), args.rm_clip, args.batch_size) \
                if reward_model is not None or (args.reasoning and rules != "none") else None
            dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len)
            if args.limit:
                dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        metrics, responses[name] = evaluate(model, tokenizer, dataset, reward, args.batch_size, args.max_gen_len,
                                            args.device, args.temperature)
        results[name] = dict(path=weight, **metrics)
        del model
    print(f"{len(dataset)} prompts from {args.data_path}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, "
          f"max {args.max_gen_len} new tokens\n")
    print(markdown_table({f"{name} ({result['path']})": result for name, result in results.items()}))
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
