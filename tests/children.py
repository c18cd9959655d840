"""Training runs as child processes: of a forkserver that imported tests/fault_runner.py (and so torch,
transformers and train_ppo) once, real processes that can be killed with SIGKILL, SIGTERM or SIGINT,
started in milliseconds (the `forkserver` fixture is in conftest.py); or ranks under torchrun."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import fault_runner
from conftest import ROOT
from trainer_utils import load_resume


def timeless(record):
    """A metrics line without what depends on the clock (time_*, *_per_s): what two equal runs share."""
    return {k: v for k, v in record.items() if not k.startswith("time_") and not k.endswith("_per_s")}


def read_metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]


def assert_resume_from_step_2_is_exact(run, argv, full, part, metrics):
    """The run in `full` (4 steps, a resume file every 2), stopped after step 2 and resumed in `part` with `argv`
    (the same flags) + --from_resume 1, is the run that would have happened: the same metrics after step 2 (the
    clock aside) and the same final weights."""
    import shutil
    import torch
    from trainer_utils import load_state_dict_file
    os.makedirs(os.path.join(part, "checkpoints"))
    shutil.copy(os.path.join(full, "checkpoints", "ppo_actor_64_resume.1.pth"),
                os.path.join(part, "checkpoints", "ppo_actor_64_resume.pth"))
    run([*argv, "--from_resume", "1"])
    assert list(map(timeless, read_metrics(part))) == list(map(timeless, metrics[2:]))
    a = load_state_dict_file(os.path.join(full, "ppo_actor_64.pth"))
    b = load_state_dict_file(os.path.join(part, "ppo_actor_64.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def start(ctx, argv, log, **faults):
    open(log, "a").close()
    proc = ctx.Process(target=fault_runner.run, args=(argv, str(log), faults))
    proc.start()
    return proc


def finish(proc, log, timeout=180):
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"child still running after {timeout}s:\n{open(log).read()[-3000:]}")
    return proc.exitcode


def wait_for(proc, log, condition, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        if not proc.is_alive():
            pytest.fail(f"child exited ({proc.exitcode}) before {what}:\n{open(log).read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout}s:\n{open(log).read()[-3000:]}")
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(ctx, argv, log_dir, world=2, **faults):
    """Start `world` gloo ranks of one run; returns (processes, logs)."""
    port = free_port()
    logs = [log_dir / f"log{r}" for r in range(world)]
    return [start(ctx, argv, logs[r], rank=r, world=world, port=port, **faults) for r in range(world)], logs


def assert_same_run(save_dir, reference_dir, steps, resume):
    """Identical metrics (timings aside) for every step, and identical actor, critic and old actor."""
    def strip(metrics):
        return [timeless(m) for m in metrics]
    got, want = strip(read_metrics(save_dir)), strip(read_metrics(reference_dir))
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    for a, b in zip(got, want):
        assert a == b, a["step"]
    a, _ = load_resume(os.path.join(save_dir, resume))
    b, _ = load_resume(os.path.join(reference_dir, resume))
    assert a["global_step"] == b["global_step"] == steps
    for key in ["model", "critic_model", "old_actor"]:  # old_actor: None when it is the actor itself
        assert (a[key] is None) == (b[key] is None), key
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key] or {}), key


def torchrun(*args, nproc=2):
    """tests/ddp_worker.py under `torchrun --nproc_per_node nproc` (gloo); fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ddp_worker.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
