"""Prompt data for RL (PPO): MiniMind `rlaif.jsonl`-style conversations rendered with the
chat template, plus a collator that left-pads them for generation."""
import json
import os
import random

import torch
from torch.utils.data import Dataset

ROLES = ("system", "user", "assistant")
# switches that MiniMind's chat templates take: minimind-3 (2026-03) and the 2025-10 Qwen3-style one
THINKING_FLAGS = ("open_thinking", "enable_thinking")
DEFAULT_THINKING_RATIO = 0.9  # the share of prompts served with the think block open, as minimind-3's PPO


def thinking_flag(tokenizer):
    """The thinking switch the tokenizer's chat template reads, or None (MiniMind2's template has none).
    Rendered True, both leave the think block open for the response; False closes it empty."""
    template = tokenizer.chat_template or ""
    return next((flag for flag in THINKING_FLAGS if flag in template), None)


def parse_record(text):
    """(messages, answer) from one jsonl line, or (prompt text, answer) for a plain-text row
    {"prompt": "..."} (base models: used as it is, no chat template); raises ValueError(reason) on
    bad input. The trailing assistant message is MiniMind's placeholder ("无") and is dropped."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    answer = record.get("answer", "")
    if not isinstance(answer, str):
        raise ValueError(f"'answer' must be a string, got {type(answer).__name__}")
    if "prompt" in record and "conversations" not in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        return record["prompt"], answer
    if "conversations" not in record:
        raise ValueError("missing 'conversations' (or 'prompt' for a plain-text row)")
    conversations = record["conversations"]
    if not isinstance(conversations, list):
        raise ValueError(f"'conversations' must be a list, got {type(conversations).__name__}")

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
    """Prompts from a jsonl of conversation rows, rendered by the tokenizer's own chat template, or
    of plain-text rows {"prompt": ...} used as they are (with the tokenizer's own special tokens, as
    a base model reads text); one kind per file. Tokenised once at load time.

    Prompts longer than `max_length` tokens keep their last `max_length` ids: the end holds
    the user's latest turn and the generation prompt, which the policy must see.
    With a template that has a thinking switch (see `thinking_flag`), each prompt is rendered both ways
    and a share `thinking_ratio` (default 0.9) of them is served with the think block open, drawn per
    prompt and epoch from `seed` (`set_epoch`), as minimind-3's PPO draws it; resumed and distributed
    runs draw the same. Plain-text rows take no thinking ratio."""

    def __init__(self, path, tokenizer, max_length=512, system_prompt=None, skip_bad_lines=False,
                 thinking_ratio=None, seed=0, prompt_key=None, label_key=None):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.path = os.fspath(path)
        self.skipped = []  # (lineno, reason) of bad lines skipped with skip_bad_lines=True
        numbered = self._read_records(skip_bad_lines)  # (line number, (messages or prompt text, answer))
        self.chat = isinstance(numbered[0][1][0], list)
        for lineno, (content, _) in numbered:
            if isinstance(content, list) != self.chat:
                kinds = ("conversation", "plain-text prompt")
                raise ValueError(f"{self.path}:{lineno}: a {kinds[self.chat]} row in a file of {kinds[not self.chat]} "
                                 f"rows (line {numbered[0][0]}); one kind per file")
        if self.chat and not tokenizer.chat_template:
            raise ValueError(f"{self.path}:{numbered[0][0]}: a conversation row, but the tokenizer has no chat "
                             f"template; use plain-text rows {{\"prompt\": ...}} or a tokenizer with a template")
        records = [record for _, record in numbered]
        self.flag = thinking_flag(tokenizer) if self.chat else None
        if thinking_ratio is not None and not self.chat:
            raise ValueError(f"--thinking_ratio {thinking_ratio}: {self.path} has plain-text prompt rows, which no "
                             f"chat template renders, so there is no think block to open")
        if thinking_ratio and self.flag is None:
            raise ValueError(f"--thinking_ratio {thinking_ratio}: the chat template of --tokenizer_path "
                             f"{tokenizer.name_or_path!r} has no thinking switch ({' or '.join(THINKING_FLAGS)})")
        if thinking_ratio is None:  # minimind-3's PPO default where the template has the switch
            thinking_ratio = DEFAULT_THINKING_RATIO if self.flag else 0.0
        self.thinking_ratio, self.seed, self.epoch = thinking_ratio, seed, 0

        self.answers = [answer for _, answer in records]
        # the chat each prompt renders (None for plain text): what the reward model reads as the query
        self.messages = [self._with_system(content, system_prompt) if self.chat else None for content, _ in records]
        self.variants = [{} for _ in records]  # per prompt: {switch: (prompt text, ids)}
        truncated = set()
        for switch in ([False, True] if self.flag else [None]):  # the think block closed / open
            texts = [content if not self.chat else
                     tokenizer.apply_chat_template(self._with_system(content, system_prompt), tokenize=False,
                                                   add_generation_prompt=True,
                                                   **({self.flag: switch} if self.flag else {}))
                     for content, _ in records]
            # a rendered template holds its special tokens already; plain text gets the tokenizer's own (a BOS)
            all_ids = tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
            for i, (text, ids) in enumerate(zip(texts, all_ids)):
                if len(ids) > max_length:
                    ids = ids[-max_length:]
                    text = tokenizer.decode(ids)
                    truncated.add(i)
                self.variants[i][switch] = (text, ids)
        self.num_truncated = len(truncated)
        if self.num_truncated:
            print(f"warning: {self.path}: {self.num_truncated} of {len(self.variants)} prompts are longer "
                  f"than max_length={max_length} tokens and were truncated from the left", flush=True)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def thinking_open(self, index):
        """Whether prompt `index` is served with the think block open this epoch (None: no switch)."""
        if self.flag is None:
            return None
        return random.Random(f"{self.seed}:{self.epoch}:{index}").random() < self.thinking_ratio

    @property
    def samples(self):
        return [self[i] for i in range(len(self))]

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
                    records.append((lineno, parse_record(text)))
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
        return len(self.variants)

    def __getitem__(self, index):
        text, ids = self.variants[index][self.thinking_open(index)]
        return {"prompt": text, "prompt_ids": ids, "answer": self.answers[index], "messages": self.messages[index],
                "row": None}


def decode_responses(tokenizer, response_ids, response_mask):
    """Each row's response text: its real tokens only (lengths from the mask, never from comparing ids
    with the pad id, which may be EOS or an ordinary token), special tokens skipped."""
    return [tokenizer.decode(ids[:n], skip_special_tokens=True)
            for ids, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())]


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
            "messages": [item.get("messages") for item in items],
            "rows": [item.get("row") for item in items],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
