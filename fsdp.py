"""`--fsdp 1`: the PPO models sharded over the ranks of torchrun with FSDP2 (torch.distributed.fsdp.fully_shard),
and resume checkpoints that every rank writes its own shard of (torch.distributed.checkpoint, DCP).

What is sharded, and how (README "Beyond one GPU: FSDP"):
- the actor (a model.policy.Policy) and the critic: every decoder block is an FSDP unit and the root module (the
  Policy, the CriticModel) one more, holding what is outside the blocks (embeddings, final norm, LM head, value
  head). The root must be the Policy, not its LM: the Policy's forward calls the LM's backbone and head itself.
  Their AdamW states follow their parameter shards (the optimizers are built after sharding).
- the frozen models (the reference; the old actor where it is a copy): sharded the same way, with no optimizer.
- the reward model is replicated, not sharded: it is frozen and scored without gradients (one copy of its weights,
  no gradients or optimizer states: the smallest of the five), and scored a data-dependent number of times per rank
  (chunks of a rank's responses, a rank's share of the held-out prompts), where a sharded model would need the same
  collectives on every rank; get_score() models run their own remote code too.
- on CUDA, FSDP's mixed precision: bfloat16 (--dtype) parameters for compute, gradients reduced in float32, float32
  master weights and AdamW states; on CPU float32 throughout (CPU --dtype autocast is unchanged).

The models are built in CPU memory and each rank moves only its shards to its GPU: a GPU never holds a whole model
except during generation (unsharded). Rules that keep every rank in step: every forward of a sharded model is a
collective, so each rank must run the same number of them (the --accumulation_steps micro-batches, not the packed
--max_tokens_per_micro_batch ones, refused), and generation, whose number of decoding steps differs per rank, runs
with the policy gathered once beforehand (unsharded): no collective inside the sampler.
"""
import contextlib
import glob
import os
import pickle
import shutil
import sys
import warnings

import torch
import torch.distributed as dist

from trainer_utils import (atomic_save, first_line, get_world_size, InputError, is_main_process, Logger,
                           resume_candidates, rotate_into_place)

STATE_FILE = "state.pth"  # the non-tensor part of a sharded resume checkpoint (progress, RNG states, schedulers...)


def check_flags(args):
    """--fsdp 1 with flags it cannot serve: an InputError naming the flag, before any model is built."""
    if not args.fsdp:
        return
    if args.lora_rank:
        raise InputError(f"--fsdp 1 with --lora_rank {args.lora_rank}: not supported. A LoRA policy's reference is "
                         f"its own base weights with the adapters switched off, run outside the actor's FSDP root, "
                         f"and LoRA already trains with a small optimizer state: train LoRA on one GPU per process "
                         f"(--lora_rank without --fsdp; DDP under torchrun), or shard the full model (--fsdp 1 "
                         f"without --lora_rank)")
    if args.max_tokens_per_micro_batch:
        raise InputError(f"--fsdp 1 with --max_tokens_per_micro_batch {args.max_tokens_per_micro_batch}: every "
                         f"forward of a sharded model is a collective, so every rank must run as many micro-batches "
                         f"as the others, and rows packed by length give each rank its own count; use "
                         f"--accumulation_steps (equal micro-batches) with --fsdp 1")
    import torch.distributed.fsdp
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        raise InputError(f"--fsdp 1 needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this torch is "
                         f"{torch.__version__}")
    if not dist.is_initialized():
        raise InputError("--fsdp 1 shards the models over the processes of torchrun: launch with `torchrun "
                         "--nproc_per_node N train_ppo.py ... --fsdp 1` (N = 1 works too, e.g. to continue a sharded "
                         "checkpoint on one GPU)")


def is_sharded(module):
    """An FSDP module (without importing FSDP, which takes seconds: nothing is sharded before it is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def decoder_block_names(*models):
    """The class names of the models' decoder blocks: transformers' `_no_split_modules` (MiniMind's `Block` too)."""
    return {name for model in models if model is not None for m in model.modules()
            for name in (getattr(m, "_no_split_modules", None) or ())}


def shard_models(args, actor, old_actor, ref_model, critic):
    """fully_shard each model in place: its decoder blocks, then its root. Trained roots keep their parameters
    gathered from forward to backward (FSDP's default for a root); frozen ones reshard after every forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    from model.loading import is_moe
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(device_type, (get_world_size(),))
    dtype = getattr(torch, args.dtype)
    # CUDA: compute in --dtype, reduce gradients in float32 (the master weights and AdamW states stay float32)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
        if device_type == "cuda" and dtype != torch.float32 else MixedPrecisionPolicy()
    # the critic's forward returns a view (value_head(h).squeeze(-1)), which FSDP warns about for in-place ops on
    # it; critic_values only slices and converts it, out of place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCriticModel\) returned a view tensor")
    names = decoder_block_names(actor.lm, critic)
    counts = {}
    models = [(actor, True), (critic, True), (ref_model, False)] + \
        ([(old_actor, False)] if old_actor is not actor else [])
    for model, trained in models:
        if model is None:
            continue
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        blocks = [b for b in blocks if not any(b is not o and any(b is m for m in o.modules()) for o in blocks)]
        if not blocks:
            raise InputError(f"--fsdp 1: no decoder blocks found in {type(model).__name__} (looked for the classes "
                             f"its _no_split_modules name: {sorted(names)})")
        counts[id(model)] = len(blocks)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not trained)
        if trained and is_moe(model):  # an expert no token reached on one rank still joins the reduce-scatter
            if not hasattr(model, "set_reduce_scatter_unused_params"):
                raise InputError(f"--fsdp 1 with a mixture-of-experts model needs an FSDP that reduces the gradients "
                                 f"of experts a rank did not use (set_reduce_scatter_unused_params); torch "
                                 f"{torch.__version__} has none: use a newer torch, or DDP (--fsdp 0)")
            model.set_reduce_scatter_unused_params(True)
        if not trained:
            model.register_forward_hook(lambda module, args_, output: forget_forwards(module))
    # FSDP takes the first module to run forward as the root: make it the Policy (generation calls the LM's blocks
    # directly), with one tiny forward through each sharded Policy; then every unit is sharded again
    for policy in {id(m): m for m in (actor, old_actor, ref_model) if m is not None}.values():
        ids = torch.tensor([[1, 2]], device=args.device)
        with torch.no_grad():
            policy(ids, torch.ones_like(ids), 1)
        policy.reshard()
        forget_forwards(policy)
    local = sum(local_tensor(p).numel() for model, _ in models if model is not None for p in model.parameters())
    full = sum(p.numel() for model, _ in models if model is not None for p in model.parameters())
    sharded = ", ".join(name for name, model in [("actor", actor), ("critic", critic), ("reference", ref_model),
                                                 ("old actor", None if old_actor is actor else old_actor)]
                        if model is not None)
    Logger(f"FSDP: {sharded} sharded over {get_world_size()} ranks ({counts[id(actor)]} decoder blocks + the root each"
           f"{f', {args.dtype} compute, float32 reduction' if mp.param_dtype else ''}); this rank holds "
           f"{local / 1e6:.2f}M of their {full / 1e6:.2f}M parameters; reward model replicated")


@contextlib.contextmanager
def unsharded(policy):
    """`policy` (a sharded Policy) with every parameter gathered for the block, resharded at its end: one all-gather
    per FSDP unit for a whole generation, however many tokens it decodes. Inside, the forwards run no collective,
    so each rank may decode its own number of steps (rows stop at their EOS). Costs the full policy's parameters
    (in the compute dtype) on every rank while it lasts. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    if not is_sharded(policy):
        yield
        return
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for handle in [unit.unshard(async_op=True) for unit in units]:
        handle.wait()
    try:
        yield
    finally:  # local: no collective
        frozen = not any(p.requires_grad for p in policy.parameters())
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not policy or frozen, recurse=False)
        forget_forwards(policy)


def forget_forwards(root):
    """FSDP records every forward for the prefetch order of the backward that follows, and clears the record in
    that backward: a frozen model, or a generation's thousands of forwards, would grow it for the whole run.
    FSDPModule.reset_iter_state (torch 2.13 has it) clears it, and reshards; without it the record stays (a few
    bytes per forward)."""
    if hasattr(root, "reset_iter_state"):
        root.reset_iter_state()


def sharded_grad_scaler(device_type):
    """float16's loss scaler over sharded gradients: a gradient that overflowed on one rank's shard skips the step
    on every rank."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler(device_type)


def full_tensor(t):
    """A DTensor's global value (clip_grad_norm_'s total norm over sharded gradients), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (not imported: it takes seconds)


def local_tensor(t):
    return t.to_local() if hasattr(t, "to_local") else t


def full_lm_state_dict(policy):
    """The sharded Policy's LM weights, gathered on rank 0 in CPU memory under the LM's own key names (no "lm."),
    tied weights (embedding and LM head) sharing one tensor as in the model; {} on the other ranks. Every rank calls
    it (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return {}
    state = {k[len("lm."):]: v for k, v in full.items()}
    first = {}
    for name, p in policy.lm.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def gathered_state_dicts(parts):
    """{name: model state dict, name_optimizer: optimizer state dict} of `parts` ({name: (model, optimizer or
    None)}), gathered in full on rank 0 (tests and the bench compare them across world sizes); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, StateDictOptions
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for name, (model, opt) in parts.items():
        if opt is not None and opt.state:
            out[name], out[f"{name}_optimizer"] = get_state_dict(model, opt, options=options)
        else:
            out[name] = get_model_state_dict(model, options=options)
    return out


# ----------------------------------------------------------------------------- sharded resume checkpoints
def sharded_path(resume_file):
    """x_resume.pth -> x_resume.dcp: the folder a sharded resume checkpoint is (rotated as x_resume.1.dcp, ...)."""
    return os.path.splitext(resume_file)[0] + ".dcp"


def save_sharded(record, parts, path, keep):
    """A resume checkpoint folder at `path`: the tensors of `parts` ({name: (model, optimizer or None)}) written by
    DCP, every rank its own shard, and `record` (the non-tensor state, rank 0's) as STATE_FILE. Written into
    `path`.tmp and published (renamed into place, older ones rotated) by rank 0 once every rank has finished, so a
    kill at any moment never leaves a partial checkpoint as the newest. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    tmp = f"{path}.tmp"
    if is_main_process():  # a killed save's leftovers
        for stale in glob.glob(glob.escape(path) + "*.tmp") + glob.glob(glob.escape(os.path.splitext(path)[0])
                                                                         + "*.trash"):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    tensors, saved_optimizers = {}, []
    for name, (model, opt) in parts.items():
        # an optimizer that never stepped (the actor's during a critic warm-up) is not saved: asking DCP for its
        # state would create one with a zero-gradient step, and the run would no longer be the uninterrupted one
        if opt is not None and opt.state:
            tensors[name], tensors[f"{name}_optimizer"] = get_state_dict(model, opt)
            saved_optimizers.append(name)
        else:
            tensors[name] = get_model_state_dict(model)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # returns once the metadata is written
    if is_main_process():
        atomic_save(dict(record, sharded_optimizers=saved_optimizers), os.path.join(tmp, STATE_FILE))
        rotate_into_place(tmp, path, keep)


def load_sharded(folder, parts, optimizers):
    """The tensors of a sharded checkpoint `folder` into `parts` ({name: (model, optimizer or None)}; the optimizers
    named in `optimizers` were saved), resharded by DCP to this run's world size. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    tensors = {}
    for name, (model, opt) in parts.items():
        if opt is not None and name in optimizers:
            tensors[name], tensors[f"{name}_optimizer"] = get_state_dict(model, opt)
        else:
            tensors[name] = get_model_state_dict(model)
    dcp.load(tensors, storage_reader=safe_reader(folder))
    for name, (model, opt) in parts.items():
        if opt is not None and name in optimizers:
            set_state_dict(model, opt, model_state_dict=tensors[name], optim_state_dict=tensors[f"{name}_optimizer"])
        else:
            set_model_state_dict(model, tensors[name])


def load_resume(path):
    """(state, folder) from the newest readable sharded checkpoint of path, path.1, ... (its STATE_FILE, with the
    folder as state["sharded_folder"]); (None, None) when there is none. One that is unreadable, or whose shard files
    are missing or shorter than its metadata says, is skipped with a warning, as a corrupt resume file is. Every rank
    calls it and every rank takes the same one (rank 0 lists them)."""
    candidates = [resume_candidates(path)]
    dist.broadcast_object_list(candidates, src=0)
    errors = []
    for candidate in candidates[0]:
        try:
            state = torch.load(os.path.join(candidate, STATE_FILE), map_location="cpu", weights_only=True)
            check_shards(candidate)
            error = None
        except Exception as e:
            error = first_line(e)
        # every rank takes the same one: skip a folder that any rank cannot read
        failed = [error]
        if get_world_size() > 1:
            failed = [None] * get_world_size()
            dist.all_gather_object(failed, error)
        failed = next((f for f in failed if f), None)
        if failed is None:
            return dict(state, sharded_folder=candidate), candidate
        errors.append(f"{candidate} ({failed})")
        Logger(f"warning: skipping unreadable resume checkpoint {errors[-1]}")
    if errors:
        raise InputError("all resume checkpoints are unreadable: " + "; ".join(errors))
    return None, None


def check_shards(folder):
    """The folder's DCP metadata reads (safely) and names shard files that are all there, each at least as long as
    the data it holds: a folder cut short by a failing disk is not taken for a checkpoint."""
    metadata = safe_reader(folder).read_metadata()
    needed = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file) or os.path.getsize(file) < size:
            raise InputError(f"{file}: missing or shorter than its {size} bytes")


# DCP reads its metadata file with pickle.load, which runs whatever a planted file asks; this reader accepts only
# the types DCP's metadata is made of (its dataclasses, torch sizes, dtypes and layouts, paths)
_METADATA_TYPES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                   ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                   ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = (module, name) in _METADATA_TYPES or module == "torch.distributed.checkpoint.metadata" or \
            (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which DCP metadata does "
                                         f"not hold; refusing to load it")
        return super().find_class(module, name)


def safe_reader(folder):
    """DCP's file reader for `folder`, its metadata unpickled by _MetadataUnpickler (a class built on first use:
    DCP's imports take seconds, and a run without --fsdp needs none of them)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if hasattr(self, "load_id"):  # as FileSystemReader.read_metadata does (torch >= 2.4)
                from torch.distributed.checkpoint.metadata import StorageMeta
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader(folder)


def local_bytes(model, optimizer=None):
    """Bytes this rank holds of `model`'s parameters, gradients and `optimizer`'s states (its shards under FSDP)."""
    def size(t):
        t = local_tensor(t)
        return t.numel() * t.element_size()
    params = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(size(v) for s in (optimizer.state.values() if optimizer else ()) for v in s.values()
                 if torch.is_tensor(v))
    return dict(params=params, grads=grads, optimizer=states)
