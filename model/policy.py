"""A causal LM as PPO scores it: the log-probs of a response's tokens, their entropy and the MoE balance
loss, in one forward that fits in memory (the scoring hot path).

PPO needs log pi(a_t | s_t) of the R response tokens only; the naive way computes logits [B, R, V] in
float32 and keeps them, with their softmax, for the backward: at Qwen's 152k vocabulary, micro-batch 16
and 1024 tokens that is 9.3 GiB per tensor, several alive at once. Where a micro-batch's float32 logits would
exceed CHUNK_ELEMENTS, the LM head runs on chunks of positions inside torch.utils.checkpoint: one chunk's
logits exist at a time, in the forward and again, recomputed, in the backward. Where they fit, the head runs
once, plainly: recomputing it would cost time (a small model's head is a large share of its FLOPs) and save
little. Within a chunk, TokenLogprobs' backward keeps one [B, c, V] tensor where autograd keeps five. The
numbers are those of the full computation (to float rounding).
"""
import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

from model.loading import balance_loss_coef
from model.lora import adapters_disabled
from model.sampling import position_ids_from_mask

CHUNK_ELEMENTS = 2 ** 26  # float32 logits per chunk: 256 MiB


class TokenLogprobs(torch.autograd.Function):
    """log pi(targets) [B, c] and the entropy H [B, c] of logits [B, c, V] / temperature, with a backward that
    keeps one full-vocab tensor where autograd keeps five.

    Autograd through logsumexp and gather saves the logits and, in the backward, makes exp(z - lse), its
    product with the gradient, a zero tensor for the gather's scatter and their sum: five [B, c, V] float32
    tensors at once, 190 MB at Qwen's vocabulary and 64 tokens. The gradient has a closed form in the softmax p:
        d log p(a) / dz = onehot(a) - p,        dH / dz = -p (z - E_p[z]),  E_p[z] = lse - H,
    so the forward saves p alone (and z where the entropy is in the loss) and the backward writes the gradient
    into p's own storage; p is made in the storage of the logits' float32 or tempered copy where there is one.
    Same numbers as autograd's to float rounding (tests/test_memory.py). The saved p is consumed: a second
    backward through the same graph (retain_graph) fails loudly on its version counter.
    `entropy`: "none" (logprobs only), "value" (H without gradient) or "grad".
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, entropy):
        z = logits.float()  # the logits themselves where they are float32, else a float32 copy of our own
        if temperature != 1.0:  # x / 1 == x: skip a full-vocab pass and its backward
            z = z / temperature if z is logits else z.div_(temperature)
        # where z is our own copy and the backward does not need it, p takes its storage: the forward then makes
        # no full-vocab tensor beyond that copy (bfloat16 logits on a GPU: 6 bytes per logit at the peak, not 10)
        p_in_z = z is not logits and entropy != "grad"
        shift = z.amax(-1, keepdim=True)  # [B, c, 1]: logsumexp's max shift (none for a row of infinities)
        shift = torch.where(shift.isinf(), 0.0, shift)
        target_z = z.gather(-1, targets[..., None]).squeeze(-1)  # [B, c], taken before z may become p
        p = (z.sub_(shift) if p_in_z else z - shift).exp_()  # [B, c, V], normalised below: what the backward needs
        total = p.sum(-1, keepdim=True)
        p.div_(total)
        lse = (shift + total.log()).squeeze(-1)  # [B, c]
        logprobs = target_z - lse
        ctx.temperature, ctx.entropy, ctx.dtype = temperature, entropy, logits.dtype
        if entropy == "none":
            ctx.save_for_backward(p, targets)
            return logprobs
        # H = lse - sum p z = -sum p log p, by eighths of the vocabulary (no further full-vocab tensor); a -inf
        # logit (p = 0) adds nothing (0 * -inf is NaN, made 0)
        part = -(-z.shape[-1] // 8)
        if p_in_z:  # z is gone: log p = z - lse
            H = -sum(q.log().mul_(q).nan_to_num_(nan=0.0).sum(-1) for q in p.split(part, -1))
        else:
            H = lse - sum((p_part * z_part).nan_to_num_(nan=0.0).sum(-1)
                          for p_part, z_part in zip(p.split(part, -1), z.split(part, -1)))
        if entropy == "grad":
            ctx.save_for_backward(p, targets, z, lse - H)
        else:
            ctx.save_for_backward(p, targets)
            ctx.mark_non_differentiable(H)
        return logprobs, H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy=None):
        p, targets, *z_and_mean = ctx.saved_tensors
        g = grad_logprobs[..., None]  # [B, c, 1]
        if ctx.entropy == "grad":  # -p * (g + g_H (z - E_p[z])) + g onehot
            z, mean_z = z_and_mean
            centred = (z - mean_z[..., None]).masked_fill_(p == 0, 0.0)  # p = 0 (a -inf logit): no term, not NaN
            p.mul_(centred.mul_(grad_entropy[..., None]).add_(g))
        else:  # -p * g + g onehot
            p.mul_(g)
        grad = p.neg_().scatter_add_(-1, targets[..., None], g)
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None, None


def token_logprobs(hidden, head, targets, temperature, entropy):
    """log-probs [B, c] of `targets` [B, c] under head(hidden) / temperature, and their entropy [B, c] when
    `entropy` is "value" (no gradient) or "grad" (else None): TokenLogprobs on the head's logits [B, c, V]."""
    out = TokenLogprobs.apply(head(hidden), targets, temperature, entropy)
    return (out, None) if entropy == "none" else out


class Policy(nn.Module):
    """A causal LM (MiniMind or any transformers model; `lm` samples too) whose forward returns
    (log-probs [B, R], entropy [B, R] or None, MoE balance loss or None) of the last R tokens.

    DDP and FSDP wrap this module, so every loss-bearing computation, LM head included, runs inside
    their forward. With `adapters_off` the forward runs the LM with its LoRA adapters switched off:
    the reference of a LoRA policy, sharing its weights. Position ids are the sampler's
    (position_ids_from_mask), so pi_old here is the sampling distribution even for learned positions.
    """

    def __init__(self, lm, adapters_off=False):
        super().__init__()
        self.lm, self.adapters_off = lm, adapters_off
        self.chunked = self.check_chunked_head()

    @property
    def config(self):
        return self.lm.config

    def backbone(self):
        """The LM without its head (its final norm included): MiniMindModel, LlamaModel, GPT2Model, ..."""
        return getattr(self.lm, getattr(self.lm, "base_model_prefix", ""), None)

    @torch.no_grad()
    def check_chunked_head(self):
        """Use the chunked LM head only where backbone + output embedding give the LM's own logits (models that
        scale or soft-cap their logits, and transformers MoE models, whose balance loss only the LM computes,
        run the LM's own forward). Checked once, on a few tokens."""
        backbone, head = self.backbone(), self.lm.get_output_embeddings()
        if backbone is None or head is None or balance_loss_coef(self.lm) is not None:
            return False
        ids = torch.tensor([[1, 2, 3, 4]], device=head.weight.device)
        mask = torch.ones_like(ids)
        hidden = backbone(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))[0]
        return torch.allclose(head(hidden).float(), self.lm(ids, attention_mask=mask).logits.float(), atol=1e-4)

    def forward(self, input_ids, attention_mask, response_len, temperature=1.0, entropy="none"):
        with adapters_disabled(self.lm) if self.adapters_off else contextlib.nullcontext():
            return self.score(input_ids, attention_mask, response_len, temperature, entropy)

    def score(self, input_ids, attention_mask, response_len, temperature, entropy):
        T = input_ids.shape[1]
        positions = position_ids_from_mask(attention_mask)
        targets = input_ids[:, T - response_len:]  # [B, R]
        if not self.chunked:  # the LM's own forward: logits at the R positions that predict a response token
            predicting = torch.arange(T - response_len - 1, T - 1, device=input_ids.device)
            coef = balance_loss_coef(self.lm)  # a transformers MoE: its balance loss, at its own weight
            out = self.lm(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                          logits_to_keep=predicting, **({"output_router_logits": True} if coef else {}))
            logprobs, ent = token_logprobs(out.logits, nn.Identity(), targets, temperature, entropy)
            aux = getattr(out, "aux_loss", None)  # MiniMind's comes weighted by its generation's alpha
            return logprobs, ent, aux * coef if coef and aux is not None else aux
        out = self.backbone()(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        hidden = out[0][:, T - response_len - 1:T - 1]  # [B, R, H]: the states that predict the response tokens
        aux = out[1] if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]) else None  # MiniMind's
        head = self.lm.get_output_embeddings()
        B = hidden.shape[0]
        if B * response_len * head.out_features <= CHUNK_ELEMENTS:  # the logits fit the budget: one plain head
            logprobs, ent = token_logprobs(hidden, head, targets, temperature, entropy)
            return logprobs, ent, aux
        chunk = max(1, CHUNK_ELEMENTS // (B * head.out_features))
        pieces = []
        for start in range(0, response_len, chunk):
            args = (hidden[:, start:start + chunk], head, targets[:, start:start + chunk], temperature, entropy)
            pieces.append(torch.utils.checkpoint.checkpoint(token_logprobs, *args, use_reentrant=False)
                          if torch.is_grad_enabled() else token_logprobs(*args))
        logprobs = torch.cat([p[0] for p in pieces], 1)
        ent = torch.cat([p[1] for p in pieces], 1) if entropy != "none" else None
        return logprobs, ent, aux
