"""The MiniMind user's setup: the tokenizer that fits the weights, the three generations of chat
templates, the reward rules of MiniMind2 and minimind-3, and files MiniMind's own code loads."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import train_ppo
from conftest import ROOT, tiny_run_args
from dataset.lm_dataset import RLAIFDataset, thinking_flag
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from conftest import reward_of
from reward import collapse_history, minimind3_rules, repetition, scored_turn
from trainer_utils import load_state_dict_file, save_weights

DEMO_ACTOR, DEMO_DATA = str(ROOT / "demo" / "full_sft_128.pth"), str(ROOT / "dataset" / "rlaif-mini.jsonl")

# Templates written for these tests that behave as docs/minimind.md "Tokenizer and chat templates" describes each generation's
TURNS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{% endfor %}")
TEMPLATES = {
    # MiniMind2 (2025-04): a default system turn when the chat has none
    "minimind2": ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant"
                  "<|im_end|>\\n' }}{% endif %}" + TURNS +
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # 2025-10: Qwen3 style, enable_thinking=False closes an empty think block
    "2025-10": (TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is "
                "defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"),
    # minimind-3 (2026-03): open_thinking=True leaves the think block open, otherwise closed and empty
    "minimind3": (TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if open_thinking is "
                  "defined and open_thinking %}{{ '<think>\\n' }}{% else %}{{ '<think>\\n\\n</think>\\n\\n' }}"
                  "{% endif %}{% endif %}"),
}
# minimind-3's tool rendering as docs/tools.md describes it: the tools in the system turn (after its own text), calls
# asked for as <tool_call> JSON, a `tool` message inside a user turn as <tool_response>
TOOL_TURNS = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\nCall a tool as "
    "<tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n{% elif not (tools and loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
TEMPLATES["minimind3_tools"] = TEMPLATES["minimind3"].replace(TURNS, TOOL_TURNS)
OPEN, CLOSED = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The project tokenizer saved with each generation's template, one without any, and a second
    tokenizer the project trains with another seed (same special ids, other merges)."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, template in list(TEMPLATES.items()) + [("none", None)]:
        tok = AutoTokenizer.from_pretrained(ROOT / "model")
        tok.chat_template = template
        tok.save_pretrained(root / name)
        folders[name] = str(root / name)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--out_dir", str(root / "other"),
                    "--seed", "7", "--n_docs", "800"], check=True, capture_output=True)
    folders["other"] = str(root / "other")
    return folders


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


# ----------------------------------------------------------------------------- the tokenizer fits the weights
def demo_flags(save_dir, *extra):
    return ["--from_weight", DEMO_ACTOR, "--data_path", DEMO_DATA, "--eval_data_path", "none", "--save_dir",
            str(save_dir), "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "8", "--max_steps", "1",
            "--device", "cpu", *extra]


def test_a_tokenizer_that_does_not_fit_stops_the_run(tokenizers, tmp_path, capsys):
    other = AutoTokenizer.from_pretrained(tokenizers["other"])
    own = AutoTokenizer.from_pretrained(ROOT / "model")
    assert other("What is 3 + 4?")["input_ids"] != own("What is 3 + 4?")["input_ids"]  # other merges, same specials
    assert [other.convert_ids_to_tokens(i) for i in range(3)] == [own.convert_ids_to_tokens(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"--tokenizer_path '\S+other' does not fit the actor \S+full_sft_128\.pth: "
                                         r"it scores \S+ nats/token .* MiniMind checkout .* --check_tokenizer 0"):
        run(demo_flags(tmp_path / "wrong", "--tokenizer_path", tokenizers["other"]))
    assert not (tmp_path / "wrong").exists()  # before any training or file
    # the shipped kit raises no false alarm, and says so
    run(demo_flags(tmp_path / "right"))
    assert "tokenizer check: the actor reads --tokenizer_path" in capsys.readouterr().out
    # an explicit flag turns the check off; a random-init actor skips it
    run(demo_flags(tmp_path / "off", "--tokenizer_path", tokenizers["other"], "--check_tokenizer", "0"))
    run(demo_flags(tmp_path / "random", "--from_weight", "none", "--hidden_size", "64", "--num_hidden_layers", "1"))
    assert "tokenizer check" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- chat templates
def test_each_generations_template_renders_the_prompts(tokenizers):
    def dataset(name, **kw):
        return RLAIFDataset(DEMO_DATA, AutoTokenizer.from_pretrained(tokenizers[name]), max_length=64, **kw)

    v2 = dataset("minimind2")
    assert v2.flag is None and thinking_flag(AutoTokenizer.from_pretrained(tokenizers["minimind3"])) == "open_thinking"
    assert all(s["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n")
               and s["prompt"].endswith("<|im_start|>assistant\n") for s in v2.samples)
    for name, flag, open_end, closed_end in [("minimind3", "open_thinking", OPEN, CLOSED),
                                             ("2025-10", "enable_thinking", "<|im_start|>assistant\n", CLOSED)]:
        assert dataset(name).flag == flag
        ends = [s["prompt"].endswith(open_end) and not s["prompt"].endswith(CLOSED) for s in
                dataset(name, thinking_ratio=0.9, seed=3).samples]
        assert 0.85 < sum(ends) / len(ends) < 0.95, (name, sum(ends))  # 450 prompts, 90% open
        assert all(s["prompt"].endswith(closed_end) for s in dataset(name, thinking_ratio=0.0).samples)
        assert all(s["prompt"].endswith(open_end) for s in dataset(name, thinking_ratio=1.0).samples)
    # drawn per prompt and epoch from the seed: the same in every process, another draw next epoch
    a, b = dataset("minimind3", thinking_ratio=0.5, seed=3), dataset("minimind3", thinking_ratio=0.5, seed=3)
    assert [s["prompt"] for s in a.samples] == [s["prompt"] for s in b.samples]
    first = [s["prompt"] for s in a.samples]
    a.set_epoch(1)
    assert [s["prompt"] for s in a.samples] != first
    with pytest.raises(ValueError, match="no thinking switch"):
        dataset("minimind2", thinking_ratio=0.5)


def test_thinking_ratio_defaults_to_0_9_with_a_thinking_template(tiny_kit, tokenizers, tmp_path):
    run(tiny_run_args(tiny_kit, tmp_path / "v3", "--max_steps", "1", "--tokenizer_path", tokenizers["minimind3"]))
    assert json.load(open(tmp_path / "v3" / "run_args.json"))["thinking_ratio"] == 0.9
    run(tiny_run_args(tiny_kit, tmp_path / "v2", "--max_steps", "1", "--tokenizer_path", tokenizers["minimind2"]))
    assert json.load(open(tmp_path / "v2" / "run_args.json"))["thinking_ratio"] == 0.0


@pytest.mark.parametrize("case", ["no chat template", "a switch the template lacks", "unknown rule name"])
def test_bad_setup_stops_before_any_model_is_built(tiny_kit, tokenizers, tmp_path, capsys, case):
    if case == "unknown rule name":
        with pytest.raises(SystemExit):
            train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--reward_rules", "minimind4"))
        assert "--reward_rules: invalid choice: 'minimind4'" in capsys.readouterr().err
        return
    tokenizer, extra, message = {
        "no chat template": ("none", [], r"prompts_sample\.jsonl:1: a conversation row, but the tokenizer has no "
                                         r"chat template"),
        "a switch the template lacks": ("minimind2", ["--thinking_ratio", "0.5"],
                                        r"--thinking_ratio 0\.5: the chat template of --tokenizer_path '\S+minimind2' "
                                        r"has no thinking switch \(open_thinking or enable_thinking\)"),
    }[case]
    with pytest.raises(ValueError, match=message):
        run(tiny_run_args(tiny_kit, tmp_path, "--tokenizer_path", tokenizers[tokenizer], *extra))
    assert "actor: " not in capsys.readouterr().out  # build_models logs the actor it built: none was


# ----------------------------------------------------------------------------- the reasoning reward sees the full turn
class ChatRecorder:
    """get_score() interface: remembers each chat it scores and returns 1.0."""

    def __init__(self):
        self.seen = []

    def get_score(self, tokenizer, chat):
        self.seen.append(chat)
        return 1.0


PROMPT_OPEN = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n" + OPEN
PROMPT_CLOSED = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n" + CLOSED


def test_a_response_continuing_an_opened_think_block_is_scored_as_the_full_turn():
    continued = "7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"
    assert scored_turn(PROMPT_OPEN, continued) == "<think>\n" + continued
    assert scored_turn(PROMPT_CLOSED, "<answer>\n12\n</answer>") == "<answer>\n12\n</answer>"
    rm = ChatRecorder()
    total, parts = reward_of(rm)([PROMPT_OPEN], [continued])  # MiniMind2's rules
    assert parts["format"].item() == 0.5 and parts["tags"].item() == 1.0
    assert rm.seen[0][-1] == {"role": "assistant", "content": "<think>\n" + continued}
    assert rm.seen[1][-1] == {"role": "assistant", "content": "12"}  # the answer-only chat
    # without the opening in the prompt, the same text lacks <think>: not the layout
    _, parts = reward_of(ChatRecorder())(["<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"],
                                         [continued])
    assert parts["format"].item() == 0.0 and parts["tags"].item() == 0.75


# ----------------------------------------------------------------------------- minimind-3's reward rules
def test_minimind3_rules_hand_computed():
    thinking = "I add seven and five and get twelve."  # 36 characters
    parts, answer = minimind3_rules("<think>\n" + thinking + "\n</think>\n\nThe answer is 12.")
    assert parts == {"length": 0.5, "think": 1.0 + 0.25, "repetition": -0.0} and answer == "The answer is 12."
    parts, answer = minimind3_rules("short\n</think>\nok ok ok ok ok ok</think>")
    # 33 characters; thinking "short" < 20 -> -0.5; two </think> -> -0.25; the answer's units: ok x 6, "<", "/",
    # "think", ">": 8 trigrams, 5 distinct (ok ok ok; ok ok <; ok < /; < / think; / think >) -> 1 - 5/8
    assert parts == {"length": 0.5, "think": -0.5 - 0.25, "repetition": -0.375}
    assert answer == "ok ok ok ok ok ok</think>".strip()
    parts, answer = minimind3_rules("12")  # no </think>: the whole turn is the answer
    assert parts == {"length": -0.5, "think": 0.0, "repetition": -0.0} and answer == "12"
    assert repetition("一二三一二三一二三") == 0.0  # minimind-3's tokens: one run of CJK characters is one token
    assert repetition("the cat sat on the mat") == 0.0


def test_minimind3_reward_collapses_the_history_and_scores_the_answer():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 7 + 5?"}]
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in history) + OPEN
    response = "Seven plus five is twelve, I am sure.\n</think>\n\n12"
    rm = ChatRecorder()
    total, parts = reward_of(rm, rules="minimind3", rm_clip=3.0)([prompt], [response])
    assert rm.seen == [[{"role": "user", "content": "system: Be brief.\nuser: Hi\nassistant: Hello\n以上是对话历史。"
                                                    "我的新问题是：\nWhat is 7 + 5?"}, {"role": "assistant", "content": "12"}]]
    assert set(parts) == {"length", "think", "repetition", "rm"}
    assert parts["think"].item() == 1.25 and parts["rm"].item() == 1.0
    assert total.item() == pytest.approx(0.5 + 1.25 + 0.0 + 1.0)
    assert collapse_history(history[1:2]) == history[1:2]  # one user message stays as it is


def test_reward_rules_default_to_the_weights_generation_and_log_each_part(tiny_kit, tmp_path, capsys):
    run(tiny_run_args(tiny_kit, tmp_path / "v2", "--max_steps", "1", "--log_samples", "1"))
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(MiniMindConfig(version=3, hidden_size=64, num_hidden_layers=2)),
                 tmp_path / "full_sft_64.pth")
    run(tiny_run_args(tiny_kit, tmp_path / "v3", "--max_steps", "1", "--log_samples", "1", "--from_weight",
                      str(tmp_path / "full_sft_64.pth")))
    out = capsys.readouterr().out.split("actor: ")
    for name, rules, parts, log in [("v2", "minimind2 (format, tags)", {"format", "tags", "rm"}, out[1]),
                                    ("v3", "minimind3 (length, think, repetition)",
                                     {"length", "think", "repetition", "rm"}, out[2])]:
        assert f"reward = rules {rules} + rm: the reward model {tiny_kit['reward_model']}" in log
        assert json.load(open(tmp_path / name / "run_args.json"))["reward_rules"] is None  # default: the weights'
        metrics = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
        sample = json.loads(open(tmp_path / name / "samples.jsonl").readline())
        assert {k for k in metrics if k.startswith("reward_")} == {f"reward_{p}" for p in parts}
        assert {k for k in sample if k.startswith("reward_")} == {f"reward_{p}" for p in parts}


# ----------------------------------------------------------------------------- files MiniMind's code loads
def test_saved_actor_has_minimind_keys_and_shapes(tiny_kit, tmp_path):
    """The fixture's weights come from MiniMind's own model code (hidden 64, 2 layers, v2, like the tiny
    kit): the trainer's saved .pth has exactly its keys and shapes, in fp16, so MiniMind's
    `load_state_dict(..., strict=True)` takes it."""
    fixture = torch.load(ROOT / "tests" / "fixtures" / "minimind_v2_dense.pt", weights_only=True)
    expected = {k: tuple(v.shape) for k, v in fixture["weights"].items()}
    expected.update({k: (fixture["vocab_size"], 64) for k in ("model.embed_tokens.weight", "lm_head.weight")})
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1"))
    saved = torch.load(tmp_path / "ppo_actor_64.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.dtype == torch.float16 for v in saved.values())
    assert load_state_dict_file(tmp_path / "ppo_actor_64.pth").keys() == saved.keys()


# ----------------------------------------------------------------------------- the README's commands
def readme_torchrun_commands():
    import re
    import shlex
    text = open(ROOT / "README.md", encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(torchrun .*?)```", text, re.S)
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


def test_readme_minimind_commands_parse_as_documented():
    commands = {cmd[cmd.index("--reward_rules") + 1]: cmd for cmd in readme_torchrun_commands()
                if "--reward_rules" in cmd and "--policy_loss" not in cmd}
    assert set(commands) == {"minimind2", "minimind3"}
    for rules, cmd in commands.items():
        assert cmd[:3] == ["torchrun", "--nproc_per_node", "2"] and cmd[3] == "train_ppo.py"
        args = train_ppo.parse_args(cmd[4:])
        assert (args.tokenizer_path, args.from_weight, args.reward_rules) == ("../minimind/model", "full_sft", rules)
        assert args.reward_model_path == "../internlm2-1_8b-reward" and args.use_swanlab
    assert train_ppo.parse_args(commands["minimind3"][4:]).thinking_ratio == 0.9
    # the two-line check's stated output for this project's own tokenizer
    own = AutoTokenizer.from_pretrained(ROOT / "model")("What is 3 + 4?").input_ids
    assert own == [395, 310, 227, 25, 314, 227, 26, 37]
    assert "[395, 310, 227, 25, 314, 227, 26, 37]" in open(ROOT / "README.md", encoding="utf-8").read()


def test_plain_prompts_with_a_thinking_template_take_no_thinking_ratio(tiny_kit, tokenizers, tmp_path):
    """Plain-text rows are not rendered by the template, so its switch's 0.9 default does not apply to them
    (they train with no flag given); an explicit --thinking_ratio with plain rows is a clear error."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"{a} plus {a} is"}) + "\n" for a in range(8)))
    flags = tiny_run_args(tiny_kit, tmp_path / "out", "--max_steps", "1", "--tokenizer_path", tokenizers["minimind3"],
                          "--data_path", str(plain))
    run(flags)
    assert json.load(open(tmp_path / "out" / "run_args.json"))["thinking_ratio"] == 0.0
    with pytest.raises(ValueError, match=r"--thinking_ratio 0\.5: \S+plain\.jsonl has plain-text prompt rows"):
        run([*flags, "--thinking_ratio", "0.5"])


def test_eval_policy_renders_prompts_as_the_trainers_evaluation(tiny_kit, tokenizers, tmp_path):
    """With a thinking-switch template the trainer's evaluation opens the think block in 90% of the prompts (drawn
    from --seed); eval_policy follows the same rule (and the run's tokenizer), so its numbers are the trainer's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_policy
    save_dir = tmp_path / "run"
    eval_data = str(ROOT / "dataset" / "rlaif-eval.jsonl")
    run(tiny_run_args(tiny_kit, save_dir, "--max_steps", "1", "--tokenizer_path", tokenizers["minimind3"],
                      "--eval_data_path", eval_data, "--eval_limit", "12", "--reward_rules", "minimind2"))
    step0 = [json.loads(line) for line in open(save_dir / "metrics.jsonl") if "eval_eos_rate" in line][0]
    results = eval_policy.main(["--base", tiny_kit["actor"], "--trained",
                                str(save_dir / "checkpoints" / "ppo_actor_64_resume.pth")])
    for key in ("format", "tags", "accuracy", "reward", "reward_rm", "response_len", "eos_rate"):
        assert results["base"][key] == pytest.approx(step0[f"eval_{key}"], rel=1e-6, abs=1e-7), key
    opened = [s["prompt"].endswith(OPEN) for s in RLAIFDataset(eval_data, AutoTokenizer.from_pretrained(
        tokenizers["minimind3"]), max_length=48, seed=1).samples[:12]]
    assert 0 < sum(opened) < 12  # both kinds of prompt were evaluated


# ----------------------------------------------------------------------------- other frameworks' prompts
QUESTIONS = [f"What is {a} plus {a}?" for a in range(6)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("name", ["minimind3", "2025-10"])
def test_other_frameworks_chats_get_the_templates_own_thinking_default(tokenizers, tmp_path, name):
    """minimind-3's 0.9 is MiniMind's choice for MiniMind's data; a verl/TRL `prompt` chat is rendered as the
    template renders it by default (transformers' own call, no switch passed), unless --thinking_ratio is given."""
    tok = AutoTokenizer.from_pretrained(tokenizers[name])
    path = write_rows(tmp_path / "verl.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS])
    data = RLAIFDataset(path, tok, max_length=64)
    assert data.thinking_ratio is None
    assert [s["prompt"] for s in data.samples] == [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS]
    for ratio in (0.0, 1.0):  # given, the switch is drawn on any chat data
        assert all(s["prompt"].endswith(CLOSED) == (ratio == 0.0)
                   for s in RLAIFDataset(path, tok, max_length=64, thinking_ratio=ratio).samples)
    conversations = write_rows(tmp_path / "mm.jsonl", [{"conversations": [{"role": "user", "content": q},
                                                                           {"role": "assistant", "content": "无"}]}
                                                       for q in QUESTIONS])
    assert RLAIFDataset(conversations, tok, max_length=64).thinking_ratio == 0.9  # MiniMind's data: unchanged


def test_apply_chat_template_renders_plain_prompts_as_one_user_message(tiny_kit, tokenizers, tmp_path):
    """OpenRLHF's --apply_chat_template: a string prompt becomes one user message rendered by the template (as
    transformers renders it); the run records the flag and eval_policy reads it back."""
    tok = AutoTokenizer.from_pretrained(tokenizers["minimind2"])
    path = write_rows(tmp_path / "openrlhf.jsonl", [{"input": q, "answer": str(2 * i)} for i, q in enumerate(QUESTIONS)])
    data = RLAIFDataset(path, tok, max_length=64, prompt_key="input", apply_chat_template=True)
    expected = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                for q in QUESTIONS]
    assert [s["prompt"] for s in data.samples] == expected
    assert [s["prompt"] for s in RLAIFDataset(path, tok, max_length=64, prompt_key="input").samples] == QUESTIONS
    with pytest.raises(ValueError, match=r"openrlhf\.jsonl:1: --apply_chat_template, but the tokenizer has no chat"):
        RLAIFDataset(path, AutoTokenizer.from_pretrained(tokenizers["none"]), prompt_key="input",
                     apply_chat_template=True)
    assert train_ppo.parse_args(["--apply_chat_template"]).apply_chat_template == 1  # OpenRLHF's bare flag
    flags = tiny_run_args(tiny_kit, tmp_path / "out", "--max_steps", "1", "--tokenizer_path", tokenizers["minimind2"],
                          "--data_path", path, "--prompt_key", "input", "--apply_chat_template")
    run(flags)
    assert json.load(open(tmp_path / "out" / "run_args.json"))["apply_chat_template"] == 1
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_policy
    args = eval_policy.parse_args(["--trained", str(tmp_path / "out" / "checkpoints" / "ppo_actor_64_resume.pth")])
    assert args.apply_chat_template == 1 and args.prompt_key == "input"


class RecordingRewardModel:
    """Stands in for a reward model: records the chats it is asked to score."""
    path = "recording"

    def __init__(self):
        self.chats = []

    def score(self, chats, batch_size):
        self.chats += chats
        return torch.zeros(len(chats))


def test_a_prompt_ending_with_an_assistant_message_is_continued(tokenizers, tmp_path, capsys):
    """TRL renders a `prompt` chat that ends with an assistant message with continue_final_message: the response
    extends that message. The reward model scores the whole reply (prefix + response). In TRL's `messages` rows the
    trailing assistant message is the completion: left out, and the load says so."""
    from reward import Reward
    tok = AutoTokenizer.from_pretrained(tokenizers["minimind2"])
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Let me add:"}] for q in QUESTIONS]
    data = RLAIFDataset(write_rows(tmp_path / "trl.jsonl", [{"prompt": c} for c in chats]), tok, max_length=64)
    prompts = [s["prompt"] for s in data.samples]
    assert prompts == [tok.apply_chat_template(c, tokenize=False, continue_final_message=True) for c in chats]
    assert all(p.endswith("<|im_start|>assistant\nLet me add:") for p in prompts)
    recorder = RecordingRewardModel()
    Reward(recorder, rules="none")(prompts[:2], [" 0", " 2"], messages=[s["messages"] for s in data.samples[:2]])
    assert [c[-1] for c in recorder.chats] == [{"role": "assistant", "content": "Let me add: 0"},
                                               {"role": "assistant", "content": "Let me add: 2"}]
    assert [m["role"] for m in recorder.chats[0]] == ["system", "user", "assistant"]  # the template's system turn kept
    capsys.readouterr()
    messages = RLAIFDataset(write_rows(tmp_path / "messages.jsonl", [{"messages": c} for c in chats]), tok,
                            max_length=64)
    assert "6 rows of 'messages' end with an assistant message" in capsys.readouterr().out
    assert [s["prompt"] for s in messages.samples] == [
        tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in chats]


def test_readme_minimind3_grpo_command_has_minimind3s_defaults():
    """The README's one command for minimind-3's train_grpo.py: its documented defaults (docs/minimind.md
    "MiniMind-3's GRPO and CISPO defaults"), one optimizer step per rollout."""
    [cmd] = [cmd for cmd in readme_torchrun_commands() if "--policy_loss" in cmd and "--tools" not in cmd]
    args = train_ppo.parse_args(cmd[4:])
    assert (args.adv_estimator, args.policy_loss, args.clip_epsilon, args.clip_epsilon_high) == ("grpo", "cispo", 0.2, 5.0)
    assert (args.n_samples_per_prompt, args.kl_mode, args.kl_estimator, args.kl_coef) == (6, "loss", "k3", 0.1)
    assert (args.loss_agg_mode, args.learning_rate, args.grad_clip) == ("seq-mean-token-mean", 3e-7, 1.0)
    assert (args.max_seq_len, args.max_gen_len, args.thinking_ratio) == (768, 1024, 0.9)
    assert args.ppo_epochs == 1 and args.mini_batch_size == args.batch_size * args.n_samples_per_prompt
    assert (args.reward_rules, args.tokenizer_path) == ("minimind3", "../minimind/model")


def test_readme_minimind3_agent_command_has_train_agents_defaults():
    """The README's command for minimind-3's train_agent.py: its defaults (docs/minimind.md "MiniMind-3's agentic
    RL"): 4 responses per prompt, CISPO capped at 5.0, k3 KL in the loss at 0.1, 3 turns of 768 tokens, tools under a
    1 s limit, temperature 0.8, thinking open in 10% of prompts, its reward."""
    [cmd] = [cmd for cmd in readme_torchrun_commands() if "--tools" in cmd]
    args = train_ppo.parse_args(cmd[4:])
    assert (args.adv_estimator, args.policy_loss, args.clip_epsilon_high, args.n_samples_per_prompt) == \
        ("grpo", "cispo", 5.0, 4)
    assert (args.kl_mode, args.kl_estimator, args.kl_coef, args.loss_agg_mode) == ("loss", "k3", 0.1,
                                                                                 "seq-mean-token-mean")
    assert (args.max_turns, args.max_gen_len, args.tool_timeout, args.temperature, args.thinking_ratio) == \
        (3, 768, 1.0, 0.8, 0.1)
    assert (args.learning_rate, args.grad_clip, args.batch_size, args.ppo_epochs) == (3e-7, 1.0, 2, 1)
    assert args.mini_batch_size == args.batch_size * args.n_samples_per_prompt
    assert (args.reward_rules, args.tools, args.tool_max_chars) == ("minimind3_agent", "examples/minimind3_tools.py",
                                                                    2048)


def test_verls_rows_keep_a_trailing_assistant_message_as_a_finished_turn(tokenizers, tmp_path):
    """verl renders its `prompt` list with the generation prompt whatever it ends with: a trailing assistant
    message is a finished turn of the history, not a prefix to continue, and the reward model scores the response
    alone after it."""
    from reward import Reward
    tok = AutoTokenizer.from_pretrained(tokenizers["minimind2"])
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Let me add:"}] for q in QUESTIONS]
    rows = [{"prompt": c, "data_source": "arith", "reward_model": {"ground_truth": "0"}} for c in chats]
    data = RLAIFDataset(write_rows(tmp_path / "verl.jsonl", rows), tok, max_length=64)
    prompts = [s["prompt"] for s in data.samples]
    assert prompts == [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    recorder = RecordingRewardModel()
    Reward(recorder, rules="none")(prompts[:1], [" 0"], messages=[data.samples[0]["messages"]])
    assert recorder.chats[0][-2:] == [{"role": "assistant", "content": "Let me add:"},
                                      {"role": "assistant", "content": " 0"}]
