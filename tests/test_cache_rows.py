"""Rows at different context lengths in one batch (engine/cache.py StackedCaches, per-row encoder starts): the
same K/V and logits as each row run alone, for prefill, decoder steps and commits, sliding windows included."""

import torch
from conftest import TINY_CONFIG

from dgemma.config import ModelConfig
from dgemma.engine.cache import KVCache, StackedCaches
from dgemma.model.blocks import DiffusionGemma
from dgemma.model.saving import init_weights

TOL = dict(rtol=1e-5, atol=1e-5)  # K/V
LOGITS = dict(rtol=1e-4, atol=1e-4)  # fp32 GEMMs of other shapes round differently (measured <= 3e-5)


def _module():
    module = DiffusionGemma(ModelConfig.from_dict(TINY_CONFIG)).eval()
    init_weights(module, torch.Generator().manual_seed(0), std=0.5)
    return module


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (1, n), generator=g) for n in lengths]


def _assert_caches_match(got: KVCache, want: KVCache):
    assert got.length == want.length and got.valid is None and want.valid is None
    for layer in range(got.config.num_hidden_layers):
        (k, v, _), (k0, v0, _) = got.context(layer), want.context(layer)
        assert k.shape == k0.shape, (layer, k.shape, k0.shape)  # sliding layers keep only their window
        torch.testing.assert_close(k, k0, **TOL)
        torch.testing.assert_close(v, v0, **TOL)


@torch.inference_mode()
def test_rows_of_different_lengths_batched_match_each_row_alone():
    module = _module()
    L, window = module.config.canvas_length, module.config.sliding_window
    lengths = [3, 11, 6]  # one shorter than the window, two longer (sliding layers trimmed per row)
    prompts = _prompts(lengths)
    alone = [KVCache(module.config, 1) for _ in prompts]
    for ids, cache in zip(prompts, alone):
        module.encode(ids, cache)
    # one right-padded encoder pass over all prompts; only each row's true tokens enter its cache
    batched = [KVCache(module.config, 1) for _ in prompts]
    T = max(lengths)
    padded = torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in prompts])
    valid = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    module.encode(padded, StackedCaches(batched, counts=lengths), valid=valid)
    for got, want in zip(batched, alone):
        _assert_caches_match(got, want)
    assert all(c.keys[0].shape[2] == min(n, window - 1) for c, n in zip(batched, lengths))

    # one decoder forward over the three canvases at their own positions, with and without self-conditioning
    canvas = torch.randint(0, 512, (3, L), generator=torch.Generator().manual_seed(2))
    soft = torch.randn(3, L, module.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for s in (None, soft):
        together = module.denoise(canvas, StackedCaches(batched), soft=s)
        for row, cache in enumerate(alone):
            one = module.denoise(canvas[row:row + 1], cache, soft=None if s is None else s[row:row + 1])
            torch.testing.assert_close(together[row:row + 1], one, **LOGITS)
    # a row on its first step (soft None) beside rows with a signal: a zero soft row is exactly "no signal"
    mixed = soft.clone()
    mixed[1] = 0
    together = module.denoise(canvas, StackedCaches(batched), soft=mixed)
    torch.testing.assert_close(together[1:2], module.denoise(canvas[1:2], alone[1]), **LOGITS)

    # commit a subset (rows 0 and 2) in one encoder pass at their own starts; row 1 is untouched
    module.encode(canvas[[0, 2]], StackedCaches([batched[0], batched[2]]))
    for row in (0, 2):
        module.encode(canvas[row:row + 1], alone[row])
    for got, want in zip(batched, alone):
        _assert_caches_match(got, want)
    assert [c.length for c in batched] == [3 + L, 11, 6 + L]
    together = module.denoise(canvas, StackedCaches(batched))
    for row, cache in enumerate(alone):
        torch.testing.assert_close(together[row:row + 1], module.denoise(canvas[row:row + 1], cache), **LOGITS)


@torch.inference_mode()
def test_equal_lengths_stack_without_a_mask_exactly_like_one_batched_cache():
    """Rows at the same length need no padding: no mask is built, and prefill and decoder steps through the view
    give the same bits as one batched KVCache (the same ops on the same shapes)."""
    module = _module()
    prompts = torch.cat(_prompts([5, 5], seed=4))
    caches = [KVCache(module.config, 1) for _ in range(2)]
    module.encode(prompts, StackedCaches(caches))
    both = KVCache(module.config, 2)
    module.encode(prompts, both)
    view = StackedCaches(caches)
    for i in range(module.config.num_hidden_layers):
        k, v, valid = view.context(i)
        assert valid is None and torch.equal(k, both.context(i)[0]) and torch.equal(v, both.context(i)[1])
    canvas = torch.randint(0, 512, (2, module.config.canvas_length), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(module.denoise(canvas, view), module.denoise(canvas, both), rtol=0, atol=0)
