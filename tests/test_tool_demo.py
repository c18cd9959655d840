"""The tool-use demo kit (scripts/build_tool_demo.py): its miniature build, template, tool and data."""
import json
import os
import sys

import pytest
import torch
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import build_tool_demo  # noqa: E402
from dataset.lm_dataset import RLAIFDataset  # noqa: E402
from model.model_minimind import MiniMindForCausalLM, config_from_state_dict  # noqa: E402
from multi_turn import check_tool_template  # noqa: E402
from tools import ToolRunner, load_tools, parse_tool_calls, tool_schemas  # noqa: E402
from trainer_utils import load_state_dict_file  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools_kit")
    return build_tool_demo.main(["--tiny", "--out", str(out)])


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_miniature_kit_files(kit):
    paths = kit["paths"]
    for key in ("tool", "train", "eval", "actor"):
        assert os.path.isfile(paths[key]), key
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(paths["tokenizer"], name))
    info = json.load(open(os.path.join(os.path.dirname(paths["actor"]), "build_info.json")))
    assert info["args"]["tiny"] and "accuracy" in info["sft_heldout_greedy"]
    assert "tool_call_rate" in info["sft_heldout_sampled_t1"]
    state = load_state_dict_file(paths["actor"])  # MiniMind's fp16 state dict, loadable as the trainer loads it
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    MiniMindForCausalLM(config_from_state_dict(state)).load_state_dict(state, strict=True)


def test_template_carries_tool_conversations(kit):
    paths = kit["paths"]
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    schemas = tool_schemas(load_tools(paths["tool"]))
    assert [s["function"]["name"] for s in schemas] == ["calculator"]
    check_tool_template(tokenizer, schemas, {}, ["<|im_end|>"], "test")
    chat = [{"role": "user", "content": "What is 347 * 29?"}]
    prompt = tokenizer.apply_chat_template(chat, tools=schemas, tokenize=False, add_generation_prompt=True)
    assert "calculator(expression)" in prompt and "<tool_call>" in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is 347 * 29?<|im_end|>\n<|im_start|>assistant\n")
    # without tools: plain ChatML, as the project's own template
    plain = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert plain == "<|im_start|>user\nWhat is 347 * 29?<|im_end|>\n<|im_start|>assistant\n"
    call = build_tool_demo.tool_call_text("347 * 29")
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": call},
                                                 {"role": "tool", "name": "calculator", "content": "10063"}],
                                         tools=schemas, tokenize=False, add_generation_prompt=True)
    assert full.endswith(f"{call}<|im_end|>\n<|im_start|>user\n<tool_response>\n10063\n</tool_response><|im_end|>\n"
                         f"<|im_start|>assistant\n")
    # structured tool_calls render as the policy writes them
    structured = tokenizer.apply_chat_template(
        chat + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "347 * 29"}}}]}],
        tools=schemas, tokenize=False)
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in structured


def test_calculator_through_tool_runner(kit):
    runner = ToolRunner(kit["paths"]["tool"], 5, 2048)
    try:
        assert runner.names == ["calculator"]
        run = lambda text: runner.run(parse_tool_calls(text)[0])  # noqa: E731
        assert run(build_tool_demo.tool_call_text("347 * 29")) == "10063"
        assert run(build_tool_demo.tool_call_text("-(2 + 3) * 4 - 1")) == "-21"
        for bad in ("347 times 29", "2 ** 10", "__import__('os')", "1 / 2", "9" * 300):
            assert "error" in json.loads(run(build_tool_demo.tool_call_text(bad))), bad
        assert "error" in json.loads(run(build_tool_demo.tool_call_text("1 + 2", broken=True)))  # bad JSON
    finally:
        runner.close()


def test_data_rows_disjoint_and_right(kit):
    paths = kit["paths"]
    train, held_out = rows(paths["train"]), rows(paths["eval"])
    assert len(train) == build_tool_demo.TINY["n_train"] and len(held_out) == build_tool_demo.TINY["n_eval"]
    question = lambda row: row["messages"][-1]["content"]  # noqa: E731
    numbers = lambda row: tuple(int(t) for t in question(row).replace("?", " ").replace(".", " ").split()  # noqa: E731
                                if t.isdigit())
    assert not {question(r) for r in train} & {question(r) for r in held_out}
    assert not {numbers(r) for r in train} & {numbers(r) for r in held_out}  # no pair in both, in any phrasing
    for row in train + held_out:
        assert set(row) == {"messages", "answer"} and [m["role"] for m in row["messages"]] == ["user"]
        k = build_tool_demo.phrasing_of(question(row))
        a, b = numbers(row)
        op = "*" if "*" in question(row) or "times" in question(row) else "+"
        assert build_tool_demo.true_value(build_tool_demo.Question(op, a, b, k)) == int(row["answer"])
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    schemas = tool_schemas(load_tools(paths["tool"]))
    samples = RLAIFDataset(paths["eval"], tokenizer, max_length=None, tools=schemas).samples
    assert all("calculator" in s["prompt"] for s in samples)
