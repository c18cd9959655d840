"""Shared fixtures: a tiny kit (actor weights, reward model, prompts) built in seconds, and the forkserver
that starts training runs as child processes (tests/children.py)."""
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from no_skips import pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary  # noqa: E402,F401
from scripts.bench_ppo import build_tiny_reward_model  # noqa: E402
from trainer_utils import save_weights  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    torch.manual_seed(0)
    actor = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    save_weights(actor, root / "full_sft_64.pth")
    return dict(actor=str(root / "full_sft_64.pth"), reward_model=build_tiny_reward_model(root / "rm"),
                data=str(ROOT / "dataset" / "prompts_sample.jsonl"), root=root)


def reward_of(model, **kwargs):
    """A Reward over a get_score() stand-in model, as the trainer builds it for internlm2-style models."""
    from reward import Reward, RewardModel
    return Reward(RewardModel(model, None, "get_score"), **kwargs)


def tiny_run_args(kit, save_dir, *extra):
    """Flags for a few-second CPU run of train_ppo on the tiny kit."""
    return ["--from_weight", kit["actor"], "--reward_model_path", kit["reward_model"], "--data_path", kit["data"],
            "--save_dir", str(save_dir), "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "8",
            "--max_seq_len", "48", "--save_interval", "2", "--device", "cpu", "--seed", "1",
            "--check_tokenizer", "0", *extra]  # random weights read no tokenizer


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver context whose server has imported fault_runner (torch, transformers, train_ppo)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fault_runner"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # the server's import path
    multiprocessing.forkserver.ensure_running()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved
    return ctx
