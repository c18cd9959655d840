"""MiniMind: a small decoder-only transformer, state-dict compatible with MiniMind v2 and v3.

Pre-norm blocks, RMSNorm (float32 inside), RoPE (rotate-half, theta 1e6), grouped-query
attention through fused SDPA with a padding mask, SwiGLU MLP or a mixture of experts, and
tied input/output embeddings. The two generations differ only in defaults (see VERSIONS):
v3 adds RMSNorm on q and k per head and uses other kv-head, eps and MLP-ratio defaults.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

# the output field that holds the cache: `cache` in newer transformers 5.x (`past_key_values` deprecated), else
# `past_key_values`
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# What differs between the two generations of MiniMind checkpoints (MoE loss: MoEFeedForward.balance_loss).
VERSIONS = {
    2: dict(num_key_value_heads=2, rms_norm_eps=1e-5, qk_norm=False, mlp_ratio=8 / 3,
            n_shared_experts=1, num_experts_per_tok=2, aux_loss_alpha=0.1, seq_aux=True),
    3: dict(num_key_value_heads=4, rms_norm_eps=1e-6, qk_norm=True, mlp_ratio=math.pi,
            n_shared_experts=0, num_experts_per_tok=1, aux_loss_alpha=5e-4, seq_aux=False),
}


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(self, version=2, vocab_size=6400, hidden_size=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=None, intermediate_size=None,
                 rms_norm_eps=None, qk_norm=None, rope_theta=1e6, max_position_embeddings=32768,
                 use_moe=False, n_routed_experts=4, n_shared_experts=None,
                 num_experts_per_tok=None, norm_topk_prob=True, aux_loss_alpha=None,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **kwargs):
        if version not in VERSIONS:
            raise ValueError(f"MiniMind version must be 2 or 3, got {version!r}")
        defaults = VERSIONS[version]
        self.version = version
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or defaults["num_key_value_heads"]
        self.intermediate_size = intermediate_size or 64 * math.ceil(hidden_size * defaults["mlp_ratio"] / 64)
        self.rms_norm_eps = rms_norm_eps or defaults["rms_norm_eps"]
        self.qk_norm = defaults["qk_norm"] if qk_norm is None else qk_norm
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = defaults["n_shared_experts"] if n_shared_experts is None else n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok or defaults["num_experts_per_tok"]
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = defaults["aux_loss_alpha"] if aux_loss_alpha is None else aux_loss_alpha
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def config_from_state_dict(state_dict, **flags):
    """Read a MiniMindConfig off a bare state dict's keys and shapes.

    `flags` are the sizes a user asked for on the command line (None = not given); any that
    contradicts the weights raises a ValueError naming both values. The number of attention
    heads cannot be read off the weights (v3's q_norm gives head_dim, v2's does not): it is
    taken from `num_attention_heads` (MiniMind always uses 8).
    """
    def shape(key):
        if key not in state_dict:
            raise ValueError(f"not a MiniMind state dict: key '{key}' is missing")
        return tuple(state_dict[key].shape)

    vocab_size, hidden_size = shape("model.embed_tokens.weight")
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    num_layers = len(layer_ids)
    if layer_ids != set(range(num_layers)):
        raise ValueError(f"not a MiniMind state dict: layer indices {sorted(layer_ids)} are not 0..n-1")
    attn = "model.layers.0.self_attn."
    qk_norm = attn + "q_norm.weight" in state_dict
    if qk_norm:
        head_dim = shape(attn + "q_norm.weight")[0]
        num_heads = shape(attn + "q_proj.weight")[0] // head_dim
    else:
        num_heads = flags.get("num_attention_heads") or 8
        head_dim = shape(attn + "q_proj.weight")[0] // num_heads
    num_kv_heads = shape(attn + "k_proj.weight")[0] // head_dim
    mlp = "model.layers.0.mlp."
    use_moe = mlp + "gate.weight" in state_dict
    n_routed = shape(mlp + "gate.weight")[0] if use_moe else 4
    n_shared = len({k.split(".")[5] for k in state_dict if k.startswith(mlp + "shared_experts.")})
    up = mlp + ("experts.0.gate_proj.weight" if use_moe else "gate_proj.weight")
    intermediate_size = shape(up)[0]

    inferred = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                    num_key_value_heads=num_kv_heads, use_moe=use_moe, vocab_size=vocab_size)
    for name, value in flags.items():
        if value is not None and name in inferred and value != inferred[name]:
            raise ValueError(f"--{name} {value} contradicts the weights, which have {name} = {inferred[name]}")
    version = 3 if qk_norm else 2
    return MiniMindConfig(version=version, intermediate_size=intermediate_size, qk_norm=qk_norm,
                          n_routed_experts=n_routed,
                          n_shared_experts=n_shared if use_moe else VERSIONS[version]["n_shared_experts"],
                          **inferred)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_tables(head_dim, end, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)


def apply_rope(x, cos, sin):  # x [B, H, T, D]; cos, sin [T, D] or, per row, [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Key/value buffers for every layer, preallocated once and written in place.

    k, v: [layers, B, kv_heads, max_len, head_dim]; `length` = positions already filled.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def keep_rows(self, rows):
        """Only the batch rows `rows` [b] from now on (the others finished decoding)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def update(self, layer, k, v):
        """Write this step's k, v [B, kv, T, D] after the filled part; return everything so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise RuntimeError(f"KV cache full: {end} positions > {self.k.shape[3]} preallocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # mask None means a plain causal batch with no cache: the fused kernel's fastest path
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Softmax-gated top-k experts (renormalised weights) plus optional shared experts.

    Two routings give the same output; which one runs depends only on the token count N,
    never on tensor values, so choosing cannot sync:
    - N <= dense_max_tokens (a decode step: one token per row): every expert runs on every
      token and a [N, E] weight matrix, zero for unchosen experts, mixes the outputs. No
      data-dependent shapes, hence no device->host sync per expert per layer per token on CUDA;
      a GPU reads every expert's weights either way, so the extra rows are nearly free there
      (on CPU they cost up to E / top_k times the expert FLOPs).
    - larger N (training forwards, prefill): each expert runs only on the tokens routed to it,
      E / top_k times fewer FLOPs, at one host sync per expert on CUDA.
    """
    dense_max_tokens = 64

    def __init__(self, config):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.norm_topk_prob, self.alpha = config.norm_topk_prob, config.aux_loss_alpha
        self.seq_aux = VERSIONS[config.version]["seq_aux"]
        self.gate = nn.Linear(config.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x):  # x [B, T, hidden]
        B, T, hidden = x.shape
        x = x.reshape(-1, hidden)  # [N, hidden]
        scores = F.softmax(self.gate(x).float(), dim=-1)  # [N, E]
        weights, chosen = scores.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        route = self.route_dense if B * T <= self.dense_max_tokens else self.route_sparse
        out = route(x, weights, chosen)
        for expert in self.shared_experts:
            out = out + expert(x)
        return out.view(B, T, hidden), self.balance_loss(scores.view(B, T, -1), chosen.view(B, T, -1))

    def route_dense(self, x, weights, chosen):
        mix = weights.new_zeros(x.shape[0], self.n_experts).scatter(1, chosen, weights)  # [N, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (expert(x) * mix[:, e, None]).to(x.dtype)
        return out

    def route_sparse(self, x, weights, chosen):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(x.dtype))
        return out

    def balance_loss(self, scores, chosen):  # scores [B, T, E], chosen [B, T, k]
        """MiniMind's load-balancing loss: alpha * E * sum_e load[e] * mean_t p[e], where load[e] is
        the fraction of top-k slots routed to expert e and p the gate's softmax (all experts).

        v2 measures it per sequence and averages over the batch (its ce[b, e] = E * load[b, e]);
        v3 measures it once over all B * T tokens. Counted with scatter_add rather than one_hot,
        whose range check reads the indices back with .item().
        """
        if not self.seq_aux:
            scores, chosen = scores.flatten(0, 1)[None], chosen.flatten(0, 1)[None]  # one group of B*T tokens
        G, T, k = chosen.shape
        slots = scores.new_zeros(G, self.n_experts).scatter_add_(1, chosen.reshape(G, T * k),
                                                                 scores.new_ones(G, T * k))  # [G, E]
        load = slots / (T * k)
        return self.alpha * self.n_experts * (load * scores.mean(1)).sum(-1).mean()


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        h = self.mlp(self.post_attention_layernorm(x))
        h, aux = h if isinstance(h, tuple) else (h, None)
        return x + h, aux


def attention_mask_4d(attention_mask, past_len, T):
    """Boolean [B, 1, T, past+T] mask: causal, pads masked as keys.

    A query always sees itself, so a pad query (left padding) has a non-empty row and SDPA
    stays finite; pad positions' outputs are never used.
    """
    S = past_len + T
    q_pos = torch.arange(past_len, S, device=attention_mask.device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # [1, S]
    keep = (k_pos <= q_pos) & attention_mask[:, None, None, :S].bool()
    return keep | (k_pos == q_pos)


class MiniMindModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=False):
        """Returns final-normed hidden states [B, T, hidden] and the summed MoE aux loss. Keys and values are
        cached only into a given `past_key_values` (`use_cache` is taken, as transformers' base models take it).

        `position_ids` [B, T] place each row's tokens for RoPE (left-padded rows: see
        model.sampling.position_ids_from_mask); default: past length + 0..T-1 for every row.
        """
        T = input_ids.shape[1]
        past = past_key_values.length if past_key_values is not None else 0
        if position_ids is None:
            cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        else:
            cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
        mask = None
        if past_key_values is not None or (attention_mask is not None and not bool(attention_mask.all())):
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape[0], past + T, dtype=torch.long, device=input_ids.device)
            mask = attention_mask_4d(attention_mask, past, T)
        x = self.embed_tokens(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, mask, past_key_values, i)
            if aux is not None:
                aux_loss = aux_loss + aux
        if past_key_values is not None:
            past_key_values.length += T
        return self.norm(x), aux_loss


class MiniMindForCausalLM(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as in MiniMind

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MiniMindModel):  # buffers are not in the state dict: rebuild
            module.rope_cos, module.rope_sin = (t.to(module.rope_cos.device) for t in rope_tables(
                module.config.head_dim, module.config.max_position_embeddings, module.config.rope_theta))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, position_ids=None, **kwargs):
        """Logits for the last `logits_to_keep` positions (0 = all), or, as in transformers, for the
        positions listed by a 1-D index tensor.

        `past_key_values` is a KVCache (see `new_cache`); with `use_cache=True` and none given,
        a cache just large enough for this call is made and returned.
        `attention_mask` [B, past+T] marks real tokens (1) and left padding (0).
        """
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        hidden, aux_loss = self.model(input_ids, attention_mask, past_key_values, position_ids)
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        return MoeCausalLMOutputWithPast(logits=logits, aux_loss=aux_loss, **{CACHE_FIELD: past_key_values})

    def new_cache(self, batch_size, max_len, dtype=None):
        return KVCache(self.config, batch_size, max_len, self.device, dtype or self.model.embed_tokens.weight.dtype)


AutoConfig.register("minimind", MiniMindConfig)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
