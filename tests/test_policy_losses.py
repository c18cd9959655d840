"""The policy losses and DAPO's pieces in the trainer (core_algos' maths itself: tests/test_core_algos.py):
--policy_loss, clip-higher, dynamic sampling, overlong shaping, truncated-response masking and rollout correction,
each checked against an equivalent run built another way, split over micro-batches and ranks, and resumed."""
import json
import math

import pytest
import torch

import train_ppo
from checkpoint import Learner
from children import assert_resume_from_step_2_is_exact, read_metrics, torchrun
from conftest import tiny_run_args
from ddp_worker import fixed_rollout, one_update, tiny_models, update_args
from train_ppo import concat_samples, dynamic_sampling, Experience, Samples


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


# ----------------------------------------------------------------------------- flags
def test_policy_loss_defaults_follow_each_papers_recipe(capsys):
    ppo = train_ppo.parse_args([])
    assert (ppo.policy_loss, ppo.clip_epsilon, ppo.clip_epsilon_high) == ("ppo", 0.2, 0.2)  # unchanged default
    assert train_ppo.parse_args(["--clip_epsilon", "0.1"]).clip_epsilon_high == 0.1
    gspo = train_ppo.parse_args(["--policy_loss", "gspo"])
    assert (gspo.clip_epsilon, gspo.clip_epsilon_high) == (3e-4, 4e-4)  # verl's GSPO recipe
    cispo = train_ppo.parse_args(["--policy_loss", "cispo"])
    assert cispo.clip_epsilon_high == 5.0  # minimind-3's and TRL's cap on the ratio
    # minimind-3's and TRL's flag name
    assert train_ppo.parse_args(["--policy_loss", "cispo", "--epsilon_high", "3"]).clip_epsilon_high == 3.0
    mask = train_ppo.parse_args(["--rollout_is", "token", "--rollout_is_mode", "mask", "--rollout_is_threshold", "4"])
    assert mask.rollout_is_threshold_low == 0.25
    for argv, message in [
        (["--policy_loss", "cispo", "--dual_clip_c", "3"], "--dual_clip_c is the ppo loss's"),
        (["--filter_groups", "1"], "--filter_groups compares the responses to a prompt"),
        (["--overlong_buffer_len", "48", "--max_gen_len", "48"], "--overlong_buffer_len 48 must be below"),
        (["--rollout_is", "token", "--rollout_is_threshold_low", "3"], "--rollout_is_threshold_low in [0, threshold)"),
        (["--clip_epsilon_high", "0"], "--clip_epsilon and --clip_epsilon_high must be > 0"),
        (["--policy_loss", "dapo"], "argument --policy_loss: invalid choice: 'dapo'"),
    ]:
        with pytest.raises(SystemExit):
            train_ppo.parse_args(argv)
        assert message in capsys.readouterr().err, argv


# ----------------------------------------------------------------------------- the update, built two ways
def update(rows, flags, advantages, kl_coef=0.0, sampler_shift=None):
    """One update of a tiny MiniMind policy on `rows` of the fixed rollout with the given advantages [rows, R]
    (no estimator in between) and plain SGD (the step is the gradient); the actor's new state dict. With
    `sampler_shift`, the sampler's log-probs are pi_old's plus it."""
    actor, _ = tiny_models("minimind")
    rollout = fixed_rollout(actor, 4, 6, 5)
    if sampler_shift is not None:
        rollout["sampler_logprobs"] = rollout["old_logprobs"] + sampler_shift
    rollout = {k: v[rows] for k, v in rollout.items()}
    args = update_args(len(rows), 1, "--adv_estimator", "grpo", "--entropy_coef", "0", *flags)
    sampler_logprobs = rollout.pop("sampler_logprobs")
    exp = Experience(**rollout)
    exp.loss_mask, exp.rollout_weights, _ = train_ppo.policy_loss_weights(exp.old_logprobs, sampler_logprobs,
                                                                          exp.response_mask, exp.has_eos, args)
    exp.advantages = advantages * exp.response_mask
    opt = torch.optim.SGD(actor.parameters(), lr=0.5)
    learner = Learner(actor, None, opt, None, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)
    train_ppo.ppo_update(learner, exp, [torch.arange(len(rows))], kl_coef, args, torch.autocast("cpu", enabled=False))
    return actor.state_dict()


def assert_same(a, b, before):
    assert max((a[k] - before[k]).abs().max().item() for k in before) > 1e-4, "the update must move the weights"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


ADVANTAGES = torch.tensor([[1.0], [-0.5], [2.0], [-1.5]]).expand(4, 5)


@pytest.mark.parametrize("loss", ["ppo", "cispo", "gspo", "sapo"])
def test_masked_truncated_responses_are_the_update_without_them(loss):
    """--mask_truncated_responses 1 on 4 responses of which 2 hit the length limit (rows 0 and 3 of the fixed
    rollout have no EOS) takes the step of an update on the 2 finished responses alone: the truncated ones add
    nothing to the loss nor to its normalisers (token-mean, and seq-mean over the responses left)."""
    before = tiny_models("minimind")[0].state_dict()
    for agg in ("token-mean", "seq-mean-token-mean"):
        flags = ["--policy_loss", loss, "--loss_agg_mode", agg]
        masked = update(torch.arange(4), [*flags, "--mask_truncated_responses", "1"], ADVANTAGES, kl_coef=0.05)
        finished = update(torch.tensor([1, 2]), flags, ADVANTAGES[[1, 2]], kl_coef=0.05)
        assert_same(masked, finished, before)


@pytest.mark.parametrize("loss", ["ppo", "cispo", "gspo", "sapo"])
def test_rollout_correction_weights_multiply_the_policy_loss(loss):
    """A sampler whose log-probs are pi_old's + log 2 everywhere gives token weights pi_old / sampler = 1/2 (under
    the threshold 2): the step is the one with every advantage halved and no correction (each loss is positively
    homogeneous in A). Sequence weights are the product over the response: here 2^-len, per row."""
    before = tiny_models("minimind")[0].state_dict()
    flags = ["--policy_loss", loss, "--clip_epsilon_high", "0.28" if loss != "cispo" else "5"]
    rows = torch.arange(4)
    assert_same(update(rows, [*flags, "--rollout_is", "token"], ADVANTAGES, sampler_shift=math.log(2)),
                update(rows, flags, ADVANTAGES / 2), before)
    lengths = fixed_rollout(tiny_models("minimind")[0], 4, 6, 5)["response_mask"].sum(1, keepdim=True)  # [5, 2, 5, 3]
    assert_same(update(rows, [*flags, "--rollout_is", "sequence"], ADVANTAGES, sampler_shift=math.log(2)),
                update(rows, flags, ADVANTAGES * 0.5 ** lengths), before)


@pytest.mark.parametrize("flags", [
    ["--adv_estimator", "grpo", "--policy_loss", "cispo"],
    ["--adv_estimator", "grpo", "--policy_loss", "gspo", "--loss_agg_mode", "seq-mean-token-mean"],
    ["--adv_estimator", "grpo", "--policy_loss", "sapo"],
    ["--adv_estimator", "grpo", "--clip_epsilon_high", "0.28", "--rollout_is", "token", "--mask_truncated_responses",
     "1"],
    ["--adv_estimator", "rloo", "--policy_loss", "cispo", "--rollout_is", "sequence", "--rollout_is_mode", "mask",
     "--rollout_is_threshold", "3"],
])
def test_two_ranks_take_the_step_of_one_process(tmp_path, flags):
    """Each loss, with the correction and the truncation mask, split over 2 gloo ranks and 2 micro-batches per
    rank: the step one process takes on the whole batch in one micro-batch."""
    torchrun("update", tmp_path, "minimind", *flags)
    ddp = torch.load(tmp_path / "ddp_update.pt", weights_only=True)
    actor, critic = tiny_models("minimind")
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    actor_sd, _ = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5), update_args(4, 1, *flags))
    assert_same(actor_sd, ddp["actor"], before)


# ----------------------------------------------------------------------------- dynamic sampling, by hand
def draw(scores, prompt_len, tag):
    """A batch of 2 prompts x 2 responses whose rewards are `scores`; prompts `prompt_len` tokens wide (left-padded
    by one on the second prompt), responses 3 wide, every token id tagging the draw."""
    prompt_mask = torch.ones(4, prompt_len, dtype=torch.long)
    prompt_mask[2:, 0] = 0
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    return Samples(torch.full((4, prompt_len), tag) * prompt_mask, prompt_mask, torch.full((4, 3), tag) * response_mask,
                   response_mask, response_mask, -torch.rand(4, 3), torch.tensor(scores), {"rm": torch.tensor(scores)},
                   torch.tensor([True, True, False, True]), [f"{tag}.{i}" for i in range(4)],
                   [f"prompt {tag}.{i // 2}" for i in range(4)], torch.tensor([0, 0, 1, 1]),
                   dict(generate=1.0, reward=0.5))


def test_dynamic_sampling_keeps_the_groups_with_signal_and_draws_until_full():
    args = train_ppo.parse_args(["--batch_size", "2", "--n_samples_per_prompt", "2", "--mini_batch_size", "2",
                                 "--adv_estimator", "grpo", "--filter_groups", "1", "--device", "cpu"])
    draws = {1: draw([1.0, 1.0, 0.0, 1.0], 4, 1), 2: draw([0.0, 0.0, 0.5, 0.5], 6, 2), 3: draw([0.0, 1.0, 1.0, 1.0], 5, 3)}
    batches = iter([2, 3])
    samples, stats = dynamic_sampling(1, lambda: next(batches, None), lambda b: draws[b], args, pad_token_id=0)
    # draw 1 gives its second group, draw 2 none, draw 3 its first: full after 3 draws
    assert samples.responses == ["1.2", "1.3", "3.0", "3.1"]
    assert samples.prompts == ["prompt 1.1", "prompt 1.1", "prompt 3.0", "prompt 3.0"]
    assert samples.groups.tolist() == [0, 0, 1, 1] and samples.scores.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert stats == dict(filter_groups_kept=2, filter_batches_drawn=3, filter_groups_drawn=6)
    assert samples.seconds == dict(generate=3.0, reward=1.5)
    # re-padded to the widest prompt (6) on the left and the widest response on the right, tokens unchanged
    assert samples.prompt_ids.shape == (4, 6) and samples.prompt_mask.sum(1).tolist() == [3, 3, 5, 5]
    assert samples.prompt_ids[0].tolist() == [0, 0, 0, 1, 1, 1] and samples.prompt_ids[2].tolist() == [0, 3, 3, 3, 3, 3]
    assert samples.response_ids.tolist() == [[1, 0, 0], [1, 1, 1], [3, 3, 3], [3, 3, 0]]
    # never full: after --max_filter_batches extra draws, topped up with groups without signal, in order
    args.max_filter_batches = 1
    batches = iter([3])
    samples, stats = dynamic_sampling(2, lambda: next(batches, None), lambda b: draws[b], args, pad_token_id=0)
    assert samples.responses == ["3.0", "3.1", "2.0", "2.1"]
    assert stats == dict(filter_groups_kept=1, filter_batches_drawn=2, filter_groups_drawn=4)
    # the epoch runs out (next_batch None): what there is, topped up
    samples, stats = dynamic_sampling(2, lambda: None, lambda b: draws[b], args, pad_token_id=0)
    assert samples.responses == ["2.0", "2.1", "2.2", "2.3"] and stats["filter_groups_kept"] == 0


def test_concat_samples_renumbers_groups_in_order():
    a, b = draw([0.0, 1.0, 0.0, 1.0], 4, 1), draw([0.0, 1.0, 0.0, 1.0], 4, 2)
    both = concat_samples([a.select(torch.tensor([2, 3])), b], pad_token_id=0)
    assert both.groups.tolist() == [0, 0, 1, 1, 2, 2] and both.responses == ["1.2", "1.3", "2.0", "2.1", "2.2", "2.3"]
    assert torch.equal(both.reward_parts["rm"], both.scores)


# ----------------------------------------------------------------------------- in the trainer
PARITY = '''
def parity(prompts, completions, **kwargs):
    """1 for a response of an even number of characters: groups of 2 often agree."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]
'''


def test_dapo_run_filters_shapes_masks_corrects_logs_and_resumes_exactly(tiny_kit, tmp_path):
    """GRPO with CISPO, dynamic sampling, overlong shaping, truncated responses masked and token-level rollout
    correction on a discrete reward: the logs say what was kept, drawn and corrected, the overlong part is DAPO's
    formula on each logged sample, and a run stopped after 2 steps and resumed is the run that would have happened."""
    reward_file = tmp_path / "parity.py"
    reward_file.write_text(PARITY)
    flags = ["--adv_estimator", "grpo", "--n_samples_per_prompt", "2", "--batch_size", "2", "--mini_batch_size", "2",
             "--max_steps", "4", "--log_samples", "4", "--policy_loss", "cispo", "--filter_groups", "1",
             "--overlong_buffer_len", "4", "--overlong_penalty", "0.5", "--mask_truncated_responses", "1",
             "--rollout_is", "token", "--reward_model_path", "none", "--reward_fn", f"{reward_file}:parity"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_run_args(tiny_kit, full, *flags))
    metrics = read_metrics(full)
    steps = [m for m in metrics if "filter_groups_kept" in m]
    assert len(steps) == 4
    assert sum(m["filter_batches_drawn"] for m in steps) > 4, "the parity reward must leave some groups without signal"
    for m in steps:
        assert m["filter_groups_drawn"] == 2 * m["filter_batches_drawn"] and 0 <= m["filter_groups_kept"] <= 2
        assert m["rollout_token_ratio_max"] >= m["rollout_token_ratio_min"] > 0 and "rollout_is_mean" in m
        assert m["reward"] == pytest.approx(m["reward_custom"] + m["reward_overlong"], abs=1e-6)
    samples = [json.loads(line) for line in open(full / "samples.jsonl")]
    assert len(samples) == 16 and any(s["reward_overlong"] < 0 for s in samples)
    for s in samples:  # DAPO's overlong formula (verl), by hand: max_gen_len 8, buffer 4, factor 0.5
        assert s["reward_overlong"] == pytest.approx(min(-(s["response_tokens"] - 4) / 4 * 0.5, 0.0))
    assert_resume_from_step_2_is_exact(run, tiny_run_args(tiny_kit, part, *flags), full, part, metrics)
    with pytest.raises(ValueError, match="resume file was written with --filter_groups 1, this run has "
                                         "--filter_groups 0"):
        run(tiny_run_args(tiny_kit, part, *flags, "--filter_groups", "0", "--from_resume", "1"))


def test_readme_dapo_recipe_parses_to_dapos_settings():
    import re
    import shlex
    from conftest import ROOT
    text = open(ROOT / "README.md", encoding="utf-8").read()
    [block] = [b for b in re.findall(r"```bash\n(python train_ppo.py .*?)```", text, re.S) if "--filter_groups" in b]
    args = train_ppo.parse_args(shlex.split(block.replace("\\\n", " "))[2:])
    assert (args.adv_estimator, args.policy_loss, args.clip_epsilon, args.clip_epsilon_high) == ("grpo", "ppo", 0.2, 0.28)
    assert (args.loss_agg_mode, args.kl_coef, args.filter_groups, args.overlong_buffer_len) == ("token-mean", 0, 1, 128)
    assert args.reward_fn == ["gsm8k_reward.py:compute_score"] and args.reward_model_path == "none"  # the function alone


def test_dynamic_sampling_on_two_ranks_keeps_them_in_step(tiny_kit, tmp_path):
    """Two gloo ranks with --filter_groups 1 on a discrete reward: each draws as long as one of them is short (one
    collective per draw, no hang), both update on the same number of rows, and their weights stay identical."""
    reward_file = tmp_path / "parity.py"
    reward_file.write_text(PARITY)
    torchrun("train", tmp_path, *tiny_run_args(
        tiny_kit, tmp_path / "run", "--max_steps", "3", "--adv_estimator", "grpo", "--n_samples_per_prompt", "2",
        "--batch_size", "2", "--mini_batch_size", "2", "--filter_groups", "1", "--policy_loss", "cispo",
        "--reward_model_path", "none", "--reward_fn", f"{reward_file}:parity"))
    for rank in range(2):
        assert json.load(open(tmp_path / f"checks_rank{rank}.json")) == [True, True, True]
    steps = [m for m in read_metrics(tmp_path / "run") if "filter_batches_drawn" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert sum(m["filter_batches_drawn"] for m in steps) > 3  # some rollouts needed more than one batch
