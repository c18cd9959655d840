"""The demo kit: the miniature build path, the committed kit, and eval_policy's metrics."""
import glob
import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import build_demo  # noqa: E402
import eval_policy  # noqa: E402
from dataset.lm_dataset import RLAIFDataset  # noqa: E402
from evaluation import markdown_table  # noqa: E402
from model.model_minimind import MiniMindForCausalLM, config_from_state_dict  # noqa: E402
from reward import extract_answer, final_answer, format_ok, is_correct, load_reward_model, tags_complete  # noqa: E402
from trainer_utils import load_state_dict_file  # noqa: E402

GOOD = "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"


def digest(path):
    files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
    return hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()


def check_kit(actor_path, reward_model_path, train_path, eval_path):
    """Everything loads the way the trainer loads it; the prompt sets are disjoint."""
    state = load_state_dict_file(actor_path)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    actor = MiniMindForCausalLM(config_from_state_dict(state))
    actor.load_state_dict(state, strict=True)
    reward_model = load_reward_model(reward_model_path, "cpu", torch.float32)
    reward_tokenizer = reward_model.tokenizer
    scores = reward_model.score([[{"role": "user", "content": "What is 7 + 5?"},
                                                           {"role": "assistant", "content": GOOD}]])
    assert scores.shape == (1,) and torch.isfinite(scores).all()
    train_set, eval_set = (RLAIFDataset(p, reward_tokenizer, max_length=64) for p in (train_path, eval_path))
    assert all(s["answer"] for s in train_set.samples + eval_set.samples)
    train_prompts = {s["prompt"] for s in train_set.samples}
    assert not train_prompts & {s["prompt"] for s in eval_set.samples}
    return dict(actor=actor, reward_model=reward_model, reward_tokenizer=reward_tokenizer, eval_set=eval_set)


def test_miniature_kit_trains_with_ppo(tmp_path):
    """The same code paths end to end: build a miniature kit, then a few PPO steps on it."""
    import train_ppo
    paths = build_demo.main(["--tiny", "--out_dir", str(tmp_path / "demo"), "--data_dir", str(tmp_path / "data")])["paths"]
    out = tmp_path / "out"
    train_ppo.main(train_ppo.parse_args([
        "--from_weight", paths["actor"], "--reward_model_path", paths["reward_model"], "--data_path",
        paths["train_prompts"], "--save_dir", str(out), "--max_steps", "2", "--batch_size", "4",
        "--mini_batch_size", "2", "--max_gen_len", "8", "--device", "cpu",
        "--check_tokenizer", "0"]))  # the miniature actor trained for seconds: it reads no text yet
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    trained = glob.glob(str(out / "ppo_actor_*.pth"))
    assert len(trained) == 1
    state = load_state_dict_file(trained[0])
    MiniMindForCausalLM(config_from_state_dict(state)).load_state_dict(state, strict=True)
    assert glob.glob(str(out / "checkpoints" / "ppo_actor_*_resume.pth"))


def test_miniature_build_loads_and_is_deterministic(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        out = build_demo.main(["--tiny", "--out_dir", str(tmp_path / name / "demo"),
                               "--data_dir", str(tmp_path / name / "data")])
        runs.append(out["paths"])
    paths = runs[0]
    assert set(paths) == {"actor", "reward_model", "train_prompts", "eval_prompts"}
    for key in paths:  # same seed, same bytes
        assert digest(paths[key]) == digest(runs[1][key]), key
    assert not glob.glob(str(tmp_path / "a" / "**" / "*.tmp"), recursive=True)
    kit = check_kit(paths["actor"], paths["reward_model"], paths["train_prompts"], paths["eval_prompts"])
    assert len(kit["eval_set"]) == build_demo.TINY["n_eval"]

    # eval_policy end to end on the miniature kit
    json_out = tmp_path / "eval.json"
    results = eval_policy.main(["--base", paths["actor"], "--trained", paths["actor"], "--data_path",
                                paths["eval_prompts"], "--reward_model_path", paths["reward_model"],
                                "--device", "cpu", "--limit", "5", "--max_gen_len", "8", "--json_out", str(json_out)])
    assert json.load(open(json_out))["models"]["base"]["n"] == 5
    for key in ("format", "tags", "accuracy", "reward", "reward_rm", "eos_rate", "response_len"):
        assert results["base"][key] == results["trained"][key]
    assert "| answer accuracy |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the committed kit
DEMO = os.path.join(ROOT, "demo")
# (question, its think-line expression, right answer, a wrong one): hand-written, every phrasing
EXAMPLES = [("What is 7 + 5?", "7 + 5", 12, 13), ("Compute 3 + 4.", "3 + 4", 7, 8),
            ("What is 6 plus 2?", "6 + 2", 8, 9), ("9 加 8 等于多少？", "9 + 8", 17, 16),
            ("计算 0 + 5。", "0 + 5", 5, 15), ("2 加上 9 是多少？", "2 + 9", 11, 12)]


def response(expression, value):
    return f"<think>\n{expression} = {value}\n</think>\n<answer>\n{value}\n</answer>"


def chat(question, content):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": content}]


@pytest.fixture(scope="module")
def committed_kit():
    actors = glob.glob(os.path.join(DEMO, "full_sft_*.pth"))
    assert len(actors) == 1, f"expected one demo actor in {DEMO}, found {actors}"
    return check_kit(actors[0], os.path.join(DEMO, "reward_model"), os.path.join(ROOT, "dataset", "rlaif-mini.jsonl"),
                     os.path.join(ROOT, "dataset", "rlaif-eval.jsonl"))


def test_committed_reward_model_prefers_right_answers(committed_kit):
    reward_model = committed_kit["reward_model"]
    for question, expr, right, wrong in EXAMPLES:
        chosen = [chat(question, str(right)), chat(question, response(expr, right))]
        rejected = [chat(question, str(wrong)), chat(question, response(expr, wrong))]
        s_c, s_r = reward_model.score(chosen), reward_model.score(rejected)
        assert (s_c > s_r).all(), (question, s_c.tolist(), s_r.tolist())


def test_committed_reward_model_prefers_the_format(committed_kit):
    reward_model = committed_kit["reward_model"]
    for question, expr, right, _ in EXAMPLES:
        broken = [f"<answer>\n{right}\n</answer>",                                      # no think block
                  f"<think>{expr} = {right}</think><answer>{right}</answer>",            # no newlines
                  response(expr, right) + "\nHope this helps!",                         # text after </answer>
                  response(expr, right)[:-12]]                                          # cut off
        scores = reward_model.score([chat(question, response(expr, right))] + [chat(question, b) for b in broken])
        assert (scores[0] > scores[1:]).all(), (question, scores.tolist())


def assert_rope_base(reward_model, base):
    """The RoPE base the loaded Llama (a RewardModel's) really uses: inv_freq = base ** (-2i / head_dim)."""
    inv_freq = reward_model.model.model.rotary_emb.inv_freq.double()
    head_dim = 2 * len(inv_freq)
    expected = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert torch.allclose(inv_freq, expected, rtol=1e-5), (inv_freq[:3].tolist(), base)


def test_committed_reward_model_uses_its_rope_base(committed_kit):
    assert_rope_base(committed_kit["reward_model"], 1e6)


def test_rope_base_saved_by_transformers_5_is_never_lost(tiny_kit, tmp_path):
    """transformers 5 saves RoPE's base only in rope_parameters, which 4.x ignores: such a folder loads right
    or is refused, never scored with another base; build_demo.make_portable makes it load under both."""
    folder = tmp_path / "rm"
    shutil.copytree(tiny_kit["reward_model"], folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        config.pop(key, None)
    config["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        assert_rope_base(load_reward_model(str(folder), "cpu", torch.float32), 1e6)  # transformers 5
    except ValueError as e:  # transformers 4.x
        assert "only in rope_parameters" in str(e)
    build_demo.make_portable(str(folder))
    assert_rope_base(load_reward_model(str(folder), "cpu", torch.float32), 1e6)


# ----------------------------------------------------------------------------- the evaluation's metrics
@pytest.mark.parametrize("text, fmt, tags, answer", [
    (GOOD, True, True, "12"),
    ("<think>\n7 + 5 = 12\n</think>\n\n<answer>\n12\n</answer>", True, True, "12"),  # the blank-line variant
    ("<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>\n", True, True, "12"),   # $ allows a final newline
    ("<answer>\n12\n</answer>", False, False, "12"),
    ("<think>7 + 5 = 12</think><answer>12</answer>", False, True, "12"),
    (GOOD + "\nDone.", False, True, "12"),
    (GOOD + "\n" + GOOD, True, False, "12"),  # MiniMind's regex accepts a repeat; the tag rule does not
    ("<think>\n7 + 5 = 12\n</think>\n<answer>\n1", False, False, None),
    ("12", False, False, None),
    ("<think>\n7 + 5 = 13\n</think>\n<answer> 13 </answer>", False, True, "13"),
])
def test_metric_functions(text, fmt, tags, answer):
    assert format_ok(text) is fmt
    assert tags_complete(text) is tags
    assert extract_answer(text) == answer
    assert is_correct(text, "12") is (final_answer(text) == "12")  # the <answer> content, else the text itself
    assert is_correct(text, " 12\n") is (final_answer(text) == "12")


def test_markdown_table_has_deltas():
    base = dict(format=0.5, tags=0.75, accuracy=0.4, reward=1.0, reward_rm=0.2, eos_rate=1.0, response_len=20.0)
    trained = dict(base, format=0.9, reward=1.5, response_len=18.5)
    lines = markdown_table({"base (a.pth)": base, "trained (b.pth)": trained}).splitlines()
    assert lines[0] == "| metric | base (a.pth) | trained (b.pth) | delta |"
    assert "| format compliance | 50.0% | 90.0% | +40.0 pt |" in lines
    assert "| mean reward (total) | 1.000 | 1.500 | +0.500 |" in lines
    assert "| mean response length (tokens) | 20.0 | 18.5 | -1.5 |" in lines
    assert "delta" not in markdown_table({"trained": trained}).splitlines()[0]
