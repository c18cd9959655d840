"""The committed tokenizer in model/: ids, tags, round-trips, chat template, reproducibility."""
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "model"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_special_ids(tok):
    assert tok.is_fast
    assert len(tok) == 6400
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id != tok.eos_token_id  # padding must not look like end-of-turn
    assert tok.model_max_length == 32768
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no bos/eos added


def test_reasoning_tags_are_single_non_special_tokens(tok):
    for i, tag in enumerate(TAGS, start=3):
        assert tok.encode(tag) == [i]
    text = "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"
    ids = tok.encode(text)
    assert [i for i in ids if i < 7] == [3, 4, 5, 6]
    # the reward regex reads the tags from text decoded with skip_special_tokens=True
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode([1, *ids, 2], skip_special_tokens=True) == text


def test_round_trip(tok):
    s = ("Hello, world! It's 2024 , isn't it ? 你好，世界！今天 7 加 5 等于 12。"
         " Emoji 😀👍🏽, accents café naïve, tabs\tand\nnewlines  double  spaces ")
    assert tok.decode(tok.encode(s)) == s


def test_digits_split_one_per_token(tok):
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert tok.decode(tok.encode("x = 9876")) == "x = 9876"
    assert [t for t in tok.tokenize("x = 9876") if t.isdigit()] == ["9", "8", "7", "6"]


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"},
        {"role": "user", "content": "7 加 5 等于多少？"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer><|im_end|>\n"
        "<|im_start|>user\n7 加 5 等于多少？<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    # no default system message, and no generation prompt unless asked for
    assert (tok.apply_chat_template(messages[1:2], tokenize=False)
            == "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n")
    ids = tok.encode(expected)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4


def test_script_reproduces_committed_files(tmp_path):
    # takes a few seconds: keeps model/tokenizer*.json reproducible from the script
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True, cwd=REPO)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (MODEL_DIR / name).read_bytes(), name

