"""Any reward a researcher brings: encoder classifiers scored as their authors score them, a chosen label,
rule-only rewards with ground truth, reward functions from files, and the critic on its own device."""
import json
import re

import pytest
import torch
from transformers import (BertForSequenceClassification, BertTokenizerFast, DistilBertForSequenceClassification,
                          DistilBertTokenizerFast)

import reward
import train_ppo
from children import timeless
from conftest import tiny_run_args
from reward import Reward, load_reward_model
from reward_functions import NonFiniteRolloutError, RewardFunction

def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def last_user_message(prompt):
    return re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S)[-1]


# ----------------------------------------------------------------------------- encoders, as their authors score
@pytest.mark.parametrize("model, extra, documented", [
    # OpenAssistant's usage: tokenizer(question, answer) -> logits[0]
    ("bert", [], lambda model, tok, q, a: model(**tok(q, a, return_tensors="pt")).logits[0, 0]),
    # TRL's sentiment usage: the POSITIVE label's raw logit on query + response
    ("distilbert", ["--reward_label", "POSITIVE"],
     lambda model, tok, q, a: model(**tok(q + a, return_tensors="pt")).logits[0, 1]),
])
def test_encoder_scores_equal_the_models_documented_usage(tiny_kit, encoder_rms, tmp_path, model, extra, documented):
    path = encoder_rms[model]
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "2", "--reward_model_path", path, "--reasoning", "0",
                      "--rm_clip", "1e9", "--log_samples", "4", *extra))
    samples = read_lines(tmp_path / "samples.jsonl")
    reference = (BertForSequenceClassification if model == "bert" else DistilBertForSequenceClassification
                 ).from_pretrained(path).eval()
    tokenizer = (BertTokenizerFast if model == "bert" else DistilBertTokenizerFast).from_pretrained(path)
    with torch.no_grad():
        for s in samples:  # one at a time, no padding: the model's own usage
            want = documented(reference, tokenizer, last_user_message(s["prompt"]), s["response"]).item()
            assert s["reward_rm"] == pytest.approx(want, abs=1e-5), s
    assert len({s["reward_rm"] for s in samples}) > 1  # the scores depend on the text


def test_auto_input_format_and_labels(encoder_rms, tiny_kit):
    assert load_reward_model(encoder_rms["bert"], "cpu").input_format == "pair"  # 1 label, no chat template
    assert load_reward_model(encoder_rms["distilbert"], "cpu", label="POSITIVE").input_format == "text"
    assert load_reward_model(encoder_rms["distilbert"], "cpu", label="1").label == 1
    assert load_reward_model(encoder_rms["distilbert"], "cpu", label="positive").label == 1
    assert load_reward_model(tiny_kit["reward_model"], "cpu").input_format == "chat"  # decoder with a template
    assert load_reward_model(encoder_rms["bert"], "cpu", input_format="text").input_format == "text"
    # a tokenizer that emits token_type_ids for a model without segment embeddings: they are left out
    bert_tokenizer = BertTokenizerFast.from_pretrained(encoder_rms["bert"])
    distil = load_reward_model(encoder_rms["distilbert"], "cpu", label="POSITIVE")
    with_types = type(distil)(distil.model, bert_tokenizer, "text", 1)
    chat = [[{"role": "user", "content": "what is 7 + 5?"}, {"role": "assistant", "content": "12"}]]
    assert "token_type_ids" in bert_tokenizer("what is 7 + 5?12")
    assert torch.allclose(with_types.score(chat), distil.score(chat))
    with pytest.raises(ValueError, match=r"has 2 labels; choose the one to score with --reward_label NAME or INDEX "
                                         r"\(0: NEGATIVE, 1: POSITIVE\)"):
        load_reward_model(encoder_rms["distilbert"], "cpu")
    with pytest.raises(ValueError, match=r"--reward_label 'NEUTRAL': \S+ has no such label; its labels are "
                                         r"0: NEGATIVE, 1: POSITIVE"):
        load_reward_model(encoder_rms["distilbert"], "cpu", label="NEUTRAL")


# ----------------------------------------------------------------------------- rule-only rewards, ground truth
PROMPT = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
GOOD = "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"


def test_correctness_reward_against_the_datas_answer():
    reward = Reward(None, correctness=2.0)  # no reward model: the rules and the ground truth
    responses = [GOOD, GOOD.replace("12\n</answer>", "13\n</answer>"), " 12 \n", "12", GOOD]
    total, parts = reward([PROMPT] * 5, responses, ["12", "12", "12", "13", None])
    assert set(parts) == {"format", "tags", "correctness"}
    # the <answer> content, or the stripped response without tags; a row without an answer earns nothing
    assert parts["correctness"].tolist() == [2.0, 0.0, 2.0, 0.0, 0.0]
    assert total.tolist() == [0.5 + 1.0 + 2.0, 0.5 + 1.0, 2.0, 0.0, 0.5 + 1.0]
    with pytest.raises(ValueError, match="no reward"):
        Reward(None, reasoning=False)([PROMPT], [GOOD])


def test_correctness_reward_needs_answers_in_the_data(tiny_kit, tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(line for line in open(tiny_kit["data"]) if '"answer"' not in line))
    with pytest.raises(ValueError, match=r"--correctness_reward 1\.0: \S+data\.jsonl has no `answer` field"):
        run(tiny_run_args(tiny_kit, tmp_path / "out", "--reward_model_path", "none", "--correctness_reward", "1",
                          "--data_path", str(tmp_path / "data.jsonl")))


# ----------------------------------------------------------------------------- reward functions from files
FUNCTIONS = '''
def length(prompts, responses, answers):
    return [len(r) / 100 for r in responses]

def echo_answers(prompts, responses, answers):
    return [0.0 if a is None else float(a) for a in answers]

def picky(prompts, responses, answers):
    if any("bad" in r for r in responses):
        raise KeyError("bad sample")
    return [1.0] * len(responses)

def short(prompts, responses, answers):
    return [1.0]

def words(prompts, responses, answers):
    return ["many"] * len(responses)

def nan(prompts, responses, answers):
    return [float("nan")] * len(responses)
'''


def test_reward_functions_from_a_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(FUNCTIONS)
    one = Reward(None, reasoning=False, functions=[RewardFunction(f"{path}:length")])
    total, parts = one([PROMPT] * 2, ["abc", "abcdef"], ["7", None])
    assert set(parts) == {"custom"} and parts["custom"].tolist() == pytest.approx([0.03, 0.06])
    two = Reward(None, functions=[RewardFunction(f"{path}:length"), RewardFunction(f"{path}:echo_answers")])
    total, parts = two([PROMPT] * 2, [GOOD, "x"], ["7", ""])  # "": a row without an answer arrives as None
    assert set(parts) == {"format", "tags", "custom_length", "custom_echo_answers"}
    assert parts["custom_echo_answers"].tolist() == [7.0, 0.0]
    assert total.tolist() == pytest.approx([0.5 + 1.0 + len(GOOD) / 100 + 7.0, 0.01])

    where = f"--reward_fn {path}:"
    for spec, error, message in [
        (f"{tmp_path / 'nope.py'}:f", FileNotFoundError, r"nope\.py:f: no such file"),
        (f"{path}:missing", ValueError, rf"{re.escape(where)}missing: \S+ defines no function 'missing'"),
        ("rewards.py", ValueError, "expected path/to/file.py:function"),
    ]:
        with pytest.raises(error, match=message):
            RewardFunction(spec)
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ValueError, match=r"broken\.py:f: loading \S+ failed \(ModuleNotFoundError"):
        RewardFunction(f"{tmp_path / 'broken.py'}:f")
    calls = [("picky", RuntimeError, r"picky raised KeyError: 'bad sample' \(sample 1: response 'a bad one'\)"),
             ("short", ValueError, r"short returned 1 values for 2 responses"),
             ("words", ValueError, r"words returned 'many' for sample 0 \(response 'ok'\): expected a number"),
             ("nan", NonFiniteRolloutError, r"nan returned nan for sample 0 \(response 'ok'\)")]
    for name, error, message in calls:
        with pytest.raises(error, match=re.escape(where) + message):
            RewardFunction(f"{path}:{name}")([PROMPT] * 2, ["ok", "a bad one"], [None, None])


def test_rule_only_run_with_a_reward_function_learns_on_the_demo_kit(tmp_path):
    """No reward model (none by default beside a --reward_fn): MiniMind2's format rules, named, plus a
    ground-truth function from a file. Held-out accuracy
    (greedy, 64 prompts) rises within 16 rollouts of 16 prompts (measured: 54.7% -> 89.1%)."""
    (tmp_path / "correct.py").write_text(
        "import re\n\n\ndef correct(prompts, responses, answers):\n"
        "    found = [re.search(r'<answer>(.*?)</answer>', r, re.S) for r in responses]\n"
        "    return [float(a is not None and m is not None and m.group(1).strip() == a)\n"
        "            for m, a in zip(found, answers)]\n")
    run(["--reward_rules", "minimind2", "--reward_fn", f"{tmp_path / 'correct.py'}:correct", "--max_steps", "16",
         "--batch_size", "16", "--mini_batch_size", "8", "--eval_limit", "64", "--eval_interval", "16",
         "--save_dir", str(tmp_path / "out"), "--device", "cpu"])
    # the function defines correctness: the held-out set reports its score (the share right), not the project's rule
    evals = [m for m in read_lines(tmp_path / "out" / "metrics.jsonl") if "eval_reward_custom" in m]
    assert [m["step"] for m in evals] == [0, 16] and "eval_accuracy" not in evals[0]
    assert evals[1]["eval_reward_custom"] > evals[0]["eval_reward_custom"] + 0.15, evals
    assert "eval_reward_rm" not in evals[0] and "reward_custom" in read_lines(tmp_path / "out" / "samples.jsonl")[0]


# ----------------------------------------------------------------------------- the two-GPU layout's code path
def test_critic_and_reward_model_on_their_own_devices(tiny_kit, tmp_path):
    """The seeds' layout (policy and reference on one device, critic and reward model on another) runs
    the same code; on CPU both device strings name the CPU, and the result equals a default run."""
    run(tiny_run_args(tiny_kit, tmp_path / "split", "--max_steps", "2", "--critic_device", "cpu:0",
                      "--reward_device", "cpu:0"))
    run(tiny_run_args(tiny_kit, tmp_path / "default", "--max_steps", "2"))
    def strip(metrics):
        return [timeless(m) for m in metrics]
    assert strip(read_lines(tmp_path / "split" / "metrics.jsonl")) == strip(read_lines(tmp_path / "default" /
                                                                                   "metrics.jsonl"))


def test_missing_eos_penalty_is_a_logged_part_and_the_parts_sum_to_the_reward(tiny_kit, tmp_path):
    """--missing_eos_penalty is its own part (reward_missing_eos): every step's reward_<part> fields add up to
    its reward, and a sample's parts to its reward."""
    save_dir = tmp_path / "run"
    train_ppo.main(train_ppo.parse_args(tiny_run_args(tiny_kit, save_dir, "--max_steps", "2",
                                                      "--missing_eos_penalty", "0.7", "--max_gen_len", "4")))
    steps = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    for m in steps:
        parts = {k: v for k, v in m.items() if k in ("reward_format", "reward_tags", "reward_rm", "reward_missing_eos")}
        assert parts["reward_missing_eos"] == pytest.approx(-0.7 * (1 - m["eos_rate"]))
        assert sum(parts.values()) == pytest.approx(m["reward"], abs=1e-5)
    for sample in map(json.loads, open(save_dir / "samples.jsonl")):
        parts = [v for k, v in sample.items() if k.startswith("reward_")]
        assert sum(parts) == pytest.approx(sample["reward"], abs=1e-5)
        assert sample["reward_missing_eos"] in (0.0, pytest.approx(-0.7))


# ----------------------------------------------------------------------------- what the reward is made of by default
def test_a_users_task_gets_only_the_reward_it_names(tiny_kit, tmp_path, capsys):
    """The demo's reward model and MiniMind's format rules belong to the demo: with a --reward_fn on the user's own
    data, MiniMind weights get that function alone; without one, their generation's rules and no reward model.
    The start-up line says what the reward is made of; the demo's data without flags keeps the demo's reward."""
    (tmp_path / "fn.py").write_text("def length(prompts, responses, answers):\n"
                                    "    return [len(r) / 10 for r in responses]\n")
    base = [a for a in tiny_run_args(tiny_kit, tmp_path / "x", "--max_steps", "1", "--log_samples", "1")
            if a != tiny_kit["reward_model"]]
    base.remove("--reward_model_path")
    for name, extra, parts, said in [
            ("fn", ["--reward_fn", f"{tmp_path / 'fn.py'}:length"], {"custom"},
             f"reward = custom: length from {tmp_path / 'fn.py'} (plain's signature)\n"),
            ("rules", [], {"format", "tags"}, "reward = rules minimind2 (format, tags)\n")]:
        flags = [a if a != str(tmp_path / "x") else str(tmp_path / name) for a in base] + extra
        run(flags)
        metrics = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
        assert {k[len("reward_"):] for k in metrics if k.startswith("reward_")} == parts
        assert said in capsys.readouterr().out
    named = train_ppo.parse_args(base + ["--reward_fn", f"{tmp_path / 'fn.py'}:length", "--reward_model_path",
                                          tiny_kit["reward_model"], "--reward_rules", "minimind2"])
    assert named.reward_model_path == tiny_kit["reward_model"] and named.reward_rules == "minimind2"
    demo = train_ppo.parse_args([])
    assert demo.reward_model_path == reward.DEMO_REWARD_MODEL and demo.reward_rules is None
