"""Fault tolerance of train_ppo on tiny models.

Kill it anywhere (SIGKILL inside a save, at a random moment; SIGTERM; SIGINT) and
`--from_resume 1` ends with the same weights and metrics as an uninterrupted run; a world-size
change resumes at the right data position; non-finite rewards, values and losses skip the
update and abort after --max_bad_steps; bad input fails with an error naming the culprit and
writes nothing; weight and resume files never unpickle code.

Runs that are killed, signalled, distributed or compared bit for bit run as child processes of
a forkserver that imported train_ppo once (tests/fault_runner.py), so they start in
milliseconds; single-process error paths run in this process.
"""
import ast
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

import fault_runner
import reward
import train_ppo
import trainer_utils
from model import loading
from children import assert_same_run, finish, free_port, read_metrics, run_ranks, start, wait_for
from conftest import ROOT, tiny_run_args
from hf_models import save_tiny_hf_model
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer_utils import load_resume, load_state_dict_file, save_weights

STEPS = 8  # two epochs of 6 rollouts over the 24 sample prompts: resumes cross the epoch boundary
RESUME = "checkpoints/ppo_actor_64_resume.pth"


def flags(kit, save_dir, *extra):
    return tiny_run_args(kit, save_dir, "--max_steps", str(STEPS), "--epochs", "2", "--save_interval", "1", *extra)


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, like the children: on a busy small machine, several
    threads per tiny matmul make a run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged_step(log, step=r"\d+"):
    """A condition: the child has logged a completed step (any step, or the given one)."""
    return lambda: re.search(rf"^step {step}/{STEPS} \|", open(log).read(), re.M) is not None


def kill_inside(ctx, kit, save_dir, hang, tmp_path, resume=True):
    """Start a run that hangs inside a save (see fault_runner) and SIGKILL it there."""
    marker, log = tmp_path / f"hang_{hang[0]}", tmp_path / f"log_{hang[0]}"
    proc = start(ctx, flags(kit, save_dir, "--from_resume", str(int(resume))), log, hang=hang, marker=str(marker))
    wait_for(proc, log, marker.exists, f"hang in a {hang[0]} save")
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    return open(log).read()


def global_step(save_dir):
    state, _ = load_resume(os.path.join(save_dir, RESUME))
    return state["global_step"]


@pytest.fixture(scope="module")
def reference(tiny_kit, forkserver, tmp_path_factory):
    """An uninterrupted run with the flags every resumed run below uses."""
    save_dir = tmp_path_factory.mktemp("reference")
    log = save_dir / "log"
    assert finish(start(forkserver, flags(tiny_kit, save_dir), log), log) == 0, open(log).read()[-3000:]
    return save_dir


# ----------------------------------------------------------------------------- exact resume
def test_sigkill_anywhere_and_sigterm_then_resume_is_bit_exact(tiny_kit, forkserver, reference, tmp_path):
    save_dir = tmp_path / "run"
    # 1. inside the weight save of step 2: the step-1 weights and resume file stay loadable
    kill_inside(forkserver, tiny_kit, save_dir, ("weights", 2), tmp_path, resume=False)
    assert glob.glob(str(save_dir / "ppo_actor_64.pth.*.tmp")), "the kill must land mid-write"
    load_state_dict_file(save_dir / "ppo_actor_64.pth")
    assert global_step(save_dir) == 1
    # 2. inside the resume-file write of its 2nd save (step 3)
    log = kill_inside(forkserver, tiny_kit, save_dir, ("resume", 2), tmp_path)
    assert "global step 1" in log
    assert global_step(save_dir) == 2
    # 3. inside the rotation of its 2nd save (step 4): the newest file has moved to .1, the new one
    # is not in place; the next run resumes from .1
    kill_inside(forkserver, tiny_kit, save_dir, ("rotate", 2), tmp_path)
    assert not (save_dir / RESUME).exists()
    # 4. at a random moment: just after step 5 was logged (in its save, or in step 6)
    log = tmp_path / "log_random"
    proc = start(forkserver, flags(tiny_kit, save_dir, "--from_resume", "1"), log)
    wait_for(proc, log, logged_step(log, 5), "step 5")
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    assert re.search(r"resumed from \S+_resume\.1\.pth: epoch 1, step 3, global step 3", open(log).read())
    # 5. SIGTERM after its first step: finish the step, save, exit 0
    log = tmp_path / "log_sigterm"
    proc = start(forkserver, flags(tiny_kit, save_dir, "--from_resume", "1"), log)
    wait_for(proc, log, logged_step(log), "a step")
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, log) == 0
    stopped = int(re.search(r"stopped by signal at step (\d+); resume file written", open(log).read()).group(1))
    assert global_step(save_dir) == stopped
    # 6. the rest
    log = tmp_path / "log_last"
    assert finish(start(forkserver, flags(tiny_kit, save_dir, "--from_resume", "1"), log), log) == 0
    assert f"global step {stopped}" in open(log).read()
    assert_same_run(save_dir, reference, STEPS, RESUME)
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["ppo_actor_64_resume.1.pth", "ppo_actor_64_resume.pth"]
    assert not glob.glob(str(save_dir / "**" / "*.tmp"), recursive=True)  # killed saves' temps are cleaned up


def test_sigint_stops_cleanly_and_resume_matches_uninterrupted_run(tiny_kit, forkserver, reference, tmp_path):
    save_dir, log = tmp_path / "run", tmp_path / "log"
    argv = flags(tiny_kit, save_dir, "--save_interval", "100")  # the signal alone writes the resume file
    proc = start(forkserver, argv, log)
    wait_for(proc, log, lambda: (save_dir / "metrics.jsonl").exists() and len(read_metrics(save_dir)) >= 2,
             "2 metrics lines")
    os.kill(proc.pid, signal.SIGINT)
    assert finish(proc, log) == 0
    stopped = int(re.search(r"stopped by signal at step (\d+); resume file written. Continue with the same "
                            r"command plus --from_resume 1", open(log).read()).group(1))
    assert global_step(save_dir) == stopped >= 2
    assert finish(start(forkserver, argv + ["--from_resume", "1"], tmp_path / "log2"), tmp_path / "log2") == 0
    assert_same_run(save_dir, reference, STEPS, RESUME)


@pytest.mark.parametrize("where", ["generate", "reward"])
def test_signal_inside_a_rollout_drops_it_and_resume_is_bit_exact(tiny_kit, forkserver, reference, tmp_path, where):
    """SIGTERM in the middle of generation (the 3rd forward of the sampler) or of reward scoring in
    rollout 3: no weight has changed, so the run does not finish the step (torchrun would SIGKILL a
    real-size one first); it saves the state after step 2, RNG included, and exits 0."""
    save_dir, log = tmp_path / "run", tmp_path / "log"
    argv = flags(tiny_kit, save_dir, "--save_interval", "100")  # the stop alone writes the resume file
    assert finish(start(forkserver, argv, log, self_signal=(where, 3, 3)), log) == 0
    out = open(log).read()
    assert "stop signal during the rollout of step 3: rollout dropped" in out
    assert "stopped by signal at step 2; resume file written" in out
    assert global_step(save_dir) == 2 and [m["step"] for m in read_metrics(save_dir)] == [1, 2]
    log = tmp_path / "log2"
    assert finish(start(forkserver, argv + ["--from_resume", "1"], log), log) == 0
    assert "resumed from" in open(log).read() and "global step 2" in open(log).read()
    assert_same_run(save_dir, reference, STEPS, RESUME)


def test_signal_between_rollouts_stops_before_the_next_one(tiny_kit, forkserver, reference, tmp_path):
    """SIGTERM during the save after step 2 (as during an evaluation or the data fetch): the run stops before
    rollout 3 instead of running it only to drop it, keeps the state after step 2, and resumes bit-exact."""
    save_dir, log = tmp_path / "run", tmp_path / "log"
    argv = flags(tiny_kit, save_dir, "--save_interval", "2")
    assert finish(start(forkserver, argv, log, signal_save=1), log) == 0
    out = open(log).read()
    assert "rollout dropped" not in out and "stopped by signal at step 2; resume file written" in out
    assert global_step(save_dir) == 2 and [m["step"] for m in read_metrics(save_dir)] == [1, 2]
    log = tmp_path / "log2"
    assert finish(start(forkserver, argv + ["--from_resume", "1"], log), log) == 0
    assert_same_run(save_dir, reference, STEPS, RESUME)


def test_sigterm_to_one_rank_stops_both_and_resume_matches(tiny_kit, forkserver, tmp_path):
    """torchrun is not the only sender: a signal that reaches one rank must stop every rank (the others
    agree through a collective) with exit 0, not leave them waiting in the next epoch's collectives."""
    argv = tiny_run_args(tiny_kit, tmp_path / "ref", "--epochs", "2", "--save_interval", "100")  # 2 x 3 rollouts
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    procs, logs = run_ranks(forkserver, argv, tmp_path / "a")
    assert [finish(p, log, timeout=120) for p, log in zip(procs, logs)] == [0, 0]

    save_dir = tmp_path / "run"
    argv = tiny_run_args(tiny_kit, save_dir, "--epochs", "2", "--save_interval", "100")
    procs, logs = run_ranks(forkserver, argv, tmp_path / "b")
    wait_for(procs[0], logs[0], lambda: re.search(r"^step 1/6 \|", open(logs[0]).read(), re.M), "step 1")
    os.kill(procs[1].pid, signal.SIGTERM)  # rank 1 only
    assert [finish(p, log, timeout=60) for p, log in zip(procs, logs)] == [0, 0]
    stopped = int(re.search(r"stopped by signal at step (\d+); resume file written", open(logs[0]).read()).group(1))
    assert 1 <= stopped < 6 and global_step(save_dir) == stopped
    procs, logs = run_ranks(forkserver, argv + ["--from_resume", "1"], tmp_path / "c")
    assert [finish(p, log, timeout=120) for p, log in zip(procs, logs)] == [0, 0]
    assert_same_run(save_dir, tmp_path / "ref", 6, RESUME)


def test_resume_on_more_processes_trains_the_rest_at_a_fresh_runs_lr(tiny_kit, forkserver, tmp_path):
    """1 process -> 2: the checkpoint after 4 one-process rollouts (16 prompts) is step 2 of 6 for two
    processes. The resumed run trains steps 3-6 (the rest of both epochs) and its LR equals that of
    a fresh two-process run at the same steps, instead of ending early with the schedule at its floor."""
    one, two, fresh = tmp_path / "one", tmp_path / "two", tmp_path / "fresh"
    for d in ("p1", "p2", "l2", "l3"):
        (tmp_path / d).mkdir()
    argv = tiny_run_args(tiny_kit, one, "--epochs", "2", "--save_interval", "4", "--keep_checkpoints", "3")
    log = tmp_path / "log1"
    assert finish(start(forkserver, argv, log, log_prompts=str(tmp_path / "p1")), log) == 0
    (two / "checkpoints").mkdir(parents=True)
    shutil.copy(one / "checkpoints" / "ppo_actor_64_resume.2.pth", two / RESUME)
    assert global_step(two) == 4

    argv = tiny_run_args(tiny_kit, two, "--epochs", "2", "--from_resume", "1")
    procs, logs = run_ranks(forkserver, argv, tmp_path / "l2", log_prompts=str(tmp_path / "p2"))
    assert [finish(p, log, timeout=120) for p, log in zip(procs, logs)] == [0, 0]
    out = open(logs[0]).read()
    assert "resume: world size 1 -> 2; data position 16 prompts -> step 2, global step 4 -> 2" in out
    assert "done in" in out
    resumed = read_metrics(two)
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]

    procs, logs = run_ranks(forkserver, tiny_run_args(tiny_kit, fresh, "--epochs", "2"), tmp_path / "l3")
    assert [finish(p, log, timeout=120) for p, log in zip(procs, logs)] == [0, 0]
    fresh_lr = {m["step"]: (m["actor_lr"], m["critic_lr"]) for m in read_metrics(fresh)}
    for m in resumed:
        assert (m["actor_lr"], m["critic_lr"]) == pytest.approx(fresh_lr[m["step"]], rel=1e-9), m["step"]
    assert resumed[-1]["actor_lr"] == pytest.approx(5e-6, rel=1e-6)  # the schedule ends at its floor, not before
    # epoch 0: 16 prompts on one process, then the other 8 on two: every prompt exactly once
    first16 = [p for line in open(tmp_path / "p1" / "prompts_rank0.jsonl").readlines()[:4] for p in json.loads(line)]
    last8 = [p for r in range(2) for p in json.loads(open(tmp_path / "p2" / f"prompts_rank{r}.jsonl").readline())]
    dataset = train_ppo.RLAIFDataset(tiny_kit["data"], AutoTokenizer.from_pretrained(ROOT / "model"), max_length=80)
    assert sorted(first16 + last8) == sorted(s["prompt"] for s in dataset)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_kit, forkserver, reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(reference / "metrics.jsonl", tmp_path)
    newest = tmp_path / RESUME
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a crash or a bad disk
    log = tmp_path / "log"
    assert finish(start(forkserver, flags(tiny_kit, tmp_path, "--from_resume", "1"), log), log) == 0
    out = open(log).read()
    assert f"warning: skipping unreadable resume file {newest}" in out
    assert re.search(rf"resumed from \S+resume\.1\.pth: .*global step {STEPS - 1}", out)
    assert_same_run(tmp_path, reference, STEPS, RESUME)


def test_world_size_change_continues_at_the_right_data_position(tiny_kit, forkserver, tmp_path):
    """2 gloo ranks (rank 1 sees a NaN reward at step 1: both must skip it, or DDP hangs) for 2
    rollouts of 2 x 4 prompts, then 1 process: it starts at prompt 16 of the same epoch order."""
    port = free_port()
    first, second = tmp_path / "ranks2", tmp_path / "rank1"
    first.mkdir()
    second.mkdir()
    argv = tiny_run_args(tiny_kit, tmp_path / "run", "--max_steps", "2")
    procs = [start(forkserver, argv, first / f"log{r}", rank=r, world=2, port=port, log_prompts=str(first),
                   **({"nan_reward": [1]} if r == 1 else {})) for r in range(2)]
    assert [finish(p, first / f"log{r}", timeout=120) for r, p in enumerate(procs)] == [0, 0]
    assert "warning: step 1 (rank 1): reward model returned nan for sample 0" in open(first / "log1").read()
    assert "step 1: non-finite reward or value; no update for this rollout" in open(first / "log0").read()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2]

    log = second / "log"
    argv = tiny_run_args(tiny_kit, tmp_path / "run", "--max_steps", "6", "--from_resume", "1")
    assert finish(start(forkserver, argv, log, log_prompts=str(second)), log) == 0
    out = open(log).read()
    assert "resume: world size 2 -> 1; data position 16 prompts -> step 4, global step 2 -> 4" in out
    assert "resume: RNG states reseeded (world size changed)" in out
    # one process counts 4-prompt rollouts: 16 prompts are its steps 1-4, the rest of the epoch steps 5-6
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2, 5, 6]
    # 16 prompts on 2 ranks, then the other 8 of the epoch: every prompt exactly once
    seen = [p for f in [first / "prompts_rank0.jsonl", first / "prompts_rank1.jsonl", second / "prompts_rank0.jsonl"]
            for line in open(f) for p in json.loads(line)]
    dataset = train_ppo.RLAIFDataset(tiny_kit["data"], AutoTokenizer.from_pretrained(ROOT / "model"), max_length=80)
    assert sorted(seen) == sorted(s["prompt"] for s in dataset)


@pytest.fixture
def checkpoint_dir(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ("layers", r"resume file was written with num_hidden_layers=2, but this run has num_hidden_layers=1"),
    ("hidden", r"no resume file for this actor \(ppo_actor_32_resume\.pth\), but \S+ holds "
               r"ppo_actor_64_resume\.1\.pth, ppo_actor_64_resume\.pth from another model size"),
    ("batch", r"resume file was written with --batch_size 4, this run has --batch_size 2"),
])
def test_incompatible_resume_file_names_the_mismatch(tiny_kit, checkpoint_dir, tmp_path, change, message):
    if change == "batch":
        extra = ["--batch_size", "2"]
    else:
        config = dict(hidden_size=64, num_hidden_layers=1) if change == "layers" else dict(hidden_size=32)
        torch.manual_seed(0)
        save_weights(MiniMindForCausalLM(MiniMindConfig(**config)), tmp_path / "actor.pth")
        extra = ["--from_weight", str(tmp_path / "actor.pth")]
    before = sorted(os.listdir(checkpoint_dir))
    with pytest.raises(ValueError, match=message):
        run(flags(tiny_kit, checkpoint_dir, "--from_resume", "1", *extra))
    assert sorted(os.listdir(checkpoint_dir)) == before  # nothing written


# ----------------------------------------------------------------------------- numerical faults
def test_non_finite_reward_value_or_loss_skips_the_update(tiny_kit, tmp_path, capsys):
    """Step 2: NaN reward; step 3: NaN critic value; step 4: NaN loss. None changes a weight."""
    run = train_ppo.build_run(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "5",
                                                                 "--max_bad_steps", "4")))
    snapshots = []  # snapshots[k]: the weights after step k (the old actor is synced after every step)

    def snapshot(run):
        models = (run.old_actor, run.learner.critic)
        snapshots.append([{k: v.clone() for k, v in m.state_dict().items()} for m in models])

    snapshot(run)
    run.reward.reward_model = fault_runner.FaultyRewardModel(run.reward.reward_model, nan_calls=[2])
    run.learner.critic.register_forward_hook(  # the rollout's values (no grad) of step 3
        lambda module, args, values: values * float("nan") if len(snapshots) == 3 and not torch.is_grad_enabled()
        else None)

    def nan_logits(module, args, out):  # the update's forwards (with grad) of step 4: NaN log-probs
        if len(snapshots) == 4 and torch.is_grad_enabled():
            return (out[0] * float("nan"), *out[1:])
        return out
    run.learner.actor.register_forward_hook(nan_logits)
    train_ppo.finish(run, train_ppo.train(run, after_step=snapshot))
    out = capsys.readouterr().out
    assert re.search(r"warning: step 2: reward model returned nan for sample 0 \(response '.*'\)", out)
    assert "step 2: non-finite reward or value; no update for this rollout" in out
    assert re.search(r"warning: step 3: critic returned a non-finite value for sample 0 \(response '.*'\)", out)
    assert "step 4: 4 optimizer step(s) skipped (non-finite loss or gradient)" in out

    def same(a, b):
        return all(torch.equal(a[i][k], b[i][k]) for i in range(2) for k in a[i])
    assert not same(snapshots[0], snapshots[1])  # step 1 trained
    assert same(snapshots[1], snapshots[2]) and same(snapshots[1], snapshots[3]) and same(snapshots[1], snapshots[4])
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 4, 5]  # rollouts with no usable data leave no line
    assert metrics[1]["skipped_steps"] == 4 and metrics[1]["optimizer_steps"] == 0
    assert metrics[1]["actor_lr"] == metrics[0]["actor_lr"]  # the schedule did not move either
    assert global_step(tmp_path) == 5


def test_consecutive_bad_steps_abort_and_keep_the_last_good_checkpoint(tiny_kit, tmp_path):
    run = train_ppo.build_run(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "6",
                                                                 "--save_interval", "1", "--max_bad_steps", "2")))
    run.reward.reward_model = fault_runner.FaultyRewardModel(run.reward.reward_model, nan_calls=range(3, 100))
    with pytest.raises(RuntimeError, match=r"aborting at step 4: 2 consecutive rollouts with non-finite rewards, "
                                           r"values, losses or gradients \(--max_bad_steps 2\); the last good "
                                           r"checkpoint is kept in "):
        train_ppo.train(run)
    state, loaded_from = load_resume(str(tmp_path / RESUME))
    assert state["global_step"] == 2 and state["bad_streak"] == 0 and loaded_from == str(tmp_path / RESUME)
    load_state_dict_file(tmp_path / "ppo_actor_64.pth")


def test_reward_model_folder_returning_nan_aborts(tiny_kit, tmp_path, capsys):
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_kit["reward_model"])
    torch.nn.init.constant_(rm.score.weight, float("nan"))
    rm.save_pretrained(tmp_path / "rm")
    shutil.copy(os.path.join(tiny_kit["reward_model"], "tokenizer.json"), tmp_path / "rm")
    shutil.copy(os.path.join(tiny_kit["reward_model"], "tokenizer_config.json"), tmp_path / "rm")
    with pytest.raises(RuntimeError, match="aborting at step 1"):
        run(tiny_run_args(tiny_kit, tmp_path / "out", "--reward_model_path", str(tmp_path / "rm"),
                          "--max_bad_steps", "1"))
    assert "warning: step 1: reward model returned nan for sample 0" in capsys.readouterr().out
    assert not glob.glob(str(tmp_path / "out" / "checkpoints" / "*"))  # no checkpoint of the bad step


# ----------------------------------------------------------------------------- disk faults
def test_unwritable_save_dir_fails_at_start_up(tiny_kit, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OSError, match=r"--save_dir '\S+blocker/out' is not writable"):
        run(tiny_run_args(tiny_kit, tmp_path / "blocker" / "out"))
    with pytest.raises(OSError, match=r"--checkpoint_dir '\S+blocker/ck' is not writable"):
        run(tiny_run_args(tiny_kit, tmp_path / "out", "--checkpoint_dir", str(tmp_path / "blocker" / "ck")))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_kit, tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    class FullDisk:  # a file that takes 4 kB and then reports a full disk, as write(2) does
        def __init__(self, f):
            self.f, self.room = f, 4096

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f):
        saves.append(f.name)
        return real_save(obj, FullDisk(f) if len(saves) == 4 else f)  # saves: weights, resume, weights, resume

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"cannot write \S+ppo_actor_64_resume\.pth \(No space left on device\)") as e:
        run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "4"))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    state, loaded_from = load_resume(str(tmp_path / RESUME))
    assert state["global_step"] == 2 and loaded_from == str(tmp_path / RESUME)
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)


# ----------------------------------------------------------------------------- bad input
def write_rm(folder, num_labels):
    config = LlamaConfig(vocab_size=6400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROOT / "model").save_pretrained(folder)
    return str(folder)


def bad_input(case, tmp):
    """(flags, exception, message) for one kind of bad input."""
    data = tmp / "data.jsonl"
    good_line = open(ROOT / "dataset" / "prompts_sample.jsonl", encoding="utf-8").readline()
    if case == "missing weights":
        return ["--from_weight", str(tmp / "nope.pth")], FileNotFoundError, r"nope\.pth: no file or folder of that name"
    if case == "corrupt weights":
        (tmp / "bad.pth").write_bytes(b"\x00garbage, not a checkpoint")
        return ["--from_weight", str(tmp / "bad.pth")], ValueError, r"bad\.pth: cannot read weights"
    if case == "shape vs flags":
        return ["--hidden_size", "32"], ValueError, r"full_sft_64\.pth: .*hidden_size"
    if case == "tokenizer too big":
        tok = AutoTokenizer.from_pretrained(ROOT / "model")
        tok.add_tokens(["<extra_1>", "<extra_2>"])
        tok.save_pretrained(tmp / "tok")
        return (["--tokenizer_path", str(tmp / "tok")], ValueError,
                r"tokenizer \S+tok' has 6402 tokens but the model's vocabulary holds 6400")
    if case == "no reward folder":
        return ["--reward_model_path", str(tmp / "rm")], FileNotFoundError, r"rm': no such folder"
    if case == "reward folder without model":
        (tmp / "rm").mkdir()
        return ["--reward_model_path", str(tmp / "rm")], ValueError, r"rm': not a model folder \(no config.json\)"
    if case == "reward folder unloadable":
        (tmp / "rm").mkdir()
        (tmp / "rm" / "config.json").write_text('{"model_type": "no-such-architecture"}')
        return ["--reward_model_path", str(tmp / "rm")], ValueError, r"rm': could not load a reward model"
    if case == "reward model with 2 labels":
        return (["--reward_model_path", write_rm(tmp / "rm", 2)], ValueError,
                r"rm' has 2 labels; choose the one to score with --reward_label NAME or INDEX \(0: LABEL_0, 1: LABEL_1\)")
    if case == "empty data":
        data.write_text("\n\n")
        return ["--data_path", str(data)], ValueError, r"data\.jsonl: no prompts \(the file is empty"
    if case == "data not UTF-8":
        data.write_bytes(good_line.encode() + b'{"conversations": "\xff\xfe"}\n')
        return ["--data_path", str(data)], ValueError, r"data\.jsonl:2: not valid UTF-8"
    if case == "data not JSON":
        data.write_text(good_line + good_line + "{not json\n")
        return ["--data_path", str(data)], ValueError, r"data\.jsonl:3: invalid JSON"
    if case == "data without conversations":
        data.write_text('{"text": "hello"}\n' + good_line)
        return ["--data_path", str(data)], ValueError, r"data\.jsonl:1: missing 'conversations'"
    if case == "batch larger than data":
        return (["--batch_size", "32", "--mini_batch_size", "32"], ValueError,
                r"--batch_size 32 x 1 processes needs 32 prompts, but \S+prompts_sample\.jsonl has 24")
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing weights", "corrupt weights", "shape vs flags", "tokenizer too big", "no reward folder",
    "reward folder without model", "reward folder unloadable", "reward model with 2 labels", "empty data",
    "data not UTF-8", "data not JSON", "data without conversations", "batch larger than data"])
def test_bad_input_names_the_culprit_and_writes_nothing(tiny_kit, tmp_path, case):
    extra, error, message = bad_input(case, tmp_path)
    with pytest.raises(error, match=message):
        run(tiny_run_args(tiny_kit, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_mini_batch_size_must_divide_batch_size(tiny_kit, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--batch_size", "4", "--mini_batch_size", "3"))
    assert "--mini_batch_size 3 must divide the 4 responses of a rollout (--batch_size 4 x --n_samples_per_prompt 1)" \
        in capsys.readouterr().err


def test_long_prompts_are_left_out_counted_and_reported(tiny_kit, tmp_path, capsys):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--max_seq_len", "24"))
    assert re.search(r"prompts_sample\.jsonl: \d+ of 24 prompts are longer than --max_seq_len 24 tokens .* and are "
                     r"left out, not cut", capsys.readouterr().out)
    assert len(read_metrics(tmp_path)) == 1


def test_max_seq_len_fits_the_users_data_by_default(tiny_kit, tmp_path, capsys):
    """Not the demo's data: --max_seq_len defaults to the longest prompt (none left out); the demo's stays 64."""
    args = [a for a in tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1") if a not in ("--max_seq_len", "80")]
    run(args)
    saved = json.load(open(tmp_path / "run_args.json"))
    assert saved["max_seq_len"] == 75  # the longest rendered prompt of prompts_sample.jsonl
    out = capsys.readouterr().out
    assert "--max_seq_len 75: the longest prompt of --data_path" in out and "left out" not in out
    assert train_ppo.parse_args([]).max_seq_len is None  # resolved at load: 64 for the demo's data


# ----------------------------------------------------------------------------- security
class RunsCode:
    """Unpickling this runs os.system: what a malicious downloaded .pth would do."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_pickled_code_is_refused_by_weight_and_resume_loading(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": RunsCode(sentinel)}, evil)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot read weights \(not a plain tensor file; "
                                         r"torch\.load\(weights_only=True\) refused it \(.*system"):
        load_state_dict_file(evil)
    path = tmp_path / "ck" / "x_resume.pth"
    path.parent.mkdir()
    shutil.copy(evil, path)
    with pytest.raises(ValueError, match=r"all resume files are unreadable: \S+x_resume\.pth \(not a plain tensor"):
        load_resume(str(path))
    trainer_utils.atomic_save({"global_step": 1}, tmp_path / "ck" / "x_resume.1.pth")
    state, loaded_from = load_resume(str(path))  # a planted newest file does not stop the run either
    assert state == {"global_step": 1} and loaded_from.endswith("x_resume.1.pth")
    assert "warning: skipping unreadable resume file" in capsys.readouterr().out
    assert not sentinel.exists()


def project_sources():
    """(path, syntax tree) of every project .py file outside tests/: tracked, or new and not git-ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        path = ROOT / name
        if not name.startswith("tests/") and path.exists():
            yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_no_project_code_unpickles_arbitrary_objects():
    checked = 0
    for path, tree in project_sources():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
                checked += 1
            assert not (owner in ("pickle", "dill", "joblib", "marshal") and node.func.attr in ("load", "loads")), where
            unsafe_numpy = [k for k in node.keywords if k.arg == "allow_pickle"
                            and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
            assert not unsafe_numpy, where
    assert checked >= 2  # load_state_dict_file and load_resume


def test_remote_code_only_for_the_named_reward_folder_with_a_notice(tmp_path, capsys):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_rm.RM"}}))
    with pytest.raises(ValueError, match="could not load a reward model"):
        reward.load_reward_model(str(tmp_path / "rm"), "cpu", torch.float32)
    out = capsys.readouterr().out
    assert out.count("trust_remote_code") == 1
    assert f"note: trust_remote_code enabled for the reward model folder {tmp_path / 'rm'} only" in out
    # a transformers policy folder: the same rule; one without auto_map runs no remote code and says nothing
    policy = save_tiny_hf_model("llama", tmp_path / "policy", str(ROOT / "model"))
    loading.load_hf_causal_lm(policy, loading.load_tokenizer(policy), policy)
    assert "trust_remote_code" not in capsys.readouterr().out
    config = json.load(open(tmp_path / "policy" / "config.json"))
    with open(tmp_path / "policy" / "config.json", "w") as f:
        json.dump(config | {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, f)
    with pytest.raises(ValueError, match="policy"):
        loading.load_hf_causal_lm(policy, loading.load_tokenizer(policy), policy)
    assert f"note: trust_remote_code enabled for the policy folder {policy} only" in capsys.readouterr().out
    # nowhere else is remote code turned on: every trust_remote_code= is the value trusts_remote_code() gave
    loaders = {"load_reward_model", "load_causal_lm_config", "load_hf_causal_lm", "load_hf_backbone"}
    for path, tree in project_sources():
        allowed = {id(node) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in loaders
                   for node in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert id(node) in allowed, f"{path.relative_to(ROOT)}:{node.value.lineno}"


def test_a_mistyped_flag_is_answered_with_the_closest_one(capsys):
    with pytest.raises(SystemExit):
        train_ppo.parse_args(["--lerning_rate", "1e-5"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --lerning_rate 1e-5; --lerning_rate: did you mean --learning_rate" in err
