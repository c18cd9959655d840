"""One definition of "the answer" (the correctness reward and the held-out accuracy), minimind-3's reward rules
exactly as docs/minimind.md "minimind-3's reward rules" gives them (numbers computed by hand), the project's minimind3_cjk variant, and
--rm_clip. Names are read off the `reward` module inside each test, so that each test fails on its own."""
import pytest
import torch

import evaluation
import reward

PROMPT = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
OPEN = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>\n"  # minimind-3, open_thinking
CLOSED = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class RecordingRM:
    """The RewardModel interface Reward calls: score(chats, batch_size) -> [N]; remembers the chats."""

    def __init__(self, scores=None):
        self.chats, self.scores = [], scores

    def score(self, chats, batch_size=32):
        self.chats += chats
        return torch.tensor(self.scores, dtype=torch.float32) if self.scores else torch.zeros(len(chats))


# ----------------------------------------------------------------------------- the answer
# (response, correct against "12")
FORMS = [
    ("<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>", True),  # the <answer> content
    ("12", True),  # bare
    ("<think>\n7 + 5 = 12\n</think>12", True),  # after </think>
    ("<think>a</think>x</think> 12", True),  # after the LAST </think>
    (" 12 \n", True),  # stripped
    ("<think>\n12\n</think>\n13", False),  # the text after </think> is the answer, not the thinking
    ("<answer>12</answer><answer>13</answer>", True),  # the first span
    ("<think>\n12\n</think><answer>13</answer>", False),  # a span wins over the text after </think>
    ("The answer is 12.", False),
    ("<think>\n7 + 5 = 12", False),  # an unclosed think block: the whole response
]


def test_final_answer_is_the_one_definition():
    assert [reward.final_answer(r) for r, _ in FORMS[:5]] == ["12"] * 5
    assert reward.final_answer("<think>\n12\n</think>\n13") == "13"
    assert reward.final_answer("<think>\n7 + 5 = 12") == "<think>\n7 + 5 = 12"
    assert [reward.is_correct(r, " 12\n") for r, _ in FORMS] == [ok for _, ok in FORMS]
    assert not reward.is_correct("12", None)
    for old in ("answer_of", "answer_correct"):  # no second definition left
        assert not hasattr(reward, old)


@pytest.mark.parametrize("prompt", [PROMPT, OPEN])
def test_correctness_reward_uses_the_answer(prompt):
    responses = [r for r, _ in FORMS]
    _, parts = reward.Reward(None, rules="none", correctness=2.0)([prompt] * len(FORMS), responses,
                                                                   ["12"] * len(FORMS))
    assert parts["correctness"].tolist() == [2.0 * ok for _, ok in FORMS]
    # MiniMind2's rules (scored_turn adds the prompt's <think> opening for its format): the same answer
    _, parts = reward.Reward(None, rules="minimind2", correctness=1.0)([prompt] * len(FORMS), responses,
                                                                        [" 12 "] * len(FORMS))
    assert parts["correctness"].tolist() == [1.0 * ok for _, ok in FORMS]


def fixed_generate(responses):
    def generate(model, tokenizer, samples, *args, **kwargs):
        assert len(samples) == len(responses)
        return list(responses), torch.ones(len(samples), dtype=torch.bool), torch.full((len(samples),), 5.0), None
    return generate


def test_held_out_accuracy_uses_the_same_answer(monkeypatch):
    samples = [{"prompt": OPEN, "answer": "12", "messages": None} for _ in FORMS]
    for (response, ok), sample in zip(FORMS, samples):  # each form alone
        monkeypatch.setattr(evaluation, "generate", fixed_generate([response]))
        sums, _ = evaluation.evaluation_sums(None, None, [sample], None, 8, 8, "cpu", True)
        assert sums["accuracy"] == float(ok), response
    monkeypatch.setattr(evaluation, "generate", fixed_generate([r for r, _ in FORMS]))
    rule = reward.Reward(None, rules="minimind3", correctness=1.0)
    sums, _ = evaluation.evaluation_sums(None, None, samples, rule, 4, 8, "cpu", True)
    assert sums["accuracy"] == sum(ok for _, ok in FORMS) == 6
    # the correctness part of the same responses counts the same ones
    _, parts = rule([OPEN] * len(FORMS), [r for r, _ in FORMS], ["12"] * len(FORMS))
    assert parts["correctness"].sum().item() == sums["accuracy"]


def test_with_a_users_function_the_held_out_set_reports_its_score_and_keys(monkeypatch, tmp_path):
    """A GSM8K-style task scored by verl's compute_score: the held-out evaluation reports that function's score
    and the keys it returns (acc), not the project's answer rule, which would call every right answer written
    as verl's '#### 42' wrong. With --correctness_reward the project's rule is the reward, and is reported."""
    from reward_functions import RewardFunction
    (tmp_path / "gsm8k.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    right = solution_str.strip().endswith('#### ' + ground_truth)\n"
        "    return {'score': float(right), 'acc': right}\n")
    fn = RewardFunction(f"{tmp_path / 'gsm8k.py'}:compute_score")
    fn.label_key = "answer"
    samples = [{"prompt": "q", "answer": a, "messages": None, "row": {"data_source": "gsm8k"}} for a in ("42", "7")]
    monkeypatch.setattr(evaluation, "generate", fixed_generate(["so #### 42", "#### 8"]))
    metrics, _ = evaluation.evaluate(None, None, samples, reward.Reward(None, rules="none", functions=[fn]))
    assert "accuracy" not in metrics
    assert metrics["reward"] == metrics["reward_custom"] == metrics["reward_custom/acc"] == 0.5
    assert "| mean reward part custom/acc | 0.500 |" in evaluation.markdown_table({"a": metrics})
    metrics, _ = evaluation.evaluate(None, None, samples, reward.Reward(None, rules="none", functions=[fn],
                                                                        correctness=1.0))
    assert metrics["accuracy"] == 0.0  # the project's rule: '#### 42' is not '42'


# ----------------------------------------------------------------------------- minimind-3's rules
def m3(response, prompt=OPEN, rules="minimind3", rm=None):
    """(parts as floats, the chat the reward model saw) of one response under `rules`."""
    rm = rm or RecordingRM()
    _, parts = reward.Reward(rm, rules=rules)([prompt], [response])
    return {k: v.item() for k, v in parts.items()}, rm.chats[0]


@pytest.mark.parametrize("n, want", [(19, -0.5), (20, 0.5), (800, 0.5), (801, -0.5)])
def test_length_is_of_the_stripped_response_as_generated(n, want):
    # an open_thinking prompt ends with "<think>\n": minimind-3 measures the response, not "<think>\n" + it
    parts, _ = m3(" " + "a" * n + "\n")
    assert parts["length"] == want and parts["think"] == 0.0


@pytest.mark.parametrize("thinking, want", [
    ("t" * 19, -0.5), ("t" * 20, 1.0), ("t" * 300, 1.0), ("t" * 301, -0.5),
    ("\n " + "t" * 20 + " \n", 1.0),  # stripped
    # a <think> the model writes itself is part of the text minimind-3 measures: 7 + 13 = 20 characters
    ("<think>" + "t" * 13, 1.0),
    ("<think>\n" + "t" * 12, 1.0), ("<think>\n" + "t" * 11, -0.5),  # 8 + 12 = 20; 8 + 11 = 19
])
@pytest.mark.parametrize("prompt", [OPEN, CLOSED])  # whatever the prompt holds: the response is measured
def test_thinking_part_is_the_text_before_the_first_think_close(thinking, want, prompt):
    parts, chat = m3(thinking + "</think>\n 12 ", prompt=prompt)
    assert parts["think"] == want + 0.25
    assert chat[-1] == {"role": "assistant", "content": "12"}


def test_two_think_closes_cost_a_quarter_and_the_answer_follows_the_first():
    parts, chat = m3("t" * 25 + "</think>a</think> b ")
    assert parts["think"] == 1.0 - 0.25
    assert chat[-1]["content"] == "a</think> b"
    assert m3("t" * 25 + "</think>a")[0]["think"] == 1.0 + 0.25


def test_without_think_close_the_answer_is_the_whole_response_as_it_is():
    parts, chat = m3(" 12\n", prompt=CLOSED)
    assert parts == {"length": -0.5, "think": 0.0, "repetition": 0.0, "rm": 0.0}
    assert chat[-1] == {"role": "assistant", "content": " 12\n"}


@pytest.mark.parametrize("answer, penalty", [
    # a b c a b c d: 5 trigrams (abc bca cab abc bcd), 4 distinct -> (5 - 4) * 0.5 * 2 / 5
    ("a b c a b c d", 0.2),
    ("A b c a B c D", 0.2),  # lower-cased first
    ("ok ok ok ok ok ok", 0.5),  # 4 trigrams, 1 distinct: 3 * 0.5 * 2 / 4 = 0.75, capped at 0.5
    ("ok ok ok ok ok", 0.5),  # 3 trigrams, 1 distinct: 2 / 3, capped
    ("一二三一二三一二三", 0.0),  # a CJK run without spaces is ONE token: no trigram
    ("你好，你好，你好。", 0.25),  # 你好 ， 你好 ， 你好 。: 4 trigrams, 3 distinct
    ("café café café", 0.0),  # Unicode words: 3 tokens, one trigram
    ("x. x. x. x.", 0.5),  # x . x . x . x .: 6 trigrams, 2 distinct -> 4 / 6, capped
    ("yes no yes no yes", 1 / 3),  # 3 trigrams, 2 distinct
    ("hello world", 0.0), ("", 0.0),  # no trigram
])
def test_repetition_penalty_hand_computed(answer, penalty):
    assert reward.repetition(answer) == pytest.approx(penalty)
    parts, _ = m3("t" * 30 + "</think>\n" + answer)
    assert parts["repetition"] == pytest.approx(-penalty)


def test_minimind3_cjk_counts_cjk_characters():
    assert "minimind3_cjk" in reward.REWARD_RULES
    # 一 二 三 一 二 三 四: 5 trigrams, 4 distinct -> 0.2 (minimind3: one token, 0)
    assert reward.repetition("一二三一二三四", reward.CJK_TOKENS) == pytest.approx(0.2)
    # ok 一 二 ok 一 二: 4 trigrams, 3 distinct -> 0.25 (minimind3: ok 一二 ok 一二, 2 distinct trigrams -> 0)
    assert reward.repetition("OK 一二 ok 一二", reward.CJK_TOKENS) == pytest.approx(0.25)
    assert reward.repetition("一二三一二三一二三", reward.CJK_TOKENS) == 0.5  # 4 / 7, capped
    assert reward.repetition("a b c a b c d", reward.CJK_TOKENS) == pytest.approx(0.2)  # words as minimind3
    response = "t" * 30 + "</think>\n一二三一二三四"
    cjk, chat_cjk = m3(response, rules="minimind3_cjk")
    plain, chat = m3(response)
    assert cjk["repetition"] == pytest.approx(-0.2) and plain["repetition"] == 0.0
    del cjk["repetition"], plain["repetition"]
    assert cjk == plain
    assert chat_cjk == chat


def test_reward_model_sees_the_collapsed_history_and_the_answer():
    history = [("user", "Hi"), ("assistant", "Hello"), ("user", "What is 7 + 5?")]
    prompt = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in history) + "<|im_start|>assistant\n<think>\n"
    rm = RecordingRM([5.0])
    total, parts = reward.Reward(rm, rules="minimind3")([prompt], ["Seven plus five is twelve.\n</think>\n\n12"])
    assert rm.chats == [[{"role": "user", "content": "user: Hi\nassistant: Hello\n以上是对话历史。我的新问题是：\n"
                                                     "What is 7 + 5?"},
                         {"role": "assistant", "content": "12"}]]
    # 39 characters stripped: +0.5; thinking 26: +1.0 + 0.25; "12": no trigram; rm 5 clipped to 3
    assert {k: v.item() for k, v in parts.items()} == {"length": 0.5, "think": 1.25, "repetition": 0.0, "rm": 3.0}
    assert total.item() == pytest.approx(0.5 + 1.25 + 3.0)
    # no history: the last message's content alone
    _, chat = m3("t" * 30 + "</think>12")
    assert chat == [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"}]
    with_system = "<|im_start|>system\nBe brief.<|im_end|>\n" + OPEN
    _, chat = m3("t" * 30 + "</think>12", prompt=with_system)
    assert chat[0]["content"] == "system: Be brief.\n以上是对话历史。我的新问题是：\nWhat is 7 + 5?"
    assert reward.collapse_history([{"role": "user", "content": "Q"}]) == [{"role": "user", "content": "Q"}]


# ----------------------------------------------------------------------------- --rm_clip
def test_rm_clip_zero_is_no_clipping_and_negative_is_an_error():
    scores = [5.0, -7.0, 0.5]
    prompts, responses = [PROMPT] * 3, ["a", "b", "c"]
    _, parts = reward.Reward(RecordingRM(scores), reasoning=False, rm_clip=0)(prompts, responses)
    assert parts["rm"].tolist() == scores
    _, parts = reward.Reward(RecordingRM(scores), reasoning=False, rm_clip=3.0)(prompts, responses)
    assert parts["rm"].tolist() == [3.0, -3.0, 0.5]
    # MiniMind2's blend, unclipped: 0.4 * whole + 0.6 * answer-only
    good = "<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>"
    _, parts = reward.Reward(RecordingRM([5.0, -7.0]), rules="minimind2", rm_clip=0)([PROMPT], [good])
    assert parts["rm"].item() == pytest.approx(0.4 * 5.0 + 0.6 * -7.0)
    for bad in (-1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"--rm_clip {bad}"):
            reward.Reward(RecordingRM(), rm_clip=bad)
