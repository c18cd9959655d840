"""Plot a PPO run's metrics.jsonl: reward parts, KL, entropy, response length, losses.

usage: python scripts/plot_metrics.py out/metrics.jsonl [--out out/metrics.png] [--smooth 10]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANELS = [
    ("reward", ["reward", "reward_format", "reward_tags", "reward_rm"]),
    ("KL to reference", ["kl_ref"]),
    ("entropy (nats / token)", ["entropy"]),
    ("response length (tokens)", ["avg_response_len"]),
    ("policy loss", ["policy_loss"]),
    ("value loss", ["value_loss"]),
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
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            if key in records[0]:
                y = [r[key] for r in records]
                line, = ax.plot(steps, y, alpha=0.25)
                ax.plot(steps, moving_average(y, smooth), color=line.get_color(), label=key)
        ax.set_title(title)
        ax.set_xlabel("PPO step (rollout)")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="metrics.jsonl written by train_ppo.py")
    p.add_argument("--out", default=None, help="PNG path (default: beside the metrics file)")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "metrics.png")
    print(f"wrote {plot(read_metrics(args.metrics), out, args.smooth)}")


if __name__ == "__main__":
    main()
