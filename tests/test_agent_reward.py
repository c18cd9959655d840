"""minimind-3's agent reward (reward.minimind3_agent_reward, gt_found, required_arguments_present) and its mock
tools (examples/minimind3_tools.py) against what MiniMind-3's own trainer/train_agent.py returned on the same
inputs: tests/fixtures/minimind3_agent.json, made by tests/fixtures/make_agent_fixtures.py (see its README)."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
from transformers.utils import get_json_schema

from reward import (AGENT_PARTS, CHATML_TURN, gt_found, minimind3_agent_reward, minimind3_tool_checks,
                    required_arguments_present, tool_checks)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "minimind3_agent.json").read_text(encoding="utf-8"))
TRANSCRIPTS = {t["name"]: t for t in FIXTURE["transcripts"]}
UPSTREAM_SCHEMAS = {t["function"]["name"]: t for t in FIXTURE["tools"]}


def load_tools():
    spec = importlib.util.spec_from_file_location("minimind3_tools", ROOT / "examples" / "minimind3_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLS = load_tools()
OUR_SCHEMAS = {fn.__name__: get_json_schema(fn) for fn in TOOLS.TOOLS}


def test_fixture_covers_the_cases():
    assert len(TRANSCRIPTS) >= 40
    names = " ".join(TRANSCRIPTS)
    for kind in ("nocall_", "call_", "crash_", "unfinished", "clip_low", "clips_high", "commas", "string_arguments"):
        assert kind in names


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_transcript_matches_minimind3(name):
    """Total within 1e-9 of MiniMind-3's calculate_rewards (float64), with and without a reward model; the
    reward model sees the same answer, on the same rollouts. A call MiniMind-3 raises on (crash_*) counts as
    an invalid call: the fixture's totals are MiniMind-3's for the rollout with that call made invalid."""
    t = TRANSCRIPTS[name]
    args = (t["turns"], t["gt"], t["tools"], t["unfinished"])
    total, parts = minimind3_agent_reward(*args)
    assert total == pytest.approx(t["total"], abs=1e-9)
    assert tuple(parts) == AGENT_PARTS and parts["rm"] == 0.0
    assert sum(parts.values()) == pytest.approx(total, abs=1e-12) and -3.0 <= total <= 3.0
    assert parts["clip"] == pytest.approx(total - sum(v for k, v in parts.items() if k != "clip"), abs=1e-12)

    scored = []
    total_rm, parts_rm = minimind3_agent_reward(*args, rm_score=lambda answer: scored.append(answer) or
                                                len(answer) % 7 - 3)
    assert total_rm == pytest.approx(t["total_rm"], abs=1e-9)
    assert scored == [c["answer"] for c in t["rm_calls"]]
    for c in t["rm_calls"]:  # the reward model's chat: read back from the prompt as this project's Reward does
        assert [{"role": r, "content": m.strip()} for r, m in CHATML_TURN.findall(t["prompt"])] == c["messages"]
        assert parts_rm["rm"] == len(c["answer"]) % 7 - 3
    if "as_invalid" in t:
        assert minimind3_agent_reward(t["as_invalid"], *args[1:])[0] == pytest.approx(total, abs=1e-12)


def test_gt_found_matches_minimind3():
    for case in FIXTURE["gt_cases"]:
        found = gt_found(case["text"], case["gt"])
        assert found == {case["gt"][i] for i in case["found"]}, case
        assert len(found) == case["size"], case


def test_tool_schemas_match_minimind3():
    """The examples' functions give MiniMind-3's tool list: names in order, parameters, their types, required."""
    assert list(OUR_SCHEMAS) == list(UPSTREAM_SCHEMAS)
    for name, ours in OUR_SCHEMAS.items():
        mine, theirs = ours["function"]["parameters"], UPSTREAM_SCHEMAS[name]["function"]["parameters"]
        assert {p: s["type"] for p, s in mine["properties"].items()} == \
            {p: s["type"] for p, s in theirs["properties"].items()}, name
        assert mine.get("required", []) == theirs["required"], name


def test_required_arguments_present_matches_check_args():
    """For MiniMind-3's schemas and the examples' ones alike, and through minimind3_tool_checks: the same verdict
    as MiniMind-3's CHECK_ARGS; where CHECK_ARGS raises (arguments that are not an object), invalid."""
    default = minimind3_tool_checks()
    for case in FIXTURE["check_args"]:
        name, arguments = case["tool"], case["arguments"]
        expected = case["value"] if "value" in case else False
        assert required_arguments_present(UPSTREAM_SCHEMAS[name])(arguments) is expected, case
        assert required_arguments_present(OUR_SCHEMAS[name])(arguments) is expected, case
        assert default(name, arguments) is expected, case
    assert default("search_web", {"query": "x"}) is False  # no check for a tool MiniMind-3 does not have


def test_mock_tools_match_minimind3():
    """Each function returns MiniMind-3's mock result (same JSON text, key order included) or raises where it
    raised; only argument sets with every required argument (the functions refuse missing ones)."""
    for case in FIXTURE["mock_results"]:
        tool = getattr(TOOLS, case["tool"])
        if "error" in case:
            with pytest.raises(Exception):
                tool(**case["arguments"])
            continue
        result = tool(**case["arguments"])
        assert json.dumps(result, ensure_ascii=False) == json.dumps(case["value"], ensure_ascii=False), case


def test_calculate_math_refuses_what_is_not_arithmetic():
    for case in FIXTURE["math_refused"]:  # MiniMind-3's eval accepts some of these; the examples do not
        with pytest.raises(ValueError):
            TOOLS.calculate_math(case["expression"])
    start = time.perf_counter()
    for expression in ("9**9**9", "(9**9999)**9999", "10**10**10", "2**64001", "(2**40000)*(2**40000)",
                       "math.factorial(10**7)", "math.comb(10**7, 10**6)", "2^9999999"):
        with pytest.raises(ValueError):  # refused before computing, not after seconds
            TOOLS.calculate_math(expression)
    assert time.perf_counter() - start < 1.0
    assert len(TOOLS.calculate_math("2**10000")["result"]) == 3011


def test_hand_computed_no_call():
    turn = "<think>\nThe user greets me; a short friendly reply is enough.\n</think>\nHello! Nice to meet you."
    total, parts = minimind3_agent_reward([turn], ["unused"], ["get_current_weather"], False,
                                          rm_score=lambda answer: 1.0 if answer == "Hello! Nice to meet you." else 0)
    # length: 94 stripped characters, in 5..800 -> +0.5
    # think: the text before </think> stripped is 66 characters ("<think>" counts), in 20..300 -> +1.0; one
    #        </think> -> +0.25
    # rm: the answer after </think>, stripped -> +1.0
    # repetition: hello ! nice to meet you . -> 5 trigrams, all distinct -> 0
    assert parts == dict(tags=0.0, length=0.5, think=1.25, rm=1.0, repetition=0.0, tool_calls=0.0, gt=0.0,
                         unfinished=0.0, clip=0.0)
    assert total == 2.75


def test_hand_computed_calls():
    weather = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "北京"}}\n</tool_call>'
    total, parts = minimind3_agent_reward([weather, "Beijing is 28°C today"], ["28°C", "7.21"], ["get_current_weather"],
                                          False)
    # 1 valid call vs 2 gt values: gap |1 - 2| + 0 invalid = 1 -> -0.5
    # gt: "28°C" is in the final text, "7.21" is not -> 2.5 * 1/2 = 1.25; repetition: 4 tokens, 2 trigrams -> 0
    assert (total, parts["tool_calls"], parts["gt"], parts["repetition"]) == (0.75, -0.5, 1.25, 0.0)

    unknown = '<tool_call>\n{"name": "search_web", "arguments": {"query": "x"}}\n</tool_call>'
    total, parts = minimind3_agent_reward([unknown * 7 + "<tool_call>", "none found"], [], ["get_current_weather"],
                                          False)
    # 7 invalid calls, no gt: gap 0 + 7 = 7 -> -3.5; the first turn has 8 <tool_call> and 7 </tool_call> -> -0.5
    # final text "none found": no trigram -> 0. Sum -4.0, clipped to -3.0: clip +1.0
    assert (total, parts["tool_calls"], parts["tags"], parts["clip"]) == (-3.0, -3.5, -0.5, 1.0)

    # unfinished: 2 valid calls for 2 gt values -> +0.5; but the final text is "", so no gt credit; -0.5; and the
    # repetition is that of the last turn's answer, the call itself: 30 tokens, 28 trigrams, '" : "' twice ->
    # min(0.5, 1 / 28). Total -1/28
    total, parts = minimind3_agent_reward([weather, weather], ["28°C", "x"], ["get_current_weather"], True)
    assert (parts["tool_calls"], parts["gt"], parts["unfinished"]) == (0.5, 0.0, -0.5)
    assert parts["repetition"] == pytest.approx(-1 / 28) and total == pytest.approx(-1 / 28)


def test_tool_checks_for_other_tools():
    search = {"type": "function", "function": {"name": "search_web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": ["integer", "null"]}},
        "required": ["query", "top_k"]}}}
    check = tool_checks([search])
    assert check("search_web", {"query": "x", "top_k": 0}) and not check("search_web", {"query": "", "top_k": 3})
    assert not check("search_web", {"query": "x", "top_k": None}) and not check("get_current_time", {})
    call = '<tool_call>\n{"name": "search_web", "arguments": "{\\"query\\": \\"x\\", \\"top_k\\": 3}"}\n</tool_call>'
    total, parts = minimind3_agent_reward([call, "Found 3 results"], ["3"], ["search_web"], False,
                                          valid_arguments=check)
    assert (total, parts["tool_calls"], parts["gt"]) == (3.0, 0.5, 2.5)


class LengthScore:
    """A get_score reward model: len(answer) % 7 - 3, the fixture's stand-in; records the chats it scored."""

    def __init__(self):
        self.chats = []

    def get_score(self, tokenizer, chat):
        self.chats.append(chat)
        return len(chat[-1]["content"]) % 7 - 3


@pytest.mark.parametrize("with_rm", [False, True])
def test_the_trainers_reward_is_minimind3s_on_every_transcript(with_rm):
    """Reward(rules="minimind3_agent") on the fixture's rollouts given as the trainer gives them (turns as messages,
    the row's gt column, the prompt's tool schemas, unfinished): MiniMind-3's totals; the reward model reads
    (the history collapsed into one user message, the answer) for the rollouts without a call, and only those."""
    import torch
    from reward import Reward, RewardModel, collapse_history
    rm = LengthScore()
    reward = Reward(RewardModel(rm, None, "get_score") if with_rm else None, rules="minimind3_agent")
    cases = list(TRANSCRIPTS.values())
    transcripts = []
    for t in cases:  # the turns as the trainer logs them: each assistant turn, a tool result after each but the last
        turns = []
        for k, text in enumerate(t["turns"]):
            turns.append({"role": "assistant", "content": text})
            if k < len(t["turns"]) - 1:
                turns.append({"role": "tool", "name": "x", "content": "{}"})
        transcripts.append(turns)
    tools = [[UPSTREAM_SCHEMAS[n] for n in t["tools"] if n in UPSTREAM_SCHEMAS] for t in cases]
    total, parts = reward([t["prompt"] for t in cases], ["whole text"] * len(cases), None, None, None,
                          [{"gt": t["gt"]} for t in cases], transcripts=transcripts,
                          unfinished=torch.tensor([t["unfinished"] for t in cases]), tools=tools)
    want = [t["total_rm" if with_rm else "total"] for t in cases]
    assert total.tolist() == pytest.approx(want, abs=1e-5)
    assert set(parts) == set(AGENT_PARTS)
    if with_rm:
        called = [c for t in cases for c in t["rm_calls"]]
        assert [chat[-1]["content"] for chat in rm.chats] == [c["answer"] for c in called]
        assert [chat[:-1] for chat in rm.chats] == [collapse_history(c["messages"]) for c in called]


def test_minimind3_agent_needs_tool_conversations():
    from reward import Reward
    from trainer_utils import InputError
    with pytest.raises(InputError, match="needs --tools"):
        Reward(None, rules="minimind3_agent")(["<|im_start|>user\nq<|im_end|>\n"], ["a"])
