"""Evaluate policies (MiniMind .pth files or transformers folders) on a prompt file, greedily, side by side.

    python scripts/eval_policy.py --base demo/full_sft_128.pth --trained out/ppo_actor_128.pth

Each model is evaluated as train_ppo's own held-out evaluation evaluates it (evaluation.py, the same
code): its own tokenizer renders the prompts (the same thinking-switch rule and --seed), and its own
reward rules score it (the trainer's default for that model, unless --reward_rules says otherwise).
The settings the run used (its evaluation data, reward model and label, --max_gen_len, ...) are read
from the run_args.json that train_ppo wrote beside --trained, when there is one; flags given here win.
Metrics, where they apply: format compliance and all four reasoning tags exactly once (MiniMind2's
rules), answer accuracy (when the prompts carry a ground truth), mean reward exactly as train_ppo
computes it (total and the reward-model part), EOS rate and mean response length.
"""
import argparse
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from dataset.lm_dataset import RLAIFDataset
from evaluation import evaluate, markdown_table
from model.loading import default_tokenizer_path, init_model
from reward import add_reward_flags, build_reward, default_reward_model, reward_model_from_flags
from reward_functions import RewardFunction
from tools import add_tool_flags, check_tool_flags, ToolRunner
from trainer_utils import is_hf_folder, user_errors

DEMO_EVAL = os.path.join(ROOT, "dataset", "rlaif-eval.jsonl")
# the run's settings this script reads from run_args.json (train_ppo's flags of the same names), and the
# run's held-out file (or, without one, its training file) as --data_path
FROM_RUN = ("prompt_key", "label_key", "max_seq_len", "max_gen_len", "batch_size", "seed", "thinking_ratio",
            "apply_chat_template", "dtype",
            "reward_model_path", "reward_input", "reward_label", "reward_dtype", "reward_batch_size", "reasoning",
            "reward_rules", "rm_clip", "correctness_reward", "reward_fn", "missing_eos_penalty",
            "tools", "max_turns", "tool_timeout", "tool_max_chars")


def parser():
    p = argparse.ArgumentParser(description="Greedy evaluation of one or two policies on a prompt file.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=None, help="weights before training (a .pth path, a name in --save_dir, or a "
                                                "transformers folder)")
    p.add_argument("--trained", default=None, help="weights after training (its run's run_args.json, beside it, "
                                                   "gives the defaults of the run's settings)")
    p.add_argument("--save_dir", default="out", help="where bare weight names are resolved")
    p.add_argument("--data_path", default=DEMO_EVAL, help="the prompts: jsonl, json, parquet or a save_to_disk folder")
    p.add_argument("--prompt_key", default=None, help="as train_ppo")
    p.add_argument("--label_key", default=None, help="as train_ppo")
    p.add_argument("--tokenizer_path", default=None,
                   help="for MiniMind weights (default: the run's, else the project's model/); a transformers "
                        "folder reads its own")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="max prompt tokens, as in train_ppo: longer prompts are left out, never cut (default: the "
                        "run's, else no limit)")
    p.add_argument("--max_gen_len", type=int, default=48, help="max new tokens, as in train_ppo")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generation batch (train_ppo's evaluation "
                                                              "uses its --batch_size)")
    p.add_argument("--seed", type=int, default=42, help="draws the think block open or closed, as train_ppo's")
    p.add_argument("--thinking_ratio", type=float, default=None, help="as train_ppo")
    p.add_argument("--apply_chat_template", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="as train_ppo")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples, seeded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="autocast precision, as train_ppo (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (0 = all)")
    p.add_argument("--show", type=int, default=0, help="print the first N prompts and each model's response")
    p.add_argument("--json_out", default=None, help="also write the metrics here")
    add_reward_flags(p)
    add_tool_flags(p)
    return p


def run_settings(trained):
    """(run_args.json's path, the settings of FROM_RUN it holds, as defaults) for the run that wrote `trained`:
    the file beside it, or one folder up (a transformers folder, a resume file in checkpoints/)."""
    folder = os.path.dirname(os.path.abspath(trained.rstrip(os.sep)))
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, "run_args.json")
        if os.path.isfile(path):
            run = json.load(open(path))
            settings = {k: run[k] for k in FROM_RUN if k in run}
            settings["data_path"] = run.get("eval_data_path") or run.get("data_path") or DEMO_EVAL
            settings["limit"] = run.get("eval_limit", 0) if run.get("eval_data_path") else 0
            if not is_hf_folder(run.get("from_weight", "")):  # a MiniMind run: its tokenizer reads MiniMind weights
                settings["tokenizer_path"] = run.get("tokenizer_path")
            return path, settings
    return None, {}


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not (args.base or args.trained):
        p.error("give --base and/or --trained")
    run_args = None
    if args.trained:
        run_args, settings = run_settings(args.trained)
        p.set_defaults(**settings)
        args = p.parse_args(argv)  # flags given here still win
    args.run_args = run_args
    check_tool_flags(args, p.error)
    default_reward_model(args, os.path.abspath(args.data_path) == DEMO_EVAL)  # the run's, when it has run_args
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_args:
        print(f"settings of the run from {args.run_args} (flags given here win)")
    reward_model = reward_model_from_flags(args, args.device)
    functions = [RewardFunction(spec) for spec in args.reward_fn]
    autocast = torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.dtype)) \
        if args.dtype != "float32" else contextlib.nullcontext()
    results, responses, datasets = {}, {}, {}
    tool_runner = ToolRunner(args.tools, args.tool_timeout, args.tool_max_chars) if args.tools else None
    for name, weight in (("base", args.base), ("trained", args.trained)):
        if not weight:
            continue
        # each model with its own tokenizer (a transformers folder's own; MiniMind's: the run's or the project's)
        tokenizer_path = default_tokenizer_path(weight, args.tokenizer_path or os.path.join(ROOT, "model"))
        model, tokenizer = init_model(weight, args.save_dir, tokenizer_path, args.device)
        dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len,
                               thinking_ratio=args.thinking_ratio, seed=args.seed, prompt_key=args.prompt_key,
                               label_key=args.label_key, apply_chat_template=bool(args.apply_chat_template),
                               tools=tool_runner.schemas if tool_runner else None)
        samples = dataset.samples[:args.limit or None]  # epoch 0's draws, as the trainer's evaluation
        # and the reward the trainer would give this model (its generation's rules unless --reward_rules)
        reward = build_reward(args, model.config, reward_model, functions)
        metrics, responses[name] = evaluate(model.eval(), tokenizer, samples, reward, args.batch_size,
                                            args.max_gen_len, args.device, args.temperature, autocast, tool_runner,
                                            args.max_turns or 1)
        results[name], datasets[name] = dict(path=weight, rules=reward.rules, **metrics), samples
        del model
    n = len(next(iter(datasets.values())))
    decoding = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"{n} prompts from {args.data_path}, {decoding}, max {args.max_gen_len} new tokens; reward rules: "
          + ", ".join(f"{name} {result['rules']}" for name, result in results.items()) + "\n")
    print(markdown_table({f"{name} ({result['path']})": result for name, result in results.items()}))
    for i in range(min(args.show, n)):
        for name in results:
            sample = datasets[name][i]
            print(f"\n--- {name}, prompt {i}: {sample['prompt']!r}"
                  + (f" (answer {sample['answer']})" if sample["answer"] else ""))
            print(f"[{name}] {responses[name][i]!r}")
    if tool_runner:
        tool_runner.close()
    if args.json_out:
        with open(args.json_out + ".tmp", "w") as f:
            json.dump(dict(data_path=args.data_path, temperature=args.temperature, models=results), f, indent=2)
        os.replace(args.json_out + ".tmp", args.json_out)
    return results


if __name__ == "__main__":
    with user_errors():
        main()
