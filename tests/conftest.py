"""Shared fixtures: a tiny kit (actor weights, reward model, prompts) built in seconds, and the forkserver
that starts training runs as child processes (tests/children.py)."""
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, DistilBertConfig,
                          DistilBertForSequenceClassification, DistilBertTokenizerFast)

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
            "--max_seq_len", "80", "--save_interval", "2", "--device", "cpu", "--seed", "1",
            "--check_tokenizer", "0", *extra]  # random weights read no tokenizer; 80: every prompt of prompts_sample.jsonl (up to 75 tokens)


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


WORDS = ["what", "is", "plus", "compute", "the", "answer", "think"]


def write_wordpiece(folder, tokenizer_class):
    """A WordPiece vocabulary written here: specials, single characters (and their ## forms), a few words."""
    chars = [chr(c) for c in range(33, 127)] + list("加上等于多少是计算。？")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + WORDS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return tokenizer_class(vocab_file=str(folder / "vocab.txt"), do_lower_case=True), len(vocab)


@pytest.fixture(scope="session")
def encoder_rms(tmp_path_factory):
    """Tiny random encoder reward models built offline: a 1-label BERT (OpenAssistant's DeBERTa is scored
    the same way) and a 2-label DistilBERT with NEGATIVE / POSITIVE (TRL's sentiment classifier)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    tokenizer, vocab_size = write_wordpiece(root / "bert", BertTokenizerFast)
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=512, num_labels=1))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    tokenizer, vocab_size = write_wordpiece(root / "distilbert", DistilBertTokenizerFast)
    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=512,
        num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    distil.save_pretrained(root / "distilbert")
    tokenizer.save_pretrained(root / "distilbert")
    return dict(bert=str(root / "bert"), distilbert=str(root / "distilbert"))
