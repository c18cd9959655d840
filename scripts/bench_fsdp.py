"""Per-rank memory of DDP against FSDP (--fsdp 1) at 2 ranks, and what gathering the policy for generation costs.

    python scripts/bench_fsdp.py                                   # MiniMind hidden 768, 8 layers, 2 gloo ranks
    python scripts/bench_fsdp.py --hidden_size 512 --num_hidden_layers 8 --ranks 2

The script runs the real train_ppo (build_run, train) under `torchrun --nproc_per_node N` twice, --fsdp 0 (DDP)
then --fsdp 1, on a random-init MiniMind actor with responses forced to full length, a tiny reward model and
generated prompts (scripts/bench_ppo.py's), and reports for every rank:
- bytes held: parameters of actor, critic and reference; gradients of actor and critic (at their first optimizer
  step); AdamW states (after it): what FSDP divides among the ranks;
- RSS (CPU) or CUDA memory: after build_run, the peak while models are built (FSDP builds them whole in CPU memory,
  then keeps its shards), and the peak while training (from after build_run to the end);
- generation: the seconds and memory of gathering the policy once before sampling (fsdp.unsharded), and, as the
  alternative it avoids, sampling with every decoder block gathered at every decoded token.
One JSON line per mode and rank on stdout, then a table.
"""
import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

MB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-rank memory, DDP vs FSDP, under torchrun; prints JSON lines.")
    p.add_argument("--hidden_size", type=int, default=768)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2, help="torchrun --nproc_per_node")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--mini_batch_size", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--max_gen_len", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--mmap_threshold", type=int, default=131072,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the ranks, so that RSS counts live memory (CPU)")
    p.add_argument("--profile", type=int, default=0, help="1: cProfile one gathered generation (rank 0, stderr)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "ddp" or "fsdp": one rank, under torchrun
    p.add_argument("--kit", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one rank
def memory_mb(device):
    """(current, peak) MB: this process's RSS and its peak (VmHWM) on CPU, allocated CUDA memory on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / MB, torch.cuda.max_memory_allocated() / MB
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak(device):
    """Start a new peak: Linux resets VmHWM on writing 5 to clear_refs; freed heap goes back to the OS first."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args):
    import train_ppo
    from fsdp import local_bytes, unsharded
    from model.sampling import sample_responses
    from scripts.bench_ppo import force_full_length
    from trainer_utils import get_rank, unwrap_model
    torch.set_num_threads(args.threads)
    kit, fsdp = args.kit, int(args.worker == "fsdp")
    argv = ["--from_weight", "none", "--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers,
            "--batch_size", args.batch_size, "--mini_batch_size", args.mini_batch_size, "--ppo_epochs", 1,
            "--max_gen_len", args.max_gen_len, "--max_seq_len", args.prompt_len, "--max_steps", args.steps,
            "--data_path", os.path.join(kit, "prompts.jsonl"), "--tokenizer_path", os.path.join(ROOT, "model"),
            "--reward_model_path", os.path.join(kit, "rm"), "--device", args.device, "--save_dir",
            os.path.join(kit, args.worker), "--save_interval", 10 ** 9, "--eval_data_path", "none", "--fsdp", fsdp,
            *(["--dtype", args.dtype] if args.dtype else [])]
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        run = train_ppo.build_run(train_ppo.parse_args([str(a) for a in argv]))
    result = dict(mode=args.worker, rank=get_rank(), build_s=time.time() - t0)
    result["build_peak_mb"] = memory_mb(args.device)[1]
    reset_peak(args.device)
    result["after_build_mb"] = memory_mb(args.device)[0]
    for lm in {id(unwrap_model(m).lm): unwrap_model(m).lm for m in (run.learner.actor, run.ref_model)}.values():
        force_full_length(lm, run.tokenizer.eos_token_id)
    learner = run.learner
    held = {name: local_bytes(model) for name, model in [("actor", learner.actor), ("critic", learner.critic),
                                                         ("reference", run.ref_model)]}
    result["params_mb"] = {name: b["params"] / MB for name, b in held.items()}
    grads, states = {}, {}
    for name, model, opt in [("actor", learner.actor, learner.actor_opt), ("critic", learner.critic,
                                                                          learner.critic_opt)]:
        def before(opt_, *_, name=name, model=model):  # the gradients exist (reduced) just before the first step
            grads.setdefault(name, local_bytes(model)["grads"] / MB)

        def after(opt_, *_, name=name, model=model):
            states.setdefault(name, local_bytes(model, opt_)["optimizer"] / MB)
        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
    gathers = []
    real_unsharded = train_ppo.unsharded

    @contextlib.contextmanager
    def timed_unsharded(policy):  # the trainer's gather for generation, timed
        before_mb, t = memory_mb(args.device)[0], time.time()
        with real_unsharded(policy):
            gathers.append(dict(gather_s=time.time() - t, gathered_mb=memory_mb(args.device)[0] - before_mb))
            yield
    train_ppo.unsharded = timed_unsharded
    with contextlib.redirect_stdout(sys.stderr):
        train_ppo.train(run)
    train_ppo.unsharded = real_unsharded
    result["train_peak_mb"] = memory_mb(args.device)[1]
    result["grads_mb"], result["optimizer_mb"] = grads, states
    metrics = [json.loads(line) for line in open(os.path.join(kit, args.worker, "metrics.jsonl"))] \
        if get_rank() == 0 else []
    if metrics:
        result["rollout_s"] = [m["time_rollout_s"] for m in metrics]
        result["step_s"] = [m["time_step_s"] for m in metrics]
    if gathers:
        result["gather_s"] = [g["gather_s"] for g in gathers]
        result["gathered_mb"] = [g["gathered_mb"] for g in gathers]
    # generation alone, the actor's own sampler on one batch, responses at full length
    batch = next(iter(torch.utils.data.DataLoader(
        run.dataset, batch_size=args.batch_size,
        collate_fn=train_ppo.PromptCollator(run.tokenizer.pad_token_id))))
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
    policy = unwrap_model(learner.actor)

    def generate():
        with torch.no_grad(), run.autocast:
            sample_responses(policy.lm, ids, mask, args.max_gen_len, [run.tokenizer.eos_token_id],
                             run.tokenizer.pad_token_id)
    t = time.time()
    with unsharded(policy):
        generate()
    result["generate_gathered_once_s"] = time.time() - t
    if args.profile and get_rank() == 0:  # where a gathered generation's time goes (FSDP's hooks, the model)
        import cProfile
        import pstats
        profile = cProfile.Profile()
        with unsharded(policy):
            profile.runcall(generate)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(12)
    if fsdp:  # the alternative: the root gathered, every block all-gathered and freed at every decoded token
        policy.unshard()
        t = time.time()
        generate()
        result["generate_gathered_per_token_s"] = time.time() - t
        policy.reshard()
    with contextlib.redirect_stdout(sys.stderr):
        train_ppo.finish(run, False)
    with open(os.path.join(kit, f"{args.worker}_rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- the two runs
def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from transformers import AutoTokenizer
    from scripts.bench_ppo import build_tiny_reward_model, write_prompts
    results = []
    with tempfile.TemporaryDirectory() as kit:
        write_prompts(os.path.join(kit, "prompts.jsonl"), AutoTokenizer.from_pretrained(os.path.join(ROOT, "model")),
                      args.batch_size * args.ranks * (args.steps + 1), args.prompt_len, 0)
        build_tiny_reward_model(os.path.join(kit, "rm"))
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                   os.path.abspath(__file__), "--worker", mode, "--kit", kit,
                   *[f"--{k}={v}" for k, v in vars(args).items() if v is not None and k not in ("worker", "kit")]]
            # glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap, where RSS still counts
            # them: FSDP's gathered parameters, freed after every forward, would count long after; blocks from
            # 128 KiB are mmapped instead and go back to the OS when freed (both modes alike)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT,
                       MALLOC_MMAP_THRESHOLD_=str(args.mmap_threshold))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stderr[-4000:]}")
            if args.profile:
                print(out.stderr[out.stderr.find("   Ordered by"):][:3000], file=sys.stderr)
            for rank in range(args.ranks):
                results.append(json.load(open(os.path.join(kit, f"{mode}_rank{rank}.json"))))
                print(json.dumps(results[-1]), flush=True)
    table(results, args)


def table(results, args):
    rows = sorted(results, key=lambda r: (r["mode"], r["rank"]))
    print(f"\nMiniMind hidden {args.hidden_size}, {args.num_hidden_layers} layers, {args.ranks} ranks, {args.device}; "
          f"MB per rank")
    print("| mode | rank | params (actor / critic / ref) | grads (actor / critic) | AdamW states | after build | "
          "build peak | training peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, g, o = r["params_mb"], r["grads_mb"], r["optimizer_mb"]
        print(f"| {r['mode']} | {r['rank']} | {p['actor']:.0f} / {p['critic']:.0f} / {p['reference']:.0f} | "
              f"{g.get('actor', 0):.0f} / {g.get('critic', 0):.0f} | {sum(o.values()):.0f} | "
              f"{r['after_build_mb']:.0f} | {r['build_peak_mb']:.0f} | {r['train_peak_mb']:.0f} |")
    for r in rows:
        if r["mode"] == "fsdp" and "gather_s" in r:
            print(f"fsdp rank {r['rank']}: gather for generation {1000 * min(r['gather_s']):.0f}-"
                  f"{1000 * max(r['gather_s']):.0f} ms, +{max(r['gathered_mb']):.0f} MB while it lasts; generation "
                  f"{r['generate_gathered_once_s']:.2f} s gathered once vs {r['generate_gathered_per_token_s']:.2f} s "
                  f"gathered per token")
        elif r["mode"] == "ddp":
            print(f"ddp rank {r['rank']}: generation {r['generate_gathered_once_s']:.2f} s (whole model resident)")


if __name__ == "__main__":
    main()
