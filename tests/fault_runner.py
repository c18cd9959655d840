"""Child-process entry for tests/test_fault_tolerance.py: train_ppo.main with injected faults.

The tests start `run` through a multiprocessing forkserver that has imported this module (and
so torch, transformers and train_ppo) once: each child is a real process that can be killed
with SIGKILL, SIGTERM or SIGINT, but starts in milliseconds instead of seconds.

`faults` (all optional):
  hang: (kind, n)    on the n-th "weights" or "resume" save, write half the temp file; or on the
                     n-th "rotate" (save_resume has just moved the newest file to .1 and the new
                     one is not in place yet); then create the file `marker` and sleep, waiting
                     for the test's SIGKILL
  nan_reward: [k]    the reward model returns NaN for sample 0 at its k-th call in this process
  log_prompts: dir   append each rollout's prompts to dir/prompts_rank{rank}.jsonl
  self_signal: (where, n, k)  the process sends itself SIGTERM during its n-th rollout: "generate" at
                     the k-th forward of the sampling model, "reward" as the reward model is called
  rank, world, port: join a gloo group of `world` processes on localhost as `rank`
"""
import io
import json
import os
import signal
import time

import torch

import reward
import train_ppo


def _hang(marker):
    open(marker, "w").close()
    time.sleep(600)


def _install(faults):
    rank = faults.get("rank", 0)
    if "hang" in faults:
        kind, n = faults["hang"]
        counts = {"weights": 0, "resume": 0, "rotate": 0}
        real_save, real_replace = torch.save, os.replace

        def save(obj, f, *args, **kwargs):
            which = "resume" if "_resume.pth" in f.name else "weights"
            counts[which] += 1
            if (which, counts[which]) != (kind, n):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            _hang(faults["marker"])

        def replace(src, dst):
            real_replace(src, dst)
            if os.fspath(src).endswith("_resume.pth"):  # the rotation's first rename
                counts["rotate"] += 1
                if ("rotate", counts["rotate"]) == (kind, n):
                    _hang(faults["marker"])
        torch.save, os.replace = save, replace

    if "nan_reward" in faults:
        real_score, calls = reward.RewardModel.score, [0]

        def score_chats(*args, **kwargs):
            scores = real_score(*args, **kwargs)
            calls[0] += 1
            if calls[0] in faults["nan_reward"]:
                scores[0] = float("nan")
            return scores
        reward.RewardModel.score = score_chats

    if "log_prompts" in faults:
        real_collect = train_ppo.collect_rollout

        def collect_rollout(batch, *args, **kwargs):
            with open(os.path.join(faults["log_prompts"], f"prompts_rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps(batch["prompts"]) + "\n")
            return real_collect(batch, *args, **kwargs)
        train_ppo.collect_rollout = collect_rollout


    if "self_signal" in faults:
        where, n, k = faults["self_signal"]
        real_sample, real_score, rollouts = train_ppo.sample_responses, reward.RewardModel.score, [0]

        def sample_responses(model, *args, **kwargs):
            rollouts[0] += 1
            if where != "generate" or rollouts[0] != n:
                return real_sample(model, *args, **kwargs)
            forwards = [0]

            def signal_at_kth_forward(module, inputs):
                forwards[0] += 1
                if forwards[0] == k:
                    os.kill(os.getpid(), signal.SIGTERM)
            hook = model.register_forward_pre_hook(signal_at_kth_forward)
            try:
                return real_sample(model, *args, **kwargs)
            finally:
                hook.remove()

        def score_chats(*args, **kwargs):
            if where == "reward" and rollouts[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_score(*args, **kwargs)
        train_ppo.sample_responses, reward.RewardModel.score = sample_responses, score_chats


def run(argv, log_path, faults=None):
    faults = faults or {}
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # every run the same, so runs compare bit for bit
    if "world" in faults:
        os.environ.update(RANK=str(faults["rank"]), LOCAL_RANK=str(faults["rank"]), WORLD_SIZE=str(faults["world"]),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(faults["port"]))
    _install(faults)
    train_ppo.main(train_ppo.parse_args(argv))
