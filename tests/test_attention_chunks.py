"""Long encoder passes in query chunks (attention.chunk_queries) and the CUDA K/V head repeat (attention.attend).

Chunks must give the one call's very bits on the CPU (the parity with transformers rests on it), must skip only
keys that no query of theirs attends to, and must leave short passes alone. The slow side of each comparison is
the plain one-call path (QUERY_CHUNK = None), and a long prompt is also checked against the reference itself.
"""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.model import attention
from dgemma.model.attention import ChunkedMask, attend, attend_reference, chunk_queries, repeat_heads
from dgemma.model.encoder import EncoderMask


def layer_mask(B, S0, T, window, pad=0):
    """The encoder's mask for T new tokens after S0 cached ones; row 0 left-padded by `pad` slots if B > 1."""
    key_valid = None
    if pad:
        key_valid = torch.ones(B, S0 + T, dtype=torch.bool)
        key_valid[0, :pad] = False
    return EncoderMask(S0, T, S0, window, key_valid, "cpu")


GEOMETRIES = [  # (B, cached S0, new T, window, pad of row 0)
    (1, 0, 2100, 8, 0),
    (2, 700, 2500, 512, 37),
    (3, 0, 1800, None, 0),
    (2, 1500, 3000, 1024, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S0,T,window,pad", GEOMETRIES)
def test_chunked_attention_gives_the_one_calls_bits(B, S0, T, window, pad, dtype):
    g = torch.Generator().manual_seed(T)
    mask = layer_mask(B, S0, T, window, pad)
    chunked = chunk_queries(mask)
    assert isinstance(chunked, ChunkedMask), "a long pass must be chunked"
    q = torch.randn(B, 8, T, 32, generator=g).to(dtype)
    k = torch.randn(B, 2, S0 + T, 32, generator=g).to(dtype)
    v = torch.randn(B, 2, S0 + T, 32, generator=g).to(dtype)
    one, parts = attend(q, k, v, mask.dense()), attend(q, k, v, chunked)
    assert torch.equal(one, parts), f"max |diff| {(one.float() - parts.float()).abs().max().item():.3e}"
    # and the one call is right (the oracle: an explicit fp32 softmax)
    torch.testing.assert_close(one.float(), attend_reference(q, k, v, mask.dense()).float(), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("B,S0,T,window,pad", GEOMETRIES)
def test_chunks_skip_only_keys_no_query_of_theirs_sees(B, S0, T, window, pad):
    rule = layer_mask(B, S0, T, window, pad)
    chunked, mask = chunk_queries(rule), rule.dense()
    S = S0 + T
    starts = [c[0] for c in chunked.chunks]
    assert starts[0] == 0 and chunked.chunks[-1][1] == T
    skipped = 0
    for (q0, q1, k0, k1), nxt in zip(chunked.chunks, starts[1:] + [T]):
        assert q1 == nxt and q0 % 256 == 0 and q1 - q0 >= attention.MIN_QUERY_CHUNK
        assert k0 % attention.KEY_BLOCK == 0 and (k1 % attention.KEY_BLOCK == 0 or k1 == S)
        assert not mask[..., q0:q1, :k0].any() and not mask[..., q0:q1, k1:].any()
        skipped += (q1 - q0) * (S - (k1 - k0))
    assert skipped > 0
    if window is not None and window <= 1024:  # the point: a sliding layer's chunks see far fewer keys
        assert skipped > 0.3 * T * S


def dense_rule(B, S0, T, window, key_valid, start):
    """The encoder mask written out whole, straight from spec §4.7 (the oracle for EncoderMask's blocks)."""
    start = torch.as_tensor(start).reshape(-1, 1)
    q_pos = start + torch.arange(T)  # [B or 1, T]
    k_pos = start - S0 + torch.arange(S0 + T)
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if key_valid is not None:
        m = (m & key_valid[:, None, :]) | (k_pos[:, None, :] == q_pos[:, :, None])
    return m[:, None]


@pytest.mark.parametrize("B,S0,T,window,pad", GEOMETRIES + [(3, 900, 1900, 512, 1200)])
def test_mask_blocks_and_key_ranges_follow_the_rule(B, S0, T, window, pad):
    """Every block EncoderMask builds is that block of the whole mask, with per-row starts too (stacked caches),
    and each chunk's key range is exactly the span of keys its queries attend to (the first and last True)."""
    g = torch.Generator().manual_seed(S0 + T)
    key_valid = torch.ones(B, S0 + T, dtype=torch.bool)
    key_valid[0, :pad] = False
    key_valid[-1, : pad // 2] = False
    for start in (S0, torch.tensor([S0 + 7 * b for b in range(B)])):
        rule = EncoderMask(S0, T, start, window, key_valid, "cpu")
        whole = dense_rule(B, S0, T, window, key_valid, start)
        assert torch.equal(rule.dense(), whole)
        for _ in range(20):
            q0, k0 = (int(torch.randint(0, n, (1,), generator=g)) for n in (T, S0 + T))
            q1, k1 = (int(torch.randint(a + 1, n + 1, (1,), generator=g)) for a, n in ((q0, T), (k0, S0 + T)))
            assert torch.equal(rule.block(q0, q1, k0, k1), whole[..., q0:q1, k0:k1])
        for q0, q1 in ((0, 1024), (1024, T), (256, 1280), (T - 1, T)):
            seen = whole[..., q0:q1, :].any(dim=(0, 1, 2)).nonzero()
            assert rule.key_range(q0, q1) == (int(seen[0]), int(seen[-1]) + 1), (q0, q1, start)


def test_a_long_pass_never_builds_its_whole_mask(monkeypatch):
    """Memory: a chunked pass builds one chunk's block of the mask at a time (O(T x chunk)), never the [T, S]
    mask (64 MB per layer kind at 8K tokens, 1 GB at 32K)."""
    built = []
    block = EncoderMask.block
    monkeypatch.setattr(EncoderMask, "block", lambda self, *a: built.append(a) or block(self, *a))
    T, S0 = 6000, 500
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 2, S0 + T, 16, generator=g)
    for window in (None, 512):
        built.clear()
        attend(q, k, k, chunk_queries(layer_mask(1, S0, T, window)))
        assert built and all(q1 - q0 < 2 * attention.QUERY_CHUNK for q0, q1, _, _ in built)
        assert sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in built) < (0.6 if window else 0.8) * T * (S0 + T)


def test_short_passes_and_commits_are_not_chunked():
    for T, S0 in ((256, 4000), (1024, 0), (1791, 0)):  # a canvas commit after a long context; short prompts
        mask = layer_mask(1, S0, T, 512)
        assert torch.equal(chunk_queries(mask), mask.dense())
    # a full (causal) layer of a pass too short for two chunks of 768: one call
    short = layer_mask(1, 0, 1500, None)
    assert torch.equal(chunk_queries(short), short.dense())
    assert isinstance(chunk_queries(layer_mask(1, 0, 1792, None)), ChunkedMask)


def test_long_prompt_encode_equals_the_unchunked_pass_and_the_reference(reference_checkpoint, monkeypatch):
    """A 2,100-token prompt through the whole encoder: every layer's K/V and the final hidden state are the same
    bits with and without chunks, and equal to transformers' (the oracle), as are the decoder's logits after it."""
    ref, path = reference_checkpoint({"text_config": {"max_position_embeddings": 4096}})
    engine = dgemma.load(path, dtype=torch.float32, quiet=True)
    cfg = engine.config
    T, L = 2100, cfg.canvas_length
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, cfg.vocab_size - 8, (1, T), generator=g)
    canvas = torch.randint(3, cfg.vocab_size - 8, (1, L), generator=g)

    def run():
        cache = engine.new_cache(1)
        return engine.encode(tokens, cache, return_hidden=True), cache

    made = []
    monkeypatch.setattr("dgemma.model.encoder.chunk_queries", lambda m: made.append(chunk_queries(m)) or made[-1])
    hidden, cache = run()
    assert any(isinstance(c, ChunkedMask) for c in made), "the long prompt was not chunked"
    monkeypatch.setattr(attention, "QUERY_CHUNK", None)
    plain_hidden, plain_cache = run()
    assert torch.equal(hidden, plain_hidden)
    for i in range(cfg.num_hidden_layers):
        assert torch.equal(cache.keys[i], plain_cache.keys[i]) and torch.equal(cache.values[i], plain_cache.values[i])

    from transformers.cache_utils import DynamicCache

    pkv = DynamicCache(config=ref.config.get_text_config())
    with torch.no_grad():
        out = ref(input_ids=tokens, past_key_values=pkv, decoder_input_ids=canvas,
                  position_ids=torch.arange(T)[None], decoder_position_ids=torch.arange(T, T + L)[None])
    assert (hidden - out.encoder_last_hidden_state).abs().max().item() <= 1e-4
    for i in range(cfg.num_hidden_layers):
        assert (cache.keys[i] - pkv.layers[i].keys).abs().max().item() <= 1e-4
        assert (cache.values[i] - pkv.layers[i].values).abs().max().item() <= 1e-4
    assert (engine.denoise(canvas, cache) - out.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("H,Hk", [(8, 2), (6, 3), (4, 1)])
def test_repeated_heads_equal_grouped_query_attention(H, Hk):
    """The CUDA fallback's layout (K/V heads repeated) computes what enable_gqa computes."""
    g = torch.Generator().manual_seed(H + Hk)
    q, k, v = torch.randn(2, H, 7, 16, generator=g), torch.randn(2, Hk, 11, 16, generator=g), None
    v = torch.randn(2, Hk, 11, 16, generator=g)
    mask = torch.rand(2, 1, 7, 11, generator=g) > 0.3
    mask[..., -1] = True
    repeated = torch.nn.functional.scaled_dot_product_attention(q, repeat_heads(k, H), repeat_heads(v, H),
                                                                attn_mask=mask, scale=1.0)
    torch.testing.assert_close(repeated, attend(q, k, v, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(repeated, attend_reference(q, k, v, mask), rtol=0, atol=1e-5)


def test_flash_takes_gqa_only_where_cudas_flash_kernel_does():
    half, wide = torch.empty(1, 8, 4, 256, dtype=torch.bfloat16), torch.empty(1, 8, 4, 512, dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert attention.flash_takes_gqa(half, half, None)
    assert not attention.flash_takes_gqa(half, half, mask)  # a mask: math kernel
    assert not attention.flash_takes_gqa(wide, wide, None)  # the 512-wide full-attention heads
    assert not attention.flash_takes_gqa(half.float(), half.float(), None)  # fp32


def test_training_on_a_chunked_sequence_keeps_the_loss_bits_and_the_gradients(monkeypatch):
    """Training's encoder pass (dgemma/train/loss.py, grad on, right-padded rows) over a sequence long enough to be
    chunked: the same loss bits as the one call; the gradients agree to rounding (the backward sums each chunk's
    key/value gradients apart, so those differ from the one call's in the last bits, README 'Long prompts')."""
    from conftest import make_config, randomise

    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from dgemma.train.data import Example, collate
    from dgemma.train.loss import LossConfig, diffusion_loss

    cfg = ModelConfig.from_dict(make_config({"text_config": {"max_position_embeddings": 4096}}))
    model = DiffusionGemma(cfg)
    randomise(model, 0)
    g, L = torch.Generator().manual_seed(0), cfg.canvas_length
    ids = lambda n: tuple(torch.randint(3, 500, (n,), generator=g).tolist())  # noqa: E731
    examples = [Example((2,) + ids(1900), ids(3 * L), "a"), Example((2,) + ids(700), ids(L), "b")]
    batch = collate(examples, 0, L, seeds=[1, 2])
    made = []
    monkeypatch.setattr("dgemma.model.encoder.chunk_queries", lambda m: made.append(chunk_queries(m)) or made[-1])

    def run():
        model.zero_grad()
        loss, _ = diffusion_loss(model, batch, cfg=LossConfig(ar_weight=0.5))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    assert all(isinstance(c, ChunkedMask) for c in made) and made, "the long sequence was not chunked"
    monkeypatch.setattr(attention, "QUERY_CHUNK", None)
    plain_loss, plain_grads = run()
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


# --- a prompt prefilled in pieces (Engine.prefill_chunk, encoder.encode's `piece`) ------------------------------

def test_a_prompt_prefilled_in_pieces_equals_one_pass_and_the_reference(reference_checkpoint, monkeypatch):
    """Pieces of 96 tokens over a 700-token prompt (a sliding window of 8, so pieces cross it everywhere): each
    pass holds at most one piece, and the cache, the hidden states and the decoder's logits after it equal one
    pass's to rounding (not bits: other matrix shapes) and transformers' one-pass forward (the oracle)."""
    from dgemma.model import encoder

    ref, path = reference_checkpoint({"text_config": {"max_position_embeddings": 4096}})
    engine = dgemma.load(path, dtype=torch.float32, quiet=True)
    T, L = 700, engine.config.canvas_length
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, engine.config.vocab_size - 8, (1, T), generator=g)
    canvas = torch.randint(3, engine.config.vocab_size - 8, (1, L), generator=g)

    def run():
        cache = engine.new_cache(1)
        return engine.encode(tokens, cache, return_hidden=True), cache

    plain_hidden, plain_cache = run()
    passes = []
    one_pass = encoder.encode_pass
    monkeypatch.setattr(encoder, "encode_pass", lambda m, t, *a: passes.append(t.shape[1]) or one_pass(m, t, *a))
    engine.prefill_chunk = 96
    hidden, cache = run()
    assert passes == [96] * 7 + [28]
    assert cache.length == plain_cache.length == T
    torch.testing.assert_close(hidden, plain_hidden, rtol=0, atol=1e-4)
    for i in range(engine.config.num_hidden_layers):
        torch.testing.assert_close(cache.keys[i], plain_cache.keys[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(cache.values[i], plain_cache.values[i], rtol=0, atol=1e-4)
    logits = engine.denoise(canvas, cache)
    torch.testing.assert_close(logits, engine.denoise(canvas, plain_cache), rtol=0, atol=1e-4)
    engine.prefill_chunk = None

    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        out = ref(input_ids=tokens, past_key_values=DynamicCache(config=ref.config.get_text_config()),
                  decoder_input_ids=canvas, position_ids=torch.arange(T)[None],
                  decoder_position_ids=torch.arange(T, T + L)[None])
    assert (hidden - out.encoder_last_hidden_state).abs().max().item() <= 1e-4
    assert (logits - out.logits).abs().max().item() <= 1e-4


def test_pieces_keep_a_padded_batch_and_its_generation(random_engine):
    """A left-padded batch prefilled in pieces (rows of 150 and 37 tokens, pieces of 64): the padding mask crosses
    the pieces, and generate() gives one pass's tokens for the same seed (rounding could only flip a near tie)."""
    engine = random_engine
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (2, 150), generator=g)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :113] = 0
    options = dict(max_new_tokens=engine.config.canvas_length, max_denoising_steps=4)
    try:
        torch.manual_seed(1)
        plain = engine.generate(ids, attention_mask=mask, **options)
        engine.prefill_chunk = 64
        torch.manual_seed(1)
        pieces = engine.generate(ids, attention_mask=mask, **options)
    finally:
        engine.prefill_chunk = None
    assert torch.equal(plain, pieces)


def test_prefill_chunk_takes_positive_token_counts_only(random_model_dir, capsys):
    from dgemma.cli import main

    for bad in (0, -5, 2.5, True, "64"):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
            dgemma.load(random_model_dir, quiet=True, prefill_chunk=bad)
    assert dgemma.load(random_model_dir, quiet=True, prefill_chunk=64).prefill_chunk == 64
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(random_model_dir), "--prefill-chunk", "0", "Hi"])
    assert "--prefill-chunk" in capsys.readouterr().err
    assert main(["generate", "--model", str(random_model_dir), "--prefill-chunk", "4", "--steps", "2",
                 "--max-tokens", "8", "--seed", "0", "A prompt of more than four tokens"]) == 0
