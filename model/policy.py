"""A causal LM as PPO scores it: the log-probs of a response's tokens, their entropy and the MoE balance
loss, in one forward that fits in memory (the scoring hot path).

PPO needs log pi(a_t | s_t) of the R response tokens only; the naive way computes logits [B, R, V] in
float32 and keeps them, with their softmax, for the backward: at Qwen's 152k vocabulary, micro-batch 16
and 1024 tokens that is 9.3 GiB per tensor, several alive at once. Where a micro-batch's float32 logits would
exceed CHUNK_ELEMENTS, the LM head runs on chunks of positions inside torch.utils.checkpoint: one chunk's
logits exist at a time, in the forward and again, recomputed, in the backward. Where they fit, the head runs
once, plainly: recomputing it would cost time (a small model's head is a large share of its FLOPs) and save
little. The numbers are those of the full computation (to float rounding).
"""
import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

from model.loading import balance_loss_coef
from model.lora import adapters_disabled
from model.sampling import position_ids_from_mask

CHUNK_ELEMENTS = 2 ** 26  # float32 logits per chunk: 256 MiB


def entropy_from_logits(logits):
    """H = logsumexp(z) - sum(softmax(z) * z) per position; a -inf logit (p = 0) adds nothing."""
    p = logits.softmax(-1)
    return logits.logsumexp(-1) - torch.where(p > 0, p * logits, 0.0).sum(-1)


def token_logprobs(hidden, head, targets, temperature, entropy):
    """log-probs [B, c] of `targets` [B, c] under head(hidden) / temperature (gather - logsumexp, never a full
    log_softmax), and their entropy [B, c] (H = logsumexp(z) - sum softmax(z) z) when `entropy` is "value"
    (no gradient) or "grad"."""
    logits = head(hidden).float()  # [B, c, V]
    if temperature != 1.0:  # x / 1 == x: skip a full-vocab pass and its backward
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    if entropy == "none":
        return logprobs, None
    with contextlib.nullcontext() if entropy == "grad" else torch.no_grad():
        return logprobs, entropy_from_logits(logits)


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
