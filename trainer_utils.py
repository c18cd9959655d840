"""What a trainer needs that is not its algorithm: distributed set-up and reductions, seeding,
batching, the LR schedule, file names, crash-safe checkpoint I/O, RNG state capture for exact
resume, the metrics and samples files, and stop signals."""
import contextlib
import ctypes
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.data import BatchSampler, Sampler


# ---------------------------------------------------------------- errors a user can fix

class UserError(Exception):
    """What the trainer says on purpose about what it was given (a flag, a file, data, a model, an output
    folder): the command line prints it as one `error: ...` line (user_errors; PPO_TRACEBACK=1 shows the
    traceback). The concrete types are also the built-in exceptions callers know."""


class InputError(UserError, ValueError):
    """A bad flag value, file content, data row or model."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that is not there."""


class OutputError(UserError, OSError):
    """An output that cannot be written (a folder that is not writable, a full disk)."""


@contextlib.contextmanager
def user_errors():
    """Around a script's main: a UserError becomes one `error: ...` line on stderr (every rank that has one says
    so) and exit status 1; anything else, or PPO_TRACEBACK=1, keeps its traceback."""
    try:
        yield
    except UserError as e:
        if os.environ.get("PPO_TRACEBACK") == "1":
            raise
        print(f"error{f' (rank {get_rank()})' if get_world_size() > 1 else ''}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ---------------------------------------------------------------- distributed

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def Logger(content):
    if is_main_process():
        print(content, flush=True)


def init_distributed_mode(device="cpu"):
    """Join the process group when launched by torchrun; a no-op for plain `python`.
    The backend follows the training device (NCCL for cuda, gloo otherwise), not what the
    machine has: `--device cpu` on a GPU machine runs gloo.
    Returns the local rank (the GPU index on this node)."""
    if "RANK" not in os.environ:
        return 0
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("RANK is set but LOCAL_RANK is not; launch distributed runs with torchrun")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise InputError(f"--device {device} under torchrun needs CUDA, which is not available; use --device cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before init, so NCCL binds each rank to its own GPU
    dist.init_process_group(backend=backend)
    return local_rank


def synced_time(device):
    """Wall time after the device's queued work has finished, so phase timings on CUDA are honest."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.time()


def setup_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_dict(sums):
    """{name: 0-d tensor} summed over ranks, as {name: float}; every rank has the same names."""
    names = sorted(sums)
    return dict(zip(names, all_reduce_sum(torch.stack([sums[k] for k in names])).tolist()))


def all_names(values):
    """The union of every rank's names in `values` (a dict), sorted: metrics that only some ranks produced (a
    reward function's diagnostics) still take part in one reduction. A collective under torch.distributed."""
    if not dist.is_initialized():
        return sorted(values)
    names = [None] * get_world_size()
    dist.all_gather_object(names, list(values))
    return sorted(set().union(*names))


def no_sync(*models):
    """Gradients accumulate locally, with no reduction, for every model at once: DDP's no_sync(), or for an FSDP2
    model set_requires_gradient_sync(False), switched back on at the end of the block."""
    stack = contextlib.ExitStack()
    for m in models:
        if hasattr(m, "set_requires_gradient_sync"):  # an FSDPModule (not imported here: that takes seconds)
            m.set_requires_gradient_sync(False)
            stack.callback(m.set_requires_gradient_sync, True)
        else:
            stack.enter_context(m.no_sync())
    return stack


def gather_rng_states(state):
    """Every rank's RNG `state`, gathered to all ranks (rank 0 writes them)."""
    if not dist.is_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------- batching and LR

class SkipBatchSampler(Sampler):
    """Batches of indices from `sampler`, minus the first `skip_batches` ones, so a resumed
    epoch continues where it stopped. Skipped batches are still drawn from the sampler so a
    seeded shuffle yields the same order as in the interrupted run."""

    def __init__(self, sampler, batch_size, skip_batches=0):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if skip_batches < 0:
            raise InputError(f"skip_batches must be >= 0, got {skip_batches}")
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.skip_batches = skip_batches

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip_batches:
                yield batch

    def __len__(self):
        return max(0, len(self.batches) - self.skip_batches)


def build_cosine_scheduler(optimizer, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Linear warmup (lr/warmup_steps ... lr), then cosine decay to lr*min_lr_ratio at total_steps."""
    if total_steps < 1:
        raise InputError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise InputError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise InputError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = total_steps - warmup_steps

    # A plain function, not a callable object, so state_dict() holds only numbers.
    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------- file names

def _model_tag(weight, hidden_size, use_moe):
    return f"{weight}_{hidden_size}{'_moe' if use_moe else ''}"


def weight_path(save_dir, weight, hidden_size, use_moe):
    return os.path.join(save_dir, f"{_model_tag(weight, hidden_size, use_moe)}.pth")


def resume_path(checkpoint_dir, weight, hidden_size, use_moe):
    return os.path.join(checkpoint_dir, f"{_model_tag(weight, hidden_size, use_moe)}_resume.pth")


def hf_folder_path(save_dir, weight, hidden_size=None, use_moe=False):
    """{save_dir}/{weight}_hf: where a transformers policy is saved with save_pretrained. MiniMind's
    --save_hf export is named as its .pth is, with the model tag: {weight}_{hidden}[_moe]_hf."""
    return os.path.join(save_dir, f"{weight if hidden_size is None else _model_tag(weight, hidden_size, use_moe)}_hf")


def lora_folder_path(save_dir, weight):
    """{save_dir}/{weight}_lora: a LoRA policy's adapter (peft's save_pretrained)."""
    return os.path.join(save_dir, f"{weight}_lora")


def weight_file_pattern(weight):
    """{weight}_{hidden}[_moe].pth: group 1 the hidden size, group 2 the MoE suffix."""
    return re.compile(re.escape(weight) + r"_(\d+)(_moe)?\.pth")


def resume_file_pattern(weight):
    """Every resume file of `weight`, of any model size, rotated copies (.1, .2) included."""
    return re.compile(re.escape(weight) + r"_\d+(_moe)?_resume(\.\d+)?\.pth")


def is_hf_folder(path):
    """A transformers checkpoint folder (save_pretrained's config.json), as opposed to a MiniMind .pth."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def resolve_weight(weight, save_dir, hidden_size=None, use_moe=None):
    """A weight name becomes the one file {save_dir}/{name}_{hidden}{_moe}.pth, whatever its size:
    `--from_weight full_sft` finds full_sft_512.pth or full_sft_768_moe.pth alone in the folder.
    hidden_size and use_moe (when given) pick among several; anything that looks like a path (a
    transformers folder too) is used as it is."""
    if os.path.isfile(weight) or is_hf_folder(weight):
        return weight
    if os.path.isdir(weight):
        raise MissingFileError(f"--from_weight {weight}: the folder {os.path.abspath(weight)} holds no config.json, "
                                f"so it is not a transformers model folder")
    if weight.endswith(".pth") or os.sep in weight or weight.startswith("."):  # a path, not a name
        raise MissingFileError(f"--from_weight {weight}: no file or folder of that name exists "
                                f"({os.path.abspath(weight)})")
    pattern = weight_file_pattern(weight)
    found = sorted(n for n in (os.listdir(save_dir) if os.path.isdir(save_dir) else []) if pattern.fullmatch(n))
    picked = [n for n in found if (hidden_size is None or int(pattern.fullmatch(n).group(1)) == hidden_size)
              and (use_moe is None or bool(pattern.fullmatch(n).group(2)) == bool(use_moe))]
    if len(picked) == 1:
        return os.path.join(save_dir, picked[0])
    wanted = _model_tag(weight, hidden_size or "<hidden>", use_moe)
    if not picked:
        raise MissingFileError(f"--from_weight {weight}: no file or folder of that name exists, and as a weight name "
                                f"it found no {wanted}.pth in {os.path.abspath(save_dir)} (--save_dir; pattern "
                                f"{weight}_<hidden>[_moe].pth" + (f"; it holds {', '.join(found)}" if found else "")
                                + "); give a path, or the --save_dir that holds the file")
    raise InputError(f"--from_weight {weight}: {len(picked)} files match in {os.path.abspath(save_dir)}: "
                     f"{', '.join(picked)}; pick one with --hidden_size and/or --use_moe, or give its path")


# ---------------------------------------------------------------- crash-safe saving

def _remove_if_exists(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder):
    # Makes the renames themselves durable; some filesystems refuse fsync on a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(obj, path):
    """torch.save `obj` into a fully synced temp file beside `path`; returns the temp name.
    The temp lives in the same folder so the final os.replace is an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.tmp"  # *.tmp is git-ignored
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a process killed while saving
        _remove_if_exists(stale)
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as e:
        raise OutputError(f"cannot write {path}: folder {folder} is not writable ({e.strerror or e})") from e
    try:
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _remove_if_exists(tmp)
        # torch reports a failed write (a full disk) as an opaque RuntimeError; the OSError behind it says why
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise OutputError(cause.errno, f"cannot write {path} ({cause.strerror or cause}); "
                                       f"the file already there, if any, is left as it was") from e
        raise
    return tmp


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file at `path`: on any failure the
    previous file stays intact and no temp file is left behind."""
    path = os.fspath(path)
    tmp = _write_temp(obj, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_if_exists(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_folder(folder):
    """Yields a temp folder to write into; on success it replaces `folder` (written beside it, then swapped in),
    so `folder` always holds one complete save: the old one until the swap. On failure nothing changes."""
    tmp, old = f"{folder}.{os.getpid()}.tmp", f"{folder}.{os.getpid()}.old"
    for stale in glob.glob(glob.escape(folder) + ".*.tmp") + glob.glob(glob.escape(folder) + ".*.old"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))


# safetensors serialises a shard into one bytes object before writing it: at transformers 5's default of 50 GB a
# whole float32 7B policy (28 GB) would be copied at each save; shards of this size bound that transient
MAX_SHARD_SIZE = "1GB"


def release_free_memory():
    """Hand the memory freed so far back to the system (glibc's malloc_trim): the C allocator keeps freed blocks
    resident in its arenas, so the pieces of a save would otherwise hold what the previous piece freed. A no-op
    where the C library has no malloc_trim (macOS, musl)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_hf_folder(model, tokenizer, folder, state_dict=None):
    """save_pretrained (model and tokenizer) that never leaves a half-written folder (atomic_folder);
    `state_dict`: the weights to write instead of the model's own (FSDP's gathered policy). A model with LoRA
    adapters is written merged, one weight at a time: save_pretrained writes the base (the model's own tensors,
    no copy), then each adapted weight is overwritten in place by its merged value (model/lora.py's
    merge_into_safetensors), so the save never holds a merged copy of the model."""
    from model.lora import adapter_layers, base_state_dict, merge_into_safetensors, merged_state_dict
    model = unwrap_model(model)
    lora = state_dict is None and bool(adapter_layers(model))
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, state_dict=base_state_dict(model) if lora else state_dict,
                              max_shard_size=MAX_SHARD_SIZE)
        if lora and merge_into_safetensors(model, tmp):  # a weight conversion moved an adapted weight
            for name in os.listdir(tmp):
                if name.endswith((".safetensors", ".safetensors.index.json")):
                    os.remove(os.path.join(tmp, name))
            model.save_pretrained(tmp, state_dict=merged_state_dict(model), max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)


def unwrap_model(model):
    """The bare module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model, path, dtype=torch.float16):
    """Save the bare model's state dict (or a state dict) like MiniMind's `full_sft_512.pth`: float tensors in
    `dtype` on CPU (integer buffers keep their type). Tied tensors (embedding and lm_head)
    keep both keys but share one converted copy, so the file stores them once."""
    converted, state = {}, {}
    weights = model if isinstance(model, dict) else unwrap_model(model).state_dict()
    for k, v in weights.items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if key not in converted:
            converted[key] = (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu()
        state[k] = converted[key]
    atomic_save(state, path)


def first_line(error):
    # torch's unpickling errors run to several paragraphs; one line says what happened. When
    # weights_only=True refuses a file, that is the line naming what was refused, not the
    # opening advice to retry with weights_only=False (which lets the file run code).
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reason = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the doc"))), "")
        return f"not a plain tensor file; torch.load(weights_only=True) refused it ({reason})"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _strip_wrapper_prefixes(key):
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_state_dict_file(path):
    """Read a weight file into a CPU state dict. Accepts plain state dicts, MiniMind resume
    files (`{"model": state_dict, ...}`) and keys saved from DDP / compiled models."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot read weights ({first_line(e)})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: expected a non-empty dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise InputError(f"{path}: not a state dict; entry {bad[0]!r} is not a tensor")
    return {_strip_wrapper_prefixes(k): v for k, v in obj.items()}


# ---------------------------------------------------------------- RNG state

def get_rng_state():
    """All RNG states, in types that torch.load(weights_only=True) accepts."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (version, tuple(mt_state), gauss),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    try:
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(mt_state), gauss))
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise InputError(f"invalid RNG state ({first_line(e)})") from e
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the generators it has.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


# ---------------------------------------------------------------- resume files with rotation

def numbered_path(path, index):
    """`x_resume.pth` -> `x_resume.1.pth` (a folder `x_resume.dcp` -> `x_resume.1.dcp`); index 0 is `path` itself."""
    if index == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{index}{ext}"


def _indexed_candidates(path):
    """(index, path) of `path` (index 0) and its numbered older copies (files or folders) on disk, newest first."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    pattern = re.compile(re.escape(root) + r"\.(\d+)" + re.escape(ext))
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    indices = sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m and int(m.group(1)) > 0)
    return [(i, numbered_path(path, i)) for i in [0] + indices if os.path.exists(numbered_path(path, i))]


def resume_candidates(path):
    """`path` and its numbered older copies (files or folders) that exist on disk, newest first."""
    return [candidate for _, candidate in _indexed_candidates(path)]


def rotate_into_place(tmp, path, keep):
    """`tmp`, a complete checkpoint (a file, or a folder of shards), becomes `path`. The older ones first shift one
    slot (path -> path.1 -> path.2 ..., the oldest first, each an atomic rename onto a free name), so every complete
    checkpoint always sits under a name load_resume tries; then those beyond `keep` go (also leftovers of a run with
    a larger `keep`). A folder is renamed out of the candidates' names before it is deleted."""
    for index, older in reversed(_indexed_candidates(path)):
        os.replace(older, numbered_path(path, index + 1))
    os.replace(tmp, path)
    for stale in resume_candidates(path)[keep:]:
        if os.path.isdir(stale):
            os.replace(stale, stale + ".trash")
            shutil.rmtree(stale + ".trash", ignore_errors=True)
        else:
            _remove_if_exists(stale)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_resume(state, path, keep=2):
    """Write a resume checkpoint and keep the `keep - 1` previous ones as path.1, path.2, ...: the new file is
    written to a synced temp, then rotated into place (rotate_into_place). A crash at any point leaves all
    previously saved checkpoints loadable (load_resume falls back to path.1)."""
    if keep < 1:
        raise InputError(f"keep must be >= 1, got {keep}")
    path = os.fspath(path)
    tmp = _write_temp(state, path)
    try:
        rotate_into_place(tmp, path, keep)
    except BaseException:
        _remove_if_exists(tmp)
        raise


def load_resume(path, map_location="cpu"):
    """(state, file it came from) from the newest readable of path, path.1, ...;
    (None, None) when none exists. Corrupt files are skipped with a warning."""
    path = os.fspath(path)
    errors = []
    for candidate in resume_candidates(path):
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"expected a dict, got {type(state).__name__}")
            return state, candidate
        except Exception as e:
            errors.append(f"{candidate} ({first_line(e)})")
            Logger(f"warning: skipping unreadable resume file {errors[-1]}")
    if errors:
        raise InputError("all resume files are unreadable: " + "; ".join(errors))
    return None, None


# ---------------------------------------------------------------- metrics and samples files

def append_jsonl(path, record, swanlab_run=None):
    """One JSON line in `path` (rank 0 writes); the same record to swanlab."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if swanlab_run is not None:
        swanlab_run.log(record, step=record["step"])


def log_step(metrics, parts, metrics_path, swanlab_run, total_rollouts, eta_s, args):
    """Append the step's metrics to metrics.jsonl (and swanlab); print a line every --log_interval, with the
    reward's `parts` (names: each logged as reward_<part>)."""
    append_jsonl(metrics_path, metrics, swanlab_run)
    if metrics["step"] % args.log_interval == 0 or metrics["step"] == total_rollouts:
        policy = f"policy {metrics['policy_loss']:.4f}" if "policy_loss" in metrics else "critic warm-up"
        value = f" value {metrics['value_loss']:.4f}" if "value_loss" in metrics else ""  # no critic: none
        parts = " ".join(f"{part} {metrics[f'reward_{part}']:.2f}" for part in parts)
        Logger(f"step {metrics['step']}/{total_rollouts} | reward {metrics['reward']:.3f} ({parts}) | "
               f"kl_ref {metrics['kl_ref']:.4f} | "
               f"{policy}{value} | "
               f"len {metrics['avg_response_len']:.1f} eos {metrics['eos_rate']:.2f} | "
               f"{metrics['time_step_s']:.1f}s/step, eta {eta_s / 60:.1f} min")


def log_samples(step, prompts, responses, scores, reward_parts, n, samples_path, swanlab_run, advantages=None,
                groups=None, lengths=None, transcripts=None):
    """The first n samples of a rollout, each with its reward, every reward part ({name: [B]}), what it was
    credited with (`advantage`), its prompt's index in the rollout (`group`), its length in tokens
    (`response_tokens`: the policy's own) and, with tools, its `turns` (the assistant turns and tool results as
    messages), to samples.jsonl (and to swanlab as text)."""
    rows = [dict(step=step, prompt=prompts[i], response=responses[i], reward=scores[i].item(),
                 **{f"reward_{part}": values[i].item() for part, values in reward_parts.items()},
                 **({"advantage": advantages[i]} if advantages is not None else {}),
                 **({"group": groups[i]} if groups is not None else {}),
                 **({"response_tokens": lengths[i]} if lengths is not None else {}),
                 **({"turns": transcripts[i]} if transcripts is not None else {}))
            for i in range(min(n, len(prompts)))]
    with open(samples_path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if swanlab_run is not None:
        import swanlab
        swanlab_run.log({"samples": [swanlab.Text(json.dumps(row, ensure_ascii=False, indent=1)) for row in rows]},
                        step=step)


def truncate_metrics(path, last_step):
    """On resume, keep only the lines of steps <= last_step: later steps are run (and logged) again."""
    if not os.path.exists(path):
        return
    lines = open(path).readlines()
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise InputError(f"{path}:{lineno}: not JSON; fix or move the file before resuming")
            Logger(f"{path}:{lineno}: dropping a torn last line (the previous run died while writing it)")
            continue
        if record["step"] <= last_step:
            kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- stop signals

class RolloutInterrupted(BaseException):
    """Raised by the stop-signal handler inside a rollout. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` in model or tokenizer code swallows it."""


class StopSignal:
    """SIGTERM / SIGINT. Inside a rollout (generation, scoring: nothing has changed yet) the handler
    raises RolloutInterrupted at once, so the rollout is dropped and the state after the last
    finished step is saved: torchrun SIGKILLs its workers 30 s after forwarding SIGTERM, less than
    one real-size step. Elsewhere (the update, a save) it only records the signal: the update
    finishes, the step is saved, and the run exits.
    interrupt_rollouts=False (sharded models, --fsdp 1: their rollout forwards are collectives, which a rank that
    left would leave the others waiting in) only records it inside a rollout too: the rollout runs to its end, and
    the ranks then agree to drop it, as they do after an interrupted one."""

    def __init__(self, interrupt_rollouts=True):
        self.signum, self.in_rollout, self.previous = None, False, {}
        self.interrupt_rollouts = interrupt_rollouts

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        self.signum = signum
        if self.in_rollout and self.interrupt_rollouts:
            raise RolloutInterrupted(signum)

    def agreed(self, device):
        """Whether any rank has had a stop signal (a collective: every rank calls it at the same point)."""
        return all_reduce_sum(torch.tensor(float(self.signum is not None), device=device)).item() > 0

    def interruptible(self, fn, *args):
        """fn(*args), or None when a stop signal comes in meanwhile (fn must change no state and run
        no collective); without interrupt_rollouts always fn(*args). Other exceptions pass through."""
        try:
            try:
                self.in_rollout = True
                return fn(*args)
            finally:  # a signal landing here, before the flag is down, is caught below too
                self.in_rollout = False
        except RolloutInterrupted:
            return None
