"""Launched by tests/test_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

mode "update" (argument: an architecture, minimind or one of tests/hf_models.py): each rank runs one
PPO update on its half of a fixed global rollout; rank 0 saves the resulting weights for comparison
with a single-process update on the whole batch.
mode "train": the real build_run and train, checking after every step that all ranks hold
identical actor and critic weights.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ppo  # noqa: E402
from checkpoint import Learner  # noqa: E402
from model.critic import build_critic  # noqa: E402
from trainer_utils import get_rank, init_distributed_mode, unwrap_model  # noqa: E402


def fixed_rollout(actor, batch, prompt_len, response_len, seed=0):
    """A deterministic rollout of `batch` rows (same on every process), as the tensors of an Experience."""
    g = torch.Generator().manual_seed(seed)
    T = prompt_len + response_len
    input_ids = torch.randint(3, 6400, (batch, T), generator=g)
    lengths = torch.tensor([response_len, 2, 5, 3][:batch])
    response_mask = (torch.arange(response_len)[None] < lengths[:, None]).float()
    attention_mask = torch.cat([torch.ones(batch, prompt_len), response_mask], 1).long()
    with torch.no_grad():
        old_logprobs = train_ppo.response_logprobs(actor, input_ids, attention_mask, response_len, 1.0)[0]
    rewards = torch.randn(batch, response_len, generator=g) * response_mask
    values = torch.randn(batch, response_len, generator=g) * response_mask
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                old_logprobs=old_logprobs + 0.05 * torch.randn(batch, response_len, generator=g),
                ref_logprobs=old_logprobs, values=values, token_rewards=rewards)


def one_update(actor, critic, rollout, args):
    """Advantages (globally whitened) and one PPO update; returns the updated state dicts."""
    experience = train_ppo.Experience(**rollout)
    train_ppo.add_advantages(experience, 1.0, 0.95)
    # plain SGD: the step is linear in the gradient, so the comparison measures the gradient
    # itself (Adam's first step is ~sign(g) and would blow up rounding noise on tiny gradients)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=0.5)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.5)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in (actor_opt, critic_opt)]
    orders = [torch.arange(len(rollout["input_ids"]))]
    learner = Learner(actor, critic, actor_opt, critic_opt, *sched)
    train_ppo.ppo_update(learner, experience, orders, 0.02, args, torch.autocast("cpu", enabled=False))
    return unwrap_model(actor).state_dict(), unwrap_model(critic).state_dict()


def update_args(mini_batch_size, accumulation_steps=1):
    return train_ppo.parse_args(["--device", "cpu", "--batch_size", str(mini_batch_size), "--mini_batch_size",
                                 str(mini_batch_size), "--ppo_epochs", "1", "--accumulation_steps",
                                 str(accumulation_steps), "--entropy_coef", "0.01", "--kl_mode", "loss"])


def tiny_models(arch="minimind"):
    """A tiny actor (MiniMind, or a transformers architecture of tests/hf_models.py) and its critic."""
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from hf_models import tiny_hf_model
    torch.manual_seed(0)
    actor = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)) if arch == "minimind" \
        else tiny_hf_model(arch)
    actor.eval()  # dropout off, as the trainer runs it
    critic = build_critic(actor).eval()
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)  # non-zero so the critic's gradient is non-trivial
    return actor, critic


def main():
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "update":
        init_distributed_mode("cpu")
        rank, world = get_rank(), dist.get_world_size()
        actor, critic = tiny_models(sys.argv[3])
        rollout = fixed_rollout(actor, 4, 6, 5)
        share = 4 // world
        mine = {k: v[rank * share:(rank + 1) * share] for k, v in rollout.items()}
        ddp = torch.nn.parallel.DistributedDataParallel
        actor_sd, critic_sd = one_update(ddp(actor), ddp(critic), mine, update_args(share, accumulation_steps=2))
        if rank == 0:
            torch.save({"actor": actor_sd, "critic": critic_sd}, os.path.join(out_dir, "ddp_update.pt"))
        dist.destroy_process_group()
    else:  # train
        checks = []

        def check_ranks(run):
            actor, critic = run.learner.actor, run.learner.critic
            flat = torch.cat([p.detach().flatten() for m in (actor, critic) for p in m.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            # identical weights on every rank, and no buffer broadcast per forward (RoPE tables are equal by construction)
            checks.append(all(torch.equal(gathered[0], g) for g in gathered)
                          and actor.broadcast_buffers is False and critic.broadcast_buffers is False)
        run = train_ppo.build_run(train_ppo.parse_args(sys.argv[3:]))
        train_ppo.finish(run, train_ppo.train(run, after_step=check_ranks))
        with open(os.path.join(out_dir, f"checks_rank{os.environ['RANK']}.json"), "w") as f:  # the group is gone
            json.dump(checks, f)


if __name__ == "__main__":
    main()
