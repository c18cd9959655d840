"""Every recipe of the README, run as written on tiny stand-ins of the models and data it names (a step or
two, offline, on CPU): the README cannot drift from the code. The verl, TRL, OpenRLHF and routed commands run
end to end in tests/test_data_formats.py, gpt2-sentiment in tests/test_hf_policy.py; the multi-node command, which
needs the hardware it names, is parsed here and in tests/test_fsdp.py."""
import json
import re
import shlex
import shutil
import sys

import pytest
import torch
from transformers import AutoTokenizer

import data_formats_kit as kit
import train_ppo
from conftest import ROOT
from hf_models import save_tiny_hf_model
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from test_minimind_setup import TEMPLATES
from trainer_utils import save_weights

sys.path.insert(0, str(ROOT / "scripts"))
from bench_ppo import build_tiny_reward_model  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
# what a recipe's run is cut to here: a step on a few tokens, on the CPU, untrained stand-ins (which read no
# tokenizer, so the start-up tokenizer check is off)
SHORT = ["--max_steps", "1", "--max_gen_len", "8", "--device", "cpu", "--check_tokenizer", "0", "--save_interval", "1"]


def section(heading):
    """The README's text under `## heading`, up to the next `## `."""
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def commands(text, program=("python", "train_ppo.py")):
    """The shell commands of `text`'s bash blocks that start with `program`, as argument lists (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    found = [shlex.split(line, comments=True) for line in lines]
    return [cmd for cmd in found if cmd[:len(program)] == list(program)]


def trainer_argv(cmd):
    """The train_ppo.py flags of a `python train_ppo.py ...` or `torchrun ... train_ppo.py ...` command."""
    return cmd[cmd.index("train_ppo.py") + 1:]


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def metrics(save_dir):
    return [json.loads(line) for line in open(save_dir / "metrics.jsonl")]


def tiny_minimind(path):
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)), path)


# ----------------------------------------------------------------------------- the quick start and the demo
def test_the_demo_recipe_runs_and_its_evaluation_reproduces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (ppo, grpo) = commands(section("The demo on a laptop"))
    for cmd, out in ((ppo, "ppo"), (grpo, "grpo")):
        run(trainer_argv(cmd) + SHORT + ["--eval_limit", "4", "--save_dir", str(tmp_path / out),
                                          "--from_weight", str(ROOT / "demo" / "full_sft_128.pth")])
        assert metrics(tmp_path / out)[-1]["step"] == 1
    assert train_ppo.parse_args(trainer_argv(grpo)).adv_estimator == "grpo"
    (evaluate,) = commands(section("The demo on a laptop"), ("python", "scripts/eval_policy.py"))
    import eval_policy
    argv = [a.replace("out/", str(tmp_path / "ppo") + "/").replace("demo/", str(ROOT / "demo") + "/")
            for a in evaluate[2:]]
    results = eval_policy.main(argv + ["--limit", "4", "--device", "cpu"])
    assert set(results) == {"base", "trained"}


def test_the_quick_start_command_is_the_plain_demo():
    quick = section("Quick start")
    assert "python train_ppo.py          # the main job" in quick and "python -m pytest -q tests" in quick
    assert "python -m pytest -q tests" in (ROOT / ".ci" / "run").read_text()  # what CI runs


# ----------------------------------------------------------------------------- MiniMind
def minimind_checkout(tmp_path, template):
    """../minimind (its tokenizer with `template`, full_sft weights, RLAIF data) and ../internlm2-1_8b-reward (a
    tiny reward model) beside a working folder, which is returned."""
    work, checkout = tmp_path / "work", tmp_path / "minimind"
    work.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "model")
    tokenizer.chat_template = TEMPLATES[template]
    tokenizer.save_pretrained(checkout / "model")
    tiny_minimind(checkout / "out" / "full_sft_64.pth")
    (checkout / "dataset").mkdir()
    for name in ("rlaif-mini.jsonl", "rlaif.jsonl"):
        shutil.copy(ROOT / "dataset" / "prompts_sample.jsonl", checkout / "dataset" / name)
    build_tiny_reward_model(tmp_path / "internlm2-1_8b-reward")
    return work


@pytest.mark.parametrize("rules,template", [("minimind2", "minimind2"), ("minimind3", "minimind3"),
                                            ("cispo", "minimind3")])
def test_the_minimind_recipes_run_on_a_checkout_of_stand_ins(tmp_path, monkeypatch, rules, template):
    """The MiniMind2, minimind-3 and minimind-3 GRPO (CISPO) commands, verbatim but for SHORT, as one process
    (torchrun's N processes take one process's step: tests/test_ddp.py)."""
    found = [cmd for cmd in commands(README, ("torchrun",)) if "--reward_rules" in cmd and "--tools" not in cmd]
    by_kind = {("cispo" if "--policy_loss" in cmd else cmd[cmd.index("--reward_rules") + 1]): cmd for cmd in found}
    assert set(by_kind) == {"minimind2", "minimind3", "cispo"}
    cmd = by_kind[rules]
    assert cmd[:4] == ["torchrun", "--nproc_per_node", "2", "train_ppo.py"]
    monkeypatch.chdir(minimind_checkout(tmp_path, template))
    run(trainer_argv(cmd) + SHORT + ["--max_seq_len", "80"])
    (step,) = [m for m in metrics(tmp_path / "minimind" / "out") if "reward" in m]
    assert "reward_rm" in step and ("reward_format" in step) == (rules == "minimind2")
    assert (tmp_path / "minimind" / "out" / "ppo_actor_64.pth").exists()


# ----------------------------------------------------------------------------- a Hugging Face model
def test_the_hugging_face_lora_grpo_recipe_with_its_python_reward(tmp_path, monkeypatch):
    """The README's data row, reward function and command, verbatim, on a tiny Qwen2 stand-in: every logged
    reward is the README's function applied to the logged response and its row's answer."""
    text = section("A Hugging Face model with LoRA, GRPO and a Python reward")
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("qwen2", tmp_path / "Qwen2.5-0.5B-Instruct", str(ROOT / "model"))
    row = json.loads(re.search(r"`(\{\"prompt\".*?\})`", text).group(1))
    rows = [dict(row, prompt=[{"role": "user", "content": f"What is {a} + {b}?"}], answer=str(a + b))
            for a in range(10, 18) for b in (3, 25)]
    (tmp_path / "arithmetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "my_reward.py").write_text(code)
    (cmd,) = commands(text)
    run(cmd[2:] + SHORT + ["--log_samples", "64"])
    namespace = {}
    exec(code, namespace)
    samples = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
    by_question = {r["prompt"][0]["content"]: r["answer"] for r in rows}
    assert len(samples) == 64
    for s in samples:
        question = next(q for q in by_question if q in s["prompt"])
        assert s["reward_custom"] == namespace["accuracy"]([s["prompt"]], [s["response"]], [by_question[question]])[0]
        assert s["reward"] == s["reward_custom"]  # no reward model, no rules beside the function
    assert (tmp_path / "out" / "ppo_actor_lora" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "ppo_actor_hf" / "config.json").exists()


def test_the_dapo_recipe_runs_on_verls_parquet(tmp_path, monkeypatch):
    (cmd,) = commands(section("DAPO"))
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("qwen2", tmp_path / "Qwen2.5-0.5B-Instruct", str(ROOT / "model"))
    kit.write_verl_parquet(tmp_path)
    (tmp_path / "gsm8k_reward.py").write_text(kit.GSM8K_REWARD)
    run(cmd[2:] + SHORT + ["--batch_size", "4", "--eval_limit", "4", "--overlong_buffer_len", "4"])  # 8 new tokens
    (step,) = [m for m in metrics(tmp_path / "out") if "filter_batches_drawn" in m]
    assert "reward_overlong" in step and "reward_custom" in step


# ----------------------------------------------------------------------------- several GPUs, resume
def test_the_ddp_command_parses_and_runs_as_one_process(tmp_path, monkeypatch):
    text = section("Several GPUs: DDP and FSDP")
    ddp = [cmd for cmd in commands(text, ("torchrun",)) if "--fsdp" not in cmd]
    (cmd,) = ddp
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("qwen2", tmp_path / "Qwen2.5-1.5B-Instruct", str(ROOT / "model"))
    build_tiny_reward_model(tmp_path / "Skywork-Reward-V2-Llama-3.1-8B")
    shutil.copy(ROOT / "dataset" / "prompts_sample.jsonl", tmp_path / "prompts.jsonl")
    run(trainer_argv(cmd) + SHORT + ["--max_seq_len", "80"])
    assert "reward_rm" in metrics(tmp_path / "out")[-1]
    (sharded,) = [cmd for cmd in commands(text, ("torchrun",)) if "--fsdp" in cmd]
    assert train_ppo.parse_args(trainer_argv(sharded)).fsdp == 1


def test_the_resume_recipe_continues_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (cmd,) = commands(section("Resume"))
    demo = ["--max_gen_len", "8", "--device", "cpu", "--save_interval", "1", "--eval_limit", "4"]
    run(demo + ["--max_steps", "1"])
    run(cmd[2:] + demo + ["--max_steps", "2"])
    assert [m["step"] for m in metrics(tmp_path / "out") if "reward" in m] == [1, 2]


# ----------------------------------------------------------------------------- tool use
def tool_tokenizer(folder, template="minimind3_tools"):
    """The project tokenizer with a chat template that renders tools (test_minimind_setup.TEMPLATES)."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "model")
    tokenizer.chat_template = TEMPLATES[template]
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_tool_use_recipe_with_its_calculator_and_reward(tmp_path, monkeypatch):
    """The README's tool, reward and command, verbatim, on a tiny Qwen2 stand-in whose template renders tools: the
    tool computes, the run logs tool use, and every logged reward is the README's function of the logged turns."""
    from tools import ToolRunner
    text = section("Tool use (multi-turn)")
    monkeypatch.chdir(tmp_path)
    save_tiny_hf_model("qwen2", tmp_path / "Qwen2.5-0.5B-Instruct", tool_tokenizer(tmp_path / "tok"))
    tool_code, reward_code = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "my_tools.py").write_text(tool_code)
    (tmp_path / "my_reward.py").write_text(reward_code)
    with ToolRunner(tmp_path / "my_tools.py") as runner:
        assert runner.names == ["calculator"]
        assert runner.run({"name": "calculator", "arguments": {"expression": "(17 + 25) * 3"}}) == "126"
        assert "ValueError" in runner.run({"name": "calculator", "arguments": {"expression": "2 ** 99999999"}})
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} * {b}?"}], "answer": str(a * b)}
            for a in range(10, 18) for b in (3, 25)]
    (tmp_path / "arithmetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = next(c for c in commands(text) if "my_tools.py" in c)
    run(cmd[2:] + SHORT + ["--log_samples", "64", "--max_turns", "2"])
    (step,) = [m for m in metrics(tmp_path / "out") if "tool_call_rate" in m]
    assert step["turns"] >= 1.0
    namespace = {}
    exec(reward_code, namespace)
    samples = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
    by_question = {r["prompt"][0]["content"]: r["answer"] for r in rows}
    assert len(samples) == 64
    for s in samples:
        answer = next(a for q, a in by_question.items() if q in s["prompt"])
        assert s["reward_custom"] == namespace["final_answer"]([s["turns"]], [answer])[0]
    # a number only the tool wrote earns nothing: the reward reads the final turn
    turns = [{"role": "assistant", "content": "<tool_call>x</tool_call>"}, {"role": "tool", "content": "126"},
             {"role": "assistant", "content": "done"}]
    assert namespace["final_answer"]([turns], ["126"]) == [0.0]


def test_the_minimind3_agent_recipe_runs_on_a_checkout_of_stand_ins(tmp_path, monkeypatch):
    """minimind-3's agent RL command, verbatim but for SHORT, on MiniMind's agent data layout (tools as a JSON string
    in the system message, a gt list) with a minimind-3 template that renders tools, and the shipped mock tools."""
    (cmd,) = [cmd for cmd in commands(README, ("torchrun",)) if "--tools" in cmd]
    assert cmd[cmd.index("--reward_rules") + 1] == "minimind3_agent"
    work = minimind_checkout(tmp_path, "minimind3_tools")
    from tools import load_tools, tool_schemas
    schemas = tool_schemas(load_tools(ROOT / "examples" / "minimind3_tools.py"))
    rows = [{"conversations": [{"role": "system", "content": "", "tools": json.dumps(schemas[:2], ensure_ascii=False)},
                               {"role": "user", "content": f"What is {a} * 3?"},
                               {"role": "assistant", "content": "无"}], "gt": [str(a * 3)]} for a in range(12)]
    (tmp_path / "minimind" / "dataset" / "agent_rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(work)
    argv = trainer_argv(cmd)
    argv[argv.index("--tools") + 1] = str(ROOT / "examples" / "minimind3_tools.py")  # the checkout has no examples/
    run(argv + SHORT + ["--dtype", "float32"])
    (step,) = [m for m in metrics(tmp_path / "minimind" / "out") if "reward" in m]
    assert {f"reward_{p}" for p in ("tags", "rm", "tool_calls", "gt", "unfinished", "clip")} <= set(step)
    assert "tool_call_rate" in step and (tmp_path / "minimind" / "out" / "agent_64.pth").exists()


def test_the_tool_demo_command_runs_on_the_shipped_kit(tmp_path, monkeypatch):
    """The README's tool demo command, verbatim but for SHORT, on the shipped demo/tools kit: the policy calls the
    calculator and the evaluation reports tool use."""
    (cmd,) = [c for c in commands(section("Tool use (multi-turn)")) if "demo/tools/calculator.py" in c]
    monkeypatch.chdir(ROOT)
    run(cmd[2:] + SHORT + ["--save_dir", str(tmp_path / "out"), "--eval_limit", "8", "--batch_size", "2",
                           "--mini_batch_size", "8", "--max_gen_len", "64"])
    (step,) = [m for m in metrics(tmp_path / "out") if "tool_call_rate" in m]
    assert step["tool_call_rate"] > 0 and step["turns"] > 1
    assert [m["eval_tool_call_rate"] for m in metrics(tmp_path / "out") if "eval_tool_call_rate" in m][0] > 0
