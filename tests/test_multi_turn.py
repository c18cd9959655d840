"""Multi-turn tool-use rollouts (multi_turn.py) and what the trainer does with them: the policy's tokens only are
trained, penalised and credited; the template's text between turns is exactly transformers' rendering of the
conversation; the log-probs the sampler reports equal one forward over the whole transcript.

A tiny MiniMind memorises one tool conversation (seconds), so that it really calls the tool when sampled."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from core_algos import compute_advantages
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.policy import Policy
from model.sampling import stop_token_ids
from multi_turn import check_tool_template, sample_with_tools
from tools import ToolRunner, tool_schemas, load_tools
from trainer_utils import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a short ChatML template with tools, in the shape of Qwen's: tools listed in a system turn, tool results in a user turn
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS_FILE = '''
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def stall(seconds: float) -> str:
    """Wait.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "done"
'''
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
CHAT = [{"role": "user", "content": "2+3?"}]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """(tokenizer folder, tools file, tokenizer, schemas, a MiniMind that learned the conversation
    user -> call add(2, 3) -> tool 5 -> "5", its .pth)."""
    folder = tmp_path_factory.mktemp("tool_kit")
    tokenizer_dir = folder / "tokenizer"
    shutil.copytree(os.path.join(ROOT, "model"), tokenizer_dir, ignore=lambda d, names: [
        n for n in names if not n.startswith("tokenizer")])
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tools_file = folder / "my_tools.py"
    tools_file.write_text(TOOLS_FILE)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    schemas = tool_schemas(load_tools(str(tools_file)))
    transcript = CHAT + [{"role": "assistant", "content": CALL}, {"role": "tool", "name": "add", "content": "5"},
                         {"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(transcript, tools=schemas, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))  # as init_model reads it back
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # memorise the one conversation
        loss = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    weight = folder / "tool_sft_64.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, weight)
    return tokenizer_dir, tools_file, tokenizer, schemas, model, weight


def rollout(kit, max_turns=3, greedy=True, rows=2, chat=CHAT, timeout=5.0):
    _, tools_file, tokenizer, schemas, model, _ = kit
    prompt = tokenizer(tokenizer.apply_chat_template(chat, tools=schemas, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = torch.tensor([prompt] * rows), torch.ones(rows, len(prompt), dtype=torch.long)
    with ToolRunner(str(tools_file), timeout=timeout) as runner:
        out = sample_with_tools(model, tokenizer, prompt_ids, prompt_mask, [chat] * rows, [schemas] * rows,
                                [{}] * rows, runner, max_turns, 64, stop_token_ids(model, tokenizer), greedy=greedy)
    return prompt_ids, prompt_mask, out


def test_the_policy_calls_the_tool_reads_its_result_and_answers(kit):
    tokenizer, schemas = kit[2], kit[3]
    prompt_ids, _, out = rollout(kit)
    assert out.transcripts[0] == [{"role": "assistant", "content": CALL}, {"role": "tool", "name": "add", "content": "5"},
                                  {"role": "assistant", "content": "5"}]
    assert out.tool_calls.tolist() == [1, 1] and out.tool_errors.tolist() == [0, 0]
    assert not out.unfinished.any() and out.has_eos.all()
    # the sequence is transformers' own rendering of the whole conversation (up to the final stop token)
    n = int(out.response_mask[0].sum())
    sequence = tokenizer.decode(prompt_ids[0].tolist() + out.response_ids[0, :n].tolist())
    assert sequence + "\n" == tokenizer.apply_chat_template(CHAT + out.transcripts[0], tools=schemas, tokenize=False)
    # the policy's tokens are exactly its two turns; the tool's block between them is masked
    action = out.action_mask[0, :n].tolist()
    turn1 = len(tokenizer(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"])
    turn2 = len(tokenizer("5<|im_end|>", add_special_tokens=False)["input_ids"])
    assert action[:turn1] == [1] * turn1 and action[-turn2:] == [1] * turn2
    assert action[turn1:-turn2] == [0] * (n - turn1 - turn2) and n - turn1 - turn2 > 5
    assert (out.logprobs[0, :n] * (1 - out.action_mask[0, :n])).abs().sum() == 0


@pytest.mark.parametrize("greedy", [True, False])
def test_sampler_log_probs_equal_one_forward_over_the_whole_transcript(kit, greedy):
    model = kit[4]
    torch.manual_seed(3)
    prompt_ids, prompt_mask, out = rollout(kit, greedy=greedy, rows=3)
    R = out.response_ids.shape[1]
    logprobs = Policy(model)(torch.cat([prompt_ids, out.response_ids], 1),
                             torch.cat([prompt_mask, out.response_mask], 1), R, 1.0)[0]
    mask = out.action_mask.bool()
    torch.testing.assert_close(logprobs[mask], out.logprobs[mask], atol=2e-5, rtol=0)


def test_last_turn_still_calling_is_unfinished_and_runs_no_tool(kit):
    _, _, out = rollout(kit, max_turns=1)
    assert out.transcripts[0] == [{"role": "assistant", "content": CALL}]
    assert out.unfinished.all() and out.tool_calls.tolist() == [0, 0]
    assert out.action_mask.equal(out.response_mask)


def test_a_tool_that_hangs_becomes_an_error_message_and_the_rollout_goes_on(kit, tmp_path):
    # the memorised model calls add; a runner whose `add` sleeps past the timeout answers with an error
    slow = tmp_path / "slow.py"
    slow.write_text(TOOLS_FILE.replace("return a + b", "time.sleep(30)\n    return a + b"))
    kit_slow = kit[:1] + (slow,) + kit[2:]
    _, _, out = rollout(kit_slow, rows=1, timeout=0.5)
    result = out.transcripts[0][1]
    assert result["role"] == "tool" and "timed out" in json.loads(result["content"])["error"]
    assert out.tool_errors.tolist() == [1] and len(out.transcripts[0]) == 3


def test_gae_skips_the_tool_tokens():
    """GAE over a row whose policy tokens have gaps equals GAE over those tokens alone (a brute-force loop)."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.float)
    rewards, values = torch.randn(2, 9) * mask, torch.randn(2, 9)
    advantages, returns = compute_advantages(rewards, values, mask, 0.9, 0.8)
    for row in range(2):
        at = mask[row].nonzero()[:, 0].tolist()
        r, v = rewards[row, at], values[row, at]
        gae, want = 0.0, [0.0] * len(at)
        for t in reversed(range(len(at))):
            next_v = v[t + 1] if t + 1 < len(at) else 0.0
            gae = r[t] + 0.9 * next_v - v[t] + 0.9 * 0.8 * gae
            want[t] = float(gae)
        torch.testing.assert_close(advantages[row, at], torch.tensor(want), atol=1e-5, rtol=0)
        torch.testing.assert_close(returns[row, at], torch.tensor(want) + v, atol=1e-5, rtol=0)
        assert advantages[row][mask[row] == 0].abs().sum() == 0 and returns[row][mask[row] == 0].abs().sum() == 0


def test_a_template_without_tools_is_refused(kit):
    plain = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
    with pytest.raises(InputError, match="does not render tools="):
        check_tool_template(plain, kit[3], {}, ["<|im_end|>"], "--tools x")
    check_tool_template(kit[2], kit[3], {}, ["<|im_end|>"], "--tools x")  # the tool template passes
    with pytest.raises(InputError, match="not with a stop token"):
        check_tool_template(kit[2], kit[3], {}, ["</s>"], "--tools x")


def train(kit, tmp_path, *extra):
    tokenizer_dir, tools_file, _, _, _, weight = kit
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT, "answer": "5"}) + "\n" for _ in range(8)))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train_ppo.py"), "--from_weight", str(weight), "--tokenizer_path",
           str(tokenizer_dir), "--data_path", str(data), "--eval_data_path", str(data), "--eval_limit", "2",
           "--tools", str(tools_file), "--max_turns", "2", "--reward_model_path", "none", "--reasoning", "0",
           "--correctness_reward", "1", "--batch_size", "2", "--n_samples_per_prompt", "2", "--mini_batch_size", "4",
           "--max_gen_len", "64", "--max_steps", "2", "--save_dir", str(out), "--eval_interval", "2",
           "--log_samples", "4", "--check_tokenizer", "0", "--temperature", "0.5", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics, result.stdout


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_run_with_tools_trains_on_the_policys_turns(kit, tmp_path, estimator):
    out, metrics, log = train(kit, tmp_path, "--adv_estimator", estimator)
    steps = [m for m in metrics if "tool_call_rate" in m]
    assert len(steps) == 2 and steps[0]["tool_call_rate"] >= 0.5 and steps[0]["tool_error_rate"] == 0.0
    assert steps[0]["turns"] > 1.0 and steps[0]["reward_correctness"] >= 0.5
    evals = [m for m in metrics if "eval_tool_call_rate" in m]  # greedy: the memorised conversation
    assert evals and evals[-1]["eval_tool_call_rate"] == 1.0 and evals[-1]["eval_accuracy"] == 1.0
    assert evals[-1]["eval_tool_errors"] == 0.0 and evals[-1]["eval_unfinished_rate"] == 0.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    called = [s for s in samples if len(s["turns"]) == 3]
    assert called and called[0]["turns"][1] == {"role": "tool", "name": "add", "content": "5"}
    # the whole text (what reward functions read) holds the tool's block; response_tokens counts the policy's own
    assert "<tool_response>" in called[0]["response"] and called[0]["response_tokens"] < len(called[0]["response"])
    if estimator == "grpo":  # eval_policy reads the run's tools from run_args.json and evaluates as the trainer
        from scripts import eval_policy
        results = eval_policy.main(["--trained", str(out / "ppo_actor_64.pth"), "--limit", "2", "--device", "cpu"])
        assert results["trained"]["tool_call_rate"] == 1.0 and results["trained"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------- the update, 2 ranks, resume
@pytest.mark.parametrize("flags", [["--adv_estimator", "gae"], ["--adv_estimator", "grpo", "--policy_loss", "cispo"],
                                   ["--adv_estimator", "reinforce_pp", "--loss_agg_mode", "seq-mean-token-mean"]])
def test_the_update_ignores_what_the_tool_positions_hold(flags):
    """Garbage in the old and reference log-probs, values, token rewards and sampler log-probs at a tool's positions
    changes nothing: they are in no loss, KL, advantage or critic target."""
    from ddp_worker import TOOL_GAPS, fixed_rollout, one_update, tiny_models, update_args
    actor, critic = tiny_models("minimind")
    rollout = fixed_rollout(actor, 4, 6, 5, gaps=True)
    before = {k: v.clone() for k, v in actor.state_dict().items()}, {k: v.clone() for k, v in critic.state_dict().items()}
    want = one_update(actor, critic, rollout, update_args(4, 1, *flags))
    garbage = dict(rollout)
    for key in ("old_logprobs", "ref_logprobs", "values", "token_rewards", "sampler_logprobs"):
        garbage[key] = rollout[key].clone()
        garbage[key][:, TOOL_GAPS] = torch.randn(4, len(TOOL_GAPS)) * 5
    actor.load_state_dict(before[0])
    critic.load_state_dict(before[1])
    got = one_update(actor, critic, garbage, update_args(4, 1, *flags))
    for a, b in zip(want, got):
        assert a is None and b is None or all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(want[0][k], before[0][k]) for k in before[0])  # it did update


@pytest.mark.parametrize("flags", [["--adv_estimator", "gae"], ["--adv_estimator", "grpo", "--policy_loss", "cispo"]])
def test_two_ranks_take_the_step_of_one_process_on_a_multi_turn_rollout(tmp_path, flags):
    from children import torchrun
    from ddp_worker import fixed_rollout, one_update, tiny_models, update_args
    from test_policy_losses import assert_same
    torchrun("update", tmp_path, "minimind-gaps", *flags)
    ddp = torch.load(tmp_path / "ddp_update.pt", weights_only=True)
    actor, critic = tiny_models("minimind")
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    actor_sd, _ = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5, gaps=True), update_args(4, 1, *flags))
    assert_same(actor_sd, ddp["actor"], before)


def test_two_rank_run_with_tools_stays_in_step(kit, tmp_path):
    from children import torchrun
    tokenizer_dir, tools_file, _, _, _, weight = kit
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT, "answer": "5"}) + "\n" for _ in range(8)))
    torchrun("train", tmp_path, "--from_weight", weight, "--tokenizer_path", tokenizer_dir, "--data_path", data,
             "--tools", tools_file, "--max_turns", "2", "--reward_model_path", "none", "--reasoning", "0",
             "--correctness_reward", "1", "--batch_size", "2", "--n_samples_per_prompt", "2", "--mini_batch_size", "2",
             "--adv_estimator", "grpo", "--max_gen_len", "64", "--max_steps", "2", "--temperature", "0.7",
             "--save_dir", tmp_path / "run", "--check_tokenizer", "0", "--device", "cpu")
    for rank in range(2):
        assert json.load(open(tmp_path / f"checks_rank{rank}.json")) == [True, True]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "tool_call_rate" in m] == [1, 2]
    assert max(m["tool_call_rate"] for m in steps if "tool_call_rate" in m) > 0


def test_sigkill_inside_a_tool_call_then_resume_is_the_uninterrupted_run(kit, tmp_path, forkserver):
    """The run is killed while a tool runs (mid rollout, between two turns); --from_resume 1 from the last resume
    file gives the same metrics and weights as a run never killed."""
    import signal
    from children import assert_same_run, finish, start, wait_for
    tokenizer_dir, tools_file, _, _, _, weight = kit
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT, "answer": "5"}) + "\n" for _ in range(8)))
    marker, armed = tmp_path / "in_the_tool", tmp_path / "armed"
    # the same tool, except that while `armed` exists its 6th call (in the 2nd or 3rd rollout) signals and hangs
    hanging = tmp_path / "hanging_tools.py"
    hanging.write_text(TOOLS_FILE.replace("    return a + b", f'''    import os
    if os.path.exists({str(armed)!r}):
        calls = len(open({str(armed)!r}).read()) + 1
        open({str(armed)!r}, "a").write("x")
        if calls == 6:
            os.remove({str(armed)!r})
            open({str(marker)!r}, "w").close()
            time.sleep(600)
    return a + b'''))

    def flags(save_dir, tools, *extra):
        return ["--from_weight", str(weight), "--tokenizer_path", str(tokenizer_dir), "--data_path", str(data),
                "--tools", str(tools), "--max_turns", "2", "--reward_model_path", "none", "--reasoning", "0",
                "--correctness_reward", "1", "--batch_size", "2", "--n_samples_per_prompt", "2",
                "--mini_batch_size", "2", "--max_gen_len", "64", "--max_steps", "4", "--temperature", "0.7",
                "--save_dir", str(save_dir), "--save_interval", "1", "--check_tokenizer", "0", "--device", "cpu",
                "--tool_timeout", "120", "--seed", "3", *extra]
    reference, log = tmp_path / "reference", tmp_path / "log_reference"
    assert finish(start(forkserver, flags(reference, tools_file), log), log) == 0, open(log).read()[-3000:]
    armed.write_text("")
    save_dir, log = tmp_path / "run", tmp_path / "log_killed"
    proc = start(forkserver, flags(save_dir, hanging), log)
    wait_for(proc, log, marker.exists, "the 6th tool call")
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    assert "step 1/4" in open(log).read()  # killed after a resume file was written
    log = tmp_path / "log_resumed"
    assert finish(start(forkserver, flags(save_dir, hanging, "--from_resume", "1"), log), log) == 0, \
        open(log).read()[-3000:]
    assert "resumed from" in open(log).read()
    assert_same_run(save_dir, reference, 4, "checkpoints/ppo_actor_64_resume.pth")


def test_dynamic_sampling_keeps_each_rows_turns_with_it():
    """Samples.select and concat_samples (dynamic sampling) move each row's turns and tool counts with its tokens."""
    from test_policy_losses import draw
    from train_ppo import concat_samples
    parts = []
    for tag in (1, 2):
        s = draw([0.0, 1.0, 1.0, 1.0], 3, tag)
        s.transcripts = [[{"role": "assistant", "content": f"{tag}.{i}"}] for i in range(4)]
        s.tool_stats = {"tool_calls": torch.tensor([10 * tag + i for i in range(4)])}
        parts.append(s.select(torch.tensor([3, 0])))
    both = concat_samples(parts, 0)
    assert [t[0]["content"] for t in both.transcripts] == both.responses == ["1.3", "1.0", "2.3", "2.0"]
    assert both.tool_stats["tool_calls"].tolist() == [13, 10, 23, 20]


def test_the_position_check_counts_every_turn():
    """A learned position table must hold the prompt and every turn: refused at start-up, naming the flags."""
    from hf_models import tiny_hf_model
    from model.loading import check_position_limit
    with pytest.raises(InputError, match=r"--max_seq_len 20 \+ --max_gen_len 20 x --max_turns 3 = 80 positions"):
        check_position_limit(tiny_hf_model("gpt2", positions=64), 20, 60,
                             gen_flags="--max_gen_len 20 x --max_turns 3")
