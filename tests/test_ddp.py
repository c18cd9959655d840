"""Two gloo ranks under torchrun: gradients really averaged, ranks stay identical."""
import json
import sys

import pytest
import torch

from children import torchrun
from conftest import ROOT, tiny_run_args
from ddp_worker import fixed_rollout, one_update, tiny_models, update_args


@pytest.mark.parametrize("arch", ["minimind", "gpt2", "llama"])
def test_two_rank_update_equals_one_rank_update_on_the_global_batch(tmp_path, arch):
    torchrun("update", tmp_path, arch)
    ddp = torch.load(tmp_path / "ddp_update.pt", weights_only=True)
    actor, critic = tiny_models(arch)
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    actor_sd, critic_sd = one_update(actor, critic, fixed_rollout(actor, 4, 6, 5), update_args(4))
    moved = max((actor_sd[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4, "the update must change the weights for this comparison to mean anything"
    for name, ref, got in [("actor", actor_sd, ddp["actor"]), ("critic", critic_sd, ddp["critic"])]:
        for k in ref:
            assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=1e-5), (name, k)


def test_two_rank_training_keeps_ranks_identical(tiny_kit, tmp_path):
    """Identical weights on both ranks after every update; the held-out evaluation is split over the
    ranks and reduced, so at step 0 it equals one process evaluating every prompt of the actor file."""
    eval_data = str(ROOT / "dataset" / "rlaif-eval.jsonl")
    torchrun("train", tmp_path, *tiny_run_args(tiny_kit, tmp_path / "run", "--max_steps", "3", "--eval_data_path",
                                               eval_data, "--eval_limit", "7", "--eval_interval", "2"))
    for rank in range(2):
        checks = json.load(open(tmp_path / f"checks_rank{rank}.json"))
        assert checks == [True, True, True]
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    metrics, evals = [m for m in lines if "reward" in m], [m for m in lines if "eval_format" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # rank 0 alone writes
    assert [m["step"] for m in evals] == [0, 2, 3]
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_policy
    single = eval_policy.main(["--base", tiny_kit["actor"], "--data_path", eval_data, "--limit", "7",
                               "--reward_model_path", tiny_kit["reward_model"], "--max_gen_len", "8",
                               "--max_seq_len", "80", "--device", "cpu"])["base"]
    for key in ["format", "tags", "accuracy", "reward", "reward_rm", "response_len", "eos_rate"]:
        assert evals[0][f"eval_{key}"] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    args = json.load(open(tmp_path / "run" / "run_args.json"))
    assert args["world_size"] == 2
