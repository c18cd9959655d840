"""Benchmark the real train_ppo.py loop for a few steps, and micro-benchmark its hot-path choices.

    python scripts/bench_ppo.py --preset small --runs 3     # one JSON line per run, then a summary line
    python scripts/bench_ppo.py --preset mm2 --device cuda --dtype bfloat16
    python scripts/bench_ppo.py --preset llama_mm2 --runs 3  # a transformers Llama policy of the same size
    python scripts/bench_ppo.py --preset small --ablations  # ours vs the naive reference, one line each
    python scripts/bench_ppo.py --preset small --flops      # matmul GFLOP per step and the floor they set
    python scripts/bench_ppo.py --preset mm2 --max_gen_len 512 --signal_test  # SIGTERM during step 2: s to exit
    python scripts/bench_ppo.py --preset qwen0.5b --memory  # peak memory: full, + checkpointing, + LoRA, both

train_ppo.main() runs unchanged on a random-init actor (--from_weight none), a tiny random reward model
and generated arithmetic prompts, all built into a temp folder, so no files are needed. The actor's EOS
logit is pinned low so every response runs to --max_gen_len: token counts, hence times, are comparable
across runs and commits. Step 1 warms up; s/step and phase times summarise steps 2..N from the run's
metrics.jsonl. train_ppo's log goes to stderr, the JSON lines to stdout. On a shared CPU, set --threads to
the cores really free: oversubscribed OpenMP threads slow the matmuls several-fold.

Upstream reference (torch 2.13 CPU, float32, random init, stub reward model, --num_workers 0):
small 1.95 s/step, 262 generated tokens/s end to end, peak RSS 907 MB; mm2 5.2 s/step, 49 tokens/s, 1.9 GB.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

import train_ppo
from dataset.lm_dataset import PromptCollator, RLAIFDataset
from model.loading import init_model
from model.sampling import sample_categorical, sample_responses
from reward import load_reward_model
from model.policy import Policy, TokenLogprobs
from core_algos import compute_advantages
from trainer_utils import release_free_memory, unwrap_model

PRESETS = {
    "small": dict(hidden_size=256, num_hidden_layers=4, batch_size=8, mini_batch_size=4, ppo_epochs=2,
                  max_gen_len=64, prompt_len=64),
    "mm2": dict(hidden_size=512, num_hidden_layers=8, batch_size=4, mini_batch_size=2, ppo_epochs=2,
                max_gen_len=64, prompt_len=64),
}
# the mm2 run with a transformers LlamaForCausalLM of MiniMind2-small's shape as the policy (a folder built
# on the fly, loaded like any Hugging Face checkpoint): the general path timed beside the MiniMind one
PRESETS["llama_mm2"] = PRESETS["mm2"]
# a random transformers Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, SwiGLU 4864,
# vocabulary 151936, tied embeddings): --memory's model, at a fixed small batch
PRESETS["qwen0.5b"] = dict(hidden_size=896, num_hidden_layers=24, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                           max_gen_len=32, prompt_len=32)
# a random Llama of ~100M parameters whose embedding is a small share (hidden 768, 12 layers, SwiGLU 2048, vocabulary
# 32000, untied): --memory's second shape, where the decoder blocks dominate
PRESETS["llama100m"] = dict(hidden_size=768, num_hidden_layers=12, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                            max_gen_len=32, prompt_len=32)
HF_POLICY_PRESETS = ("llama_mm2", "qwen0.5b", "llama100m")
MEMORY_MODES = {"full": [], "gradient checkpointing": ["--gradient_checkpointing", 1], "LoRA": ["--lora_rank", 16],
                "LoRA + gradient checkpointing": ["--lora_rank", 16, "--gradient_checkpointing", 1]}
TOKENIZER = os.path.join(ROOT, "model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time train_ppo.py steps at a fixed config; prints JSON lines.")
    p.add_argument("--preset", default="small", choices=PRESETS)
    for name in PRESETS["small"]:  # every size can override the preset
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--steps", type=int, default=6, help="PPO steps per run; steps 2..N are summarised")
    p.add_argument("--runs", type=int, default=1, help="repeat the PPO run in R fresh subprocesses (isolated RSS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="as train_ppo: default bfloat16 autocast on CUDA, float32 on CPU (CPU autocast is for "
                        "checking, not speed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true", help="micro-benchmarks instead of the PPO run")
    p.add_argument("--signal_test", action="store_true",
                   help="run the bench in a child, SIGTERM it --signal_delay s after step 1 is logged (inside step 2's "
                        "generation at real sizes) and time how long it takes to exit")
    p.add_argument("--signal_delay", type=float, default=1.0)
    p.add_argument("--lengths", default="full", choices=["full", "varied"],
                   help="full: every response runs to --max_gen_len (comparable token counts); varied: lengths as "
                        "real runs have them (geometric, mean ~half the limit), where padding costs the most")
    p.add_argument("--max_tokens_per_micro_batch", type=int, default=0, help="as train_ppo")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1],
                   help="as train_ppo; step 1 (first_step_s) then includes the compile time")
    p.add_argument("--gradient_checkpointing", type=int, default=0, choices=[0, 1], help="as train_ppo")
    p.add_argument("--lora_rank", type=int, default=0, help="as train_ppo")
    p.add_argument("--phases", action="store_true",
                   help="also record the peak memory of each phase: load (building the models), rollout, update, "
                        "save")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of a PPO step (peak CUDA memory on a GPU, peak RSS on CPU) in each of the modes "
                        "full, + gradient checkpointing, + LoRA (rank 16), both: one subprocess each")
    p.add_argument("--flops", action="store_true",
                   help="count the matmul FLOPs of a PPO step (slow: not timed) and the floor they set at this "
                        "machine's measured GEMM rate, instead of timing the run")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up)")
    return args


# ----------------------------------------------------------------------------- inputs built on the fly
def build_tiny_reward_model(folder, seed=0):
    """A random 1-label Llama sequence classifier with the project tokenizer: a real HF RM folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return str(folder)


def write_prompts(path, tokenizer, n, max_len, seed):
    """n chats "What is a + b + ...?" rendering to 2/3 * max_len .. max_len tokens (so left padding varies).
    Returns the questions."""
    rng = random.Random(seed)

    def rendered_len(question):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    questions = []
    with open(path, "w") as f:
        for _ in range(n):
            target = rng.randint(max_len - max_len // 3, max_len)
            terms = [str(rng.randint(0, 20))]
            while True:  # add terms while the prompt still fits
                longer = terms + [str(rng.randint(0, 20))]
                if rendered_len(f"What is {' + '.join(longer)}?") > target:
                    break
                terms = longer
            question = f"What is {' + '.join(terms)}?"
            if rendered_len(question) > max_len:
                raise ValueError(f"--prompt_len {max_len} is shorter than the shortest prompt")
            questions.append(question)
            f.write(json.dumps({"conversations": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": "无"}]}) + "\n")
    return questions


def build_qwen_policy(folder, hidden_size, num_hidden_layers, seed=0):
    """A random Qwen2ForCausalLM of Qwen2.5-0.5B's shape (its width, heads and vocabulary; `num_hidden_layers`
    of them), with the project's tokenizer, saved as a transformers folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151936, hidden_size=hidden_size, intermediate_size=4864,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return str(folder)


def build_llama100m_policy(folder, hidden_size, num_hidden_layers, seed=0):
    """A random LlamaForCausalLM of ~100M parameters, untied, vocabulary 32000, the project's tokenizer."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden_size, intermediate_size=2048,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return str(folder)


def build_llama_policy(folder, hidden_size, num_hidden_layers, seed=0):
    """A random LlamaForCausalLM shaped as MiniMind2 (GQA 8/2 heads, SwiGLU 64-rounded 8/3 width, RoPE 1e6,
    tied embeddings, the project's tokenizer), saved as a transformers folder."""
    from transformers import LlamaForCausalLM
    from model.model_minimind import MiniMindConfig
    torch.manual_seed(seed)
    mm = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    config = LlamaConfig(vocab_size=mm.vocab_size, hidden_size=hidden_size, intermediate_size=mm.intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=mm.num_attention_heads,
                         num_key_value_heads=mm.num_key_value_heads, rms_norm_eps=mm.rms_norm_eps,
                         rope_theta=mm.rope_theta, max_position_embeddings=mm.max_position_embeddings,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return str(folder)


def reset_peak_memory(device):
    """From here on, peak memory counts what training holds, not the transients of building the models (a random
    model written to a folder and loaded back): the CUDA allocator's peak, and on Linux the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs once freed memory went back to the system)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak of the whole process
        pass


def peak_rss_mb():
    """The process's peak resident set since reset_peak_memory (VmHWM), or since it started where unavailable."""
    try:
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def force_full_length(model, eos_token_id):
    """Pin the EOS logit to -1e4 so sampling never stops early. Put on the actor, the old actor and the
    reference, so sampling and every scoring pass see the same distribution. Written in place, outside autograd,
    so that the bench adds no logits-sized copy (forward or backward) to the memory it measures: its softmax
    probability is exactly 0 in float32, so the gradient is the same as through a constant."""
    def hook(module, inputs, logits):
        with torch.no_grad():
            logits[..., eos_token_id] = -1e4
    model.lm_head.register_forward_hook(hook)
    return model


def force_varied_lengths(model, eos_token_id, max_gen_len):
    """Set the EOS logit so that EOS has probability 2 / max_gen_len at every step, whatever the model: response
    lengths are then geometric (mean about half of --max_gen_len, many short, a few running to the limit), as
    responses of very different lengths are in real runs. Same placement and reason as force_full_length."""
    hazard = 2.0 / max_gen_len

    def hook(module, inputs, logits):
        others = logits.index_fill(-1, torch.tensor([eos_token_id], device=logits.device), float("-inf"))
        eos = others.float().logsumexp(-1) + math.log(hazard / (1 - hazard))
        index = torch.tensor([eos_token_id], device=logits.device)
        return logits.index_copy(-1, index, eos[..., None].to(logits.dtype))
    model.lm_head.register_forward_hook(hook)
    return model


# ----------------------------------------------------------------------------- the PPO run
def config_of(args):
    sizes = {name: getattr(args, name) for name in PRESETS["small"]}
    return dict(preset=args.preset, **sizes, steps=args.steps, device=args.device, lengths=args.lengths,
                max_tokens_per_micro_batch=args.max_tokens_per_micro_batch, compile=args.compile,
                dtype=args.dtype, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
                lora_rank=args.lora_rank,
                threads=torch.get_num_threads(), torch=torch.__version__, allocator=c_allocator())


def c_allocator():
    """The C library's allocator and its environment settings: on CPU, peak RSS depends on them (docs/memory.md)."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")  # the glibc running, e.g. "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        libc = None
    settings = " ".join(f"{name}={value}" for name, value in sorted(os.environ.items())
                        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES")
    return " ".join(filter(None, [libc or "not glibc", settings]))


def bench_run(args):
    """One train_ppo run (build_run, EOS pinned, train) in this process; returns the summary dict."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        write_prompts(prompts, AutoTokenizer.from_pretrained(TOKENIZER), args.batch_size * args.steps,
                      args.prompt_len, args.seed)
        build = {"qwen0.5b": build_qwen_policy, "llama100m": build_llama100m_policy}.get(args.preset,
                                                                                       build_llama_policy)
        policy = ["--from_weight", build(os.path.join(tmp, "policy"), args.hidden_size, args.num_hidden_layers,
                                         args.seed), "--check_tokenizer", 0] \
            if args.preset in HF_POLICY_PRESETS else \
            ["--from_weight", "none", "--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers]
        argv = [*policy, "--batch_size", args.batch_size, "--mini_batch_size", args.mini_batch_size,
                "--ppo_epochs", args.ppo_epochs, "--max_gen_len", args.max_gen_len, "--max_seq_len", args.prompt_len,
                "--max_steps", args.steps, "--data_path", prompts, "--tokenizer_path", TOKENIZER,
                "--reward_model_path", build_tiny_reward_model(os.path.join(tmp, "rm")), "--device", args.device,
                "--dtype", args.dtype, "--save_dir", tmp, "--save_interval", 10 ** 9, "--num_workers", 0,
                "--seed", args.seed, "--gradient_checkpointing", args.gradient_checkpointing,
                "--lora_rank", args.lora_rank, "--max_tokens_per_micro_batch", args.max_tokens_per_micro_batch,
                "--compile", args.compile]
        phases = {}  # with --phases: the peak of each phase, max over the steps (MB)
        with contextlib.redirect_stdout(sys.stderr), phase_peaks(phases, args.device, args.phases):
            # stdout carries only the JSON line
            reset_peak_memory(args.device)
            run = train_ppo.build_run(train_ppo.parse_args([str(a) for a in argv]))
            phases["load"] = peak_now_mb(args.device)
            for lm in {id(unwrap_model(m).lm): unwrap_model(m).lm for m in (run.learner.actor, run.old_actor,
                                                                             run.ref_model)}.values():
                if args.lengths == "full":
                    force_full_length(lm, run.tokenizer.eos_token_id)
                else:
                    force_varied_lengths(lm, run.tokenizer.eos_token_id, args.max_gen_len)
            policy_params = sum(p.numel() for name, p in unwrap_model(run.learner.actor).lm.named_parameters()
                                if ".lora_" not in name)  # the policy's own, not its adapters
            reset_peak_memory(args.device)  # the peak of the training steps, the models in memory included
            peaks = {}  # after each step, before that step's save: the steps' own peak, not the final save's

            def record_peak(run):
                peaks["rss_mb"] = peak_rss_mb()
                if args.device.startswith("cuda"):
                    peaks["cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            train_ppo.finish(run, train_ppo.train(run, after_step=record_peak))
        metrics = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
    if len(metrics) < args.steps:  # stopped by a signal (--signal_test): nothing to summarise
        return dict(config=config_of(args), stopped_after_steps=len(metrics))
    lengths = {m["avg_response_len"] for m in metrics}
    if args.lengths == "full" and lengths != {float(args.max_gen_len)}:
        raise RuntimeError(f"responses did not run to --max_gen_len {args.max_gen_len}: lengths {lengths}")
    timed = metrics[1:]  # step 1 warms up

    def median(key):
        return statistics.median(m[key] for m in timed)

    tokens = args.batch_size * median("avg_response_len")  # generated per step, all real
    step_s = [m["time_step_s"] for m in timed]
    result = dict(config=config_of(args),
                  s_per_step=dict(median=median("time_step_s"), min=min(step_s), max=max(step_s)),
                  first_step_s=metrics[0]["time_step_s"],  # warm-up: allocator, and compilation with --compile
                  rollout_tokens_per_s=tokens / median("time_rollout_s"),
                  end_to_end_tokens_per_s=tokens / median("time_step_s"),
                  forward_tokens_per_s=median("forward_tokens_per_s"),  # real prompt + response tokens scored
                  forward_padding_share=median("forward_padding_share"),
                  phase_s=dict(rollout=median("time_rollout_s"), forwards=median("time_forward_s"),
                               reward=median("time_reward_s"), update=median("time_update_s")),
                  avg_response_len=timed[-1]["avg_response_len"], policy_params=policy_params,
                  peak_rss_mb=peaks["rss_mb"])
    if args.device.startswith("cuda"):
        result["cuda_peak_alloc_mb"] = peaks["cuda_mb"]
    if args.phases:
        result["phase_peak_mb"] = phases
    return result


def peak_now_mb(device):
    """The peak since the last reset_peak_memory: CUDA allocated memory on a GPU, else the resident set."""
    return torch.cuda.max_memory_allocated() / 2 ** 20 if str(device).startswith("cuda") else peak_rss_mb()


@contextlib.contextmanager
def phase_peaks(phases, device, on):
    """With `on`: each rollout (sampling, reward, scoring), update and save of train_ppo resets the peak before it
    and records it after, into phases[name] (the max over the steps)."""
    if not on:
        yield
        return
    def tracked(name, fn):
        def wrapper(*a, **k):
            reset_peak_memory(device)
            try:
                return fn(*a, **k)
            finally:
                phases[name] = max(phases.get(name, 0.0), peak_now_mb(device))
        return wrapper
    originals = {name: getattr(train_ppo, name) for name in ("collect_rollout", "ppo_update", "save_checkpoint")}
    for (name, fn), phase in zip(originals.items(), ("rollout", "update", "save")):
        setattr(train_ppo, name, tracked(phase, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(train_ppo, name, fn)


def gemm_gflops(device, seconds=1.0):
    """This machine's float32 GEMM rate at a training-sized shape (tokens x hidden x intermediate)."""
    a, b = torch.randn(512, 512, device=device), torch.randn(512, 1408, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        a @ b
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * 512 * 512 * 1408 * n / (time.perf_counter() - t0) / 1e9


def flops_run(args):
    """Matmul FLOPs per PPO step (torch's FlopCounterMode over a 2-step run of the real loop; every step
    does the same work since responses run to full length) and the s/step they need at the measured
    GEMM rate: a floor for float32 at this config, whatever the rest of the code does."""
    from torch.utils.flop_counter import FlopCounterMode
    args = argparse.Namespace(**{**vars(args), "steps": 2})
    counter = FlopCounterMode(display=False)
    with counter:
        bench_run(args)
    per_op = {str(op): n / 2e9 for op, n in counter.get_flop_counts()["Global"].items()}
    gflop, rate = counter.get_total_flops() / 2e9, gemm_gflops(args.device)
    return dict(config=config_of(args), matmul_gflop_per_step=gflop, gflop_by_op=per_op, gemm_gflops=rate,
                matmul_floor_s_per_step=gflop / rate)


def signal_test(argv, delay):
    """Time from SIGTERM to exit of a bench run signalled `delay` s after its step 1 was logged."""
    argv = [a for a in argv if a != "--signal_test"]
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--runs", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = []
    for line in child.stderr:  # train_ppo's log
        log.append(line)
        if line.startswith("step 1/"):
            break
    else:
        raise RuntimeError("the run ended before step 1:\n" + "".join(log[-20:]))
    time.sleep(delay)
    t_signal = time.perf_counter()
    child.send_signal(signal.SIGTERM)
    _, rest = child.communicate()
    exit_s = time.perf_counter() - t_signal
    return dict(signal_test=True, signal_delay_s=delay, signal_to_exit_s=exit_s, exit_code=child.returncode,
                rollout_dropped="rollout dropped" in rest,
                stop_message=next((l.strip() for l in rest.splitlines() if l.startswith("stopped by signal")), None),
                step1_log=log[-1].strip())


def memory_modes(argv):
    """Peak memory of each phase (load, rollout, update, save) of a 2-step run in each of MEMORY_MODES (a fresh
    subprocess each), the run's peak (the save included) and bytes per policy parameter."""
    argv = [a for a in argv if a != "--memory"]
    rows = []
    for mode, flags in MEMORY_MODES.items():
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--steps", "2", "--runs", "1",
                              "--phases", *map(str, flags)], stdout=subprocess.PIPE, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        phases = result["phase_peak_mb"]
        peak_mb = max(phases.values())
        per_param = 2 ** 20 / result["policy_params"]
        rows.append(dict(mode=mode, peak_mb=peak_mb, bytes_per_param=peak_mb * per_param,
                         phase_peak_mb=phases, phase_bytes_per_param={k: v * per_param for k, v in phases.items()},
                         policy_params=result["policy_params"], s_per_step=result["s_per_step"]["median"],
                         memory="cuda_peak_alloc" if str(result["config"]["device"]).startswith("cuda") else "peak_rss"))
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["peak_mb"]
    return dict(summary=True, config=result["config"], **{row["mode"]: f"{row['peak_mb']:.0f} MB "
                                                                      f"({row['peak_mb'] / full:.0%} of full)"
                                                          for row in rows})


def bench_runs(argv, runs):
    """The same bench in `runs` fresh subprocesses: each line as it comes, then the median of medians."""
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--runs", "1"],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    def median(get):
        return statistics.median(get(r) for r in results)

    return dict(summary=True, runs=runs, config=results[0]["config"],
                s_per_step_median=median(lambda r: r["s_per_step"]["median"]),
                rollout_tokens_per_s=median(lambda r: r["rollout_tokens_per_s"]),
                end_to_end_tokens_per_s=median(lambda r: r["end_to_end_tokens_per_s"]),
                phase_s={k: median(lambda r: r["phase_s"][k]) for k in results[0]["phase_s"]},
                peak_rss_mb=max(r["peak_rss_mb"] for r in results))


# ----------------------------------------------------------------------------- ablations: naive references
# Straightforward MiniMind-style alternatives to the project's hot paths, used ONLY as the baseline of
# --ablations. Each returns the same thing as the function it stands in for.
class CatCache:
    """Naive reference for KVCache: per-layer k, v grown by torch.cat each token (MiniMind's past_key_values)."""

    def __init__(self, num_layers):
        self.k, self.v, self.length = [None] * num_layers, [None] * num_layers, 0

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def naive_generate(model, input_ids, attention_mask, max_new_tokens, cache=None):
    """Naive reference for sample_responses: re-forward the whole sequence every token (cache=None), or
    feed the new token through a CatCache; tokens drawn with torch.multinomial. logits_to_keep=1 as ours."""
    ids, mask, logprobs = input_ids, attention_mask, []
    for t in range(max_new_tokens):
        step_ids = ids if cache is None or t == 0 else ids[:, -1:]
        logits = model(step_ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1].float()
        logp = logits.log_softmax(-1)
        token = torch.multinomial(logp.exp(), 1)
        logprobs.append(logp.gather(-1, token))
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, input_ids.shape[1]:], torch.cat(logprobs, 1)


def naive_logprobs(model, input_ids, attention_mask, response_len):
    """Naive reference for Policy's log-probs: logits at every position, a full log_softmax, then slice."""
    logits = model(input_ids, attention_mask=attention_mask).logits.float()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logprobs[:, -response_len:]


def naive_gae(token_rewards, values, response_mask, gamma, lam):
    """Naive reference for compute_advantages: the usual reverse Python loop over tokens."""
    values = values * response_mask
    advantages, last = torch.zeros_like(values), 0.0
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else 0.0
        delta = (token_rewards[:, t] + gamma * next_value - values[:, t]) * response_mask[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def paired_seconds(fn_ours, fn_naive, device, min_rounds=3, min_total=0.5):
    """Median wall time of each fn after a warm-up call. Calls alternate, so drifting load on a shared
    machine hits both alike; at least min_rounds rounds and min_total seconds in all."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns, times = (fn_ours, fn_naive), ([], [])
    for fn in fns:
        fn()
    while len(times[0]) < min_rounds or sum(map(sum, times)) < min_total:
        for fn, t in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def ablate(name, ours, naive, fn_ours, fn_naive, args, compare=True, max_abs_diff=None):
    """Time both, print one JSON line; compare=True also checks that they compute the same thing
    (or pass max_abs_diff when the check needs more than calling each once)."""
    line = dict(ablation=name, ours=ours, naive=naive)
    if compare:
        max_abs_diff = (fn_ours() - fn_naive()).abs().max().item()
    if max_abs_diff is not None:
        line["max_abs_diff"] = max_abs_diff
    line["ours_s"], line["naive_s"] = paired_seconds(fn_ours, fn_naive, args.device)
    line["speedup"] = line["naive_s"] / line["ours_s"]
    print(json.dumps(line | dict(config=config_of(args))), flush=True)


@torch.no_grad()
def run_ablations(args):
    """Each hot path against its naive reference on the same model and inputs, at the bench's sizes."""
    torch.manual_seed(args.seed)
    model, tokenizer = init_model("none", "", TOKENIZER, args.device, hidden_size=args.hidden_size,
                                  num_hidden_layers=args.num_hidden_layers)
    force_full_length(model.eval(), tokenizer.eos_token_id)
    B, G, dev = args.batch_size, args.max_gen_len, args.device
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.jsonl")
        questions = write_prompts(path, tokenizer, B, args.prompt_len, args.seed)
        dataset = RLAIFDataset(path, tokenizer, max_length=args.prompt_len)
        reward_model = load_reward_model(build_tiny_reward_model(os.path.join(tmp, "rm")), dev, torch.float32)
    batch = PromptCollator(tokenizer.pad_token_id)([dataset[i] for i in range(B)])
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    use_amp = args.dtype != "float32"
    with torch.autocast(dev.split(":")[0], dtype=getattr(torch, args.dtype)) if use_amp else contextlib.nullcontext():
        # (1) generation
        def ours_gen():
            return sample_responses(model, ids, mask, G, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ablate("generation", "sample_responses: preallocated KVCache", "no cache: full re-forward + torch.multinomial",
               ours_gen, lambda: naive_generate(model, ids, mask, G), args, compare=False)
        ablate("generation", "sample_responses: preallocated KVCache", "cache grown by torch.cat + torch.multinomial",
               ours_gen, lambda: naive_generate(model, ids, mask, G, CatCache(args.num_hidden_layers)), args,
               compare=False)
        # (2) rollout log-probs of the sampled responses
        response_ids, response_mask, _ = ours_gen()
        full_ids, full_mask = torch.cat([ids, response_ids], 1), torch.cat([mask, response_mask], 1)
        policy = Policy(model)
        ablate("rollout_logprobs", "Policy: the LM head at the response positions, gather - logsumexp",
               "logits at every position + full log_softmax, then slice",
               lambda: policy(full_ids, full_mask, G, 1.0)[0],
               lambda: naive_logprobs(model, full_ids, full_mask, G), args)
        # (3) GAE on rows of random lengths
        rewards, values = torch.randn(B, G, device=dev), torch.randn(B, G, device=dev)
        gae_mask = (torch.arange(G, device=dev) < torch.randint(1, G + 1, (B, 1), device=dev)).float()
        ablate("gae", "compute_advantages: one matmul with the discount matrix", "reverse Python loop over tokens",
               lambda: compute_advantages(rewards, values, gae_mask, 1.0, 0.95)[0],
               lambda: naive_gae(rewards, values, gae_mask, 1.0, 0.95)[0], args)
        # (4) reward-model scoring of the sampled responses
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": r}]
                 for q, r in zip(questions, tokenizer.batch_decode(response_ids, skip_special_tokens=True))]
        ablate("reward_scoring", "RewardModel.score: one padded batch", "RewardModel.score: one call per sample",
               lambda: reward_model.score(chats), lambda: torch.cat([reward_model.score([c]) for c in chats]), args)
        # (5) drawing one token per row, as each generation step does (different draws: timing only)
        logits = model(full_ids[:, :-1], attention_mask=full_mask[:, :-1], logits_to_keep=1).logits[:, -1]
        probs = logits.float().softmax(-1)
        ablate("token_sampling", "sample_categorical: one uniform + binary search per row",
               "torch.multinomial: an exponential draw per vocabulary entry",
               lambda: sample_categorical(probs), lambda: torch.multinomial(probs, 1).squeeze(-1), args, compare=False)
        # (6) the update's log-prob gradient through the logits at the response positions
        logits = model(full_ids, attention_mask=full_mask).logits[:, -G - 1:-1]
        ablate_logprob_backward(logits, full_ids[:, -G:], args)
    # (7) one AdamW step on the actor's parameters (~16 per PPO step at the presets, actor and critic)
    ablate_adamw(model, args)


def ablate_logprob_backward(logits, targets, args):
    """TokenLogprobs (the softmax saved, the gradient written into it) vs autograd through logsumexp and gather:
    forward and backward to the logits [B, R, V], the gradients compared."""
    weights = torch.randn(targets.shape, device=args.device)

    def gradient(logprobs_of):
        z = logits.detach().requires_grad_()
        (weights * logprobs_of(z)).sum().backward()
        return z.grad

    def autograd_logprobs(z):
        z = z.float()
        return z.gather(-1, targets[..., None]).squeeze(-1) - z.logsumexp(-1)
    with torch.enable_grad():
        ablate("logprob_backward", "TokenLogprobs: the softmax saved, the gradient written into it",
               "autograd through logsumexp and gather",
               lambda: gradient(lambda z: TokenLogprobs.apply(z, targets, 1.0, "none")),
               lambda: gradient(autograd_logprobs), args)


def ablate_adamw(model, args):
    """Fused AdamW (train_ppo) vs torch's default multi-tensor AdamW, from identical states and gradients."""
    params = {kind: [p.detach().clone().requires_grad_() for p in model.parameters()] for kind in ("fused", "default")}
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    grads = [torch.randn(p.shape, generator=gen, device=args.device) * 1e-3 for p in params["fused"]]
    opts = {kind: torch.optim.AdamW(ps, lr=1e-4, fused=kind == "fused") for kind, ps in params.items()}
    for kind, ps in params.items():
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opts[kind].step()
    diff = max((a - b).abs().max().item() for a, b in zip(params["fused"], params["default"]))
    ablate("optimizer_step", "AdamW(fused=True)", "AdamW() default (foreach)", opts["fused"].step,
           opts["default"].step, args, compare=False, max_abs_diff=diff)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ablations:
        run_ablations(args)
    elif args.signal_test:
        print(json.dumps(signal_test(argv, args.signal_delay)), flush=True)
    elif args.flops:
        print(json.dumps(flops_run(args)), flush=True)
    elif args.memory:
        print(json.dumps(memory_modes(argv)), flush=True)
    elif args.runs > 1:
        print(json.dumps(bench_runs(argv, args.runs)), flush=True)
    else:
        print(json.dumps(bench_run(args)), flush=True)


if __name__ == "__main__":
    main()
