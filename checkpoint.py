"""The state of a PPO run (Learner, Progress, Run) and its checkpoints: the trained policy where users
look for it, and a resume file that is one record, written by checkpoint_record and read back field for
field by load_checkpoint_record, so that a resumed run is the run that would have happened."""
import argparse
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

import fsdp
from dataset.lm_dataset import RLAIFDataset
from model.loading import model_signature
from model.lora import load_trainable_state_dict, merged_state_dict, trainable_state_dict
from reward import Reward
from trainer_utils import (all_reduce_sum, atomic_folder, gather_rng_states, get_rank, get_world_size, hf_folder_path,
                           InputError, is_hf_folder, is_main_process, load_resume, Logger, lora_folder_path,
                           OutputError, release_free_memory, resolve_weight, resume_file_pattern, resume_path,
                           save_hf_folder, save_resume, save_weights, set_rng_state, setup_seed, truncate_metrics,
                           unwrap_model, weight_file_pattern, weight_path)


@dataclass
class Learner:
    """What the PPO update trains: actor (a model.policy.Policy) and critic (DDP wrappers under torchrun),
    their optimizers and LR schedules, the float16 loss scaler (None otherwise) and, for a LoRA policy,
    peft's model around the actor's LM (it saves the adapter)."""
    actor: nn.Module
    critic: nn.Module
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    actor_sched: torch.optim.lr_scheduler.LRScheduler
    critic_sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler = None
    actor_peft: object = None


@dataclass
class Progress:
    """Where the run is: with the models, optimizers, schedulers and RNG, what a resume file records."""
    epoch: int = 0
    step: int = 0  # the next batch of `epoch` to run
    global_step: int = 0  # rollouts done
    bad_streak: int = 0  # consecutive rollouts without a usable update
    swanlab_id: str = None  # a resumed run logs to the same swanlab run


@dataclass
class Run:
    """Everything the training loop needs, built by build_run. Tests and scripts change a part
    (wrap the reward, hook a model) between build_run and train."""
    args: argparse.Namespace
    tokenizer: object
    dataset: RLAIFDataset
    sampler: DistributedSampler
    eval_samples: list
    learner: Learner
    old_actor: nn.Module  # the behaviour policy: samples, gives pi_old
    ref_model: nn.Module  # frozen reference: the KL anchor
    reward: Reward
    autocast: object  # torch.autocast, or a null context for float32
    kl_ctl: object  # train_ppo.AdaptiveKLController
    progress: Progress
    steps_per_epoch: int
    total_rollouts: int
    resumed: bool = False
    swanlab_run: object = None
    started: float = None  # time.time() when train() started, and the global step then (for the ETA)
    first_step: int = 0
    tools: object = None  # tools.ToolRunner of --tools (None: one-turn rollouts)

    @property
    def metrics_path(self):
        return os.path.join(self.args.save_dir, "metrics.jsonl")

    @property
    def samples_path(self):
        return os.path.join(self.args.save_dir, "samples.jsonl")


# flags a resume file must agree on with the run that loads it (with the value a file older than the flag had):
# the data's order, grouping and filtering, the estimator and loss, and every flag that changes the function
# trained (the LoRA adapters' rank, scale and places; the base is checked by the reference's fingerprint)
RESUME_FLAGS = dict(batch_size=None, n_samples_per_prompt=1, adv_estimator="gae", lora_rank=0, lora_alpha=16,
                    lora_target_modules="all-linear", lora_critic=1, policy_loss="ppo", filter_groups=0,
                    max_filter_batches=10, tools=None, max_turns=None)


def policy_path(args, config):
    """Where the trained policy is saved: a transformers policy as a save_pretrained folder
    ({save_weight}_hf), MiniMind as its fp16 .pth ({save_weight}_{hidden}[_moe].pth)."""
    if is_hf_folder(args.from_weight):
        return hf_folder_path(args.save_dir, args.save_weight)
    return weight_path(args.save_dir, args.save_weight, config.hidden_size, config.use_moe)


@torch.no_grad()
def weights_fingerprint(model):
    """[tensors, 2] float64: each frozen parameter's sum and sum of absolute values, to tell one set of weights
    from another (a resume checks that its reference, a LoRA policy's base included, is the one the run
    started from). A sharded model's are summed over its shards: the same on every rank (a collective)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    buffers, sums = {}, []  # one float64 work buffer per device, reused for every tensor
    for tensor in map(fsdp.local_tensor, frozen):
        if tensor.device not in buffers:
            buffers[tensor.device] = torch.empty(2 ** 20, dtype=torch.float64, device=tensor.device)
        sums.append(tensor_sums(tensor, buffer=buffers[tensor.device]))
    sums = torch.stack(sums)
    return (all_reduce_sum(sums) if fsdp.is_sharded(model) else sums).cpu()


@torch.no_grad()
def tensor_sums(tensor, chunk=2 ** 20, buffer=None):
    """[2] float64: the tensor's sum and sum of absolute values, a chunk of elements at a time, each chunk cast into
    one float64 work `buffer` (of at least `chunk` elements; made here when not given): summing in float64 at once
    would make a float64 copy of the whole tensor (and abs() another), 1.5 GB for a 152k x 896 embedding, and a
    fresh float64 chunk per piece left the allocator holding ~250 MB after the fingerprint of a 125M model."""
    flat = tensor.detach().reshape(-1)
    if buffer is None:
        buffer = torch.empty(min(chunk, flat.numel()), dtype=torch.float64, device=flat.device)
    total = torch.zeros(2, dtype=torch.float64, device=flat.device)
    for piece in flat.split(chunk):
        work = buffer[:piece.numel()].copy_(piece)
        total[0] += work.sum()
        total[1] += work.abs_().sum()
    return total


def check_outputs(args):
    """Before any model is built: the output folders can be written, and the trained policy would not be
    saved over the weights the run starts from (the first save would destroy them, and a resume would
    rebuild the KL reference from the overwritten file)."""
    if args.from_weight != "none":
        start = os.path.realpath(resolve_weight(args.from_weight, args.save_dir, args.hidden_size, args.use_moe))
        if is_hf_folder(start):
            output = os.path.realpath(hf_folder_path(args.save_dir, args.save_weight))
            clash = start == output
        else:  # {save_dir}/{save_weight}_{hidden}[_moe].pth, the size read off the weights
            output = os.path.join(os.path.realpath(args.save_dir), f"{args.save_weight}_<hidden>[_moe].pth")
            clash = (os.path.dirname(start) == os.path.realpath(args.save_dir)
                     and weight_file_pattern(args.save_weight).fullmatch(os.path.basename(start)) is not None)
        if clash:
            kind = "folder" if is_hf_folder(start) else "file"
            raise InputError(f"--from_weight {args.from_weight} is {start}, the very {kind} this run saves its policy "
                             f"to ({output}: --save_dir {args.save_dir}, --save_weight {args.save_weight}); the first "
                             f"save would overwrite the starting weights and the reference. Give another --save_weight "
                             f"or --save_dir")
    if is_main_process():  # fail now rather than at the first save, after the training it was meant to keep
        for flag, folder in [("--save_dir", args.save_dir), ("--checkpoint_dir", args.checkpoint_dir)]:
            check_writable(folder, flag)


def check_writable(folder, flag):
    """`folder` can be written, or made where it does not exist yet (nothing is created here)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing} is a file")
        if existing == os.path.abspath(folder):
            tempfile.TemporaryFile(dir=folder).close()
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, f"{existing} is not writable")
    except OSError as e:
        raise OutputError(f"{flag} {folder!r} is not writable ({e.strerror or e})") from e


def sharded_parts(run):
    """The sharded models of a --fsdp 1 run with their optimizers, by the names their checkpoint tensors go under:
    the actor, the critic (none for the critic-free estimators), the old actor where it is a copy of its own."""
    learner = run.learner
    parts = dict(actor=(learner.actor, learner.actor_opt))
    if learner.critic is not None:
        parts["critic"] = (learner.critic, learner.critic_opt)
    if run.old_actor is not learner.actor:
        parts["old_actor"] = (run.old_actor, None)
    return parts


def checkpoint_record(run):
    """The resume file's contents (rank 0's view; every rank's RNG is added by save_checkpoint). Sharded models
    (--fsdp 1): the small state alone, the tensors being written by every rank (fsdp.save_sharded); every rank
    calls it then (the reference's fingerprint is a collective)."""
    learner = run.learner
    policy = unwrap_model(learner.actor)
    critic = learner.critic is not None
    record = dict(scheduler=learner.actor_sched.state_dict(),
                  critic_scheduler=learner.critic_sched.state_dict() if critic else None,
                  grad_scaler=learner.scaler.state_dict() if learner.scaler else None, kl_coef=run.kl_ctl.value,
                  reference=weights_fingerprint(run.ref_model),
                  model_config=model_signature(unwrap_model(learner.actor).config), world_size=get_world_size(),
                  **{flag: getattr(run.args, flag) for flag in RESUME_FLAGS}, **asdict(run.progress))
    if fsdp.is_sharded(policy):
        return record
    # the trained weights only (a LoRA policy's adapters: its base is --from_weight, checked by `reference`); the
    # old actor when it is a copy of its own (--update_old_actor_freq > 1); no critic for the critic-free estimators
    return dict(record, model=trainable_state_dict(policy.lm),
                critic_model=trainable_state_dict(unwrap_model(learner.critic)) if critic else None,
                old_actor=None if run.old_actor is policy else run.old_actor.lm.state_dict(),
                optimizer=learner.actor_opt.state_dict(),
                critic_optimizer=learner.critic_opt.state_dict() if critic else None)


def load_checkpoint_record(run, state):
    """checkpoint_record read back into the run: what save wrote, load reads, field for field."""
    have = model_signature(unwrap_model(run.learner.actor).config)
    for key, value in state["model_config"].items():
        if have[key] != value:
            raise InputError(f"resume file was written with {key}={value}, but this run has {key}={have[key]}")
    for flag, default in RESUME_FLAGS.items():  # a resume file written before a flag existed had its default
        if state.get(flag, default) != getattr(run.args, flag):
            raise InputError(f"resume file was written with --{flag} {state.get(flag, default)}, this run has "
                             f"--{flag} {getattr(run.args, flag)}")
    if "reference" in state and not torch.allclose(state["reference"], weights_fingerprint(run.ref_model),
                                                   rtol=1e-4, atol=1e-6):
        raise InputError(f"--from_resume 1: the reference rebuilt from --from_weight {run.args.from_weight} is not "
                         f"the one this run started from (its weights changed since: overwritten?); the KL anchor "
                         f"would silently move. Resume with the weights the run started from")
    learner = run.learner
    policy = unwrap_model(learner.actor)
    pairs = [(learner.actor_sched, "scheduler")] + \
        ([(learner.critic_sched, "critic_scheduler")] if learner.critic is not None else [])
    if "sharded_folder" in state:  # --fsdp 1: DCP reshards the tensors to this run's world size
        fsdp.load_sharded(state["sharded_folder"], sharded_parts(run), state["sharded_optimizers"])
    else:
        load_trainable_state_dict(policy.lm, state["model"])
        if run.old_actor is not policy:
            run.old_actor.lm.load_state_dict(state["old_actor"] or policy.lm.state_dict())
        pairs.append((learner.actor_opt, "optimizer"))
        if learner.critic is not None:
            load_trainable_state_dict(unwrap_model(learner.critic), state["critic_model"])
            pairs.append((learner.critic_opt, "critic_optimizer"))
    for obj, key in pairs:
        obj.load_state_dict(state[key])
    if learner.scaler is not None and state["grad_scaler"]:
        learner.scaler.load_state_dict(state["grad_scaler"])
    run.kl_ctl.value = state["kl_coef"]
    state.setdefault("swanlab_id", state.get("wandb_id"))  # the name in resume files written before 2026-11-21
    run.progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})


def save_checkpoint(run, rng_state):
    """The actor (policy_path) + a resume file with everything needed to continue from run.progress.
    `rng_state` is this rank's RNG state at the start of the next step to run."""
    args, learner = run.args, run.learner
    rng_states = gather_rng_states(rng_state)  # collective: every rank calls it
    lm = unwrap_model(learner.actor).lm
    config = lm.config
    hidden, moe = config.hidden_size, getattr(config, "use_moe", False)
    path = resume_path(args.checkpoint_dir, args.save_weight, hidden, moe)
    sharded = fsdp.is_sharded(learner.actor)
    if sharded:  # every rank: the policy gathered on rank 0, and each rank's shard of the resume checkpoint
        weights = fsdp.full_lm_state_dict(learner.actor)
        record = dict(checkpoint_record(run), rng_states=rng_states)
    if is_main_process():
        if learner.actor_peft is not None:  # the adapter, and the merged policy where users look for the policy
            with atomic_folder(lora_folder_path(args.save_dir, args.save_weight)) as folder:
                learner.actor_peft.save_pretrained(folder)
        # the policy: FSDP's gathered weights, else the model's own (a LoRA policy merged one weight at a time into
        # a transformers folder, straight into float16 for MiniMind's .pth)
        if is_hf_folder(args.from_weight):
            save_hf_folder(lm, run.tokenizer, policy_path(args, config), state_dict=weights if sharded else None)
        else:
            save_weights(weights if sharded else merged_state_dict(lm, torch.float16) if learner.actor_peft is not None
                         else lm, policy_path(args, config))
            if args.save_hf:
                save_hf_folder(lm, run.tokenizer, hf_folder_path(args.save_dir, args.save_weight, hidden, moe),
                               state_dict=weights if sharded else None)
        if sharded:
            del weights  # the gathered policy: freed before the resume checkpoint is written
        release_free_memory()  # what writing the policy freed, before the resume record is built
        if not sharded:
            save_resume(dict(checkpoint_record(run), rng_states=rng_states), path, keep=args.keep_checkpoints)
    if sharded:
        fsdp.save_sharded(record, sharded_parts(run), fsdp.sharded_path(path), args.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


def restore_checkpoint(run, state):
    """Load a resume file into the run.

    Under another world size every counter is re-derived from the prompts consumed: the data
    position, the global step (so the run still trains every remaining prompt) and the
    schedulers' step counts (so the LR continues where a fresh run at that world size would be).
    """
    load_checkpoint_record(run, state)
    args, p, steps_per_epoch = run.args, run.progress, run.steps_per_epoch
    world, saved_world = get_world_size(), state["world_size"]
    if saved_world != world and args.filter_groups:
        raise InputError(f"--from_resume 1 with --filter_groups 1: the run was written by {saved_world} processes, "
                         f"this one has {world}; dynamic sampling draws batches per rollout as the data allows, so "
                         f"the rollouts done cannot be re-derived from the prompts consumed: resume on {saved_world}")
    if saved_world != world:
        # the global data order does not depend on the world size: keep the number of prompts consumed
        consumed = p.step * args.batch_size * saved_world
        p.step = min(consumed // (args.batch_size * world), steps_per_epoch)
        p.global_step = p.epoch * steps_per_epoch + p.step
        for sched in filter(None, (run.learner.actor_sched, run.learner.critic_sched)):  # the same share of steps
            sched.last_epoch = round(sched.last_epoch * p.global_step / state["global_step"]) - 1 \
                if state["global_step"] else -1
            sched.step()
        Logger(f"resume: world size {saved_world} -> {world}; data position {consumed} prompts -> step {p.step}, "
               f"global step {state['global_step']} -> {p.global_step}"
               + ("" if consumed % (args.batch_size * world) == 0 else
                  f" ({consumed % (args.batch_size * world)} prompts of this epoch are revisited)"))
    if p.step >= steps_per_epoch:
        p.epoch, p.step = p.epoch + 1, 0
    rng = state["rng_states"]
    if get_rank() < len(rng) and saved_world == world:
        set_rng_state(rng[get_rank()])
    else:
        setup_seed(args.seed + get_rank() + 1000 * p.global_step)
        Logger("resume: RNG states reseeded (world size changed)")
    run.resumed = True


def resume_if_asked(run):
    """--from_resume 1: continue from the newest readable resume file of this actor, or start fresh when
    there is none (but not when the only ones are another model size's)."""
    args = run.args
    config = unwrap_model(run.learner.actor).config
    path = resume_path(args.checkpoint_dir, args.save_weight, config.hidden_size, getattr(config, "use_moe", False))
    sharded = fsdp.is_sharded(run.learner.actor)  # --fsdp 1: sharded checkpoint folders (x_resume.dcp) instead
    state, loaded_from = fsdp.load_resume(fsdp.sharded_path(path)) if sharded else load_resume(path)
    if state is None:
        # written the other way (--fsdp 0 files, --fsdp 1 folders): the formats are not converted
        other = path if sharded else fsdp.sharded_path(path)
        if os.path.exists(other):
            raise InputError(f"--from_resume 1: {args.checkpoint_dir} holds {os.path.basename(other)}, written "
                             f"{'without' if sharded else 'with'} --fsdp 1, and no resume checkpoint written "
                             f"{'with' if sharded else 'without'} it; resume with --fsdp {0 if sharded else 1} as the "
                             f"run was written, or start fresh with another --checkpoint_dir")
        # the file name holds the model size: a resume file for another size must not mean "start fresh"
        names = os.listdir(args.checkpoint_dir) if os.path.isdir(args.checkpoint_dir) else []
        others = sorted(n for n in names if resume_file_pattern(args.save_weight).fullmatch(
            n[:-len(".dcp")] + ".pth" if n.endswith(".dcp") else n))
        if others:
            raise InputError(f"--from_resume 1: no resume file for this actor ({os.path.basename(path)}), but "
                             f"{args.checkpoint_dir} holds {', '.join(others)} from another model size; "
                             f"resume with the actor they were written for, or use another --checkpoint_dir")
        Logger(f"--from_resume 1: no checkpoint at {path}; starting fresh")
        return
    restore_checkpoint(run, state)
    p = run.progress
    Logger(f"resumed from {loaded_from}: epoch {p.epoch + 1}, step {p.step}, global step {p.global_step}")
    if is_main_process():
        truncate_metrics(run.metrics_path, p.global_step)
        truncate_metrics(run.samples_path, p.global_step)
