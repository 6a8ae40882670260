"""The autoregressive baseline (engine/autoregressive.py) against a no-cache recomputation, plus sampling, stop ids
and left padding. Tiny random model (window 8, so a 20-token sequence crosses the sliding window twice)."""

from __future__ import annotations

import pytest
import torch

from conftest import randomise

from dgemma.config import ModelConfig
from dgemma.engine.autoregressive import filter_logits, generate_autoregressive, pick_next
from dgemma.engine.cache import KVCache
from dgemma.model import DiffusionGemma

S, F = "sliding_attention", "full_attention"


def tiny_model(seed: int = 0) -> DiffusionGemma:
    """A 4-layer random model at scales where logits are decisive (matrices ~ N(0, 1/fan_in), embedding ~ N(0, 0.3²),
    norms / scales / layer scalars ~ U(0.25, 1.75)), so greedy picks are not near-ties."""
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                      top_k_experts=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      global_head_dim=32, num_global_key_value_heads=1, layer_types=(S, F, S, F), sliding_window=8,
                      canvas_length=16, max_position_embeddings=1024, eos_token_id=(1,))
    model = DiffusionGemma(cfg).eval()
    randomise(model, seed)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def prompts(B, T, seed=1):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def no_cache_greedy(model, ids, n):
    """Oracle: re-encode the whole sequence from scratch each step, argmax at the last position."""
    for _ in range(n):
        hidden = model.encode(ids, KVCache(model.config, ids.shape[0]), return_hidden=True)
        ids = torch.cat([ids, model.head(hidden[:, -1]).argmax(-1)[:, None]], dim=1)
    return ids


def test_cached_decode_equals_no_cache_recomputation_past_the_window(model):
    ids = prompts(2, 5)
    out = generate_autoregressive(model, ids, max_new_tokens=15)  # 20 positions > sliding window 8
    assert out.shape == (2, 20) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, no_cache_greedy(model, ids, 15))


def test_cached_logits_match_full_recompute(model):
    """Beyond argmax: every incremental step's logits equal the full causal pass's logits at that position."""
    ids = prompts(1, 14, seed=3)
    with torch.no_grad():
        full = model.head(model.encode(ids, KVCache(model.config, 1), return_hidden=True))
        cache = KVCache(model.config, 1)
        steps = [model.head(model.encode(ids[:, :4], cache, return_hidden=True))]
        steps += [model.head(model.encode(ids[:, t:t + 1], cache, return_hidden=True)) for t in range(4, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def test_exact_length_and_zero_tokens(model):
    ids = prompts(1, 3)
    assert generate_autoregressive(model, ids, max_new_tokens=5).shape == (1, 8)  # no canvas (16) rounding
    assert torch.equal(generate_autoregressive(model, ids, max_new_tokens=0), ids)


def test_greedy_is_deterministic_and_sampling_reproducible(model):
    ids = prompts(2, 4, seed=5)
    a = generate_autoregressive(model, ids, max_new_tokens=8)
    assert torch.equal(a, generate_autoregressive(model, ids, max_new_tokens=8))

    def sample(seed, **kw):
        return generate_autoregressive(model, ids, max_new_tokens=8, temperature=1.0,
                                       generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=5, top_p=0.9), sample(7, top_k=5, top_p=0.9))
    assert torch.equal(sample(9, top_k=1), a)  # top-1 sampling is greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    keep = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert keep.tolist() == [[True, True, False, False], [False, False, True, True]]  # 0.5 < 0.7: 2nd token kept
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).sum(-1).tolist() == [1, 1]  # exactly reached: stop
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))).sum(-1).tolist() == [1, 1]  # never empty
    assert (~torch.isinf(filter_logits(logits, top_k=3))).tolist() == [[True, True, True, False],
                                                                       [False, True, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {2, 3}


def test_eos_pads_finished_rows_and_stops_when_all_done(model):
    ids = prompts(2, 4, seed=11)
    free = generate_autoregressive(model, ids, max_new_tokens=10)[:, 4:]
    eos = int(free[0, 2])  # row 0's third token
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in free]
    out = generate_autoregressive(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=499)[:, 4:]
    for row, stop in enumerate(first):
        if stop is None:
            assert torch.equal(out[row], free[row])
        else:
            assert torch.equal(out[row, :stop + 1], free[row, :stop + 1])
            assert (out[row, stop + 1:] == 499).all()
    # both rows stop: the output ends at the later stop id (early exit), list-of-ids form
    eos_pair = [int(free[0, 1]), int(free[1, 3])]
    out = generate_autoregressive(model, ids, max_new_tokens=10, eos_token_id=eos_pair)[:, 4:]
    ends = [min(int(i) for i in (free[r] == torch.tensor(eos_pair)[:, None]).any(0).nonzero()) for r in range(2)]
    assert out.shape[1] == max(ends) + 1
    pad = model.config.pad_token_id  # the default pad
    for r, end in enumerate(ends):
        assert torch.equal(out[r, :end + 1], free[r, :end + 1]) and (out[r, end + 1:] == pad).all()


def test_left_padded_batch_equals_unpadded_rows(model):
    rows = [prompts(1, 7, seed=21)[0], prompts(1, 3, seed=22)[0], prompts(1, 5, seed=23)[0]]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batched = generate_autoregressive(model, ids, max_new_tokens=12, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate_autoregressive(model, r[None], max_new_tokens=12)
        assert torch.equal(batched[i, T:], alone[0, len(r):]), f"row {i}"
    # and the prefill logits agree within float tolerance (pad slots shift positions; RoPE is relative)
    with torch.no_grad():
        padded = model.head(model.encode(ids, KVCache(model.config, 3), valid=mask.bool(), return_hidden=True))
        for i, r in enumerate(rows):
            alone = model.head(model.encode(r[None], KVCache(model.config, 1), return_hidden=True))
            torch.testing.assert_close(padded[i, T - len(r):], alone[0], rtol=0, atol=1e-4)


def test_bad_arguments(model):
    ids = prompts(1, 3)
    for kwargs in ({"max_new_tokens": -1}, {"max_new_tokens": 2, "temperature": -0.5},
                   {"max_new_tokens": 2, "top_k": 0}, {"max_new_tokens": 2, "top_p": 0.0},
                   {"max_new_tokens": 2000}, {"max_new_tokens": 2, "attention_mask": torch.ones(1, 4)},
                   {"max_new_tokens": 2, "attention_mask": torch.tensor([[1, 1, 0]])}):  # right padding
        with pytest.raises(ValueError):
            generate_autoregressive(model, ids, **kwargs)
    with pytest.raises(ValueError):
        generate_autoregressive(model, torch.zeros(1, 0, dtype=torch.int64), max_new_tokens=2)


def test_top_k_or_top_p_at_temperature_0_is_refused_not_ignored(model):
    """top_k / top_p without a temperature decoded greedily, the filters silently unused."""
    ids = prompts(1, 3)
    for kwargs in ({"top_k": 3}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="at temperature 0 decoding is greedy.*give a temperature > 0"):
            generate_autoregressive(model, ids, max_new_tokens=2, **kwargs)
    assert generate_autoregressive(model, ids, max_new_tokens=2, temperature=1.0, top_k=3,
                                   generator=torch.Generator().manual_seed(0)).shape == (1, 5)


def test_autoregressive_head_matches_the_reference_encoder_head(reference_checkpoint):
    """Oracle: the reference's AR head is lm_head(encoder_last_hidden_state) soft-capped; ours must equal it
    (one final norm, not two), and greedy decoding must pick its argmax."""
    import dgemma
    from dgemma.engine.autoregressive import generate_autoregressive

    ref, path = reference_checkpoint()
    engine = dgemma.load(path, quiet=True)
    prompt = torch.randint(3, 500, (4, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = ref(input_ids=prompt, decoder_input_ids=prompt[:, :4]).encoder_last_hidden_state
        expected = torch.tanh(ref.lm_head(hidden).float() / 30.0) * 30.0
    ours = engine.module.head(engine.encode(prompt, engine.new_cache(4), return_hidden=True))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # sampled decoding (temperature 1) depends on the whole distribution, not just the argmax: replay it
    # step by step with the reference's head and the same generator
    from dgemma.engine.autoregressive import pick_next
    out = generate_autoregressive(engine.module, prompt, max_new_tokens=8, temperature=1.0,
                                  generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in range(prompt.shape[1], out.shape[1]):
            h = ref(input_ids=out[:, :t], decoder_input_ids=prompt[:, :4]).encoder_last_hidden_state[:, -1]
            logits = torch.tanh(ref.lm_head(h).float() / 30.0) * 30.0
            assert torch.equal(out[:, t], pick_next(logits, 1.0, None, None, g)), f"token {t}"
