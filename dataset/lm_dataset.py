"""Prompt data for RL (PPO): MiniMind `rlaif.jsonl`-style conversations rendered with the
chat template, plus a collator that left-pads them for generation."""
import json
import os

import torch
from torch.utils.data import Dataset

ROLES = ("system", "user", "assistant")


def parse_record(text):
    """(messages, answer) from one jsonl line; raises ValueError(reason) on bad input.
    The trailing assistant message is MiniMind's placeholder ("无") and is dropped."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError("missing 'conversations'")
    conversations = record["conversations"]
    if not isinstance(conversations, list):
        raise ValueError(f"'conversations' must be a list, got {type(conversations).__name__}")
    answer = record.get("answer", "")
    if not isinstance(answer, str):
        raise ValueError(f"'answer' must be a string, got {type(answer).__name__}")

    messages = []
    for i, message in enumerate(conversations):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"conversations[{i}] needs string 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"conversations[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i > 0:
            raise ValueError(f"conversations[{i}] is a system message; only the first message may be one")
        is_placeholder = role == "assistant" and i == len(conversations) - 1
        if not content.strip() and not is_placeholder:
            raise ValueError(f"conversations[{i}] ({role}) has empty content")
        if not is_placeholder:
            messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    return messages, answer


class RLAIFDataset(Dataset):
    """Prompts from a conversations jsonl, tokenised once at load time.

    Prompts longer than `max_length` tokens keep their last `max_length` ids: the end holds
    the user's latest turn and the generation prompt, which the policy must see."""

    def __init__(self, path, tokenizer, max_length=512, system_prompt=None, skip_bad_lines=False):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.path = os.fspath(path)
        self.skipped = []  # (lineno, reason) of bad lines skipped with skip_bad_lines=True
        records = self._read_records(skip_bad_lines)

        texts = [tokenizer.apply_chat_template(self._with_system(messages, system_prompt),
                                               tokenize=False, add_generation_prompt=True)
                 for messages, _ in records]
        all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.samples = []
        self.num_truncated = 0
        for text, ids, (_, answer) in zip(texts, all_ids, records):
            if len(ids) > max_length:
                ids = ids[-max_length:]
                text = tokenizer.decode(ids)
                self.num_truncated += 1
            self.samples.append({"prompt": text, "prompt_ids": ids, "answer": answer})
        if self.num_truncated:
            print(f"warning: {self.path}: {self.num_truncated} of {len(self.samples)} prompts are longer "
                  f"than max_length={max_length} tokens and were truncated from the left", flush=True)

    @staticmethod
    def _with_system(messages, system_prompt):
        if system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": system_prompt}] + messages
        return messages

    def _read_records(self, skip_bad_lines):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: prompt file not found")
        records = []
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    # Decode per line so a bad byte is reported with its line number.
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad_line(lineno, f"not valid UTF-8 (byte {e.start})", skip_bad_lines)
                    continue
                if lineno == 1:
                    text = text.removeprefix("\ufeff")  # byte-order mark left by some editors
                if not text.strip():
                    continue
                try:
                    records.append(parse_record(text))
                except ValueError as e:
                    self._bad_line(lineno, str(e), skip_bad_lines)

        if self.skipped:
            shown = ", ".join(str(lineno) for lineno, _ in self.skipped[:5])
            more = ", ..." if len(self.skipped) > 5 else ""
            print(f"warning: {self.path}: skipped {len(self.skipped)} bad lines (lines {shown}{more}); "
                  f"first: {self.skipped[0][1]}", flush=True)
        if not records:
            if self.skipped:
                lineno, reason = self.skipped[0]
                raise ValueError(f"{self.path}: no prompts; all {len(self.skipped)} non-blank lines are bad "
                                 f"(line {lineno}: {reason})")
            raise ValueError(f"{self.path}: no prompts (the file is empty or has only blank lines)")
        return records

    def _bad_line(self, lineno, reason, skip_bad_lines):
        if not skip_bad_lines:
            raise ValueError(f"{self.path}:{lineno}: {reason}")
        self.skipped.append((lineno, reason))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


class PromptCollator:
    """Left-pads prompts so every row ends at the same column, where generation starts."""

    def __init__(self, pad_token_id):
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative integer, got {pad_token_id!r}; "
                             "does the tokenizer define a pad token?")
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        width = max(len(item["prompt_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids = item["prompt_ids"]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        return {
            "prompts": [item["prompt"] for item in items],
            "answers": [item["answer"] for item in items],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
