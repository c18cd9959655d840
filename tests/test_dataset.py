import copy
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import PromptCollator, RLAIFDataset

REPO = Path(__file__).resolve().parents[1]
GEN_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "model")


def write_jsonl(tmp_path, lines, name="prompts.jsonl"):
    """Write records (dicts) or raw text lines, one per line."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x) + "\n"
                            for x in lines), encoding="utf-8")
    return str(path)


def record(*messages, answer=None):
    rec = {"conversations": [{"role": role, "content": content} for role, content in messages]}
    if answer is not None:
        rec["answer"] = answer
    return rec


def chatml(*messages):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + GEN_PROMPT


GOOD = record(("user", "Hi"), ("assistant", "无"))


# ---------------------------------------------------------------- rendering

def test_single_turn_rendering(tmp_path, tokenizer):
    ds = RLAIFDataset(write_jsonl(tmp_path, [record(("user", "What is 7 + 5?"), ("assistant", "无"), answer="12")]),
                      tokenizer)
    item = ds[0]
    assert item["prompt"] == chatml(("user", "What is 7 + 5?"))
    assert item["prompt_ids"] == tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
    assert item["answer"] == "12"
    assert ds.num_dropped == 0 and ds.skipped == []


def test_multi_turn_rendering_with_system(tmp_path, tokenizer):
    turns = [("system", "Be brief."), ("user", "你好"), ("assistant", "你好！"), ("user", "1+1=?")]
    ds = RLAIFDataset(write_jsonl(tmp_path, [record(*turns, ("assistant", "无"))]), tokenizer)
    assert ds[0]["prompt"] == chatml(*turns)
    assert ds[0]["answer"] == ""


def test_placeholder_dropped_only_when_last_message_is_assistant(tmp_path, tokenizer):
    with_placeholder = record(("user", "Hi"), ("assistant", ""))
    without = record(("user", "Hi"))
    ds = RLAIFDataset(write_jsonl(tmp_path, [with_placeholder, without]), tokenizer)
    assert ds[0]["prompt"] == ds[1]["prompt"] == chatml(("user", "Hi"))


def test_system_prompt_inserted_only_when_missing(tmp_path, tokenizer):
    own = record(("system", "Own."), ("user", "Hi"), ("assistant", "无"))
    ds = RLAIFDataset(write_jsonl(tmp_path, [GOOD, own]), tokenizer, system_prompt="Default.")
    assert ds[0]["prompt"] == chatml(("system", "Default."), ("user", "Hi"))
    assert ds[1]["prompt"] == chatml(("system", "Own."), ("user", "Hi"))


def test_overlong_prompts_are_left_out_never_cut(tmp_path, tokenizer, capsys):
    """A prompt longer than max_length is not cut (its question would be lost): its row is left out and counted,
    with its ground truth and columns; "error" stops at it, naming its line; all too long stops the load."""
    long = record(("user", "one two three four five six seven eight nine ten " * 5 + "END"), ("assistant", "无"))
    path = write_jsonl(tmp_path, [dict(GOOD, answer="a"), dict(long, answer="b"), dict(GOOD, answer="c")])
    full_ids = tokenizer(chatml(("user", long["conversations"][0]["content"])), add_special_tokens=False)["input_ids"]
    assert len(full_ids) > 16
    ds = RLAIFDataset(path, tokenizer, max_length=16)
    assert len(ds) == 2 and [ds[i]["answer"] for i in range(2)] == ["a", "c"] and ds.num_dropped == 1
    assert ds.wheres == [f"{path}:1", f"{path}:3"] and ds.longest == len(ds[0]["prompt_ids"])
    out = capsys.readouterr().out
    assert f"{path}: 1 of 3 prompts are longer than --max_seq_len 16 tokens (up to {len(full_ids)}; first: {path}:2)" \
        in out and "left out, not cut" in out
    assert len(RLAIFDataset(path, tokenizer, max_length=None)) == 3
    with pytest.raises(ValueError, match=rf"{path}:2: the prompt is {len(full_ids)} tokens, longer than --max_seq_len "
                                         r"16; raise --max_seq_len .*--overlong_prompts drop"):
        RLAIFDataset(path, tokenizer, max_length=16, overlong="error")
    with pytest.raises(ValueError, match=rf"{path}:1: the prompt is \d+ tokens, longer than --max_seq_len 2, as are all "
                                         r"3 prompts"):
        RLAIFDataset(path, tokenizer, max_length=2)


def test_max_length_must_be_positive(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        RLAIFDataset(write_jsonl(tmp_path, [GOOD]), tokenizer, max_length=0)


# ---------------------------------------------------------------- bad input

BAD_LINES = [
    ('{"conversations": [', "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"messages": []}', "missing 'conversations'"),
    ('{"conversations": "hi"}', "'conversations' must be a list"),
    ('{"conversations": [{"content": "hi"}]}', "conversations[0] needs string 'role' and 'content'"),
    ('{"conversations": [{"role": "user", "content": 5}]}', "conversations[0] needs string"),
    ('{"conversations": ["hi"]}', "conversations[0] needs string"),
    ('{"conversations": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
    ('{"conversations": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}',
     "conversations[1] is a system message"),
    ('{"conversations": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "无"}]}',
     "conversations[0] (user) has empty content"),
    ('{"conversations": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "无"}]}',
     "no user message"),
    ('{"conversations": [{"role": "user", "content": "x"}], "answer": 12}', "'answer' must be a string"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, tokenizer, line, reason):
    path = write_jsonl(tmp_path, [GOOD, "", line])  # blank line 2 still counts for numbering
    with pytest.raises(ValueError) as err:
        RLAIFDataset(path, tokenizer)
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)


def test_non_utf8_line(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"conversations": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: not valid UTF-8")):
        RLAIFDataset(str(path), tokenizer)


def test_skip_bad_lines_counts_and_reports(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path, [GOOD, "not json", GOOD, '{"conversations": []}'])
    ds = RLAIFDataset(path, tokenizer, skip_bad_lines=True)
    assert len(ds) == 2
    assert [lineno for lineno, _ in ds.skipped] == [2, 4]
    assert "invalid JSON" in ds.skipped[0][1] and ds.skipped[1][1] == "no user message"
    out = capsys.readouterr().out
    assert path in out and "skipped 2 bad lines (lines 2, 4)" in out


def test_skip_bad_lines_still_raises_when_all_are_bad(tmp_path, tokenizer):
    path = write_jsonl(tmp_path, ["nope", "[]"])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: no prompts; all 2")):
        RLAIFDataset(path, tokenizer, skip_bad_lines=True)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, tokenizer, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: no prompts")):
        RLAIFDataset(str(path), tokenizer)


def test_missing_file(tmp_path, tokenizer):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        RLAIFDataset(path, tokenizer)


# ---------------------------------------------------------------- shipped sample and collation

def test_shipped_sample_loads(tokenizer):
    ds = RLAIFDataset(REPO / "dataset" / "prompts_sample.jsonl", tokenizer)
    assert len(ds) >= 20 and ds.skipped == []
    assert ds[0]["answer"] == "12" and "What is 7 + 5?" in ds[0]["prompt"]
    assert all(item["prompt"].endswith(GEN_PROMPT) for item in ds)


def test_collator_left_pads():
    items = [
        {"prompt": "a", "prompt_ids": [5, 6, 7], "answer": "12"},
        {"prompt": "b", "prompt_ids": [8], "answer": ""},
    ]
    batch = PromptCollator(pad_token_id=0)(items)
    assert batch["prompts"] == ["a", "b"] and batch["answers"] == ["12", ""]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_collator_with_dataloader(tokenizer):
    ds = RLAIFDataset(REPO / "dataset" / "prompts_sample.jsonl", tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=PromptCollator(tokenizer.pad_token_id))
    batch = next(iter(loader))
    gen_ids = tokenizer(GEN_PROMPT, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][:, -len(gen_ids):].tolist() == [gen_ids] * 8  # all rows end where generation starts
    assert batch["attention_mask"].sum(1).tolist() == [len(ds[i]["prompt_ids"]) for i in range(8)]


def test_collator_needs_a_pad_id():
    with pytest.raises(ValueError, match="pad_token_id"):
        PromptCollator(None)


# ---------------------------------------------------------------- plain-text prompts (base models)
GOOD_CHAT = json.dumps(GOOD)

def test_plain_text_rows_are_used_as_they_are(tmp_path, tokenizer):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"prompt": "This movie was", "answer": "good"}\n\n{"prompt": "The plot"}\n', encoding="utf-8")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None  # a base model's tokenizer: no template needed for plain rows
    ds = RLAIFDataset(path, tokenizer, max_length=64)
    assert [s["prompt"] for s in ds.samples] == ["This movie was", "The plot"]
    assert ds.samples[0]["prompt_ids"] == tokenizer("This movie was")["input_ids"] and ds.answers == ["good", ""]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "Hello"}', GOOD_CHAT], r"plain\.jsonl:2: a conversation row in a file of plain-text prompt rows "
                                         r"\(line 1\); one kind per file"),
    ([GOOD_CHAT, "", '{"prompt": "Hello"}'], r"plain\.jsonl:3: a plain-text prompt row in a file of conversation "
                                             r"rows \(line 1\)"),
    (['{"prompt": ""}'], r"plain\.jsonl:1: 'prompt' must be a non-empty string"),
])
def test_mixed_or_bad_plain_rows_name_the_line(tmp_path, tokenizer, lines, message):
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        RLAIFDataset(tmp_path / "plain.jsonl", tokenizer, max_length=64)


def test_conversation_rows_need_a_chat_template(tmp_path, tokenizer):
    (tmp_path / "chat.jsonl").write_text("\n" + GOOD_CHAT + "\n", encoding="utf-8")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: a conversation row, but the tokenizer has no chat template"):
        RLAIFDataset(tmp_path / "chat.jsonl", tokenizer, max_length=64)
