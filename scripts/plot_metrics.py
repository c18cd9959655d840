"""Plot a PPO run's metrics.jsonl: reward parts, KL, entropy, response length, losses, and the held-out
evaluation curves (greedy: format, tags, accuracy, EOS rate; reward).

usage: python scripts/plot_metrics.py out/metrics.jsonl [--out out/metrics.png] [--smooth 10]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (title, keys, from evaluation lines?): training lines are smoothed, evaluations drawn point by point
PANELS = [
    ("reward", None, False),  # the total and the run's own parts (reward_<part>, diagnostics "/" aside)
    ("KL to reference", ["kl_ref"], False),
    ("entropy (nats / token)", ["entropy"], False),
    ("response length (tokens)", ["avg_response_len"], False),
    ("policy loss", ["policy_loss"], False),
    ("value loss and explained variance", ["value_loss", "value_explained_var"], False),
    ("held-out eval, greedy (share of prompts)", ["eval_format", "eval_tags", "eval_accuracy", "eval_eos_rate"], True),
    ("held-out eval, greedy (mean reward)", ["eval_reward", "eval_reward_rm"], True),
]


def read_metrics(path):
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
    if not records:
        raise ValueError(f"{path}: no metrics")
    return records


def moving_average(y, window):
    """Trailing mean over `window` points (shorter at the start), so curves keep their length."""
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(records, out, smooth):
    """Draw the panels into `out`; returns (the metric keys drawn, the figure)."""
    evals = [r for r in records if "eval_eos_rate" in r]  # evaluation lines (evaluation.is_eval_record)
    train = [r for r in records if "eval_eos_rate" not in r]
    fig, axes = plt.subplots(2, 4, figsize=(20, 7.5))
    drawn = []
    parts = sorted({k for r in train for k in r if k.startswith("reward_") and "/" not in k})
    for ax, (title, keys, from_evals) in zip(axes.flat, PANELS):
        keys = keys or ["reward", *parts]
        rows = evals if from_evals else train
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if not points:
                continue
            steps, y = zip(*points)
            if from_evals:
                ax.plot(steps, y, marker="o", label=key)
            else:
                line, = ax.plot(steps, y, alpha=0.25)
                ax.plot(steps, moving_average(y, smooth), color=line.get_color(), label=key)
            drawn.append(key)
        ax.set_title(title)
        ax.set_xlabel("PPO step (rollout)")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:  # runs without evaluation leave its panels empty
            low, high = ax.get_ylim()
            ax.set_ylim(low, high + 0.4 * (high - low))  # headroom: the legend sits above the curves, not on them
            ax.legend(fontsize=7, loc="upper center", ncol=3, framealpha=0.7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return drawn, fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="metrics.jsonl written by train_ppo.py")
    p.add_argument("--out", default=None, help="PNG path (default: beside the metrics file)")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "metrics.png")
    drawn, _ = plot(read_metrics(args.metrics), out, args.smooth)
    print(f"wrote {out}")
    return drawn


if __name__ == "__main__":
    main()
