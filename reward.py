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


def calculate_rewards(prompts, responses, reward_model, reward_tokenizer, reasoning=True, rm_clip=3.0,
                      batch_size=32):
    """Hybrid reward per response: (total [B], {"format", "tags", "rm": [B]}).

    reasoning: 0.5 for the exact <think>/<answer> layout, 0.25 per tag present exactly once,
    plus the clipped RM score, blended 0.4 * whole response + 0.6 * answer-only when an
    <answer> span exists (MiniMind's PPO reward). Otherwise: the clipped RM score alone.
    """
    B = len(responses)
    chats, answer_chats, answer_rows = [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        messages = [{"role": r, "content": c.strip()} for r, c in CHATML_TURN.findall(prompt)]
        chats.append(messages + [{"role": "assistant", "content": response}])
        answer = ANSWER.search(response) if reasoning else None
        if answer:
            answer_chats.append(messages + [{"role": "assistant", "content": answer.group(1).strip()}])
            answer_rows.append(i)
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
    fmt, tags = torch.zeros(B), torch.zeros(B)
    if reasoning:
        for i, response in enumerate(responses):
            fmt[i] = 0.5 * format_ok(response)
            tags[i] = 0.25 * sum(response.count(t) == 1 for t in TAGS)
    return fmt + tags + rm, {"format": fmt, "tags": tags, "rm": rm}
