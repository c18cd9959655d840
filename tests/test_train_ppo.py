"""train_ppo end to end on tiny models: files written, resume, ratio == 1, DDP equivalence."""
import json
import math
import os
import re
import shutil

import pytest
import torch

import train_ppo
from model import loading
from children import timeless
from conftest import ROOT, tiny_run_args
from trainer_utils import load_resume, load_state_dict_file


def run(argv):
    train_ppo.main(train_ppo.parse_args(argv))


def read_metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]


def test_import_does_not_train():
    assert callable(train_ppo.main) and hasattr(train_ppo, "compute_advantages")


def test_end_to_end_writes_metrics_weights_and_resume(tiny_kit, tmp_path):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "3", "--save_hf", "1"))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["reward", "reward_format", "reward_tags", "reward_rm", "kl_ref", "approx_kl", "clipfrac",
                "policy_loss", "value_loss", "entropy", "value_explained_var", "advantage_mean", "advantage_std",
                "avg_response_len", "eos_rate", "actor_lr", "critic_lr", "rollout_tokens_per_s",
                "time_rollout_s", "time_reward_s", "time_update_s"]:
        assert all(key in m for m in metrics), key
    assert metrics[0]["optimizer_steps"] == 2 * 2  # ppo_epochs x minibatches
    assert metrics[0]["actor_lr"] < 5e-5  # cosine decay has started
    weights = load_state_dict_file(tmp_path / "ppo_actor_64.pth")
    assert all(v.dtype == torch.float16 for v in weights.values())
    state, _ = load_resume(str(tmp_path / "checkpoints" / "ppo_actor_64_resume.pth"))
    assert state["global_step"] == 3 and state["step"] == 3 and state["world_size"] == 1
    for key in ["model", "critic_model", "old_actor", "optimizer", "critic_optimizer", "scheduler",
                "critic_scheduler", "rng_states", "kl_coef", "swanlab_id", "epoch"]:
        assert key in state, key
    assert (tmp_path / "run_args.json").exists() and (tmp_path / "train_ppo.py").exists()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_actor_64_hf")
    assert torch.allclose(hf.model.norm.weight.half(), weights["model.norm.weight"])


def test_resume_continues_where_it_stopped(tiny_kit, tmp_path):
    """Resuming from the step-2 checkpoint of a 4-step run reproduces its steps 3 and 4 exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_run_args(tiny_kit, full, "--max_steps", "4"))  # saves at steps 2 and 4, keeps both
    os.makedirs(part / "checkpoints")
    shutil.copy(full / "checkpoints" / "ppo_actor_64_resume.1.pth", part / "checkpoints" / "ppo_actor_64_resume.pth")
    run(tiny_run_args(tiny_kit, part, "--max_steps", "4", "--from_resume", "1"))
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [3, 4]
    for ma, mb in zip(a[2:], b):  # same data position, RNG, optimizer and scheduler state
        for key in ["reward", "kl_ref", "policy_loss", "value_loss", "actor_lr", "avg_response_len"]:
            assert ma[key] == mb[key], (ma["step"], key)
    wa = load_state_dict_file(full / "ppo_actor_64.pth")
    wb = load_state_dict_file(part / "ppo_actor_64.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_weight_name_without_size_flags_and_a_next_hint_that_works(tiny_kit, tmp_path, capsys):
    """--from_weight full_sft finds the kit's full_sft_64.pth in --save_dir with no --hidden_size, and the
    printed `next:` command names files that exist."""
    shutil.copy(tiny_kit["actor"], tmp_path / "full_sft_64.pth")
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_weight", "full_sft"))
    hint = capsys.readouterr().out.split("next: ")[1].splitlines()[0].split()
    assert hint[:2] == ["python", str(ROOT / "scripts" / "eval_policy.py")]  # works from any folder
    assert hint[2:] == ["--base", str(tmp_path / "full_sft_64.pth"), "--trained", str(tmp_path / "ppo_actor_64.pth")]
    assert all(os.path.isfile(p) for p in hint[3::2])


def test_resume_without_checkpoint_starts_fresh(tiny_kit, tmp_path, capsys):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_resume", "1"))
    assert "starting fresh" in capsys.readouterr().out
    assert len(read_metrics(tmp_path)) == 1


def test_first_ratio_is_exactly_one_inside_the_trainers_update(tiny_kit, tmp_path):
    """The ratio of the first minibatch of every real ppo_update (logged as the mean |ratio - 1| over its
    tokens) is exactly 1 when the old actor is synced every rollout, and visibly not when it is stale."""
    run(tiny_run_args(tiny_kit, tmp_path / "sync", "--max_steps", "3"))
    metrics = read_metrics(tmp_path / "sync")
    assert [m["first_minibatch_ratio_dev"] for m in metrics] == [0.0, 0.0, 0.0]
    assert all(m["sampler_logprob_gap"] < 1e-5 for m in metrics)  # the sampler's log-probs are pi_old's
    run(tiny_run_args(tiny_kit, tmp_path / "stale", "--max_steps", "2", "--update_old_actor_freq", "2"))
    stale = read_metrics(tmp_path / "stale")
    assert stale[0]["first_minibatch_ratio_dev"] == 0.0 and stale[1]["first_minibatch_ratio_dev"] > 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu(tiny_kit, tmp_path, dtype):
    """--dtype bfloat16/float16 run under CPU autocast: the first ratio is exactly 1, the sampler's log-probs
    differ from the scoring forward's at the low precision's scale, and resume is exact, loss scale included
    (float16; a large --vf_coef makes the scaler lower its scale from 65536 in the first steps)."""
    extra = ["--dtype", dtype] + (["--vf_coef", "1e4"] if dtype == "float16" else [])
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_run_args(tiny_kit, full, "--max_steps", "4", *extra))  # saves at steps 2 and 4
    metrics = read_metrics(full)
    assert [m["first_minibatch_ratio_dev"] for m in metrics] == [0.0] * 4
    assert all(1e-6 < m["sampler_logprob_gap"] < 1e-2 for m in metrics)  # float32 runs: ~4e-7
    if dtype == "float16":
        scales = [m["loss_scale"] for m in metrics]
        assert scales[0] < 65536 and scales == sorted(scales, reverse=True)
        assert sum(m["scaler_skipped_steps"] for m in metrics) > 0 and metrics[-1]["optimizer_steps"] > 0
        assert all(m["skipped_steps"] == 0 for m in metrics)  # overflows are the scaler's, not bad steps
        state, _ = load_resume(str(full / "checkpoints" / "ppo_actor_64_resume.1.pth"))
        assert state["grad_scaler"]["scale"] == metrics[1]["loss_scale"]
    os.makedirs(part / "checkpoints")
    shutil.copy(full / "checkpoints" / "ppo_actor_64_resume.1.pth", part / "checkpoints" / "ppo_actor_64_resume.pth")
    run(tiny_run_args(tiny_kit, part, "--max_steps", "4", "--from_resume", "1", *extra))
    for a, b in zip(metrics[2:], read_metrics(part)):
        assert timeless(a) == timeless(b)
    wa, wb = load_state_dict_file(full / "ppo_actor_64.pth"), load_state_dict_file(part / "ppo_actor_64.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adaptive_kl_target_is_in_nats_per_response(tiny_kit, tmp_path):
    """--target_kl_ctl is compared with the mean summed KL per response. Step 2's rollout KL does not depend
    on the target (step 1 has KL 0, old actor == ref), so with a target just below it beta rises at step 2
    and with one just above it falls. Fed the per-token mean instead (8x smaller here), beta would fall both times."""
    flags = ["--kl_horizon", "10", "--kl_coef", "0.05", "--kl_mode", "loss"]  # k3: a KL estimate that is >= 0
    run(tiny_run_args(tiny_kit, tmp_path / "probe", "--max_steps", "3", "--target_kl_ctl", "1", *flags))
    probe = read_metrics(tmp_path / "probe")[1]
    kl = probe["kl_ref_per_response"]
    assert kl > 2 * probe["kl_ref"] > 0  # nats per response vs per token: different units
    for factor, rises in [(0.9, True), (1.1, False)]:
        save_dir = tmp_path / f"target_{factor}"
        run(tiny_run_args(tiny_kit, save_dir, "--max_steps", "3", "--target_kl_ctl", str(kl * factor), *flags))
        m = read_metrics(save_dir)
        assert m[1]["kl_ref_per_response"] == kl
        assert (m[2]["kl_coef"] > m[1]["kl_coef"]) == rises, (factor, m[1]["kl_coef"], m[2]["kl_coef"])


def test_early_stop_takes_no_optimizer_step(tiny_kit, tmp_path):
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "2", "--early_stop_kl", "1e-12", "--learning_rate", "1e-2"))
    metrics = read_metrics(tmp_path)
    # step 1: the first minibatch has approx_kl 0 (ratio 1) -> one step; the second exceeds 1e-12 -> stop
    assert metrics[0]["optimizer_steps"] == 1 and metrics[0]["early_stopped"] == 1


def test_plot_metrics_writes_png(tmp_path):
    import numpy as np
    from scripts.plot_metrics import main as plot_main, moving_average
    assert np.allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    keys = ["reward", "reward_format", "reward_tags", "reward_rm", "kl_ref", "entropy", "avg_response_len",
            "policy_loss", "value_loss"]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, **{k: step * 0.1 for k in keys}}) + "\n")
    plot_main([str(tmp_path / "metrics.jsonl")])
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_plot_legend_leaves_the_reward_curve_visible(tmp_path):
    """A run's reward rises fast from its first steps (the demo's shape) and the legend lists the run's own parts:
    it must not cover the curve's start, where the learning shows."""
    from scripts.plot_metrics import plot
    records = [{"step": s, "reward": 3.3 - 2.2 * math.exp(-s / 8), "reward_format": 0.5 - 0.2 * math.exp(-s / 8),
                "reward_tags": 1.0, "reward_rm": 1.9 - 2.0 * math.exp(-s / 8), "reward_custom/acc": 0.5}
               for s in range(1, 141)]
    drawn, fig = plot(records, str(tmp_path / "m.png"), 10)
    assert {"reward", "reward_format", "reward_tags", "reward_rm"} <= set(drawn) and "reward_custom/acc" not in drawn
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    for line in ax.get_lines():
        xy = ax.transData.transform(line.get_xydata()[:14])  # the first 10% of the steps
        assert not any(box.contains(x, y) for x, y in xy), line.get_label()


def test_plain_text_prompts_with_a_tokenizer_without_template(tiny_kit, tmp_path):
    """Base-model data: {"prompt": ...} rows used as they are, no chat template needed; the reward model's
    query is the prompt text itself."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(train_ppo.__file__), "model"))
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "base_tok")
    rows = [json.loads(line) for line in open(tiny_kit["data"])]
    with open(tmp_path / "plain.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["conversations"][0]["content"] + " The answer is"}) + "\n")
    run(tiny_run_args(tiny_kit, tmp_path / "out", "--max_steps", "2", "--data_path", str(tmp_path / "plain.jsonl"),
                      "--tokenizer_path", str(tmp_path / "base_tok"), "--log_samples", "2"))
    samples = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
    plain = {row["conversations"][0]["content"] + " The answer is" for row in rows}
    assert len(samples) == 4 and all(s["prompt"] in plain for s in samples)
    from conftest import reward_of

    class Recorder:
        seen = []

        def get_score(self, tokenizer, chat):
            self.seen.append(chat)
            return 0.0
    reward_of(Recorder(), reasoning=False)(["This movie was"], [" great"])
    assert Recorder.seen == [[{"role": "user", "content": "This movie was"},
                              {"role": "assistant", "content": " great"}]]


def test_pad_token_equal_to_eos_or_missing_trains_the_same(tmp_path):
    """Every mask comes from lengths: padding with EOS (TRL's GPT-2 convention) or with no pad token at all
    gives the same run as a distinct pad token, and EOS stays a real, trained token."""
    from transformers import AutoTokenizer
    root = os.path.dirname(os.path.abspath(train_ppo.__file__))
    for name in ("pad_eos", "no_pad"):
        tok = AutoTokenizer.from_pretrained(os.path.join(root, "model"))
        tok.pad_token = tok.eos_token if name == "pad_eos" else None
        tok.save_pretrained(tmp_path / name)
    runs = {}
    for name, path in [("own", os.path.join(root, "model")), ("pad_eos", str(tmp_path / "pad_eos")),
                       ("no_pad", str(tmp_path / "no_pad"))]:
        run(["--tokenizer_path", path, "--max_steps", "2", "--batch_size", "8", "--mini_batch_size", "4",
             "--eval_data_path", "none", "--save_dir", str(tmp_path / name), "--device", "cpu"])
        runs[name] = [timeless(m) for m in read_metrics(tmp_path / name)]
    assert loading.load_tokenizer(str(tmp_path / "no_pad")).pad_token == "<|im_end|>"
    assert runs["pad_eos"] == runs["own"] and runs["no_pad"] == runs["own"]
    assert all(m["eos_rate"] > 0.9 for m in runs["own"])  # the demo actor ends its responses with EOS


def test_grad_clip_zero_means_no_clipping_and_negative_is_refused(tiny_kit, tmp_path, capsys):
    """--grad_clip 0 trains exactly as a bound no gradient reaches (not with every gradient zeroed)."""
    run(tiny_run_args(tiny_kit, tmp_path / "off", "--max_steps", "1", "--grad_clip", "0"))
    run(tiny_run_args(tiny_kit, tmp_path / "huge", "--max_steps", "1", "--grad_clip", "1e12"))
    run(tiny_run_args(tiny_kit, tmp_path / "tight", "--max_steps", "1", "--grad_clip", "1e-4"))
    off, huge, tight = (load_state_dict_file(tmp_path / name / "ppo_actor_64.pth") for name in ("off", "huge", "tight"))
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert any(not torch.equal(off[k], tight[k]) for k in off)  # clipping does change the step
    with pytest.raises(SystemExit):
        train_ppo.parse_args(["--grad_clip", "-1"])
    assert "--grad_clip must be 0 (no clipping) or a positive norm, got -1.0" in capsys.readouterr().err


def test_a_run_whose_output_is_its_input_is_refused_before_any_model(tiny_kit, tmp_path, capsys):
    """--from_weight ppo_actor (the default --save_weight) or the run's own transformers output folder would be
    overwritten by the first save: refused, naming both, before any model is built."""
    shutil.copy(tiny_kit["actor"], tmp_path / "ppo_actor_64.pth")
    for start in ("ppo_actor", str(tmp_path / "ppo_actor_64.pth")):
        with pytest.raises(ValueError, match=r"--from_weight \S+ is \S+ppo_actor_64\.pth, the very file this run saves "
                                             r"its policy to .*--save_weight ppo_actor"):
            run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_weight", start))
    from hf_models import save_tiny_hf_model
    folder = save_tiny_hf_model("llama", tmp_path / "ppo_actor_hf", os.path.join(os.path.dirname(train_ppo.__file__),
                                                                                "model"))
    with pytest.raises(ValueError, match=r"the very folder this run saves its policy to"):
        run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_weight", folder))
    assert "actor: " not in capsys.readouterr().out  # build_models logs the actor it built: none was
    run(tiny_run_args(tiny_kit, tmp_path, "--max_steps", "1", "--from_weight", "ppo_actor", "--save_weight", "ppo2"))


def test_a_resume_whose_reference_changed_stops(tiny_kit, tmp_path):
    """The starting weights were replaced after the run began: the resumed run would rebuild another reference
    (another KL anchor) from them, so it stops instead."""
    start = tmp_path / "start_64.pth"
    shutil.copy(tiny_kit["actor"], start)
    args = tiny_run_args(tiny_kit, tmp_path / "out", "--max_steps", "4", "--from_weight", str(start))
    run([*args, "--max_steps", "2"])  # stopped after 2 of 4 steps
    shutil.copy(tmp_path / "out" / "ppo_actor_64.pth", start)  # the trained actor where the start was
    with pytest.raises(ValueError, match="the reference rebuilt from --from_weight .* is not the one this run started"):
        run([*args, "--from_resume", "1"])
    shutil.copy(tiny_kit["actor"], start)  # the true start back: the resume goes on
    run([*args, "--from_resume", "1"])
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]


def test_every_flag_has_one_line_of_help_and_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        train_ppo.parse_args(["--help"])
    text = capsys.readouterr().out
    blocks = [b for b in re.split(r"\n(?=  -)", text.split("options:", 1)[1]) if b.lstrip().startswith("--")]
    assert len(blocks) > 70
    for block in blocks:
        flag, words = block.split()[0], " ".join(block.split())
        option_words = re.match(r"(--\S+( [A-Z_.:{},0-9a-z]+)?(, --\S+( [A-Z_.:{},0-9a-z]+)?)*)", words).group(0)
        help_text = words[len(option_words):].replace("(default:", "")
        assert len(help_text.split()) >= 3, f"{flag} has no help"
        assert "default" in words, f"{flag} shows no default"


def test_user_errors_are_one_line_and_come_before_any_model(tiny_kit, tmp_path):
    """A bad flag, file or folder stops the script with one `error: ...` line and a non-zero exit, before any model
    is built (no `actor:` line); PPO_TRACEBACK=1 shows the traceback. The JSON error says no word twice."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.abspath(train_ppo.__file__)), "train_ppo.py")
    ten = tmp_path / "ten.jsonl"
    ten.write_text("".join(open(tiny_kit["data"]).readlines()[:10]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"conversations": "unterminated\n')
    (tmp_path / "blocker").write_text("a file where a folder should be")
    cases = {
        "nonexistent_folder": (["--from_weight", "nonexistent_folder"], "no file or folder of that name exists"),
        "batch": (["--data_path", str(ten), "--batch_size", "32", "--mini_batch_size", "16"],
                  "--batch_size 32 x 1 processes needs 32 prompts, but"),
        "read-only": (["--save_dir", str(tmp_path / "blocker" / "out")], "--save_dir"),
        "json": (["--data_path", str(broken)], "broken.jsonl:1: invalid JSON: Unterminated string starting at "
                                                "(column 19)"),
        "flag": (["--kl_mode", "loss", "--kl_estimator", "k1"], "zero expected gradient"),
    }
    for name, (flags, message) in cases.items():
        result = subprocess.run([sys.executable, script, "--device", "cpu", *flags], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert message in lines[0] and "at at" not in lines[0], (name, lines[0])
        assert "actor: " not in result.stdout, name
    result = subprocess.run([sys.executable, script, "--device", "cpu", "--from_weight", "nonexistent_folder"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env=dict(os.environ, PPO_TRACEBACK="1"))
    assert "Traceback (most recent call last)" in result.stderr and "MissingFileError" in result.stderr
