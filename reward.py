"""Rewards for PPO: reward-model loading and scoring, and MiniMind's rule rewards.

Used by train_ppo.py (rollouts), evaluation.py (held-out evaluation) and the scripts. A
reward is (total [B], parts {name: [B]}); every part is logged on its own.
"""
import json
import os
import re

import torch

from trainer_utils import Logger


class NonFiniteRolloutError(ValueError):
    """A NaN or infinite reward or value in a rollout: the trainer gives that rollout no update."""


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


def load_reward_model(path, device, dtype="auto"):
    """Load a reward model folder: get_score() remote-code models or 1-label sequence classifiers.
    `dtype` is a torch dtype or a --reward_dtype name."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"--reward_model_path {path!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--reward_model_path {path!r}: not a model folder (no config.json)")
    raw = json.load(open(os.path.join(path, "config.json")))
    if isinstance(dtype, str):
        dtype = resolve_reward_dtype(dtype, raw, device)
    remote = "auto_map" in raw
    if remote:
        Logger(f"note: trust_remote_code enabled for the reward model folder {path} only")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
        if remote and "AutoModelForSequenceClassification" not in raw["auto_map"]:
            model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=remote)
    except Exception as e:
        raise ValueError(f"--reward_model_path {path!r}: could not load a reward model ({e})") from e
    if not hasattr(model, "get_score") and getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"--reward_model_path {path!r}: expected one output label, found {config.num_labels}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer



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
    """Stripped content of the first <answer>...</answer> span, or None."""
    match = ANSWER.search(response)
    return match.group(1).strip() if match else None


def answer_correct(response, answer):
    return extract_answer(response) == answer.strip()


@torch.no_grad()
def score_chats(reward_model, reward_tokenizer, chats, batch_size=32):
    """Reward-model score [N] for each chat (a list of {role, content} messages), `batch_size` chats
    per forward: one padded batch of every chat would grow memory with the rollout."""
    return torch.cat([score_batch(reward_model, reward_tokenizer, chats[i:i + batch_size])
                      for i in range(0, len(chats), batch_size)])


def score_batch(reward_model, reward_tokenizer, chats):
    """Scores [N] of one batch of chats, with gradients if enabled (scripts/build_demo.py trains through it)."""
    if hasattr(reward_model, "get_scores"):  # internlm2-reward style: one padded batch per call
        return torch.tensor(reward_model.get_scores(reward_tokenizer, chats), dtype=torch.float32).reshape(-1)
    if hasattr(reward_model, "get_score"):
        return torch.tensor([float(reward_model.get_score(reward_tokenizer, c)) for c in chats])
    if reward_tokenizer.chat_template:
        texts = [reward_tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    else:
        texts = ["\n".join(f"{m['role']}: {m['content']}" for m in c) for c in chats]
    reward_tokenizer.padding_side = "right"  # the classifier pools at the last non-pad token
    enc = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(reward_model.device) for k, v in enc.items()}
    return reward_model(**enc).logits[:, 0].float().cpu()


REWARD_RULES = ("minimind2", "minimind3")
ASSISTANT_START = "<|im_start|>assistant\n"
# repetition is counted over words, and over single characters in CJK text (no spaces there)
TEXT_UNITS = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9_]+|[^\sA-Za-z0-9_\u4e00-\u9fff]")


def scored_turn(prompt, response):
    """The assistant turn the rules score. A response that continues a <think> block the prompt opened
    (minimind-3's open_thinking) is scored with that opening, as the full turn; a prompt that closed an
    empty think block (or has none) leaves the response as it is."""
    opened = prompt[prompt.rfind(ASSISTANT_START) + len(ASSISTANT_START):] if ASSISTANT_START in prompt else ""
    return opened + response if "<think>" in opened and "</think>" not in opened else response


def repetition(text, n=3):
    """Share of repeated n-grams of words (CJK: characters) in `text`: 0 with none, towards 1 for a loop."""
    units = TEXT_UNITS.findall(text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def minimind2_rules(turn):
    """MiniMind2's PPO (MINIMIND_FACTS 6): 0.5 for the exact layout, 0.25 per tag present exactly once.
    Returns (parts, the <answer> content the reward model also scores alone, or None)."""
    return dict(format=0.5 * format_ok(turn), tags=0.25 * sum(turn.count(t) == 1 for t in TAGS)), extract_answer(turn)


def minimind3_rules(turn):
    """minimind-3's PPO (MINIMIND_FACTS 7): length, thinking and repetition. Returns (parts, the answer:
    the text after the first </think>, or the whole turn). The thinking part is measured without its
    opening <think> tag, which minimind-3's open_thinking prompts put in the prompt."""
    parts = dict(length=0.5 if 20 <= len(turn.strip()) <= 800 else -0.5, think=0.0)
    answer = turn.strip()
    if "</think>" in turn:
        thinking, _, rest = turn.partition("</think>")
        thinking = thinking.strip().removeprefix("<think>").strip()
        parts["think"] = ((1.0 if 20 <= len(thinking) <= 300 else -0.5)
                          + (0.25 if turn.count("</think>") == 1 else -0.25))
        answer = rest.strip()
    parts["repetition"] = -repetition(answer)
    return parts, answer


def collapse_history(messages):
    """minimind-3 scores (history as one user message, answer): a multi-turn chat becomes one user message."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages
    return [{"role": "user", "content": "\n".join(f"{m['role']}: {m['content']}" for m in messages)}]


def calculate_rewards(prompts, responses, reward_model, reward_tokenizer, reasoning=True, rm_clip=3.0,
                      batch_size=32, rules="minimind2"):
    """Reward per response: (total [B], parts {name: [B]}), the total the sum of the parts.

    The rules read the full assistant turn (scored_turn).
    - minimind2 (MiniMind2's PPO): `format` and `tags`, plus `rm`, the reward model's clipped score
      of the whole chat, blended 0.4 * whole + 0.6 * answer-only when an <answer> span exists.
    - minimind3 (minimind-3's PPO): `length`, `think` and `repetition`, plus `rm`, the clipped score
      of (the history collapsed into one user message, the answer).
    reasoning=False: `rm` alone, the clipped score of the whole chat.
    """
    if rules not in REWARD_RULES:
        raise ValueError(f"--reward_rules {rules!r}: expected one of {', '.join(REWARD_RULES)}")
    B = len(responses)
    chats, answer_chats, answer_rows, rule_parts = [], [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        messages = [{"role": r, "content": c.strip()} for r, c in CHATML_TURN.findall(prompt)]
        turn = scored_turn(prompt, response)
        if not reasoning:
            chats.append(messages + [{"role": "assistant", "content": turn}])
        elif rules == "minimind3":
            parts, answer = minimind3_rules(turn)
            chats.append(collapse_history(messages) + [{"role": "assistant", "content": answer}])
            rule_parts.append(parts)
        else:
            parts, answer = minimind2_rules(turn)
            chats.append(messages + [{"role": "assistant", "content": turn}])
            if answer is not None:
                answer_chats.append(messages + [{"role": "assistant", "content": answer}])
                answer_rows.append(i)
            rule_parts.append(parts)
    scores = score_chats(reward_model, reward_tokenizer, chats + answer_chats, batch_size)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        j = int(bad[0])
        row = j if j < B else answer_rows[j - B]
        raise NonFiniteRolloutError(f"reward model returned {scores[j].item()} for sample {row} "
                                    f"(response {responses[row][:80]!r})")
    rm = scores[:B].clamp(-rm_clip, rm_clip)
    if answer_rows:
        rm[answer_rows] = 0.4 * rm[answer_rows] + 0.6 * scores[B:].clamp(-rm_clip, rm_clip)
    parts = {name: torch.tensor([p[name] for p in rule_parts], dtype=torch.float32) for name in
             (rule_parts[0] if rule_parts else {})}
    parts["rm"] = rm
    return sum(parts.values()), parts
