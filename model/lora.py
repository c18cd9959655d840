"""LoRA through peft, for MiniMind and any transformers causal LM (and a critic's backbone), and the other
memory and speed options beside it: gradient checkpointing, frozen weights kept in the compute precision,
compiled decoder blocks (fit_models applies the flags).

A LoRA policy is its base model with peft's adapter layers injected in place: it samples and scores as
the model it was, the reference is the same model with its adapters switched off (no copy), and what
is saved is the adapter (a folder `peft.PeftModel.from_pretrained(base, folder)` loads) and the
merged weights, under the base model's own key names.
"""
import contextlib
import copy
import functools
import glob
import json
import os
import re
import struct
import types

import torch
import torch.utils.checkpoint

from trainer_utils import InputError


def add_lora(model, rank, alpha, target_modules="all-linear"):
    """Inject trainable LoRA adapters (rank, alpha; dropout 0: two forwards of one policy must agree) into
    `model` in place and freeze everything else; returns peft's PeftModel around it (for saving).
    target_modules: peft's "all-linear" (every linear layer of the decoder blocks, GPT-2's Conv1D included;
    not the embedding or the LM head) or a comma-separated list of module names (q_proj,v_proj)."""
    from peft import LoraConfig, get_peft_model
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    # a transformers causal LM's adapter says CAUSAL_LM, so peft (and TRL, vLLM) load it as one; MiniMind's
    # model and a critic's backbone have no generate() for peft's causal-LM wrapper: no task type
    causal_lm = hasattr(model, "prepare_inputs_for_generation")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM" if causal_lm else None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft names the modules it did not find
        raise InputError(f"--lora_target_modules {target_modules}: {e}") from e
    return peft_model


def adapter_layers(model):
    """peft's tuner layers injected in `model` (none for a model without adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` as its base: every adapter off inside the block (the LoRA reference), back on after."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def base_key(name):
    """A module or tensor name in the base model's own terms: peft's `.base_layer` segments (nested when two
    parameters of one module are wrapped, as a transformers 5 MoE's fused experts) taken out."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", name)


def lora_layers(model):
    """{the adapted weight's key in the base model's own terms: peft's layer} for every module peft wraps: linear
    layers, and single parameters (peft's ParamWrapper: the fused experts and routers of a transformers 5 MoE)."""
    from peft.tuners.lora import LoraLayer
    return {f"{base_key(name)}.{getattr(module, 'parameter_name', None) or 'weight'}": module
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def base_weight(layer):
    """The frozen weight a peft layer adapts: its base layer's `weight`, or the parameter a ParamWrapper wraps."""
    return getattr(layer.get_base_layer(), getattr(layer, "parameter_name", None) or "weight")


@torch.no_grad()
def merged_weight(layer, dtype=torch.float32):
    """One adapted weight with its adapters merged in (W + scale * B A, peft's get_delta_weight), on the CPU. The sum
    is taken in float32, the precision the trainer holds the policy in: a small update added to bfloat16 weights
    (the frozen base on CUDA, keep_frozen_in) would round away; then cast to `dtype`."""
    delta = sum(layer.get_delta_weight(adapter).float() for adapter in layer.active_adapters)
    return (base_weight(layer).detach().float() + delta).to("cpu", dtype)


@torch.no_grad()
def base_state_dict(model, dtype=torch.float32, merge=False):
    """`model`'s weights under the base model's own key names (peft's `.base_layer` taken out, the adapters left out),
    on the CPU, floating tensors in `dtype`: a tensor already on the CPU in `dtype` is the model's own (no copy),
    others are cast once per storage, so tied weights stay one tensor. merge=True: each adapted weight is
    merged_weight instead, made one by one and cast at once (MiniMind's float16 .pth: no float32 copy of every
    adapted weight beside the model). `model` is left as it is."""
    layers = lora_layers(model) if merge else {}
    state, converted = {}, {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        clean = base_key(key)
        if clean in layers:
            state[clean] = merged_weight(layers[clean], dtype)
        elif not value.is_floating_point():
            state[clean] = value.cpu()
        else:
            tensor = (value.data_ptr(), value.shape, value.dtype)
            if tensor not in converted:
                converted[tensor] = value.to("cpu", dtype)
            state[clean] = converted[tensor]
    return state


def merged_state_dict(model, dtype=torch.float32):
    """`model`'s weights with every LoRA adapter merged in, under the base model's own key names, on the CPU, in
    `dtype` (float32 by default): what MiniMind's .pth and save_pretrained hold."""
    return base_state_dict(model, dtype, merge=True)


def safetensors_offsets(path):
    """{tensor name: (dtype, shape, first byte, end byte)} of a .safetensors file, from its header (an 8-byte
    little-endian header size, then a JSON header whose data_offsets count from the header's end)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    start = 8 + size
    return {name: (entry["dtype"], entry["shape"], start + entry["data_offsets"][0], start + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


@torch.no_grad()
def merge_into_safetensors(model, folder):
    """Merge `model`'s adapters into the .safetensors files save_pretrained wrote in `folder` from
    base_state_dict(model): each adapted weight, found there as the float32 base weight it was, is overwritten in
    place by merged_weight (same dtype and shape, so the same bytes): one merged weight in memory at a time, where
    a merged state dict would hold a second copy of every adapted weight while the folder is written. Returns the
    adapted keys not found as they are in the model (a transformers 5 weight conversion renamed, split or
    transformed them); the caller then writes merged_state_dict instead."""
    layers, found = lora_layers(model), set()
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        offsets = safetensors_offsets(path)
        with open(path, "r+b") as f:  # plain reads and writes: a memory map's pages would count in the resident set
            for key in sorted(offsets.keys() & layers.keys()):
                dtype, shape, begin, end = offsets[key]
                layer = layers[key]
                base = base_weight(layer).detach()
                if dtype != "F32" or list(base.shape) != shape:
                    continue
                written = torch.empty(shape, dtype=torch.float32)
                f.seek(begin)
                if f.readinto(written.view(torch.uint8).numpy().data) != end - begin or \
                        not torch.equal(written, base.to("cpu", torch.float32)):
                    continue
                f.seek(begin)
                f.write(merged_weight(layer).contiguous().view(torch.uint8).numpy().data)
                found.add(key)
    return sorted(layers.keys() - found)


def trainable_state_dict(model):
    """The trained part of `model`'s state (all of it without adapters; with LoRA, the adapters and any head
    trained in full): what a resume file needs, the frozen base being rebuilt from --from_weight."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if not adapter_layers(model):
        return model.state_dict()
    return {k: v for k, v in model.state_dict().items() if k in trained}


def load_trainable_state_dict(model, state):
    """trainable_state_dict read back: every trained tensor present, nothing else expected."""
    if not adapter_layers(model):
        model.load_state_dict(state)
        return
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - set(state)
    unexpected = set(state) - {name for name, _ in model.named_parameters()}
    if missing or unexpected:
        raise InputError(f"resume file does not hold this model's adapters (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}): was it written with another --lora_rank or "
                         f"--lora_target_modules?")
    model.load_state_dict(state, strict=False)


def enable_gradient_checkpointing(model):
    """Recompute each decoder block's activations in the backward pass instead of keeping them: every block's
    forward runs inside torch.utils.checkpoint (non-reentrant) whenever autograd records it, and as it is
    otherwise. One mechanism for MiniMind and every transformers model, on purpose not transformers' own
    gradient_checkpointing_enable: that acts only on modules in training mode, and a block flagged as training
    drops its key/value cache and turns functional dropout on (OPT, Falcon), so sampling and scoring would no
    longer be the policy's. Here the models stay in eval mode and nothing but the update's backward changes:
    sampling, scoring and evaluation run without grad and are untouched."""
    for block in decoder_blocks(model):
        # a method bound to the block: a deep copy of the model (the old actor) binds it to the copied block
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block, *args, **kwargs):
    forward = functools.partial(type(block).forward, block)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def copy_sharing(module, shared):
    """A deep copy of `module` whose parameters for which `shared(p)` is true, and all buffers, are the
    original's own tensors, not copies: a second model on one frozen base (a LoRA critic beside a LoRA actor,
    the old actor of a LoRA policy) without a second copy of the base in memory, and without the transient of
    copying it first."""
    memo = {id(t): t for t in module.buffers()}
    memo.update({id(p): p for p in module.parameters() if shared(p)})
    return copy.deepcopy(module, memo)


def keep_frozen_in(model, dtype):
    """The frozen weights and biases of linear layers (a LoRA base, a reference) in `dtype`, the compute precision
    on CUDA: autocast casts them to it for every matmul anyway, so the model computes exactly what it computed
    with them in float32 and a float32 master copy only costs memory. Embeddings (and a head tied to one), norms
    and every trained parameter stay in float32, as autocast leaves them: a reference built this way gives the
    policy's log-probs bit for bit, and the first KL is exactly 0."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (autocast casts their addmm too)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and id(p) not in embedded:
                    p.data = p.data.to(dtype)
    return model


def decoder_blocks(model):
    """The repeated decoder blocks of a causal LM or its backbone (MiniMind's and Llama's `layers`, GPT-2's `h`):
    the ModuleList of same-class modules that holds most of the parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(block) for block in m}) == 1]
    if not lists:
        raise InputError(f"{type(model).__name__}: no list of decoder blocks found")
    return list(max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters())))


def compile_blocks(model, backend="inductor"):
    """torch.compile each decoder block of `model` in place (dynamic shapes: prompts, responses and the key/value
    cache change length), for sampling, scoring and training alike; the first calls pay the compile time."""
    for block in decoder_blocks(model):
        block.compile(dynamic=True, backend=backend)


def fit_models(args, lm, critic, reference):
    """What the memory and speed flags do to the models, in place: --lora_rank (adapters on the policy's LM, and
    on the critic's backbone with --lora_critic, its value head trained in full), --gradient_checkpointing (the
    LM and the critic), --compile (their decoder blocks, the reference's too), and on CUDA with --dtype bf16/fp16
    the frozen weights (the reference, the LoRA bases) kept in that dtype. `critic` and `reference` may be None.
    Returns peft's model around the LM (it saves the adapter), or None without LoRA."""
    backbone = critic.model if critic is not None else None
    lm_peft = add_lora(lm, args.lora_rank, args.lora_alpha, args.lora_target_modules) if args.lora_rank else None
    if args.lora_rank and args.lora_critic and backbone is not None:
        add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_target_modules)
    for model in (lm, backbone) if args.gradient_checkpointing else ():
        if model is not None:
            enable_gradient_checkpointing(model)
    for model in (lm, backbone, reference) if args.compile else ():  # compiled at first use
        if model is not None:
            compile_blocks(model)
    if args.device.startswith("cuda") and args.dtype != "float32":  # a float32 master copy of frozen weights
        for model in (lm, critic, reference):  # costs memory and nothing else: autocast casts them anyway
            if model is not None:
                keep_frozen_in(model, getattr(torch, args.dtype))
    return lm_peft
