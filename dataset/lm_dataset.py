"""Prompt data for RL (PPO): rows of jsonl, json, parquet or a save_to_disk folder (dataset/formats.py) whose
prompt is a chat (MiniMind's conversations, TRL's messages or prompt, verl's prompt), rendered with the chat
template, or a plain string; their ground truth and other columns for the reward; and a collator that
left-pads the prompts for generation."""
import json
import os
import random

import torch
from torch.utils.data import Dataset

from dataset.formats import MISSING, PROMPT_KEYS, detect_label_key, label_text, read_table, resolve
from trainer_utils import InputError

ROLES = ("system", "user", "assistant")
# switches that MiniMind's chat templates take: minimind-3 (2026-03) and the 2025-10 Qwen3-style one
THINKING_FLAGS = ("open_thinking", "enable_thinking")
DEFAULT_THINKING_RATIO = 0.9  # the share of prompts served with the think block open, as minimind-3's PPO
AGENT_THINKING_RATIO = 0.1  # minimind-3's agent RL (train_agent.py) default, with tools


def thinking_flag(tokenizer):
    """The thinking switch the tokenizer's chat template reads, or None (MiniMind2's template has none).
    Rendered True, both leave the think block open for the response; False closes it empty."""
    template = tokenizer.chat_template or ""
    return next((flag for flag in THINKING_FLAGS if flag in template), None)


# chat columns whose trailing assistant message is not part of the prompt: MiniMind's placeholder ("无") in
# `conversations`, the completion in TRL's conversational `messages` rows. In TRL's `prompt` column a trailing
# assistant message is a prefix the response continues (continues_reply); in verl's rows (which have a
# `reward_model` or `data_source` column) and any other column it is a finished turn, followed by the generation
# prompt, as verl and OpenRLHF render it.
COMPLETION_KEYS = ("conversations", "messages")


def parse_chat(key, conversations):
    """The messages of a chat column (MiniMind's conversations, TRL's messages or prompt, verl's prompt) as
    [{"role", "content"}] and whether a trailing assistant message was dropped; raises ValueError(reason) on
    bad input. A trailing assistant message is dropped in COMPLETION_KEYS columns and when empty; elsewhere it
    is kept (see COMPLETION_KEYS for how it is rendered)."""
    messages, dropped = [], False
    for i, message in enumerate(conversations):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise InputError(f"{key}[{i}] needs string 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InputError(f"{key}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i > 0:
            raise InputError(f"{key}[{i}] is a system message; only the first message may be one")
        trailing_reply = role == "assistant" and i == len(conversations) - 1
        carries_tools = role == "system" and bool(message.get("tools"))  # MiniMind's agent data: tools, no text
        if not content.strip() and not trailing_reply and not carries_tools:
            raise InputError(f"{key}[{i}] ({role}) has empty content")
        if trailing_reply and (key in COMPLETION_KEYS or not content.strip()):
            dropped = True
        else:
            messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise InputError("no user message")
    return messages, dropped


def tool_name(schema):
    """The name of a tool schema, in transformers' form {"type": "function", "function": {...}} or bare."""
    inner = schema.get("function", schema) if isinstance(schema, dict) else None
    return inner.get("name") if isinstance(inner, dict) else None


def row_tools(value, record):
    """The tools a row declares, as a list of JSON schemas, or None: MiniMind's agent data puts them in the
    system message's `tools` field, other datasets (and TRL's) in a `tools` column; either may be a JSON
    string. Raises ValueError(reason) on a malformed list."""
    system = value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else {}
    where, declared = ("the system message's 'tools'", system.get("tools")) if system.get("role") == "system" \
        and system.get("tools") else ("'tools'", record.get("tools"))
    if declared is None or declared == "" or declared == []:
        return None
    if isinstance(declared, str):
        try:
            declared = json.loads(declared)
        except ValueError as e:
            raise InputError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(declared, list) or not all(isinstance(tool_name(t), str) for t in declared):
        raise InputError(f"{where} must be a list of tool schemas, each with a name "
                         f"({{\"type\": \"function\", \"function\": {{\"name\": ...}}}})")
    return declared


def continues_reply(key, messages, record):
    """Whether the response continues the chat's trailing assistant message (rendered without a generation
    prompt: transformers' continue_final_message), as TRL renders its `prompt` column; verl's rows keep it a
    finished turn."""
    verl_row = "reward_model" in record or "data_source" in record
    return key == "prompt" and not verl_row and bool(messages) and messages[-1]["role"] == "assistant"


def prompt_of(record, prompt_key=None):
    """(the prompt column's name, its value) of one row: --prompt_key, or the first of PROMPT_KEYS the row
    has. `conversations` and `messages` hold chats; any other column a string (a plain prompt) or a chat.
    Raises ValueError(reason)."""
    key = prompt_key or next((k for k in PROMPT_KEYS if resolve(record, k) is not MISSING), None)
    if key is None:
        raise InputError("missing 'conversations' (or 'messages', or 'prompt': a plain-text prompt or a chat); "
                         "--prompt_key names another column")
    value = resolve(record, key)
    if value is MISSING:
        raise InputError(f"missing {key!r} (--prompt_key)")
    if key in ("conversations", "messages") and not prompt_key and not isinstance(value, list):
        raise InputError(f"{key!r} must be a list, got {type(value).__name__}")
    if not isinstance(value, (str, list)):
        raise InputError(f"{key!r} must be a string (a plain prompt) or a list of chat messages, "
                         f"got {type(value).__name__}")
    return key, value


class FileKindError(InputError):
    """A file that mixes chat and plain-text rows: stops the run even with skip_bad_lines."""


class RLAIFDataset(Dataset):
    """Prompts from a jsonl, json or parquet file or a save_to_disk folder (dataset/formats.py). The prompt
    column (`prompt_key`; default: the first of conversations, messages, prompt) holds chats, rendered by the
    tokenizer's own chat template, or plain strings used as they are (with the tokenizer's own special
    tokens, as a base model reads text); one kind per file. The ground truth (`label_key`, a dotted path for
    nested fields; default: the first of answer, ground_truth, solution, reward_model.ground_truth) is each
    item's `answer` as a string ("" without one); every other column of the row is its `row`, for reward
    functions. Bad rows stop the load naming the file, the row (jsonl: its line) and the key. Tokenised
    once at load time.

    A prompt longer than `max_length` tokens (None: no limit) is never cut: with `overlong="drop"` (verl's
    filter_overlong_prompts) its row is left out and the load says how many were, with `"error"` the load
    stops naming the first such row; it stops too when no prompt is left. `longest` is the longest prompt kept.
    With a template that has a thinking switch (see `thinking_flag`), each prompt is rendered both ways
    and a share `thinking_ratio` (default 0.9) of them is served with the think block open, drawn per
    prompt and epoch from `seed` (`set_epoch`), as minimind-3's PPO draws it; resumed and distributed
    runs draw the same. That default is MiniMind's own and applies to MiniMind's data (a `conversations`
    column); other chats are rendered with the template's own default unless `thinking_ratio` is given
    (`thinking_ratio` None then). Plain-text rows take no thinking ratio, unless `apply_chat_template` makes
    each a one-message chat (OpenRLHF's --apply_chat_template).

    A chat in a `prompt` column (TRL's, verl's) that ends with an assistant message is continued: rendered
    without a generation prompt, so the response extends that message, as TRL does. In `messages` (TRL's
    conversational rows) such a message is the completion and is left out (the load says how many).

    `tools` (tool use, --tools: the tools file's schemas) renders each prompt with tools= its row's own
    (row_tools) or those; the thinking default on MiniMind's data is then minimind-3's agent RL's (0.1)."""

    def __init__(self, path, tokenizer, max_length=512, system_prompt=None, skip_bad_lines=False,
                 thinking_ratio=None, seed=0, prompt_key=None, label_key=None, overlong="drop",
                 apply_chat_template=False, tools=None):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InputError(f"max_length must be a positive integer, got {max_length!r}")
        self.path = os.fspath(path)
        # (number, (content, answer))
        numbered = self._read_records(skip_bad_lines, prompt_key, label_key, apply_chat_template)
        first = numbered[0][0]
        # tool use (--tools): each prompt lists its row's own tools (row_tools), else those of the tools file
        self.tool_use = tools is not None
        self.tools = [(declared or tools) if self.tool_use else None for declared in self.declared_tools]
        if self.tool_use and not self.chat:
            raise InputError(f"{self.where(first)}: --tools needs chat prompts (a tool conversation is rendered by "
                             f"the chat template); these rows are plain text (--apply_chat_template 1 makes each a "
                             f"one-message chat)")
        if self.tool_use and any(self.continued):
            raise InputError(f"{self.wheres[self.continued.index(True)]}: --tools with a prompt that continues an "
                             f"assistant message is not supported; end the chat with a user message")
        if self.chat and not tokenizer.chat_template:
            raise InputError(f"{self.where(first)}: " + ("--apply_chat_template, " if apply_chat_template else
                                                          "a conversation row, ")
                             + "but the tokenizer has no chat template; use plain-text rows {\"prompt\": ...} "
                             "or a tokenizer with a template")
        records = [record for _, record in numbered]
        self.flag = thinking_flag(tokenizer) if self.chat else None
        if thinking_ratio and not self.chat:
            raise InputError(f"--thinking_ratio {thinking_ratio}: {self.path} has plain-text prompt rows, which no "
                             f"chat template renders, so there is no think block to open")
        if thinking_ratio and self.flag is None:
            raise InputError(f"--thinking_ratio {thinking_ratio}: the chat template of --tokenizer_path "
                             f"{tokenizer.name_or_path!r} has no thinking switch ({' or '.join(THINKING_FLAGS)})")
        if thinking_ratio is None and self.flag and self.prompt_key != "conversations":
            self.flag = None  # not MiniMind's data: the template's own default, one rendering per prompt
        elif thinking_ratio is None:  # minimind-3's PPO default on MiniMind's data, where the template has the switch
            thinking_ratio = (AGENT_THINKING_RATIO if self.tool_use else DEFAULT_THINKING_RATIO) if self.flag else 0.0
        self.thinking_ratio, self.seed, self.epoch = thinking_ratio, seed, 0

        self.answers = [answer for _, answer in records]
        # the chat each prompt renders (None for plain text): what the reward model reads as the query
        self.messages = [self._with_system(content, system_prompt) if self.chat else None for content, _ in records]
        self.variants = [{} for _ in records]  # per prompt: {switch: (prompt text, ids)}
        for switch in ([False, True] if self.flag else [None]):  # the think block closed / open
            texts = [content if not self.chat else
                     tokenizer.apply_chat_template(self._with_system(content, system_prompt), tokenize=False,
                                                   add_generation_prompt=not continued,
                                                   continue_final_message=continued, tools=schemas,
                                                   **({self.flag: switch} if self.flag else {}))
                     for (content, _), continued, schemas in zip(records, self.continued, self.tools)]
            # a rendered template holds its special tokens already; plain text gets the tokenizer's own (a BOS)
            all_ids = tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
            for i, (text, ids) in enumerate(zip(texts, all_ids)):
                self.variants[i][switch] = (text, ids)
        self._leave_out_overlong(max_length, overlong)

    def _leave_out_overlong(self, max_length, overlong):
        """Rows whose prompt (its longer rendering, where there are two) exceeds max_length tokens: left out and
        counted ("drop"), or the load stops at the first ("error"). A cut prompt would lose its question or its
        generation prompt, and the policy would be trained on a prompt the data never held."""
        lengths = [max(len(ids) for _, ids in variant.values()) for variant in self.variants]
        over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
        if over and (overlong == "error" or len(over) == len(lengths)):
            first = over[0]
            raise InputError(f"{self.wheres[first]}: the prompt is {lengths[first]} tokens, longer than --max_seq_len "
                             f"{max_length}" + ("" if overlong == "error" else f", as are all {len(lengths)} prompts")
                             + "; raise --max_seq_len (a prompt is never cut: it would lose its question)"
                             + (", or --overlong_prompts drop leaves such rows out" if overlong == "error" else ""))
        if over:
            first, dropped = self.wheres[over[0]], set(over)
            keep = [i for i in range(len(lengths)) if i not in dropped]
            for name in ("variants", "answers", "messages", "rows", "labels", "wheres", "continued", "tools"):
                values = getattr(self, name)
                setattr(self, name, [values[i] for i in keep])
            print(f"note: {self.path}: {len(over)} of {len(lengths)} prompts are longer than --max_seq_len "
                  f"{max_length} tokens (up to {max(lengths[i] for i in over)}; first: {first})"
                  f" and are left out, not cut", flush=True)
        self.num_dropped = len(over)
        self.longest = max(len(ids) for variant in self.variants for _, ids in variant.values())

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

    def where(self, number):
        """How messages name a row: `file:line` (jsonl) or `file: row i` (other formats, from 0)."""
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path}: row {number}"

    def _read_records(self, skip_bad_lines, prompt_key, label_key, apply_chat_template=False):
        """The rows of the file (dataset/formats.py), checked: [(number, (messages or prompt text, answer))].
        Sets the prompt and label columns (`prompt_key`, `label_key`: given or detected), the kind of the
        file (`chat`; plain text made one-message chats with `apply_chat_template`), and per kept row its
        `rows` (every other column), raw `labels` and `wheres`."""
        table = read_table(self.path, skip_bad_lines)
        self.unit, self.skipped = table.unit, list(table.skipped)  # (number, reason) of rows skipped
        dicts = [record for _, record in table.records]
        for flag, key in (("--prompt_key", prompt_key), ("--label_key", label_key)):
            if key and dicts and not any(resolve(record, key) is not MISSING for record in dicts):
                raise InputError(f"{table.where(table.records[0][0])}: {flag} {key!r} is in no row of the file "
                                 f"(its columns: {', '.join(table.columns()) or 'none'})")
        self.label_key = detect_label_key(table, label_key)
        records, self.rows, self.labels, self.wheres, self.continued = [], [], [], [], []
        self.declared_tools = []  # per kept row: the tools it declares (row_tools), or None
        first = None  # (number, prompt column, chat?) of the first good row: the file's kind
        completions = 0  # rows whose trailing assistant message was dropped
        kinds = ("conversation", "plain-text prompt")
        for number, record in table.records:
            try:
                key, value = prompt_of(record, prompt_key)
                chat = isinstance(value, list)
                if first is not None and chat != first[2]:  # not skippable: the file itself is wrong
                    raise FileKindError(f"{table.where(number)}: a {kinds[not chat]} row in a file of "
                                        f"{kinds[chat]} rows ({table.unit} {first[0]}); one kind per file")
                if first is not None and key != first[1]:
                    raise InputError(f"missing {first[1]!r} (the prompt column of {table.unit} {first[0]}; this "
                                     f"row has {key!r}); one prompt column per file")
                if chat:
                    content, dropped = parse_chat(key, value)
                elif not value.strip():
                    raise InputError(f"{key!r} must be a non-empty string")
                else:
                    content, dropped = [{"role": "user", "content": value}] if apply_chat_template else value, False
                declared = row_tools(value, record)
                label = resolve(record, self.label_key) if self.label_key else MISSING
                if self.label_key == "answer" and label is not MISSING and not isinstance(label, str):
                    # this project's own field has always been a string; other frameworks' labels are converted
                    raise InputError(f"'answer' must be a string, got {type(label).__name__} (write it as a JSON "
                                     f"string: {json.dumps(label_text(label), ensure_ascii=False)})")
            except FileKindError:
                raise
            except ValueError as e:
                if not skip_bad_lines:
                    raise InputError(f"{table.where(number)}: {e}") from None
                self.skipped.append((number, str(e)))
                continue
            first = first or (number, key, chat)
            completions += dropped and key == "messages"
            records.append((number, (content, label_text(label))))
            self.rows.append({k: v for k, v in record.items() if k != key})
            self.labels.append(None if label is MISSING else label)
            self.wheres.append(table.where(number))
            self.continued.append(chat and continues_reply(key, content, record))
            self.declared_tools.append(declared)
        self.prompt_key = first[1] if first else prompt_key
        self.chat = bool(first and (first[2] or apply_chat_template))
        if completions:
            print(f"note: {self.path}: {completions} rows of 'messages' end with an assistant message, the "
                  f"completion in TRL's conversational rows: it is left out, and the policy writes its own "
                  f"(a 'prompt' column ending with one is continued instead)", flush=True)

        rows, many = ("lines", "non-blank lines") if self.unit == "line" else ("rows", "rows")
        self.skipped.sort()
        if self.skipped:
            shown = ", ".join(str(number) for number, _ in self.skipped[:5])
            more = ", ..." if len(self.skipped) > 5 else ""
            print(f"warning: {self.path}: skipped {len(self.skipped)} bad {rows} ({rows} {shown}{more}); "
                  f"first: {self.skipped[0][1]}", flush=True)
        if not records:
            if self.skipped:
                number, reason = self.skipped[0]
                raise InputError(f"{self.path}: no prompts; all {len(self.skipped)} {many} are bad "
                                 f"({self.unit} {number}: {reason})")
            raise InputError(f"{self.path}: no prompts (the file is empty or has only blank lines)")
        return records

    def __len__(self):
        return len(self.variants)

    def __getitem__(self, index):
        switch = self.thinking_open(index)
        text, ids = self.variants[index][switch]
        return {"prompt": text, "prompt_ids": ids, "answer": self.answers[index], "messages": self.messages[index],
                "row": self.rows[index], "tools": self.tools[index],
                "template_kwargs": {self.flag: switch} if self.flag else {}}


def decode_responses(tokenizer, response_ids, response_mask):
    """Each row's response text: its real tokens only (lengths from the mask, never from comparing ids
    with the pad id, which may be EOS or an ordinary token), special tokens skipped."""
    return [tokenizer.decode(ids[:n], skip_special_tokens=True)
            for ids, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())]


class PromptCollator:
    """Left-pads prompts so every row ends at the same column, where generation starts. With `n_samples` > 1
    each prompt fills n consecutive rows, to be answered n times: its group (`groups`: the prompt's index in
    the batch)."""

    def __init__(self, pad_token_id, n_samples=1):
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise InputError(f"pad_token_id must be a non-negative integer, got {pad_token_id!r}; "
                             "does the tokenizer define a pad token?")
        self.pad_token_id, self.n_samples = pad_token_id, n_samples

    def __call__(self, items):
        groups = torch.arange(len(items)).repeat_interleave(self.n_samples)
        items = [items[g] for g in groups.tolist()]
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
            "tools": [item.get("tools") for item in items],  # each prompt's tool schemas (--tools), or None
            "template_kwargs": [item.get("template_kwargs", {}) for item in items],  # how the prompt was rendered
            "groups": groups,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
