"""Launched by tests/test_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

mode "update" (arguments: an architecture, minimind(-lora) or one of tests/hf_models.py, with "-gaps" for a rollout
whose responses hold a tool's result (fixed_rollout), then trainer flags such as --adv_estimator and --loss_agg_mode): each rank runs one PPO update on its half of a fixed global rollout
(whole groups of 2 responses); rank 0 saves the resulting weights for comparison with a single-process update
on the whole batch.
mode "train": the real build_run and train, checking after every step that all ranks hold
identical actor and critic weights.
mode "fsdp_update" (arguments: architectures, comma-separated, then trainer flags): the "update" of each
architecture twice, under DDP and with the models sharded (fsdp.shard_models); rank 0 saves both results, gathered
(tests/test_fsdp.py starts it as children of its forkserver: fsdp_update_rank).
"""
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ppo  # noqa: E402
from checkpoint import Learner  # noqa: E402
from model.critic import build_critic  # noqa: E402
from model.policy import Policy  # noqa: E402
from trainer_utils import get_rank, init_distributed_mode, unwrap_model  # noqa: E402


def close_group():
    """Free the DDP wrappers (reference cycles) while the group lives, then take it down: a reducer collected after
    destroy_process_group holds the group's last reference, and gloo's destructor can then abort the process
    ("terminate called without an active exception"), as train_ppo.finish explains."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


TOOL_GAPS = [1, 2]  # response positions that a tool's result holds in the rollouts with gaps (multi-turn)


def fixed_rollout(actor, batch, prompt_len, response_len, seed=0, gaps=False):
    """A deterministic rollout of `batch` rows (same on every process), as the tensors of an Experience. With
    `gaps`, the response positions TOOL_GAPS of each row are a tool's result: read (attention mask) but not the
    policy's (response_mask 0), as in a multi-turn rollout."""
    g = torch.Generator().manual_seed(seed)
    T = prompt_len + response_len
    input_ids = torch.randint(3, 6400, (batch, T), generator=g)
    lengths = torch.tensor([response_len, 2, 5, 3][:batch])
    real = (torch.arange(response_len)[None] < lengths[:, None]).float()
    attention_mask = torch.cat([torch.ones(batch, prompt_len), real], 1).long()
    response_mask = real.clone()
    if gaps:
        response_mask[:, TOOL_GAPS] = 0
    with torch.no_grad():
        old_logprobs = actor(input_ids, attention_mask, response_len, 1.0)[0]
    rewards = torch.randn(batch, response_len, generator=g) * response_mask
    values = torch.randn(batch, response_len, generator=g) * response_mask
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                old_logprobs=old_logprobs + 0.05 * torch.randn(batch, response_len, generator=g),
                ref_logprobs=old_logprobs, values=values, token_rewards=rewards,
                scores=torch.randn(batch, generator=g), groups=torch.arange(batch) // 2,  # 2 responses per prompt
                # what the sampler gave (for --rollout_is) and which responses ended (--mask_truncated_responses)
                sampler_logprobs=old_logprobs + 0.3 * torch.randn(batch, response_len, generator=g),
                has_eos=torch.tensor([False, True, True, False][:batch]))


def one_update(actor, critic, rollout, args):
    """Advantages (--adv_estimator's: GAE globally whitened, or from the score groups) and one PPO update (no critic
    for the critic-free estimators); returns the updated state dicts (the critic's None without one)."""
    rollout = dict(rollout)
    sampler_logprobs = rollout.pop("sampler_logprobs")
    experience = train_ppo.Experience(**rollout)
    experience.loss_mask, experience.rollout_weights, _ = train_ppo.policy_loss_weights(
        experience.old_logprobs, sampler_logprobs, experience.response_mask, experience.has_eos, args)
    train_ppo.add_advantages(experience, args.adv_estimator, 1.0, 0.95)
    critic = critic if args.adv_estimator == "gae" else None
    # plain SGD: the step is linear in the gradient, so the comparison measures the gradient
    # itself (Adam's first step is ~sign(g) and would blow up rounding noise on tiny gradients)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) if m is not None else None
                  for m in (actor, critic)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) if o else None for o in optimizers]
    orders = [torch.arange(len(rollout["input_ids"]))]
    learner = Learner(actor, critic, *optimizers, *schedulers)
    train_ppo.ppo_update(learner, experience, orders, 0.02, args, torch.autocast("cpu", enabled=False))
    return unwrap_model(actor).state_dict(), unwrap_model(critic).state_dict() if critic is not None else None


def update_args(mini_batch_size, accumulation_steps=1, *extra):
    """An update over one minibatch of `mini_batch_size` responses (2 per prompt when an estimator groups them)."""
    grouped = "--adv_estimator" in extra and extra[extra.index("--adv_estimator") + 1] != "gae"
    return train_ppo.parse_args(["--device", "cpu", "--batch_size", str(mini_batch_size // 2 if grouped else
                                                                           mini_batch_size),
                                 "--n_samples_per_prompt", "2" if grouped else "1", "--mini_batch_size",
                                 str(mini_batch_size), "--ppo_epochs", "1", "--accumulation_steps",
                                 str(accumulation_steps), "--entropy_coef", "0.01", "--kl_mode", "loss", *extra])


def tiny_models(arch="minimind"):
    """A tiny actor (a Policy around MiniMind or a transformers architecture of tests/hf_models.py) and its
    critic; "minimind-lora": both with LoRA adapters (rank 4), their B matrices non-zero so that every adapter
    weight has a gradient."""
    from model.lora import add_lora
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from hf_models import tiny_hf_model
    torch.manual_seed(0)
    actor = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)) if arch.startswith("minimind") \
        else tiny_hf_model(arch)
    actor.eval()  # dropout off, as the trainer runs it
    critic = build_critic(actor, share_base=arch.endswith("-lora")).eval()  # the trainer's LoRA critic: one base
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)  # non-zero so the critic's gradient is non-trivial
    if arch.endswith("-lora"):
        for model in (actor, critic.model):
            add_lora(model, 4, 8)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
    return Policy(actor), critic


def fsdp_update(out_dir, archs, *flags):
    """Mode "fsdp_update": for each architecture (comma-separated), the "update" under DDP and with the models
    sharded (fsdp.shard_models); rank 0 saves both, gathered, to out_dir/fsdp_update.pt."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    from fsdp import shard_models
    init_distributed_mode("cpu")
    rank, world = get_rank(), dist.get_world_size()
    share, results = 4 // world, {}
    for arch in archs.split(","):
        for kind in ("ddp", "fsdp"):
            actor, critic = tiny_models(arch)
            rollout = fixed_rollout(actor, 4, 6, 5)
            mine = {k: v[rank * share:(rank + 1) * share] for k, v in rollout.items()}
            args = update_args(share, 2, *flags, "--fsdp", str(int(kind == "fsdp")))
            if kind == "ddp":
                ddp = torch.nn.parallel.DistributedDataParallel
                results[f"{arch}_ddp"] = one_update(ddp(actor), ddp(critic), mine, args)
            else:
                shard_models(args, actor, actor, None, critic)
                one_update(actor, critic, mine, args)
                full = StateDictOptions(full_state_dict=True, cpu_offload=True)
                results[f"{arch}_fsdp"] = tuple(get_model_state_dict(m, options=full) for m in (actor, critic))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "fsdp_update.pt"))
    close_group()


def fsdp_update_rank(rank, world, port, log, out_dir, archs, *flags):
    """fsdp_update as rank `rank` of `world` gloo processes on localhost (a child of the tests' forkserver, which
    starts in milliseconds where torchrun takes seconds); its output to the file `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    fsdp_update(out_dir, archs, *flags)


def main():
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "update":
        init_distributed_mode("cpu")
        rank, world = get_rank(), dist.get_world_size()
        actor, critic = tiny_models(sys.argv[3].removesuffix("-gaps"))
        rollout = fixed_rollout(actor, 4, 6, 5, gaps=sys.argv[3].endswith("-gaps"))
        share = 4 // world
        mine = {k: v[rank * share:(rank + 1) * share] for k, v in rollout.items()}
        ddp = torch.nn.parallel.DistributedDataParallel
        args = update_args(share, 2, *sys.argv[4:])  # further flags: --adv_estimator, --loss_agg_mode
        actor_sd, critic_sd = one_update(ddp(actor), ddp(critic) if args.adv_estimator == "gae" else critic, mine, args)
        if rank == 0:
            torch.save({"actor": actor_sd, "critic": critic_sd}, os.path.join(out_dir, "ddp_update.pt"))
        close_group()
    elif mode == "fsdp_update":
        fsdp_update(out_dir, sys.argv[3], *sys.argv[4:])
    else:  # train
        checks = []

        def check_ranks(run):
            models = [m for m in (run.learner.actor, run.learner.critic) if m is not None]  # no critic: GRPO & co
            flat = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            # identical weights on every rank, and no buffer broadcast per forward (RoPE tables equal by construction)
            checks.append(all(torch.equal(gathered[0], g) for g in gathered)
                          and all(m.broadcast_buffers is False for m in models))
        run = train_ppo.build_run(train_ppo.parse_args(sys.argv[3:]))
        train_ppo.finish(run, train_ppo.train(run, after_step=check_ranks))
        with open(os.path.join(out_dir, f"checks_rank{os.environ['RANK']}.json"), "w") as f:  # the group is gone
            json.dump(checks, f)


if __name__ == "__main__":
    main()
