"""Tiny transformers causal LMs (GPT-2, Qwen2, Llama) built offline from configs, saved as folders with
the project's tokenizer, as `save_pretrained` leaves a real checkpoint."""
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from model.loading import load_tokenizer

ARCHITECTURES = ("gpt2", "qwen2", "llama")


def tiny_hf_model(arch, vocab_size=6400, hidden=32, layers=2, seed=0, positions=256, **config):
    """A random tiny causal LM of the given architecture (token ids as the project's tokenizer); `config`: more
    config fields. "mixtral" (4 experts, top 2) is a transformers MoE; "opt" applies its dropout (0.1, as OPT's
    configs) functionally whenever a block is in training mode."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":  # learned absolute positions: left padding changes its output without position ids
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=hidden, n_layer=layers,
                                          n_head=4, **ids, **config))
    shape = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **ids, **config)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **shape))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    if arch == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, max_position_embeddings=positions, word_embed_proj_dim=hidden,
                                        dropout=0.1, attention_dropout=0.1, pad_token_id=0, **ids, **config))
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **shape}))
    raise ValueError(arch)


def save_tiny_hf_model(arch, folder, tokenizer_path, chat=True, pad=True, **kw):
    """Save a tiny model and a tokenizer into `folder`. chat=False drops the chat template (a base model's
    tokenizer) and pad=False the pad token (GPT-2's), as real base-model folders come."""
    model = tiny_hf_model(arch, **kw)
    tokenizer = load_tokenizer(tokenizer_path)
    if not chat:
        tokenizer.chat_template = None
    if not pad:
        tokenizer.pad_token = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
