"""MiniMind model: fixture logits, config inference, cache, sampler log-probs, MoE, HF round trip."""
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, config_from_state_dict
from model.sampling import output_cache, sample_categorical, sample_responses

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny(version=2, **kw):
    torch.manual_seed(0)
    cfg = MiniMindConfig(**{"version": version, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300, **kw})
    return MiniMindForCausalLM(cfg).eval()


def fixture_state_dict(fx):
    """A full state dict from a compact fixture: embedding rows outside `kept_ids` are zeros, which
    changes no kept logit column (see tests/fixtures/make_fixtures.py). Tied: lm_head = embedding."""
    embed = fx["embed_rows"].new_zeros(fx["vocab_size"], fx["embed_rows"].shape[1])  # [V, hidden]
    embed[fx["kept_ids"]] = fx["embed_rows"]
    return {**fx["weights"], "model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}


@pytest.mark.parametrize("name", ["minimind_v2_dense.pt", "minimind_v3_dense.pt"])
def test_fixture_logits_and_inferred_config(name):
    fx = torch.load(FIXTURES / name, weights_only=True)
    assert torch.isin(fx["input_ids"], fx["kept_ids"]).all(), "the hidden states need every input id's row"
    state_dict = fixture_state_dict(fx)
    cfg = config_from_state_dict(state_dict)
    for key, value in fx["config"].items():
        if key != "flash_attn":  # an attention-kernel switch, not a property of the weights
            assert getattr(cfg, key) == value, key
    model = MiniMindForCausalLM(cfg).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        logits = model(fx["input_ids"], attention_mask=fx["attention_mask"]).logits[..., fx["kept_ids"]]
    pad = fx["pad_len_row1"]
    assert (logits[0] - fx["expected_logits_row0"]).abs().max() < 1e-4
    assert (logits[1, pad:] - fx["expected_logits_row1_unpadded"]).abs().max() < 1e-4
    # fp16 weights (how MiniMind ships .pth files) load strictly too
    half = {k: v.half() for k, v in state_dict.items()}
    MiniMindForCausalLM(config_from_state_dict(half)).load_state_dict(half, strict=True)


@pytest.mark.parametrize("version,use_moe", [(2, False), (3, False), (2, True), (3, True)])
def test_config_inferred_from_state_dict(version, use_moe):
    model = tiny(version, use_moe=use_moe, num_hidden_layers=3)
    cfg = config_from_state_dict(model.state_dict())
    ref = model.config
    for key in ["version", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "qk_norm", "use_moe", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "vocab_size"]:
        assert getattr(cfg, key) == getattr(ref, key), key
    MiniMindForCausalLM(cfg).load_state_dict(model.state_dict(), strict=True)


def test_state_dict_layout_matches_minimind():
    sd = tiny(2).state_dict()
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (192, 64)  # 64 * ceil(64 * 8/3 / 64)
    assert "model.layers.0.self_attn.q_norm.weight" not in sd
    sd3 = tiny(3).state_dict()
    assert sd3["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 4 kv heads of 8
    assert sd3["model.layers.0.mlp.gate_proj.weight"].shape == (256, 64)  # 64 * ceil(64 * pi / 64)
    moe = tiny(2, use_moe=True).state_dict()
    assert "model.layers.0.mlp.shared_experts.0.up_proj.weight" in moe
    assert moe["model.layers.0.mlp.gate.weight"].shape == (4, 64)
    assert not any(k.startswith("model.rope") for k in sd), "RoPE tables must not be saved"
    # MiniMind at 512: intermediate 1408 (v2) and 1664 (v3)
    assert MiniMindConfig(version=2).intermediate_size == 1408
    assert MiniMindConfig(version=3, hidden_size=512).intermediate_size == 1664


def test_flags_contradicting_weights_name_both_values():
    sd = tiny(2).state_dict()
    with pytest.raises(ValueError, match=r"--hidden_size 512 .*hidden_size = 64"):
        config_from_state_dict(sd, hidden_size=512)
    with pytest.raises(ValueError, match=r"--use_moe True .*use_moe = False"):
        config_from_state_dict(sd, use_moe=True)
    assert config_from_state_dict(sd, hidden_size=64, num_hidden_layers=None).hidden_size == 64
    with pytest.raises(ValueError, match="missing"):
        config_from_state_dict({"foo": torch.zeros(1)})


def greedy_by_full_reforward(model, ids, mask, n, eos):
    """Reference decoder: re-run the whole sequence every step, no cache."""
    out = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, 0)
        out.append(nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def left_padded_batch(vocab=300):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    ids[2, :7], mask[2, :7] = 0, 0
    return ids, mask


@pytest.mark.parametrize("version,use_moe", [(2, False), (3, False), (2, True), (3, True)])
def test_greedy_with_cache_equals_full_reforward(version, use_moe):
    model = tiny(version, use_moe=use_moe)
    ids, mask = left_padded_batch()
    resp, resp_mask, _ = sample_responses(model, ids, mask, 12, stop_ids=-1, pad_token_id=0, greedy=True)
    assert torch.equal(resp, greedy_by_full_reforward(model, ids, mask, 12, eos=-1))
    assert resp_mask.all()


def full_forward_logprobs(model, ids, mask, resp, temperature):
    seq = torch.cat([ids, resp], 1)
    full_mask = torch.cat([mask, torch.ones_like(resp)], 1)
    with torch.no_grad():
        logits = model(seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1)


def test_sampled_logprobs_equal_a_separate_full_forward():
    model = tiny(2)
    ids, mask = left_padded_batch()
    g = torch.Generator().manual_seed(0)
    resp, resp_mask, logprobs = sample_responses(model, ids, mask, 16, stop_ids=2, pad_token_id=0,
                                                 temperature=0.7, generator=g)
    ref = full_forward_logprobs(model, ids, mask, resp, 0.7)
    assert torch.allclose(logprobs, ref * resp_mask, atol=1e-5)


def test_eos_stops_row_and_pads_after_it():
    model = tiny(2)
    # make token 5 overwhelmingly likely everywhere, so EOS=5 ends every row at step 1
    bias = torch.zeros(300)
    bias[5] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    ids, mask = left_padded_batch()
    resp, resp_mask, logprobs = sample_responses(model, ids, mask, 10, stop_ids=5, pad_token_id=0,
                                                 generator=torch.Generator().manual_seed(0))
    assert resp.shape == (3, 1), "loop must exit once every row has stopped"
    assert (resp == 5).all() and resp_mask.all()


def test_rows_stop_independently():
    model = tiny(2)
    ids, mask = left_padded_batch()
    resp, resp_mask, logprobs = sample_responses(model, ids, mask, 20, stop_ids=-1, pad_token_id=0,
                                                 greedy=True)
    eos = int(resp[0, 3])  # declare row 0's 4th greedy token the EOS, and decode again
    row0_len = int((resp[0] == eos).nonzero()[0]) + 1
    resp, resp_mask, logprobs = sample_responses(model, ids, mask, 20, stop_ids=eos, pad_token_id=0,
                                                 greedy=True)
    for row in range(3):
        hits = (resp[row] == eos).nonzero()
        n_real = int(hits[0]) + 1 if len(hits) else resp.shape[1]
        assert resp_mask[row, :n_real].all() and not resp_mask[row, n_real:].any()
        assert (resp[row, n_real:] == 0).all() and (logprobs[row, n_real:] == 0).all()
    assert resp_mask[0].sum() == row0_len


def test_top_k_and_top_p_logprobs_are_of_the_truncated_distribution():
    model = tiny(2)
    ids, mask = left_padded_batch()
    resp, resp_mask, logprobs = sample_responses(model, ids, mask, 8, stop_ids=-1, pad_token_id=0,
                                                 top_k=5, generator=torch.Generator().manual_seed(0))
    seq_logits = model(torch.cat([ids, resp], 1), attention_mask=torch.cat([mask, resp_mask], 1)).logits
    logits = seq_logits[:, ids.shape[1] - 1:-1].detach()
    top5 = logits.topk(5, -1)
    assert (top5.indices == resp[..., None]).any(-1).all(), "every sampled token is in the top 5"
    ref = top5.values.log_softmax(-1).gather(-1, (top5.indices == resp[..., None]).float().argmax(-1, keepdim=True))
    assert torch.allclose(logprobs, ref.squeeze(-1), atol=1e-5)
    _, _, lp_p = sample_responses(model, ids, mask, 8, stop_ids=-1, pad_token_id=0, top_p=0.3,
                                  generator=torch.Generator().manual_seed(0))
    assert (lp_p <= 0).all() and (lp_p > -torch.log(torch.tensor(300.0))).any()


def test_sample_categorical_matches_the_distribution():
    # unnormalised rows with zeros first, inside and last: frequencies vs the exact probabilities
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0],
                          [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                          [1e-6, 1.0, 1.0, 1.0, 1.0, 1.0]])
    n = 40000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(n // 100):
        draws = sample_categorical(probs.repeat_interleave(100, 0), g).view(4, 100)
        counts += torch.nn.functional.one_hot(draws, 6).sum(1).float()
    expected = probs / probs.sum(-1, keepdim=True)
    assert (counts[probs == 0] == 0).all(), "a zero-probability token was drawn"
    # 5 standard errors of a binomial frequency
    assert ((counts / n - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-9).all()


def test_sample_categorical_never_draws_past_the_row_total():
    # the largest float32 uniform draw, 1 - 2^-24: still the last token with p > 0, not a zero after it
    real_rand = torch.rand
    try:
        torch.rand = lambda shape, **kw: torch.full(shape, 1 - 2 ** -24)
        for total in (1.0, 1.5, 0.3, 7.0, 1e-30):
            probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]]) * total
            assert int(sample_categorical(probs)) == 1, total
        torch.rand = lambda shape, **kw: torch.zeros(shape)  # the smallest draw: the first token with p > 0
        assert int(sample_categorical(torch.tensor([[0.0, 0.0, 0.3, 0.7]]))) == 2
    finally:
        torch.rand = real_rand


def test_non_finite_logits_while_sampling_raise():
    model = tiny(2)
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    ids, mask = left_padded_batch()
    with pytest.raises(FloatingPointError, match="non-finite logits while sampling"):
        sample_responses(model, ids, mask, 4, stop_ids=-1, pad_token_id=0, generator=torch.Generator())


@pytest.mark.parametrize("version", [2, 3])
def test_moe_forward_and_aux_loss(version):
    model = tiny(version, use_moe=True).train()
    ids, mask = left_padded_batch()
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    (out.logits.mean() + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


GATE_LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.1], [0.3, 1.7, 0.2, -0.4], [-0.5, 0.0, 1.2, 0.9]],
                            [[1.1, -0.3, 0.4, 2.2], [0.6, 0.8, -1.5, 0.0], [2.5, 1.0, 0.7, -2.0]]])  # [B=2, T=3, E=4]


def expected_balance_loss(logits, top_k, alpha, per_sequence):
    """MiniMind's load-balancing loss (docs/minimind.md "MoE balance loss") by explicit loops over b, t, e."""
    B, T, E = len(logits), len(logits[0]), len(logits[0][0])
    p = [[[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in seq] for seq in logits]
    chosen = [[sorted(range(E), key=lambda e: -row[e])[:top_k] for row in seq] for seq in logits]
    total = 0.0
    if per_sequence:  # v2: alpha * mean_b sum_e ce[b, e] * mean_t p[b, t, e]
        for b in range(B):
            for e in range(E):
                ce = sum(chosen[b][t].count(e) for t in range(T)) / (T * top_k / E)
                total += ce * sum(p[b][t][e] for t in range(T)) / T
        return alpha * total / B
    for e in range(E):  # v3: alpha * E * sum_e load[e] * mean_t p[t, e], over all B * T tokens
        load = sum(chosen[b][t].count(e) for b in range(B) for t in range(T)) / (B * T * top_k)
        total += load * sum(p[b][t][e] for b in range(B) for t in range(T)) / (B * T)
    return alpha * E * total


@pytest.mark.parametrize("version,top_k,alpha,per_sequence", [(2, 2, 0.1, True), (3, 1, 5e-4, False)])
def test_moe_balance_loss_by_hand(version, top_k, alpha, per_sequence):
    assert MiniMindConfig(version=version).aux_loss_alpha == alpha
    assert MiniMindConfig(version=version, aux_loss_alpha=0.01).aux_loss_alpha == 0.01
    moe = tiny(version, use_moe=True).model.layers[0].mlp
    assert moe.top_k == top_k
    with torch.no_grad():  # gate logits = the first 4 input features
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = torch.eye(4)
    x = torch.zeros(2, 3, 64)
    x[..., :4] = GATE_LOGITS
    _, aux = moe(x)
    assert aux.item() == pytest.approx(expected_balance_loss(GATE_LOGITS.tolist(), top_k, alpha, per_sequence),
                                       rel=1e-6)


@pytest.mark.parametrize("version", [2, 3])
def test_moe_dense_and_sparse_routing_agree(version):
    moe = tiny(version, use_moe=True).model.layers[0].mlp
    x = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(0))  # N = 27 tokens
    moe.dense_max_tokens = 27
    dense, dense_aux = moe(x)
    moe.dense_max_tokens = 26
    sparse, sparse_aux = moe(x)
    assert (dense - sparse).abs().max() <= 1e-5 * sparse.abs().max()
    assert torch.equal(dense_aux, sparse_aux)


class OpRecorder(TorchDispatchMode):
    """Records every aten op that runs inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))  # e.g. "aten.mm.default"
        return func(*args, **(kwargs or {}))


def forces_host_sync(op):
    """Ops whose result a CUDA device must hand back to the host: a value, or a data-dependent shape."""
    return (op.startswith(("aten._local_scalar_dense.", "aten.nonzero.", "aten.masked_select.",
                           "aten.unique", "aten._unique"))
            or op in ("aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor"))


@pytest.mark.parametrize("version", [2, 3])
def test_moe_decode_step_forces_no_host_sync(version):
    model = tiny(version, use_moe=True)
    ids, mask = left_padded_batch()
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)  # prefill
        with OpRecorder() as recorder:  # one new token per row, as sample_responses feeds it
            model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache,
                  logits_to_keep=1)
    assert "aten.mm.default" in recorder.ops, "the recorder saw no forward"
    assert not [op for op in recorder.ops if forces_host_sync(op)]


def test_logits_to_keep_and_cache_object():
    model = tiny(2)
    ids, mask = left_padded_batch()
    full = model(ids, attention_mask=mask).logits
    last3 = model(ids, attention_mask=mask, logits_to_keep=3).logits
    assert torch.allclose(full[:, -3:], last3, atol=1e-6)
    picked = model(ids, attention_mask=mask, logits_to_keep=torch.tensor([0, 4, 5])).logits
    assert torch.allclose(full[:, [0, 4, 5]], picked, atol=1e-6)
    out = model(ids, attention_mask=mask, use_cache=True)
    assert output_cache(out).length == ids.shape[1]


def test_save_pretrained_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = tiny(3)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "minimind"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    assert torch.allclose(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits, atol=1e-6)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["minimind", "minimind-moe", "llama", "gpt2"])
@pytest.mark.parametrize("greedy", [False, True])
def test_finished_rows_leave_the_decode_batch_with_the_same_tokens(arch, greedy):
    """Rows that ended their turn are dropped from the decode batch (and their cache rows) instead of being decoded
    as padding: the same tokens and log-probs as decoding the whole batch to the end, for a fixed seed."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import tiny_hf_model
    torch.manual_seed(0)
    model = (MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=arch.endswith("moe")))
             if arch.startswith("minimind") else tiny_hf_model(arch)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 6400, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :3] = mask[5, :1] = 0
    stop_ids = torch.arange(3, 6400, 40)  # 1 token in 40 ends a turn: rows stop at many different steps
    if greedy:  # greedy decoding of a random model repeats itself: odd rows end on their first token
        stop_ids = sample_responses(model, ids, mask, 1, -1, 0, greedy=True)[0][1::2, 0]
    runs = {}
    for compact_at in (0.0, 0.25):
        runs[compact_at] = sample_responses(model, ids, mask, 24, stop_ids, 0, greedy=greedy, compact_at=compact_at,
                                            generator=torch.Generator().manual_seed(7))
    (a_ids, a_mask, a_lp), (b_ids, b_mask, b_lp) = runs[0.0], runs[0.25]
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert torch.allclose(a_lp, b_lp, atol=1e-5)
    lengths = a_mask.sum(1)
    assert lengths.min() < 12 and lengths.max() > lengths.min() + 4  # ragged: the batch did shrink


@pytest.mark.parametrize("arch", ["minimind", "llama"])
def test_compiled_blocks_decode_and_score_as_eager(arch):
    """--compile compiles each decoder block (dynamic shapes); traced by dynamo (the "eager" backend: the graph
    capture without code generation, which takes minutes on a CPU), greedy responses and log-probs are eager's."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import tiny_hf_model
    from model.lora import compile_blocks
    from model.policy import Policy
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = (MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)) if arch == "minimind"
             else tiny_hf_model(arch)).eval()
    ids = torch.randint(3, 6400, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    eager = sample_responses(model, ids, mask, 10, -1, 0, greedy=True)
    full = torch.cat([ids, eager[0]], 1), torch.cat([mask, eager[1]], 1)
    eager_logprobs = Policy(model)(*full, 10)[0]
    compile_blocks(model, backend="eager")
    compiled = sample_responses(model, ids, mask, 10, -1, 0, greedy=True)
    assert torch.equal(compiled[0], eager[0]) and torch.allclose(compiled[2], eager[2], atol=1e-6)
    assert torch.allclose(Policy(model)(*full, 10)[0], eager_logprobs, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
