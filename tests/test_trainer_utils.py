import math
import os
import random
import socket

import numpy as np
import pytest
import torch
from torch import nn

import trainer_utils as tu


def files_in(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- distributed / seed

def test_single_process_defaults(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert tu.init_distributed_mode() == 0
    assert (tu.get_rank(), tu.get_world_size(), tu.is_main_process()) == (0, 1, True)
    tu.Logger("hello")
    assert capsys.readouterr().out == "hello\n"


def test_init_distributed_mode_under_torchrun_env(monkeypatch):
    """What torchrun sets for a one-process job. The backend follows --device: `--device cpu` on a
    machine that has CUDA (faked here) must still run gloo, not NCCL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert tu.init_distributed_mode("cpu") == 0
        assert torch.distributed.get_backend() == "gloo"
        assert (tu.get_rank(), tu.get_world_size(), tu.is_main_process()) == (0, 1, True)
    finally:
        torch.distributed.destroy_process_group()


def test_init_distributed_mode_cuda_without_cuda_names_the_flag(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda under torchrun needs CUDA"):
        tu.init_distributed_mode("cuda")


def test_setup_seed_is_repeatable():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    tu.setup_seed(123)
    first = draws()
    tu.setup_seed(123)
    assert draws() == first


# ---------------------------------------------------------------- SkipBatchSampler

@pytest.mark.parametrize("n", [0, 1, 5, 10, 11])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("skip", [0, 1, 2, 5])
def test_skip_batch_sampler_matches_brute_force(n, batch_size, skip):
    indices = list(range(n))
    expected = [indices[i:i + batch_size] for i in range(0, n, batch_size)][skip:]
    sampler = tu.SkipBatchSampler(indices, batch_size, skip)
    assert list(sampler) == expected
    assert len(sampler) == len(expected)


def test_skip_batch_sampler_continues_a_seeded_shuffle():
    def sampler():
        return torch.utils.data.RandomSampler(range(10), generator=torch.Generator().manual_seed(0))

    full = list(tu.SkipBatchSampler(sampler(), 3))
    assert list(tu.SkipBatchSampler(sampler(), 3, skip_batches=2)) == full[2:]


def test_skip_batch_sampler_rejects_bad_args():
    with pytest.raises(ValueError, match="batch_size"):
        tu.SkipBatchSampler(range(4), 0)
    with pytest.raises(ValueError, match="skip_batches"):
        tu.SkipBatchSampler(range(4), 2, -1)


# ---------------------------------------------------------------- cosine scheduler

def lrs_at(steps, lr=1e-3, **kwargs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = tu.build_cosine_scheduler(opt, **kwargs)
    lrs = []
    for step in range(max(steps) + 1):
        if step in steps:
            lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_without_warmup():
    got = lrs_at([0, 50, 100, 150], total_steps=100)
    assert got == pytest.approx([1e-3, 0.55e-3, 0.1e-3, 0.1e-3])


def test_cosine_with_warmup():
    got = lrs_at([0, 4, 9, 10, 35, 60, 110, 200], total_steps=110, warmup_steps=10)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))  # 25 of 100 decay steps
    assert got == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, quarter * 1e-3, 0.55e-3, 1e-4, 1e-4])


def test_cosine_scheduler_state_round_trips(tmp_path):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = tu.build_cosine_scheduler(opt, total_steps=20, warmup_steps=5)
    for _ in range(7):
        opt.step()
        sched.step()
    tu.atomic_save(sched.state_dict(), tmp_path / "s.pth")

    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = tu.build_cosine_scheduler(opt2, total_steps=20, warmup_steps=5)
    sched2.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True))
    for s in (sched, sched2):
        s.optimizer.step()
        s.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("kwargs, flag", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, warmup_steps=10), "warmup_steps"),
    (dict(total_steps=10, min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_cosine_rejects_bad_args(kwargs, flag):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=flag):
        tu.build_cosine_scheduler(opt, **kwargs)


# ---------------------------------------------------------------- paths

def test_paths():
    assert tu.weight_path("out", "full_sft", 512, False) == "out/full_sft_512.pth"
    assert tu.weight_path("out", "ppo_actor", 768, True) == "out/ppo_actor_768_moe.pth"
    assert tu.resume_path("ck", "ppo_actor", 512, False) == "ck/ppo_actor_512_resume.pth"
    assert tu.resume_path("ck", "ppo_actor", 512, True) == "ck/ppo_actor_512_moe_resume.pth"


# ---------------------------------------------------------------- atomic_save

def test_atomic_save_creates_folder(tmp_path):
    path = tmp_path / "a" / "b" / "w.pth"
    tu.atomic_save({"x": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert files_in(path.parent) == ["w.pth"]


def test_atomic_save_keeps_old_file_when_write_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    tu.atomic_save({"x": torch.zeros(3)}, path)

    def save_then_crash(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tu.atomic_save({"x": torch.ones(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.zeros(3))
    assert files_in(tmp_path) == ["w.pth"]


def test_atomic_save_keeps_old_file_when_pickling_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    path = tmp_path / "w.pth"
    tu.atomic_save({"x": 1}, path)
    with pytest.raises(TypeError, match="cannot pickle"):
        tu.atomic_save({"x": torch.ones(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"x": 1}
    assert files_in(tmp_path) == ["w.pth"]


def test_atomic_save_unwritable_folder_names_it(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="not_a_folder"):
        tu.atomic_save({}, blocker / "w.pth")


# ---------------------------------------------------------------- weights

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)
        self.register_buffer("counter", torch.tensor([7], dtype=torch.long))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch.compile's own imports
def test_unwrap_model():
    model = Tiny()
    assert tu.unwrap_model(model) is model
    assert tu.unwrap_model(nn.DataParallel(model)) is model
    assert tu.unwrap_model(torch.compile(nn.DataParallel(model))) is model


def test_save_weights_fp16_and_loadable(tmp_path):
    model = Tiny()
    path = tmp_path / "out" / "tiny_64.pth"
    tu.save_weights(nn.DataParallel(model), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"proj.weight", "counter"}
    assert state["proj.weight"].dtype == torch.float16
    assert state["counter"].dtype == torch.long  # integer buffers are not cast
    torch.testing.assert_close(state["proj.weight"].float(), model.proj.weight.detach(), atol=1e-3, rtol=1e-3)
    loaded = tu.load_state_dict_file(path)
    assert torch.equal(loaded["proj.weight"], state["proj.weight"])


def test_load_state_dict_file_unwraps_resume_files_and_prefixes(tmp_path):
    weight = torch.randn(2, 2)
    torch.save({"model": {"module._orig_mod.proj.weight": weight}, "step": 3}, tmp_path / "r.pth")
    assert tu.load_state_dict_file(tmp_path / "r.pth").keys() == {"proj.weight"}


def test_load_state_dict_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tu.load_state_dict_file(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.pth"):
        tu.load_state_dict_file(corrupt)
    not_state = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_state)
    with pytest.raises(ValueError, match="list.pth.*dict of tensors"):
        tu.load_state_dict_file(not_state)
    mixed = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(1), "step": 3}, mixed)
    with pytest.raises(ValueError, match="mixed.pth.*'step'"):
        tu.load_state_dict_file(mixed)


# ---------------------------------------------------------------- RNG

def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    def draws():
        return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()

    tu.setup_seed(0)
    np.random.randn()  # leave a cached gaussian in numpy's state
    tu.atomic_save(tu.get_rng_state(), tmp_path / "rng.pth")
    expected = draws()
    draws()
    tu.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert draws() == expected


def test_set_rng_state_rejects_garbage():
    with pytest.raises(ValueError, match="invalid RNG state"):
        tu.set_rng_state({"python": 3})


# ---------------------------------------------------------------- resume rotation

def save_steps(path, steps, keep):
    for step in steps:
        tu.save_resume({"step": step, "w": torch.full((2,), float(step))}, path, keep=keep)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_save_resume_rotation(tmp_path, keep):
    path = str(tmp_path / "ppo_actor_512_resume.pth")
    save_steps(path, range(1, 6), keep)
    names = ["ppo_actor_512_resume.pth", "ppo_actor_512_resume.1.pth", "ppo_actor_512_resume.2.pth"][:keep]
    assert files_in(tmp_path) == sorted(names)
    for age, name in enumerate(names):
        assert torch.load(tmp_path / name, weights_only=True)["step"] == 5 - age


def test_save_resume_drops_files_beyond_a_smaller_keep(tmp_path):
    path = str(tmp_path / "x_resume.pth")
    save_steps(path, [1, 2, 3], keep=3)
    save_steps(path, [4], keep=2)
    assert files_in(tmp_path) == ["x_resume.1.pth", "x_resume.pth"]


@pytest.mark.parametrize("crash_at_rename", [1, 2])
def test_save_resume_crash_loses_nothing_older(tmp_path, monkeypatch, crash_at_rename):
    path = str(tmp_path / "x_resume.pth")
    save_steps(path, [1, 2], keep=2)
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == crash_at_rename:
            raise KeyboardInterrupt  # the process dies before this rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_steps(path, [3], keep=2)
    monkeypatch.undo()
    state, _ = tu.load_resume(path)
    assert state["step"] == 2
    assert not [n for n in files_in(tmp_path) if n.endswith(".tmp")]


def test_load_resume_nothing_there(tmp_path):
    assert tu.load_resume(str(tmp_path / "x_resume.pth")) == (None, None)
    assert tu.load_resume(str(tmp_path / "no_folder" / "x_resume.pth")) == (None, None)


def test_load_resume_falls_back_when_newest_is_truncated(tmp_path, capsys):
    path = str(tmp_path / "x_resume.pth")
    save_steps(path, [1, 2], keep=2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    state, loaded_from = tu.load_resume(path)
    assert state["step"] == 1 and loaded_from == str(tmp_path / "x_resume.1.pth")
    out = capsys.readouterr().out
    assert "warning" in out and path in out


def test_load_resume_all_corrupt_raises_listing_them(tmp_path):
    path = tmp_path / "x_resume.pth"
    path.write_bytes(b"garbage")
    (tmp_path / "x_resume.1.pth").write_bytes(b"more garbage")
    with pytest.raises(ValueError, match=r"x_resume\.pth.*x_resume\.1\.pth"):
        tu.load_resume(str(path))


def test_save_weights_stores_tied_tensors_once(tmp_path):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1))
    tu.save_weights(model, tmp_path / "w.pth")
    embed_bytes = 6400 * 64 * 2
    total_bytes = sum(p.numel() for p in model.parameters()) * 2  # parameters() yields the tied one once
    assert os.path.getsize(tmp_path / "w.pth") < total_bytes + embed_bytes // 2
    state = tu.load_state_dict_file(tmp_path / "w.pth")
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    MiniMindForCausalLM(model.config).load_state_dict(state, strict=True)


def test_a_skipped_test_fails_the_run(tmp_path):
    """The suite's no-skip rule (tests/no_skips.py, loaded by conftest.py): a run whose only test
    skips exits 1 and names it; the same file with the test passing exits 0."""
    import subprocess
    import sys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for body, code in [("pytest.skip('fixture missing')", 1), ("pass", 0)]:
        (tmp_path / "test_x.py").write_text(f"import pytest\n\n\ndef test_x():\n    {body}\n")
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no_skips", str(tmp_path / "test_x.py")],
                                capture_output=True, text=True, cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=tests_dir))
        assert result.returncode == code, result.stdout
        assert ("no test may skip: " in result.stdout) == (code == 1)


# ---------------------------------------------------------------- weight names without size flags

def test_weight_name_resolves_the_one_file_whatever_its_size(tmp_path):
    for name in ["full_sft_768_moe.pth", "full_sft_x.pth", "full_sft_512_resume.pth", "rlhf_512.pth", "full_sft_768.txt"]:
        (tmp_path / name).write_bytes(b"")  # only the first is full_sft_<hidden>[_moe].pth
    assert tu.resolve_weight("full_sft", str(tmp_path)) == str(tmp_path / "full_sft_768_moe.pth")
    assert tu.resolve_weight(str(tmp_path / "rlhf_512.pth"), "elsewhere") == str(tmp_path / "rlhf_512.pth")  # as is
    with pytest.raises(FileNotFoundError, match=r"--from_weight \S+any\.pth: no file or folder of that name exists"):
        tu.resolve_weight(str(tmp_path / "any.pth"), "elsewhere")
    (tmp_path / "full_sft_512.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--from_weight full_sft: 2 files match in \S+: full_sft_512\.pth, "
                                         r"full_sft_768_moe\.pth; pick one with --hidden_size and/or --use_moe"):
        tu.resolve_weight("full_sft", str(tmp_path))
    assert tu.resolve_weight("full_sft", str(tmp_path), hidden_size=768) == str(tmp_path / "full_sft_768_moe.pth")
    assert tu.resolve_weight("full_sft", str(tmp_path), use_moe=False) == str(tmp_path / "full_sft_512.pth")
    with pytest.raises(FileNotFoundError, match=r"--from_weight full_sft: no file or folder of that name exists, "
                                                r"and as a weight name it found no full_sft_640\.pth in \S+ "
                                                r"\(--save_dir; pattern full_sft_<hidden>\[_moe\]\.pth; it holds "
                                                r"full_sft_512\.pth, full_sft_768_moe\.pth\)"):
        tu.resolve_weight("full_sft", str(tmp_path), hidden_size=640)
    with pytest.raises(FileNotFoundError, match=rf"--from_weight nonexistent_folder: no file or folder of that name "
                                                rf"exists, and as a weight name it found no nonexistent_folder_<hidden>"
                                                rf"\.pth in {tmp_path / 'none'} \(--save_dir; pattern "
                                                rf"nonexistent_folder_<hidden>\[_moe\]\.pth\)"):
        tu.resolve_weight("nonexistent_folder", str(tmp_path / "none"))
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no_config holds no config\.json, so it is not a transformers model"):
        tu.resolve_weight(str(tmp_path / "no_config"), "elsewhere")
