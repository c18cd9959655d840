"""What a researcher watches: held-out evaluation, sample completions, critic warm-up, swanlab, plots."""
import glob
import json
import os
import shutil
import socket
import sys

import pytest
import torch

import train_ppo
from conftest import ROOT, tiny_run_args
from reward import Reward, load_reward_model
from trainer_utils import load_resume, load_state_dict_file

sys.path.insert(0, str(ROOT / "scripts"))
import eval_policy  # noqa: E402

EVAL_DATA = str(ROOT / "dataset" / "rlaif-eval.jsonl")
EVAL_KEYS = ["eval_format", "eval_tags", "eval_accuracy", "eval_reward", "eval_reward_rm", "eval_response_len",
             "eval_eos_rate"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def split(save_dir):
    """(training lines, evaluation lines) of metrics.jsonl."""
    lines = read_lines(os.path.join(save_dir, "metrics.jsonl"))
    return [m for m in lines if "reward" in m], [m for m in lines if "eval_format" in m]


# ----------------------------------------------------------------------------- periodic evaluation
def test_evaluation_at_step_0_every_interval_and_the_end_equals_eval_policy(tiny_kit, tmp_path, capsys):
    save_dir = tmp_path / "run"
    run(tiny_run_args(tiny_kit, save_dir, "--max_steps", "3", "--eval_data_path", EVAL_DATA, "--eval_limit", "6",
                      "--eval_interval", "2"))
    train, evals = split(save_dir)
    assert [m["step"] for m in train] == [1, 2, 3] and [m["step"] for m in evals] == [0, 2, 3]
    assert all(set(EVAL_KEYS) <= set(m) for m in evals)
    out = capsys.readouterr().out
    assert "eval step 0 | format " in out and "eval step 3 | format " in out
    assert "| metric | step 0 | step 3 | delta |" in out and "| answer accuracy |" in out  # the end-of-run table

    # the same weights and prompts through scripts/eval_policy.py: step 0 is the kit's actor, step 3 the
    # float32 actor in the resume file; the trainer evaluates in batches of --batch_size (4)
    results = eval_policy.main(["--base", tiny_kit["actor"], "--trained", str(save_dir / "checkpoints" /
                                "ppo_actor_64_resume.pth"), "--data_path", EVAL_DATA, "--limit", "6", "--batch_size",
                                "4", "--reward_model_path", tiny_kit["reward_model"], "--max_gen_len", "8",
                                "--max_seq_len", "80", "--device", "cpu"])
    for line, name in [(evals[0], "base"), (evals[-1], "trained")]:
        for key in EVAL_KEYS:
            assert line[key] == pytest.approx(results[name][key[len("eval_"):]], rel=1e-6, abs=1e-7), (name, key)
    assert evals[0] != evals[-1]  # the policy did change in between


def test_evaluation_is_off_without_eval_data_and_on_by_default_for_the_demo_data(tiny_kit, tmp_path):
    assert train_ppo.parse_args([]).eval_data_path == EVAL_DATA
    assert train_ppo.parse_args(["--eval_data_path", "none"]).eval_data_path is None
    assert train_ppo.parse_args(["--data_path", tiny_kit["data"]]).eval_data_path is None
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1"))
    assert split(tmp_path)[1] == []


@pytest.mark.parametrize("content, message", [
    ('{"text": "a prompt in another format"}\n', r"eval\.jsonl:1: missing 'conversations'"),
    ("\n\n", r"eval\.jsonl: no prompts"),
])
def test_bad_eval_file_stops_at_start_up_naming_file_and_line(tiny_kit, tmp_path, content, message):
    (tmp_path / "eval.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        run(tiny_run_args(tiny_kit, tmp_path / "out", "--eval_data_path", str(tmp_path / "eval.jsonl")))
    assert not (tmp_path / "out").exists()  # before any training or file


# ----------------------------------------------------------------------------- samples
def test_samples_hold_what_was_scored_and_resume_truncates_them(tiny_kit, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ["--max_steps", "4", "--log_samples", "3", "--max_seq_len", "64"]  # no prompt truncated
    run(tiny_run_args(tiny_kit, full, *flags))
    samples = read_lines(full / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert set(samples[0]) == {"step", "prompt", "response", "reward", "reward_format", "reward_tags", "reward_rm",
                               "advantage", "group", "response_tokens"}
    prompts = [json.loads(line)["conversations"][0]["content"] for line in open(tiny_kit["data"])]
    assert all(s["prompt"].startswith("<|im_start|>") and s["prompt"].endswith("<|im_start|>assistant\n")
               and any(p in s["prompt"] for p in prompts) for s in samples)  # as the policy saw it
    # scored again, independently, from the logged text: the same reward and parts
    reward = Reward(load_reward_model(tiny_kit["reward_model"], "cpu", torch.float32))
    total, parts = reward([s["prompt"] for s in samples], [s["response"] for s in samples])
    for i, s in enumerate(samples):
        assert s["reward"] == pytest.approx(total[i].item(), abs=1e-5)
        for name in ("format", "tags", "rm"):
            assert s[f"reward_{name}"] == pytest.approx(parts[name][i].item(), abs=1e-5)
    # resume from the step-2 checkpoint: lines after step 2 are dropped, then written again identically
    shutil.copytree(full, part)
    shutil.copy(part / "checkpoints" / "ppo_actor_64_resume.1.pth", part / "checkpoints" / "ppo_actor_64_resume.pth")
    run(tiny_run_args(tiny_kit, part, *flags, "--from_resume", "1"))
    assert read_lines(part / "samples.jsonl") == samples
    run(tiny_run_args(tiny_kit, tmp_path / "off", "--max_steps", "1", "--log_samples", "0"))
    assert not (tmp_path / "off" / "samples.jsonl").exists()


# ----------------------------------------------------------------------------- critic warm-up
def test_critic_warmup_leaves_actor_optimizer_and_schedule_untouched(tiny_kit, tmp_path):
    save_dir = tmp_path / "run"
    run(tiny_run_args(tiny_kit, save_dir, "--max_steps", "4", "--critic_warmup_steps", "2", "--keep_checkpoints", "3"))
    train, _ = split(save_dir)
    assert [m["critic_warmup"] for m in train] == [1, 1, 0, 0]
    assert all("policy_loss" not in m and m["value_loss"] > 0 for m in train[:2])
    assert all("policy_loss" in m for m in train[2:])
    assert [m["actor_lr"] for m in train[:2]] == [5e-5, 5e-5]  # the schedule has not moved
    assert train[-1]["actor_lr"] == pytest.approx(5e-6)  # ...and spans the remaining rollouts to its floor
    after_warmup, _ = load_resume(str(save_dir / "checkpoints" / "ppo_actor_64_resume.1.pth"))  # step 2
    assert after_warmup["global_step"] == 2
    initial = load_state_dict_file(tiny_kit["actor"])
    assert all(torch.equal(after_warmup["model"][k].half(), initial[k]) for k in initial)  # actor untouched
    assert after_warmup["optimizer"]["state"] == {}  # AdamW never stepped
    assert after_warmup["critic_optimizer"]["state"] != {}
    final, _ = load_resume(str(save_dir / "checkpoints" / "ppo_actor_64_resume.pth"))
    assert not all(torch.equal(final["model"][k].half(), initial[k]) for k in initial)


def test_critic_warmup_must_leave_rollouts_for_the_actor(tiny_kit, tmp_path):
    with pytest.raises(ValueError, match=r"--critic_warmup_steps 3 leaves none of the 3 rollouts"):
        run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "3", "--critic_warmup_steps", "3"))


# ----------------------------------------------------------------------------- swanlab, offline and real
def swanlab_records(save_dir):
    """Every record of every swanlab run file under save_dir, read back with swanlab's own reader."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    runs = []
    for path in sorted(glob.glob(os.path.join(save_dir, "swanlog", "run-*", "run-*.swanlab"))):
        reader, records = DataStoreReader(), []
        reader.open(path)
        for raw in reader:
            record = Record()
            record.ParseFromString(raw)
            records.append(record)
        reader.close()
        runs.append(records)
    return runs


def test_swanlab_offline_logs_every_metric_eval_and_samples_and_resume_continues_the_run(tiny_kit, tmp_path,
                                                                                        monkeypatch):
    connections = []
    real_connect = socket.socket.connect

    def connect(self, address):  # record any attempt to leave this machine
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            connections.append(address)
            raise OSError("network disabled in this test")
        return real_connect(self, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no login file to find
    flags = ["--use_swanlab", "--eval_data_path", EVAL_DATA, "--eval_limit", "4", "--eval_interval", "1",
             "--log_samples", "2", "--save_interval", "1"]
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "2", *flags))
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "3", "--from_resume", "1", *flags))
    assert connections == []
    runs = swanlab_records(tmp_path)
    assert len(runs) == 2  # offline: one file per process, under {save_dir}/swanlog
    ids = [next(r.start.id for r in records if r.WhichOneof("record_type") == "start") for records in runs]
    assert ids[0] == ids[1]  # the resumed process continues the same run (swanlab sync merges them by id)
    scalars = {(r.scalar.key, r.scalar.step) for records in runs for r in records
               if r.WhichOneof("record_type") == "scalar"}
    lines = read_lines(tmp_path / "metrics.jsonl")
    for line in lines:  # every metric and every evaluation value, at its step
        for key, value in line.items():
            if isinstance(value, (int, float)):
                assert (key, line["step"]) in scalars, (key, line["step"])
    assert {m["step"] for m in lines if "eval_format" in m} == {0, 1, 2, 3}
    media = [(r.media.key, r.media.step, r.media.type) for records in runs for r in records
             if r.WhichOneof("record_type") == "media"]
    assert [(key, step) for key, step, _ in media] == [("samples", 1), ("samples", 2), ("samples", 3)]
    texts = sorted(glob.glob(str(tmp_path / "swanlog" / "run-*" / "media" / "text" / "*.txt")))
    assert len(texts) == 6 and '"reward_rm"' in open(texts[0], encoding="utf-8").read()


# ----------------------------------------------------------------------------- plots
def test_plot_metrics_draws_the_eval_curves(tmp_path):
    from scripts.plot_metrics import main as plot_main
    keys = ["reward", "reward_format", "reward_tags", "reward_rm", "kl_ref", "entropy", "avg_response_len",
            "policy_loss", "value_loss", "value_explained_var"]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 6):
            if step:
                f.write(json.dumps({"step": step, **{k: step * 0.1 for k in keys}}) + "\n")
            if step % 2 == 0:
                f.write(json.dumps({"step": step, **{k: 0.5 + step * 0.1 for k in EVAL_KEYS}}) + "\n")
    drawn = plot_main([str(tmp_path / "metrics.jsonl")])
    assert {"eval_accuracy", "eval_format", "eval_reward"} <= set(drawn) and "reward" in drawn
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
