"""Sampling responses from a causal LM, MiniMind or any transformers model: the rollout hot path.

One sampler for every policy. What differs between models is only the cache (MiniMind's
preallocated KVCache, or a transformers Cache) and is chosen by `new_cache`; position ids
follow transformers' own `generate`, so models with learned positions (GPT-2) read
left-padded prompts as they would unpadded, and every scoring forward (PPO's old, ref and
actor log-probs, the critic) passes the same ids through `position_ids_from_mask`.
"""
import inspect

import torch


def position_ids_from_mask(attention_mask):
    """Position ids [B, T] for left-padded rows, as transformers' generate derives them:
    cumsum(mask) - 1, so each row's first real token is at 0; pads get 1 (never read)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)


def stop_token_ids(model, tokenizer):
    """Every id that ends a turn: the tokenizer's EOS and the model's generation_config.eos_token_id (an id or
    a list: Llama 3's <|eot_id|>, Qwen's <|im_end|> beside <|endoftext|>, Gemma's <end_of_turn>), as
    transformers' own generate stops. A [K] long tensor on the model's device."""
    ids = {tokenizer.eos_token_id}
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(listed if isinstance(listed, (list, tuple)) else [listed])
    ids.discard(None)
    return torch.tensor(sorted(ids), dtype=torch.long, device=next(model.parameters()).device)


def ends_with_stop(response_ids, response_mask, stop_ids):
    """[B] bool: the row's last real token is a stop token (it ended its turn rather than hitting the limit)."""
    last = (response_mask.sum(1) - 1).clamp(min=0)
    return torch.isin(response_ids.gather(1, last[:, None]).squeeze(1), stop_ids) & (response_mask.sum(1) > 0)


def cache_argument(model):
    """The name under which model.forward takes its key/value cache: `cache` in transformers >= 5.2x
    (`past_key_values` is deprecated there), `past_key_values` in 4.x and MiniMind."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a forward returned, under either name (see cache_argument)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def new_cache(model, batch_size, max_len, dtype):
    """A key/value cache for `max_len` positions of `batch_size` rows: MiniMind's preallocated KVCache, or a
    transformers DynamicCache (rows can leave it: keep_rows; a StaticCache gains nothing without compile, and
    holds keys and values in one dtype while autocast makes RoPE'd keys float32 and values bfloat16)."""
    if hasattr(model, "new_cache"):
        return model.new_cache(batch_size, max_len, dtype)
    from transformers import DynamicCache
    return DynamicCache()


def keep_rows(cache, rows):
    """The cache of the batch rows `rows` [b] only (the others have finished): MiniMind's KVCache or a DynamicCache."""
    if hasattr(cache, "keep_rows"):
        cache.keep_rows(rows)
    else:
        cache.batch_select_indices(rows)
    return cache


def sample_categorical(probs, generator=None, uniforms=None):
    """One token per row of probs [B, V] (rows need not sum to exactly 1), by inverting the CDF.

    One uniform draw per row (or the given `uniforms` [B, 1]) and a binary search: ~15x cheaper on CPU
    than torch.multinomial, which draws an exponential variate for every vocabulary entry. u < 1, so
    u * total stays below the total and the first index whose cumulative sum exceeds it has p > 0
    (zeros repeat the previous cumulative sum and are never the first to exceed it).
    """
    cdf = probs.cumsum(-1)  # [B, V]
    total = cdf[:, -1:]
    if uniforms is None:
        uniforms = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    u = uniforms * total
    # clamp: NaN probabilities find no index; sample_responses reports them after the loop
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_responses(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_token_id,
                     temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None, compact_at=0.25):
    """Sample up to `max_new_tokens` per row from left-padded prompts.

    One prefill, then one cached forward per token; only the last position reaches the vocabulary
    projection (logits_to_keep=1). Position ids are generate's (position_ids_from_mask for the
    prompt, then each row's last + 1). Each row stops at its first stop token (`stop_ids`: an id or
    a list, see stop_token_ids; kept as a real token); rows already stopped get `pad_token_id` and
    mask 0, and the loop exits as soon as every row has stopped. Finished rows leave the decode
    batch (their cache rows dropped) once they are `compact_at` of it, instead of being decoded as
    padding until the longest row ends; one uniform is still drawn per row of the whole batch each
    step, so the tokens are those of a batch that never shrinks.
    Returns response_ids [B, R], response_mask [B, R] (1 up to and including EOS) and
    logprobs [B, R]: log-probabilities of the sampled tokens under exactly the distribution
    they were drawn from (logits / temperature, then top-k / top-p truncation). With
    `greedy=True` the argmax is taken and logprobs are those of logits / temperature.
    """
    B, P = input_ids.shape
    device = input_ids.device
    stop_ids = torch.as_tensor(stop_ids, dtype=torch.long, device=device).reshape(-1)
    autocast = torch.is_autocast_enabled(device.type)
    cache = new_cache(model, B, P + max_new_tokens, torch.get_autocast_dtype(device.type) if autocast else None)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters  # transformers 4.x
    cache_name = cache_argument(model)
    full_mask = torch.ones(B, P + max_new_tokens, dtype=attention_mask.dtype, device=device)
    full_mask[:, :P] = attention_mask
    positions = position_ids_from_mask(attention_mask)  # [b, P]: b = the rows still decoding
    response_ids = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)  # [b] the batch rows still decoding
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # [b]
    next_input = input_ids
    steps = 0
    for t in range(max_new_tokens):
        past = 0 if t == 0 else P + t - 1
        extra = {"cache_position": torch.arange(past, P + t, device=device)} if takes_cache_position else {}
        out = model(next_input, attention_mask=full_mask[:, :P + t], position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_name: cache}, **extra)
        cache = output_cache(out)
        logits = out.logits[:, -1].float() / temperature  # [B, V]
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        logp = logits.log_softmax(-1)
        if greedy:
            token = logits.argmax(-1)
        else:  # a draw for every row of the batch, as if none had left it
            uniforms = torch.rand(B, 1, generator=generator, device=device)[rows]
            token = sample_categorical(logp.exp(), uniforms=uniforms)
        token = token.masked_fill(finished, pad_token_id)
        response_ids[rows, t] = token
        logprobs[rows, t] = logp.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0)
        steps = t + 1
        finished |= torch.isin(token, stop_ids)
        if bool(finished.all()):
            break
        next_input, positions = token[:, None], positions[:, -1:] + 1
        if compact_at and bool(finished.float().mean() >= compact_at):  # finished rows leave the batch
            keep = (~finished).nonzero().squeeze(1)
            cache = keep_rows(cache, keep)
            rows, finished, next_input, positions, full_mask = (x[keep] for x in (rows, finished, next_input,
                                                                                  positions, full_mask))
    response_ids, logprobs = response_ids[:, :steps], logprobs[:, :steps]
    if not bool(torch.isfinite(logprobs).all()):
        row = int((~torch.isfinite(logprobs)).any(1).nonzero()[0])
        raise FloatingPointError(f"the model produced non-finite logits while sampling (row {row})")
    # real tokens: everything up to and including the first stop token
    is_stop = torch.isin(response_ids, stop_ids).long()
    response_mask = (torch.cumsum(is_stop, dim=1) - is_stop == 0).long()
    return response_ids, response_mask, logprobs * response_mask
