"""Rewards for PPO: reward-model loading and scoring, MiniMind's rule rewards, and the Reward that sums them
with the reward functions from files (reward_functions.py).

Used by train_ppo.py (rollouts), evaluation.py (held-out evaluation) and the scripts. A
reward is (total [B], parts {name: [B]}); every part is logged on its own.
"""
import functools
import inspect
import json
import math
import os
import re

import torch

from dataset.lm_dataset import tool_name
from model.loading import check_rope_base, trusts_remote_code
from reward_functions import NonFiniteRolloutError, reward_parts
from trainer_utils import InputError, MissingFileError


# ----------------------------------------------------------------------------- reward models
def resolve_reward_dtype(name, config, device, bf16_supported=None):
    """--reward_dtype as a torch dtype. auto: float32 on CPU; on CUDA the dtype the model's config names
    (`torch_dtype`, or `dtype` in transformers 5), else bfloat16 where the GPU supports it, else float32.
    Never a blanket float16: models trained in bfloat16 overflow in it."""
    if name != "auto":
        return getattr(torch, name)
    if not str(device).startswith("cuda"):
        return torch.float32
    named = config.get("torch_dtype") or config.get("dtype")
    if named in ("float32", "bfloat16", "float16"):
        return getattr(torch, named)
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float32


REWARD_INPUTS = ("auto", "chat", "pair", "text")


class RewardModel:
    """A reward model and the way its authors score a (query, response) with it (docs/hf_ecosystem.md "Four kinds of reward models"):

    - get_score: the model's own get_score / get_scores over the chat (internlm2-reward);
    - chat: the reward tokenizer's chat template over the conversation plus the response
      (decoder classifiers such as Skywork-Reward; the template carries its own special tokens);
    - pair: tokenizer(query, response) with special tokens ([CLS] q [SEP] a [SEP]; OpenAssistant DeBERTa);
    - text: tokenizer(query + response) with special tokens (TRL's sentiment classifier).

    The query is the chat's last user message. Classifiers give the raw logit of `label`. Padding is
    on the right and the model's pad_token_id is the tokenizer's, so the model's own pooling works
    (the first token for encoders, the last non-pad token for decoders).
    """

    def __init__(self, model, tokenizer, input_format, label=0, path=None):
        self.model, self.tokenizer, self.input_format, self.label = model, tokenizer, input_format, label
        self.path = path or type(model).__name__

    @torch.no_grad()
    def score(self, chats, batch_size=32):
        """Scores [N] of chats (lists of {role, content}, the last one the response), `batch_size` chats
        per forward: one padded batch of every chat would grow memory with the rollout."""
        return torch.cat([self.score_batch(chats[i:i + batch_size]) for i in range(0, len(chats), batch_size)])

    def score_batch(self, chats):
        """Scores [N] of one batch, with gradients if enabled (scripts/build_demo.py trains through it)."""
        if self.input_format == "get_score":
            if hasattr(self.model, "get_scores"):  # one padded batch per call
                return torch.tensor(self.model.get_scores(self.tokenizer, chats), dtype=torch.float32).reshape(-1)
            return torch.tensor([float(self.model.get_score(self.tokenizer, c)) for c in chats])
        self.tokenizer.padding_side = "right"
        if self.input_format == "chat":
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            queries = [next((m["content"] for m in reversed(c[:-1]) if m["role"] == "user"), "") for c in chats]
            responses = [c[-1]["content"] for c in chats]
            if self.input_format == "pair":
                enc = self.tokenizer(queries, responses, return_tensors="pt", padding=True, truncation=True)
            else:
                enc = self.tokenizer([q + r for q, r in zip(queries, responses)], return_tensors="pt", padding=True,
                                     truncation=True)
        accepted = self.model_inputs(enc)
        enc = {k: v.to(self.model.device) for k, v in enc.items() if k in accepted}
        return self.model(**enc).logits[:, self.label].float().cpu()

    def model_inputs(self, enc):
        """The tokenizer outputs the model's forward takes: a tokenizer may emit token_type_ids that a model
        without segment embeddings (DistilBERT) refuses."""
        params = inspect.signature(self.model.forward).parameters
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return set(enc)
        return set(enc) & set(params)


def label_list(config):
    """'0: NEGATIVE, 1: POSITIVE': a classifier's labels, for error messages."""
    labels = {int(i): name for i, name in (config.id2label or {}).items()}
    return ", ".join(f"{i}: {labels.get(i, '?')}" for i in range(config.num_labels))


def reward_label_index(label, config, path):
    """--reward_label NAME|INDEX as a logit index of a classifier with `config.num_labels` labels."""
    labels = {int(i): name for i, name in (config.id2label or {}).items()}
    if str(label).lstrip("-").isdigit():
        index = int(label)
    else:
        index = next((i for i, name in labels.items() if name == label), None)
        if index is None:
            index = next((i for i, name in labels.items() if name.lower() == str(label).lower()), None)
    if index is None or not 0 <= index < config.num_labels:
        raise InputError(f"--reward_label {label!r}: {path} has no such label; its labels are {label_list(config)}")
    return index


def load_reward_model(path, device, dtype="auto", input_format="auto", label=None):
    """A RewardModel from a folder: get_score() remote-code models or sequence classifiers (decoder or
    encoder). `dtype` is a torch dtype or a --reward_dtype name; `input_format` and `label` are
    --reward_input and --reward_label. auto: models with get_score are scored through it; a tokenizer
    with a chat template uses chat; otherwise a 1-label model uses pair, a chosen label text."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    if not path or not os.path.isdir(path):
        raise MissingFileError(f"--reward_model_path {path!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"--reward_model_path {path!r}: not a model folder (no config.json)")
    raw = json.load(open(os.path.join(path, "config.json")))
    if isinstance(dtype, str):
        dtype = resolve_reward_dtype(dtype, raw, device)
    remote = trusts_remote_code(path, "reward model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
        if remote and "AutoModelForSequenceClassification" not in raw["auto_map"]:
            model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=remote)
    except Exception as e:
        raise InputError(f"--reward_model_path {path!r}: could not load a reward model ({e})") from e
    check_rope_base(path, config, "--reward_model_path")
    get_score = hasattr(model, "get_score")
    num_labels = getattr(config, "num_labels", 1)
    if label is not None and not get_score:
        label = reward_label_index(label, config, path)
    elif num_labels != 1 and not get_score:
        raise InputError(f"--reward_model_path {path!r} has {num_labels} labels; choose the one to score with "
                         f"--reward_label NAME or INDEX ({label_list(config)})")
    if input_format == "auto":
        input_format = ("get_score" if get_score else "chat" if tokenizer.chat_template else
                        "pair" if label is None else "text")
    elif get_score:
        raise InputError(f"--reward_input {input_format}: {path} scores through its own get_score(); use auto")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model.to(device).eval().requires_grad_(False), tokenizer, input_format, label or 0, path)


# ----------------------------------------------------------------------------- rule rewards and the hybrid reward
CHATML_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\s+(.*?)<\|im_end\|>", re.DOTALL)
FORMAT = [re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL),
          re.compile(r"^<think>\n.*?\n</think>\n\n<answer>\n.*?\n</answer>$", re.DOTALL)]
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_ok(response):
    """The exact reasoning layout: <think>, a line, </think>, <answer>, a line, </answer>."""
    return any(f.match(response) for f in FORMAT)


def tags_complete(response):
    return all(response.count(tag) == 1 for tag in TAGS)


def extract_answer(response):
    """Stripped content of the first <answer>...</answer> span, or None: what MiniMind2's answer-only reward-model
    blend scores (docs/minimind.md "MiniMind2's reward rules"). "The answer" checked against ground truth is final_answer's."""
    match = ANSWER.search(response)
    return match.group(1).strip() if match else None


def final_answer(response):
    """THE answer of a response, the one definition for --correctness_reward and the held-out accuracy: the
    stripped content of the first <answer>...</answer> span; else the stripped text after the last </think>;
    else the stripped response."""
    answer = extract_answer(response)
    if answer is not None:
        return answer
    return response.rpartition("</think>")[2].strip()  # no </think>: the whole response


def is_correct(response, truth):
    """Whether final_answer(response) equals the ground truth (stripped); never with no ground truth."""
    return truth is not None and final_answer(response) == truth.strip()


REWARD_RULES = ("minimind2", "minimind3", "minimind3_cjk", "minimind3_agent", "none")
RULE_PARTS = dict(minimind2=("format", "tags"), minimind3=("length", "think", "repetition"),
                  minimind3_cjk=("length", "think", "repetition"))
ASSISTANT_START = "<|im_start|>assistant\n"
# minimind-3's repetition tokens (docs/minimind.md "minimind-3's reward rules"): Unicode words and single punctuation marks; a run of CJK
# characters without spaces is one token
WORD_TOKENS = re.compile(r"\w+|[^\w\s]")
# minimind3_cjk (this project's variant, not MiniMind's): the same, except that every CJK ideograph or kana
# is a token of its own, so that repetition inside Chinese or Japanese text without spaces is seen
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_TOKENS = re.compile(rf"[{CJK}]|[^\W{CJK}]+|[^\w\s]")


def default_reward_rules(config):
    """The rules of the policy's own generation: MiniMind2's or minimind-3's; none for other models."""
    return f"minimind{config.version}" if config.model_type == "minimind" else "none"


def scored_turn(prompt, response):
    """The assistant turn MiniMind2's rules (and the reward model under `none`) score. A response that continues
    a <think> block the prompt opened (minimind-3's open_thinking) is scored with that opening, as the full
    turn; a prompt that closed an empty think block (or has none) leaves the response as it is. minimind-3's
    rules do not use it: they read the response as generated, as minimind-3 does."""
    opened = prompt[prompt.rfind(ASSISTANT_START) + len(ASSISTANT_START):] if ASSISTANT_START in prompt else ""
    return opened + response if "<think>" in opened and "</think>" not in opened else response


def repetition(text, tokens=WORD_TOKENS, n=3, cap=0.5):
    """minimind-3's repetition penalty (docs/minimind.md "minimind-3's reward rules"), >= 0: over the n-grams (trigrams) of the tokens of
    the lower-cased text, min(cap, (n-grams - distinct n-grams) * cap * 2 / n-grams); 0 with no n-gram.
    `tokens`: WORD_TOKENS (minimind-3's) or CJK_TOKENS (minimind3_cjk)."""
    units = tokens.findall(text.lower())
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def minimind2_rules(turn):
    """MiniMind2's PPO (docs/minimind.md "MiniMind2's reward rules"): 0.5 for the exact layout, 0.25 per tag present exactly once.
    Returns (parts, the <answer> content the reward model also scores alone, or None)."""
    return dict(format=0.5 * format_ok(turn), tags=0.25 * sum(turn.count(t) == 1 for t in TAGS)), extract_answer(turn)


def minimind3_rules(response, tokens=WORD_TOKENS):
    """minimind-3's PPO (docs/minimind.md "minimind-3's reward rules"). Returns (parts, the answer the reward model scores).

    The text measured is the response exactly as generated (decoded), as minimind-3 measures it: NOT
    scored_turn. With open_thinking the prompt ends with `<think>\n`, so the response starts inside the think
    block and its thinking part is the text before its first </think>; with the think block closed by the
    prompt the response is the answer alone (no </think>: no think part). An opening <think> the model writes
    itself stays in the measured text, as it does in minimind-3's.
    - length: +0.5 if the stripped response is 20..800 characters, else -0.5;
    - think (0 without </think>): split at the first </think>; +1.0 if the stripped thinking part is 20..300
      characters, else -0.5; plus +0.25 if </think> occurs exactly once, else -0.25;
    - the answer: the stripped text after the first </think>, or the whole response as it is;
    - repetition: minus repetition(answer, tokens), at most 0.5.
    """
    parts = dict(length=0.5 if 20 <= len(response.strip()) <= 800 else -0.5, think=0.0)
    answer = response
    if "</think>" in response:
        thinking, answer = response.split("</think>", 1)
        parts["think"] = ((1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5)
                          + (0.25 if response.count("</think>") == 1 else -0.25))
        answer = answer.strip()
    parts["repetition"] = -repetition(answer, tokens)
    return parts, answer


HISTORY_FRAMING = "\n以上是对话历史。我的新问题是：\n"  # minimind-3's, between the history and the new question


def collapse_history(messages):
    """minimind-3 scores (history as one user message, answer) (docs/minimind.md "minimind-3's reward rules"): every message but the last
    as `{role}: {content}` lines joined by newlines, then `{history}` + HISTORY_FRAMING + `{last content}`;
    just the last message's content when there is no history. Returns [that user message]."""
    history = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    last = messages[-1]["content"] if messages else ""
    return [{"role": "user", "content": f"{history}{HISTORY_FRAMING}{last}" if history else last}]


# ----------------------------------------------------------------------------- minimind-3's agent reward
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_SPAN = re.compile(f"{CALL_OPEN}(.*?){CALL_CLOSE}", re.DOTALL)
NUMERAL = r"[-+]?\d+(?:\.\d+)?"  # a plain decimal: no exponent, no leading dot
# a numeral standing alone in the text: no word character or dot just before or after it ("42." ending a
# sentence, "25km" and "是28度" hold none)
FREE_NUMERAL = re.compile(rf"(?<![\w.]){NUMERAL}(?![\w.])")
AGENT_CLIP = 3.0
AGENT_PARTS = ("tags", "length", "think", "rm", "repetition", "tool_calls", "gt", "unfinished", "clip")
RULE_PARTS["minimind3_agent"] = AGENT_PARTS
MINIMIND3_TOOLS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "minimind3_tools.py")


def gt_found(text, gt):
    """The values of `gt` that `text` contains, as a set (docs/minimind.md "minimind-3's agent reward")."""
    text = str(text)
    lowered = text.lower()
    numbers = [float(n) for n in FREE_NUMERAL.findall(text.replace(",", ""))]

    def contains(value):
        wanted = str(value).strip()
        if wanted and wanted.lower() in lowered:
            return True
        numeral = wanted.replace(",", "")
        return re.fullmatch(NUMERAL, numeral) is not None and any(abs(float(numeral) - n) < 1e-6 for n in numbers)

    return {value for value in gt if contains(value)}


def required_arguments_present(schema):
    """check(arguments) -> bool for a tool's JSON schema: every required parameter present, not None for
    number/integer ones, truthy for the others (docs/minimind.md "minimind-3's agent reward")."""
    parameters = schema.get("function", schema).get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = list(parameters.get("required") or ())

    def numeric(name):
        kind = (properties.get(name) or {}).get("type")
        return bool({"number", "integer"} & set(kind if isinstance(kind, list) else [kind]))

    tests = [(name, numeric(name)) for name in required]

    def check(arguments):
        if not tests:
            return True
        if not isinstance(arguments, dict):
            return False
        return all(arguments.get(name) is not None if is_number else bool(arguments.get(name))
                   for name, is_number in tests)

    return check


def tool_checks(schemas):
    """valid_arguments(name, arguments) for minimind3_agent_reward from tool schemas: required_arguments_present
    of the named tool's schema; False for a tool without a schema."""
    checks = {tool_name(schema): required_arguments_present(schema) for schema in schemas}
    return lambda name, arguments: name in checks and checks[name](arguments)


@functools.lru_cache(maxsize=None)
def minimind3_tool_checks():
    """tool_checks of MiniMind-3's six mock tools (examples/minimind3_tools.py, with the schemas --tools gives
    them): minimind3_agent_reward's default, MiniMind-3's own argument checks."""
    from tools import load_tools, tool_schemas
    return tool_checks(tool_schemas(load_tools(MINIMIND3_TOOLS_FILE)))


def answer_part(turn):
    """The stripped text after a turn's first </think>; the stripped turn without one."""
    return turn.split("</think>", 1)[-1].strip()


def tool_calls_in(text):
    """The JSON of every <tool_call>...</tool_call> span; spans that are not JSON are skipped."""
    calls = []
    for body in CALL_SPAN.findall(text):
        try:
            calls.append(json.loads(body.strip()))
        except (ValueError, RecursionError):
            pass
    return calls


def call_is_valid(call, tool_names, valid_arguments):
    """A JSON object naming one of `tool_names` whose arguments (a JSON string is parsed; unparsable: {})
    pass valid_arguments. Anything but an object is invalid (MiniMind-3 raises on it)."""
    if not isinstance(call, dict):
        return False
    name, arguments = call.get("name", ""), call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            arguments = {}
    return isinstance(name, str) and name in tool_names and bool(valid_arguments(name, arguments))


def minimind3_agent_reward(turns, gt, tool_names, unfinished, rm_score=None, valid_arguments=None):
    """MiniMind-3's agent-RL reward of one rollout (docs/minimind.md "minimind-3's agent reward").

    turns: the assistant text of each turn as generated; gt: the row's ground-truth values; tool_names: the
    row's tools; unfinished: still calling tools at the last turn; rm_score(answer) -> float: the reward model
    (no-call rollouts only); valid_arguments(name, arguments) -> bool: default minimind3_tool_checks().
    Returns (total clipped to [-3, 3], parts): every name of AGENT_PARTS, 0.0 where a rule does not apply;
    `clip` is the clipping's change, so the parts sum to the total.
    """
    turns = list(turns) or [""]
    valid_arguments = valid_arguments or minimind3_tool_checks()
    gt = list(gt or ())
    answers = [answer_part(turn) for turn in turns]
    last_turn, last_answer = turns[-1], answers[-1]
    calls = [call for answer in answers for call in tool_calls_in(answer)]
    parts = dict.fromkeys(AGENT_PARTS, 0.0)
    parts["tags"] = -0.5 * sum(abs(a.count(CALL_OPEN) - a.count(CALL_CLOSE)) for a in answers)
    if not calls:
        parts["length"] = 0.5 if 5 <= len(last_turn.strip()) <= 800 else -0.5
        if "</think>" in last_turn:
            thinking = last_turn.split("</think>", 1)[0].strip()
            parts["think"] = ((1.0 if 20 <= len(thinking) <= 300 else -0.5)
                              + (0.25 if last_turn.count("</think>") == 1 else -0.25))
        if rm_score is not None:
            parts["rm"] = float(rm_score(last_answer))
        parts["repetition"] = -repetition(last_answer)
    else:
        names = set(tool_names or ())
        valid = sum(call_is_valid(call, names, valid_arguments) for call in calls)
        gap = abs(valid - len(gt)) + (len(calls) - valid)
        parts["tool_calls"] = 0.5 if gap == 0 else -0.5 * gap
        final_text = "" if unfinished else last_answer.rsplit(CALL_CLOSE, 1)[-1]
        if gt:
            parts["gt"] = 2.5 * len(gt_found(final_text, gt)) / len(gt)
        if unfinished:
            parts["unfinished"] = -0.5
        parts["repetition"] = -repetition(final_text or last_answer)
    unclipped = sum(parts.values())
    total = min(AGENT_CLIP, max(-AGENT_CLIP, unclipped))
    parts["clip"] = total - unclipped
    return total, {name: value + 0.0 for name, value in parts.items()}  # + 0.0: no -0.0 in the logs



class Reward:
    """What a rollout's responses earn: (total [B], parts {name: [B]}). The total is the sum of the parts whose
    name has no slash; a part named `<part>/<key>` (e.g. `custom/acc`: an entry a verl function's dict or an
    OpenRLHF function's `extra_logs` returned beside its score) is a diagnostic, logged like every part
    (`reward_custom/acc` in metrics.jsonl and samples.jsonl) but not added to the total.

    With reasoning off there are no rules.
    - minimind2 (MiniMind2's PPO): `format` and `tags` of the full assistant turn (scored_turn); `rm` is the
      reward model's clipped score of the whole chat, blended 0.4 * whole + 0.6 * answer-only when an
      <answer> span exists.
    - minimind3 (minimind-3's PPO, minimind3_rules): `length`, `think` and `repetition` of the response as
      generated; `rm` is the clipped score of (the history collapsed into one user message, the answer).
    - minimind3_cjk: minimind3 with repetition counted over CJK characters (this project's variant).
    - none (transformers policies' default), or reasoning off: no rules; `rm` of the whole chat.
    `missing_eos` (--missing_eos_penalty P > 0): -P for a response that hit the length limit without ending its
    turn. With no reward model there is no `rm`. rm_clip: scores are clipped to [-rm_clip, rm_clip]; 0 = no
    clipping. `correctness` (W > 0): W when the response is_correct against the data row's `answer` (its
    final_answer, the held-out accuracy's definition). Each function from a file (RewardFunction: verl's, TRL's,
    OpenRLHF's or this project's signature) adds `custom` (several: `custom_<function>`); functions routed by
    data_source (RoutedRewards) form the one part `custom` together (reward_parts).
    """

    def __init__(self, reward_model=None, rules="minimind2", reasoning=True, rm_clip=3.0, batch_size=32,
                 correctness=0.0, functions=(), missing_eos_penalty=0.0):
        if rules not in REWARD_RULES:
            raise InputError(f"--reward_rules {rules!r}: expected one of {', '.join(REWARD_RULES)}")
        if not rm_clip >= 0:  # NaN too
            raise InputError(f"--rm_clip {rm_clip}: expected 0 (no clipping) or a positive bound")
        self.reward_model, self.rules, self.reasoning, self.rm_clip = reward_model, rules, reasoning, rm_clip
        self.batch_size, self.correctness, self.functions = batch_size, correctness, list(functions)
        self.function_parts = reward_parts(self.functions)  # [(part name, scorer)]
        self.missing_eos_penalty = missing_eos_penalty

    def __call__(self, prompts, responses, answers=None, messages=None, has_eos=None, rows=None, transcripts=None,
                 unfinished=None, tools=None):
        """prompts: the rendered prompt texts; messages: each row's chat as the data gave it (None for
        plain-text rows); has_eos [B] bool: the response ended its turn (for `missing_eos`); rows: each data row's
        other columns (RLAIFDataset's `row`; None where unknown), for reward functions. The reward model's
        query is read back from a ChatML prompt (MiniMind's, Qwen's), keeping a system turn the template added,
        as MiniMind's PPO does; a prompt in another template is taken from its messages, and plain text is the
        user's query itself.

        With tools (multi-turn rollouts) `transcripts` holds each response's turns as messages (assistant
        turns and tool results), `unfinished` [B] whether it still called tools at its last turn and `tools` each
        prompt's tool schemas. The rules, the reward model and --correctness_reward then read the final assistant
        turn; reward functions read the whole response (every turn and tool result, as rendered), TRL's functions
        the turns as `completions`; minimind3_agent reads every turn (agent_parts)."""
        B = len(responses)
        functions_read = responses
        if transcripts is not None:
            responses = [t[-1]["content"] if t and t[-1]["role"] == "assistant" else "" for t in transcripts]
        answers = [a or None for a in answers] if answers is not None else [None] * B
        given = messages or [None] * B
        chats, answer_chats, answer_rows, rule_parts = [], [], [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            # a chat ending with an assistant message that the prompt leaves open (TRL's continued `prompt`): the
            # scored turn is that message's text and the response (a ChatML prompt's unfinished turn is not read
            # back as a turn); a finished one (verl's rows) is part of the history
            last = given[i][-1] if given[i] else None
            reply = last["content"] if last and last["role"] == "assistant" and \
                prompt.endswith(last["content"].strip()) else ""
            messages = [{"role": r, "content": c.strip()} for r, c in CHATML_TURN.findall(prompt)] or \
                (given[i][:-1] if reply else given[i]) or [{"role": "user", "content": prompt}]
            turn = reply + response if reply else scored_turn(prompt, response)
            if self.rules == "minimind3_agent" and self.reasoning:
                chats.append(collapse_history(messages))  # the query; agent_parts adds the answer it scores
            elif not self.reasoning or self.rules == "none":
                chats.append(messages + [{"role": "assistant", "content": turn}])
            elif self.rules in ("minimind3", "minimind3_cjk"):
                tokens = CJK_TOKENS if self.rules == "minimind3_cjk" else WORD_TOKENS
                parts, answer = minimind3_rules(response, tokens)  # the response as generated, as minimind-3
                chats.append(collapse_history(messages) + [{"role": "assistant", "content": answer}])
                rule_parts.append(parts)
            else:
                parts, answer = minimind2_rules(turn)
                chats.append(messages + [{"role": "assistant", "content": turn}])
                if answer is not None:
                    answer_chats.append(messages + [{"role": "assistant", "content": answer}])
                    answer_rows.append(i)
                rule_parts.append(parts)
        if self.rules == "minimind3_agent" and self.reasoning:  # the reward model is one of its rules' parts
            rule_parts = self.agent_parts(chats, transcripts, unfinished, tools, rows, responses)
        parts = {name: torch.tensor([p[name] for p in rule_parts], dtype=torch.float32) for name in
                 (rule_parts[0] if rule_parts else {})}
        if self.reward_model is not None and "rm" not in parts:
            parts["rm"] = self.reward_model_part(chats, answer_chats, answer_rows, responses)
        if self.correctness:
            parts["correctness"] = torch.tensor([self.correctness * is_correct(r, a)
                                                 for r, a in zip(responses, answers)], dtype=torch.float32)
        rows = list(rows) if rows is not None else [None] * B
        for name, scorer in self.function_parts:
            parts[name], diagnostics = scorer.score(prompts, functions_read, answers, given, rows,
                                                    completions=transcripts)
            parts.update((f"{name}/{key}", values) for key, values in sorted(diagnostics.items()))
        if not parts:
            raise InputError("no reward: --reward_model_path none with --reasoning 0, no --correctness_reward "
                             "and no --reward_fn")
        if self.missing_eos_penalty and has_eos is not None:  # TRL's missing_eos_penalty, a part of its own
            parts["missing_eos"] = -self.missing_eos_penalty * (~has_eos.cpu()).float()
        return sum(values for name, values in parts.items() if "/" not in name), parts  # diagnostics: not added

    def agent_parts(self, queries, transcripts, unfinished, tools, rows, responses):
        """minimind-3's agent reward of each response (minimind3_agent_reward): its assistant turns, its row's `gt`
        and tools (arguments checked against the prompt's own tool schemas), `unfinished`; the reward model scores
        (query, answer) of the rollouts without a tool call, clipped by --rm_clip. Returns [parts]."""
        if transcripts is None:
            raise InputError("--reward_rules minimind3_agent scores tool conversations: it needs --tools FILE.py")
        B = len(transcripts)
        tools = tools or [None] * B
        rows = rows or [None] * B

        def score(i, rm_score):
            turns = [m["content"] for m in transcripts[i] if m["role"] == "assistant"]
            gt = (rows[i] or {}).get("gt") or []
            names = [tool_name(t) for t in tools[i] or ()]
            return minimind3_agent_reward(turns, gt if isinstance(gt, list) else [gt], names, bool(unfinished[i]),
                                          rm_score, tool_checks(tools[i]) if tools[i] else None)[1]

        scored = {}  # sample -> the answer the reward model scores (rollouts without a tool call)

        def wanted(i):  # a first pass notes the answers to score
            def note(answer):
                scored[i] = answer
                return 0.0
            return note if self.reward_model is not None else None
        parts = [score(i, wanted(i)) for i in range(B)]
        if scored:
            chats = [queries[i] + [{"role": "assistant", "content": answer}] for i, answer in scored.items()]
            rm = self.reward_model_part(chats, [], [], [responses[i] for i in scored])
            for (i, _), value in zip(scored.items(), rm.tolist()):
                parts[i] = score(i, lambda answer: value)
        return parts

    def describe(self):
        """What this reward is made of, in one line (the start-up log)."""
        parts = []
        if self.reasoning and self.rules != "none":
            parts.append(f"rules {self.rules} ({', '.join(RULE_PARTS[self.rules])})")
        if self.reward_model is not None:
            clip = f", clipped to +-{self.rm_clip:g}" if self.rm_clip else ""
            parts.append(f"rm: the reward model {self.reward_model.path} ({self.reward_model.input_format}{clip})")
        if self.correctness:
            parts.append(f"correctness: {self.correctness:g} for an answer equal to the ground truth")
        parts += [f"{name}: {scorer.describe()}" for name, scorer in self.function_parts]
        if self.missing_eos_penalty:
            parts.append(f"missing_eos: -{self.missing_eos_penalty:g} without an EOS")
        return " + ".join(parts)

    def reward_model_part(self, chats, answer_chats, answer_rows, responses):
        B = len(chats)
        scores = self.reward_model.score(chats + answer_chats, self.batch_size)
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            j = int(bad[0])
            row = j if j < B else answer_rows[j - B]
            raise NonFiniteRolloutError(f"reward model returned {scores[j].item()} for sample {row} "
                                        f"(response {responses[row][:80]!r})")
        clip = self.rm_clip or math.inf  # 0: no clipping
        rm = scores[:B].clamp(-clip, clip)
        if answer_rows:
            rm[answer_rows] = 0.4 * rm[answer_rows] + 0.6 * scores[B:].clamp(-clip, clip)
        return rm


# ----------------------------------------------------------------------------- the reward's flags
DEMO_REWARD_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "reward_model")


def add_reward_flags(parser):
    """The flags that describe a Reward, shared by train_ppo.py and scripts/eval_policy.py (same names, same
    meaning): the reward model and how it reads, the rules, ground truth and functions from files."""
    group = parser.add_argument_group("reward")
    group.add_argument("--reward_model_path", default=None,
                       help="local folder: a get_score() model (internlm2-reward style) or a sequence classifier "
                            "(decoder or encoder); 'none': rules, --correctness_reward and --reward_fn only. Default: "
                            "the demo's reward model (demo/reward_model) for the demo's data without --reward_fn, "
                            "else none")
    group.add_argument("--reward_input", default="auto", choices=list(REWARD_INPUTS),
                       help="how the reward model reads (query, response): chat = its tokenizer's chat template, "
                            "pair = tokenizer(query, response), text = tokenizer(query + response), both with "
                            "special tokens; auto: get_score models through their API, then chat if the tokenizer "
                            "has a template, else pair (1 label) or text (--reward_label)")
    group.add_argument("--reward_label", default=None,
                       help="score with the raw logit of this label (name or index), as TRL's sentiment example "
                            "takes POSITIVE; required for multi-label models (default: a 1-label model's logit)")
    group.add_argument("--reward_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: float32 on CPU; on CUDA the model's own dtype when its config names one, else "
                            "bfloat16 where the GPU supports it, else float32")
    group.add_argument("--reward_batch_size", type=int, default=32,
                       help="chats per reward-model forward (get_scores calls too)")
    group.add_argument("--reasoning", type=int, default=1, choices=[0, 1],
                       help="1: the rules of --reward_rules + RM; 0: RM only")
    group.add_argument("--reward_rules", default=None, choices=list(REWARD_RULES),
                       help="minimind2: format + tags, RM blended whole/answer-only; minimind3: length + thinking + "
                            "repetition, RM of (history as one user message, answer); minimind3_cjk: minimind3 with "
                            "repetition counted per CJK character (this project's); minimind3_agent (with --tools): "
                            "minimind-3's agent reward of every turn, the row's gt and tools, RM on answers "
                            "without a tool call; none: no rules, RM of the whole chat. Default: none with --reward_fn, else the generation of MiniMind weights (none for "
                            "other models)")
    group.add_argument("--rm_clip", type=float, default=3.0,
                       help="reward-model scores are clipped to [-rm_clip, rm_clip]; 0 = no clipping")
    group.add_argument("--correctness_reward", type=float, default=0.0,
                       help="W: add W when the answer (the <answer> content, else the text after the last </think>, "
                            "else the stripped response: the held-out accuracy's rule) equals the row's ground truth "
                            "(--label_key)")
    group.add_argument("--reward_fn", action="append", default=[], metavar="[SOURCE=]FILE.py:FUNCTION",
                       help="a reward function, recognised by its parameters: verl's compute_score(data_source, "
                            "solution_str, ground_truth, extra_info=None), TRL's reward_func(prompts, completions, "
                            "**kwargs), OpenRLHF's reward_func(queries, prompts, labels) or function(prompts, "
                            "responses, answers); the part custom (several: custom_<function>); SOURCE= routes it to "
                            "the rows whose data_source is SOURCE (a plain one beside routed ones is the default); "
                            "may be repeated (default: none)")
    group.add_argument("--missing_eos_penalty", type=float, default=0.0,
                       help="subtracted when a response hits --max_gen_len without ending its turn (logged as the "
                            "part reward_missing_eos)")
    return group


def default_reward_model(args, demo_data):
    """--reward_model_path's default: the demo's reward model only for the demo's data and no --reward_fn (it knows
    nothing of anyone else's task); otherwise none unless one is named."""
    if args.reward_model_path is None:
        args.reward_model_path = DEMO_REWARD_MODEL if demo_data and not args.reward_fn else "none"


def reward_model_from_flags(args, device):
    """The reward model --reward_model_path names (None for 'none'), loaded as --reward_* say."""
    if args.reward_model_path.lower() == "none":
        return None
    return load_reward_model(args.reward_model_path, device, args.reward_dtype, args.reward_input, args.reward_label)


def build_reward(args, policy_config, reward_model, functions):
    """The Reward of add_reward_flags' flags for a policy with `policy_config` (--reward_rules defaults to its
    generation's, and to none beside a --reward_fn: a user's function is their task's reward, MiniMind's format
    rules are not added to it unless named), around an already loaded reward model and functions from files."""
    rules = args.reward_rules or ("none" if args.reward_fn else default_reward_rules(policy_config))
    return Reward(reward_model, rules, bool(args.reasoning), args.rm_clip, args.reward_batch_size,
                  args.correctness_reward, functions, args.missing_eos_penalty)
