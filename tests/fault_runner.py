"""Child-process entry for tests/test_fault_tolerance.py: train_ppo's build_run and train, with faults
injected into the built run's objects (its reward, reward model and old actor) and into saving.

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
  signal_save: n     the process sends itself SIGTERM during its n-th weights save (between rollouts)
  rank, world, port: join a gloo group of `world` processes on localhost as `rank`
  hang_dcp: n        (--fsdp 1) on the n-th sharded save, once every rank has written its shard and before rank 0
                     renames the folder into place: create the file `marker` and sleep (rank 0; the others wait)
  dump_state: path   (--fsdp 1) after build_run (and its resume), the models' and optimizers' state gathered in
                     full, saved by rank 0 to `path`
"""
import io
import json
import os
import signal
import time

import torch
import torch.distributed.checkpoint.state_dict  # noqa: F401  (--fsdp 1: imported once by the forkserver, not per run)
import torch.distributed.fsdp  # noqa: F401

import train_ppo
# what every run would import lazily (the data reader, transformers' model and tokenizer code: seconds per run on a
# small machine), imported once by the forkserver instead
import datasets  # noqa: F401,E402
import model.model_minimind  # noqa: F401,E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401,E402


def _hang(marker):
    open(marker, "w").close()
    time.sleep(600)


def _install(faults):
    """Faults in the file system: a save that hangs halfway, waiting for the test's SIGKILL; a signal
    that arrives during a save."""
    if "signal_save" in faults:
        calls, real = [0], torch.save

        def signalled_save(obj, f, *args, **kwargs):
            if "_resume.pth" not in getattr(f, "name", ""):
                calls[0] += 1
                if calls[0] == faults["signal_save"]:
                    os.kill(os.getpid(), signal.SIGTERM)
            return real(obj, f, *args, **kwargs)
        torch.save = signalled_save
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


class FaultyRewardModel:
    """Stands in for run.reward.reward_model: NaN for sample 0 at the listed calls, or SIGTERM to this
    process as it is called during the n-th rollout."""

    def __init__(self, reward_model, nan_calls=(), signal_rollout=None, rollouts=None):
        self.reward_model, self.nan_calls, self.signal_rollout, self.rollouts = \
            reward_model, nan_calls, signal_rollout, rollouts
        self.calls = 0

    def score(self, *args, **kwargs):
        if self.signal_rollout is not None and self.rollouts.count == self.signal_rollout:
            os.kill(os.getpid(), signal.SIGTERM)
        scores = self.reward_model.score(*args, **kwargs)
        self.calls += 1
        if self.calls in self.nan_calls:
            scores[0] = float("nan")
        return scores


class SamplerForwards:
    """A forward pre-hook on the old actor counting its sampling calls (a prefill: an empty cache) and their
    forwards; SIGTERM to this process at forward k of call n (n = None: count only)."""

    def __init__(self, n=None, k=None):
        self.n, self.k, self.count, self.forwards = n, k, 0, 0

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # MiniMind's or transformers' argument
        if cache is None:  # a scoring forward
            return
        if (cache.length if hasattr(cache, "length") else cache.get_seq_length()) == 0:  # MiniMind's or HF's
            self.count, self.forwards = self.count + 1, 0
        self.forwards += 1
        if (self.count, self.forwards) == (self.n, self.k):
            os.kill(os.getpid(), signal.SIGTERM)


class LoggedPrompts:
    """Stands in for run.reward: appends each rollout's prompts to a file, then rewards as the real one."""

    def __init__(self, reward, path):
        self.reward, self.path = reward, path

    def __call__(self, prompts, *args):
        with open(self.path, "a") as f:
            f.write(json.dumps(prompts) + "\n")
        return self.reward(prompts, *args)


def _install_run_faults(run, faults):
    """Faults put on the built run's objects: its reward, its reward model, its old actor."""
    rank = faults.get("rank", 0)
    rollouts = None
    if "self_signal" in faults:
        rollouts = SamplerForwards(*(faults["self_signal"][1:] if faults["self_signal"][0] == "generate"
                                     else (None, None)))
        run.old_actor.lm.register_forward_pre_hook(rollouts, with_kwargs=True)  # the sampling LM
    if "nan_reward" in faults or faults.get("self_signal", [""])[0] == "reward":
        run.reward.reward_model = FaultyRewardModel(
            run.reward.reward_model, faults.get("nan_reward", ()),
            faults["self_signal"][1] if "self_signal" in faults else None, rollouts)
    if "log_prompts" in faults:
        run.reward = LoggedPrompts(run.reward, os.path.join(faults["log_prompts"], f"prompts_rank{rank}.jsonl"))


def _install_fsdp(faults):
    """Faults of sharded checkpoints: a save that hangs before its folder is published."""
    import fsdp
    if "hang_dcp" in faults:
        calls, real = [0], fsdp.rotate_into_place

        def rotate_into_place(*args):
            calls[0] += 1
            if calls[0] == faults["hang_dcp"]:
                _hang(faults["marker"])
            return real(*args)
        fsdp.rotate_into_place = rotate_into_place


def _dump_state(run, path):
    import checkpoint
    import fsdp
    from trainer_utils import is_main_process
    state = fsdp.gathered_state_dicts(checkpoint.sharded_parts(run))  # every rank: a collective
    if is_main_process():
        torch.save(state, path)


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
    _install_fsdp(faults)
    run = train_ppo.build_run(train_ppo.parse_args(argv))
    if "dump_state" in faults:
        _dump_state(run, faults["dump_state"])
    _install_run_faults(run, faults)
    train_ppo.finish(run, train_ppo.train(run))
