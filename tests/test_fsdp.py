"""--fsdp 1 (FSDP2) on gloo ranks on the CPU: a sharded update equals a DDP one; a run stopped by a signal inside a
sharded rollout and one SIGKILLed inside a sharded save resume bit-exact (a torn newest checkpoint falls back to the
previous one); 2 -> 1 and 1 -> 2 ranks continue from exactly the tensors saved; the saved policy loads in MiniMind's
and transformers' own code; and the flags FSDP cannot serve stop the run before any model is built.

Training runs are child processes of the forkserver of tests/conftest.py (tests/fault_runner.py), the update
comparison tests/ddp_worker.py's, as children of that forkserver too.
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal

import pytest
import torch

import train_ppo
from children import finish, free_port, read_metrics, start, wait_for
from conftest import ROOT, tiny_run_args
from ddp_worker import fixed_rollout, one_update, tiny_models, update_args
from hf_models import save_tiny_hf_model

STEPS = 4  # rollouts of 2 ranks x 4 prompts: 3 per epoch over the 24 sample prompts, so the runs cross an epoch
DCP = "checkpoints/ppo_actor_64_resume.dcp"


def flags(kit, save_dir, *extra):
    return tiny_run_args(kit, save_dir, "--fsdp", "1", "--epochs", "2", "--max_steps", str(STEPS),
                         "--save_interval", "1", "--keep_checkpoints", "4", *extra)


def ranks(ctx, argv, log_dir, world=2, per_rank=None, **faults):
    """`world` ranks of one run, rank r with `faults` and per_rank[r]; waits for them; returns their logs."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"log{r}" for r in range(world)]
    procs = [start(ctx, argv, logs[r], rank=r, world=world, port=port, **faults, **(per_rank or {}).get(r, {}))
             for r in range(world)]
    assert [finish(p, log, timeout=240) for p, log in zip(procs, logs)] == [0] * world, open(logs[0]).read()[-3000:]
    return [open(log).read() for log in logs]


def read_dcp(folder, tmp_path):
    """A sharded checkpoint's tensors, gathered in this one process (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{os.path.basename(os.path.dirname(folder))}_{os.path.basename(folder)}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def global_step(folder):
    return torch.load(os.path.join(folder, "state.pth"), weights_only=True)["global_step"]


def assert_same_tensors(a, b, where=""):
    """Every tensor of nested dicts `b` equal in `a` (other values ignored: an LR moves with the world size)."""
    for key, value in b.items():
        if isinstance(value, dict):
            assert_same_tensors(a[key], value, f"{where}.{key}")
        elif torch.is_tensor(value):
            assert torch.equal(a[key], value), f"{where}.{key}"


def strip_timing(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time_") and not k.endswith("_per_s")} for m in metrics]


@pytest.fixture(scope="module")
def reference(tiny_kit, forkserver, tmp_path_factory):
    """An uninterrupted 2-rank --fsdp 1 run of STEPS rollouts, a checkpoint after each (the last 4 kept)."""
    save_dir = tmp_path_factory.mktemp("fsdp_reference")
    ranks(forkserver, flags(tiny_kit, save_dir), save_dir / "logs")
    return save_dir


def test_fsdp_update_equals_ddp_update_and_one_process(forkserver, tmp_path):
    """One PPO update (2 micro-batches per rank: the first accumulates without a reduction) of MiniMind and GPT-2
    (tied embeddings) sharded over 2 ranks equals the DDP update and the one-process update on the global batch
    (1e-5), with the gradient norm clipped over the sharded gradients."""
    import ddp_worker
    port = free_port()
    procs = [forkserver.Process(target=ddp_worker.fsdp_update_rank, args=(r, 2, port, str(tmp_path / f"log{r}"),
                                                                         str(tmp_path), "minimind,gpt2", "--grad_clip",
                                                                         "0.05")) for r in range(2)]
    for p in procs:
        p.start()
    assert [finish(p, tmp_path / f"log{r}") for r, p in enumerate(procs)] == [0, 0]
    results = torch.load(tmp_path / "fsdp_update.pt", weights_only=True)
    for arch in ("minimind", "gpt2"):
        actor, critic = tiny_models(arch)
        before = {k: v.clone() for k, v in actor.state_dict().items()}
        single = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5), update_args(4, 1, "--grad_clip", "0.05"))
        assert max((single[0][k] - before[k]).abs().max().item() for k in before) > 1e-4, "the update must move"
        for i, model in enumerate(("actor", "critic")):
            ddp, sharded = results[f"{arch}_ddp"][i], results[f"{arch}_fsdp"][i]
            assert sharded.keys() == ddp.keys() == single[i].keys()
            for k in ddp:
                assert torch.allclose(sharded[k], ddp[k], atol=1e-6, rtol=1e-5), (arch, model, k)
                assert torch.allclose(sharded[k], single[i][k], atol=1e-6, rtol=1e-5), (arch, model, k)


def test_signal_in_a_sharded_rollout_and_sigkill_in_a_sharded_save_resume_bit_exact(tiny_kit, forkserver, reference,
                                                                                 tmp_path):
    save_dir = tmp_path / "run"
    argv = flags(tiny_kit, save_dir)
    # 1. SIGTERM to rank 1 during the generation of rollout 2: its forwards are collectives, so the rollout runs to
    # its end on both ranks, which then agree to drop it and save the state after step 1
    out = ranks(forkserver, argv, tmp_path / "a", per_rank={1: dict(self_signal=("generate", 2, 3))})
    assert "stop signal during the rollout of step 2: rollout dropped" in out[0]
    assert "stopped by signal at step 1; resume file written" in out[0]
    assert global_step(save_dir / DCP) == 1 and [m["step"] for m in read_metrics(save_dir)] == [1]
    # 2. SIGKILL to both ranks inside the 2nd save of the resumed run (step 3): every shard is written into the
    # temp folder, which is not yet in place; the newest checkpoint is still step 2's
    marker, logs = tmp_path / "hang", [tmp_path / "b0", tmp_path / "b1"]
    port = free_port()
    procs = [start(forkserver, argv + ["--from_resume", "1"], logs[r], rank=r, world=2, port=port, hang_dcp=2,
                   marker=str(marker)) for r in range(2)]
    wait_for(procs[0], logs[0], marker.exists, "a hang in the sharded save of step 3")
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    assert [finish(p, log) for p, log in zip(procs, logs)] == [-signal.SIGKILL] * 2
    assert sorted(os.listdir(f"{save_dir / DCP}.tmp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pth"]
    assert global_step(save_dir / DCP) == 2 and global_step(save_dir / DCP.replace(".dcp", ".1.dcp")) == 1
    # 3. the newest checkpoint torn (a shard cut short by a failing disk): skipped for the previous one (step 1)
    shard = save_dir / DCP / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    out = ranks(forkserver, argv + ["--from_resume", "1"], tmp_path / "c")
    assert re.search(r"warning: skipping unreadable resume checkpoint \S+_resume\.dcp \(InputError: \S+__1_0\.distcp: "
                     r"missing or shorter than", out[0])
    assert re.search(r"resumed from \S+_resume\.1\.dcp: epoch 1, step 1, global step 1", out[0])
    # the same run as the uninterrupted one: every metric, the saved policy, every sharded tensor
    assert strip_timing(read_metrics(save_dir)) == strip_timing(read_metrics(reference))
    assert all(m["first_minibatch_ratio_dev"] == 0.0 for m in read_metrics(save_dir))
    a, b = (torch.load(d / "ppo_actor_64.pth", weights_only=True) for d in (save_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (read_dcp(str(d / DCP), tmp_path) for d in (save_dir, reference))
    assert sorted(a) == sorted(b) == ["actor", "actor_optimizer", "critic", "critic_optimizer"]
    assert_same_tensors(a, b)
    assert global_step(save_dir / DCP) == STEPS
    assert not glob.glob(str(save_dir / "checkpoints" / "*.tmp"))  # the killed save's folder is cleaned up


def test_two_ranks_to_one_and_back_continue_from_the_saved_tensors(tiny_kit, forkserver, reference, tmp_path):
    """The 2-rank checkpoint after step 2 (16 prompts) read by 1 rank, and that run's checkpoint read by 2 ranks
    again: DCP reshards every tensor exactly (models and AdamW states, compared after the resume), and the world-size
    rule continues at the prompts consumed."""
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / DCP.replace(".dcp", ".2.dcp"), one / DCP)  # step 2 of the 2-rank run
    saved = read_dcp(str(one / DCP), tmp_path)
    out = ranks(forkserver, flags(tiny_kit, one, "--from_resume", "1", "--max_steps", "5"), tmp_path / "l1", world=1,
                dump_state=str(tmp_path / "loaded1.pt"))
    assert "resume: world size 2 -> 1; data position 16 prompts -> step 4, global step 2 -> 4" in out[0]
    assert "resume: RNG states reseeded (world size changed)" in out[0]
    assert_same_tensors(torch.load(tmp_path / "loaded1.pt", weights_only=False), saved)
    assert [m["step"] for m in read_metrics(one)] == [5] and global_step(one / DCP) == 5
    # 1 -> 2: 5 one-rank rollouts are 20 prompts, step 2 of the 2-rank epoch (4 prompts of it are seen again)
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / DCP, two / DCP)
    saved = read_dcp(str(two / DCP), tmp_path)
    out = ranks(forkserver, flags(tiny_kit, two, "--from_resume", "1", "--max_steps", "3"), tmp_path / "l2",
                dump_state=str(tmp_path / "loaded2.pt"))
    assert ("resume: world size 1 -> 2; data position 20 prompts -> step 2, global step 5 -> 2 (4 prompts of this "
            "epoch are revisited)") in out[0]
    assert_same_tensors(torch.load(tmp_path / "loaded2.pt", weights_only=False), saved)
    assert [m["step"] for m in read_metrics(two)] == [3] and global_step(two / DCP) == 3


def test_saved_policies_load_in_minimind_and_transformers_code(tiny_kit, forkserver, reference, tmp_path):
    """The policy, gathered on rank 0: MiniMind's .pth with exactly the keys and shapes of MiniMind's own model code
    (the fixture of tests/fixtures), holding the sharded checkpoint's weights; a transformers policy (GPT-2) trained
    with a sharded old actor (--update_old_actor_freq 2) and held-out evaluations, saved as a folder that
    AutoModelForCausalLM loads and generates with."""
    from transformers import AutoModelForCausalLM
    from model.model_minimind import config_from_state_dict, MiniMindForCausalLM
    from model.loading import load_tokenizer
    fixture = torch.load(ROOT / "tests" / "fixtures" / "minimind_v2_dense.pt", weights_only=True)
    expected = {k: tuple(v.shape) for k, v in fixture["weights"].items()}
    expected.update({k: (fixture["vocab_size"], 64) for k in ("model.embed_tokens.weight", "lm_head.weight")})
    saved = torch.load(reference / "ppo_actor_64.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    actor = read_dcp(str(reference / DCP), tmp_path)["actor"]
    assert all(torch.equal(saved[k], actor[f"lm.{k}"].half()) for k in saved)
    model = MiniMindForCausalLM(config_from_state_dict(saved))
    model.load_state_dict(saved, strict=True)

    policy = save_tiny_hf_model("gpt2", tmp_path / "gpt2", str(ROOT / "model"))
    save_dir = tmp_path / "hf"
    out = ranks(forkserver, tiny_run_args(tiny_kit, save_dir, "--from_weight", policy, "--fsdp", "1", "--max_steps",
                                          "2", "--update_old_actor_freq", "2", "--eval_data_path",
                                          str(ROOT / "dataset" / "rlaif-eval.jsonl"), "--eval_limit", "5",
                                          "--eval_interval", "1"), tmp_path / "l")
    assert "FSDP: actor, critic, reference, old actor sharded over 2 ranks" in out[0]
    lines = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    assert [m["step"] for m in lines if "eval_eos_rate" in m] == [0, 1, 2]
    assert [m["first_minibatch_ratio_dev"] == 0.0 for m in lines if "reward" in m] == [True, False]  # pi_old lags
    state = read_dcp(str(save_dir / DCP.replace("_64_", "_32_")), tmp_path)
    assert sorted(state) == ["actor", "actor_optimizer", "critic", "critic_optimizer", "old_actor"]
    assert_same_tensors(state["old_actor"], state["actor"])  # synced after step 2
    loaded = AutoModelForCausalLM.from_pretrained(save_dir / "ppo_actor_hf")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state["actor"][f"lm.{k}"]), k
    tokenizer = load_tokenizer(str(save_dir / "ppo_actor_hf"))
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")
    assert loaded.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids.input_ids.shape[1] + 3


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "4"], r"--fsdp 1 with --lora_rank 4: not supported\. .*--lora_rank without --fsdp"),
    (["--max_tokens_per_micro_batch", "64"], r"--fsdp 1 with --max_tokens_per_micro_batch 64: every forward of a "
                                             r"sharded model is a collective.*use --accumulation_steps"),
    ([], r"--fsdp 1 shards the models over the processes of torchrun: launch with `torchrun --nproc_per_node N"),
])
def test_what_fsdp_cannot_serve_is_refused_before_any_model(tiny_kit, tmp_path, capsys, extra, message):
    with pytest.raises(ValueError, match=message):
        train_ppo.build_run(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--fsdp", "1", *extra)))
    assert "actor: " not in capsys.readouterr().out


def test_a_sharded_checkpoint_is_not_read_without_fsdp(tiny_kit, reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"holds ppo_actor_64_resume\.dcp, written with --fsdp 1, and no resume "
                                         r"checkpoint written without it; resume with --fsdp 1"):
        train_ppo.build_run(train_ppo.parse_args(tiny_run_args(tiny_kit, tmp_path, "--from_resume", "1")))


def test_readme_multi_node_command_parses():
    text = open(ROOT / "README.md", encoding="utf-8").read()
    section = text[text.index("## Several GPUs: DDP and FSDP"):text.index("\n## Resume")]
    block = re.search(r"```bash\n(?:#.*\n)*(torchrun --nnodes .*?)```", section, re.S).group(1)
    cmd = shlex.split(block.replace("\\\n", " "))
    script = cmd.index("train_ppo.py")
    assert cmd[:3] == ["torchrun", "--nnodes", "2"] and "--rdzv_endpoint" in cmd[:script]
    args = train_ppo.parse_args(cmd[script + 1:])
    assert args.fsdp == 1 and not args.lora_rank and not args.max_tokens_per_micro_batch
