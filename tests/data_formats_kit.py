"""Files as verl, TRL and OpenRLHF users have them, written the way the README's "Coming from verl, TRL or
OpenRLHF" section describes (tests/test_data_formats.py runs its commands on them), and the README commands."""
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Coming from verl, TRL or OpenRLHF"

# 16 arithmetic questions, each with a tag that no other question contains, so that a logged prompt names its row
QUESTIONS = [(f"[q{i:02d}] What is {a} + {b}?", str(a + b)) for i, (a, b) in
             enumerate((a, b) for a in range(2, 10) for b in (3, 7))]
VERL_INSTRUCTION = " Let's think step by step and output the final answer after \"####\"."


def readme_commands():
    """The section's `python train_ppo.py ...` commands as argument lists (train_ppo.py's flags only)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```bash\n(python train_ppo\.py .*?)```", section, re.S)
    return [shlex.split(block.replace("\\\n", " "))[2:] for block in blocks]


def readme_command(data_path):
    """The README command that trains on `data_path`."""
    found = [cmd for cmd in readme_commands() if cmd[cmd.index("--data_path") + 1] == data_path]
    assert len(found) == 1, (data_path, readme_commands())
    return found[0]


def question_of(prompt):
    """The row tag a logged prompt holds."""
    return re.search(r"\[q\d\d\]", prompt).group(0)


# ----------------------------------------------------------------------------- verl
def verl_rows(split, source="openai/gsm8k", questions=QUESTIONS):
    """Rows as verl's examples/data_preprocess/gsm8k.py makes them."""
    return [{"data_source": source,
             "prompt": [{"role": "user", "content": question + VERL_INSTRUCTION}],
             "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": truth},
             "extra_info": {"split": split, "index": i, "question": question}}
            for i, (question, truth) in enumerate(questions)]


def write_verl_parquet(folder):
    """gsm8k/train.parquet and gsm8k/test.parquet, written by datasets as verl's preprocessing writes them."""
    import datasets
    (folder / "gsm8k").mkdir(parents=True, exist_ok=True)
    for split, questions in (("train", QUESTIONS), ("test", QUESTIONS[:4])):
        rows = datasets.Dataset.from_list(verl_rows(split, questions=questions))
        rows.to_parquet(folder / "gsm8k" / f"{split}.parquet")


def write_verl_concatenated(folder):
    """gsm8k_math: verl's GSM8K rows and MATH-like rows joined by concatenate_datasets, saved by save_to_disk."""
    import datasets
    gsm8k = datasets.Dataset.from_list(verl_rows("train", questions=QUESTIONS[:8]))
    math_ = datasets.Dataset.from_list(verl_rows("train", "DigitalLearningGmbH/MATH-lighteval", QUESTIONS[8:]))
    datasets.concatenate_datasets([gsm8k, math_]).save_to_disk(str(folder / "gsm8k_math"))


GSM8K_REWARD = '''import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's custom reward signature: a dict with the score and diagnostics."""
    found = re.search(r"#### *(-?[0-9.,]+)", solution_str)
    acc = float(found is not None and found.group(1).replace(",", "") == ground_truth)
    shaping = 0.01 * (len(solution_str) % 10) + 0.001 * extra_info["index"] + 0.5 * (data_source == "openai/gsm8k")
    return {"score": acc + shaping, "acc": acc, "chars": len(solution_str), "pred": "not a number"}
'''

MATH_REWARD = '''def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A plain float, as verl's math scorers return."""
    return 2.0 + float(ground_truth in solution_str) + 0.01 * len(solution_str) + 0.001 * len(extra_info["question"])
'''


def expected_gsm8k(response, row):
    """GSM8K_REWARD's score and diagnostics, computed here from the row's fields."""
    found = re.search(r"#### *(-?[0-9.,]+)", response)
    acc = float(found is not None and found.group(1).replace(",", "") == row["reward_model"]["ground_truth"])
    score = acc + 0.01 * (len(response) % 10) + 0.001 * row["extra_info"]["index"] + \
        0.5 * (row["data_source"] == "openai/gsm8k")
    return score, {"acc": acc, "chars": float(len(response))}


def expected_math(response, row):
    return 2.0 + float(row["reward_model"]["ground_truth"] in response) + 0.01 * len(response) + \
        0.001 * len(row["extra_info"]["question"])


# ----------------------------------------------------------------------------- TRL
def trl_rows():
    """TRL conversational rows in `messages` form (the last assistant message is the completion) with a
    `ground_truth` column and one more column, as Dataset.to_json writes them."""
    return [{"messages": [{"role": "system", "content": "Answer with a number."},
                          {"role": "user", "content": question},
                          {"role": "assistant", "content": f"The answer is {truth}."}],
             "ground_truth": truth, "level": i % 3}
            for i, (question, truth) in enumerate(QUESTIONS)]


def write_trl_jsonl(folder):
    import datasets
    datasets.Dataset.from_list(trl_rows()).to_json(folder / "math.jsonl")  # JSON lines, TRL users' to_json


TRL_REWARDS = '''def accuracy_reward(prompts, completions, ground_truth, **kwargs):
    """TRL's reward signature; conversational data: prompts are message lists, completions [assistant message]."""
    assert "messages" not in kwargs and "prompt" not in kwargs, sorted(kwargs)
    rewards = []
    for prompt, completion, truth, level in zip(prompts, completions, ground_truth, kwargs["level"]):
        assert completion[0]["role"] == "assistant" and prompt[-1]["role"] == "user", (prompt, completion)
        text = completion[0]["content"]
        rewards.append(float(truth in text) + 0.01 * len(text) + 0.1 * level + 0.001 * len(prompt[-1]["content"]))
    return rewards
'''


def expected_trl(response, row):
    question = row["messages"][1]["content"]
    return float(row["ground_truth"] in response) + 0.01 * len(response) + 0.1 * row["level"] + 0.001 * len(question)


# ----------------------------------------------------------------------------- OpenRLHF
def openrlhf_rows():
    return [{"context_messages": [{"role": "user", "content": question}], "label": truth, "source": "arith"}
            for question, truth in QUESTIONS]


def write_openrlhf_jsonl(folder):
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in openrlhf_rows())


OPENRLHF_REWARD = '''import torch


def reward_func(queries, prompts, labels):
    """OpenRLHF's reward signature: queries are prompt + response."""
    responses = [q[len(p):] for q, p in zip(queries, prompts)]
    assert all(q.startswith(p) for q, p in zip(queries, prompts))
    rewards = torch.tensor([float(label in r) + 0.01 * len(r) for r, label in zip(responses, labels)])
    return {"rewards": rewards, "scores": rewards.clamp(0, 0.05),
            "extra_logs": {"query_chars": torch.tensor([float(len(q)) for q in queries])}}
'''


def expected_openrlhf(prompt, response, row):
    reward = float(row["label"] in response) + 0.01 * len(response)
    return reward, {"scores": min(max(reward, 0.0), 0.05), "query_chars": float(len(prompt + response))}
