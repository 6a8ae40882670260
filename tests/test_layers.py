"""The in-place forms of the small building blocks compute the same bits as the textbook formulas, and keep
autograd working where training needs it."""

from __future__ import annotations

import torch

from dgemma.model.layers import rms_norm, softcap


def test_rms_norm_matches_the_formula_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    w = torch.rand(64, generator=g, requires_grad=True)
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    ours = rms_norm(x, w, 1e-6)
    textbook = x2 * torch.pow(x2.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * w2
    assert torch.equal(ours, textbook)
    ours.square().sum().backward()
    textbook.square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
    bf = x.detach().bfloat16()
    assert rms_norm(bf, None, 1e-6).dtype == torch.bfloat16


def test_softcap_in_place_is_bit_identical():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 1000, generator=g) * 40
    expected = torch.tanh(logits / 30.0) * 30.0
    buffer = logits.clone()
    out = softcap(buffer, 30.0, inplace=True)
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, expected)
    assert torch.equal(softcap(logits, 30.0), expected) and not torch.equal(logits, expected)  # input untouched
    half = logits.bfloat16()
    assert torch.equal(softcap(half, 30.0, inplace=True), softcap(half, 30.0)) and half.dtype == torch.bfloat16


def test_head_keeps_autograd_in_training():
    from conftest import TINY_CONFIG

    from dgemma.config import ModelConfig
    from dgemma.model.blocks import DiffusionGemma

    model = DiffusionGemma(ModelConfig.from_dict(TINY_CONFIG))
    hidden = torch.randn(1, 4, model.config.hidden_size)
    model.head(hidden).logsumexp(-1).sum().backward()  # the out-of-place soft-cap: tanh's output is intact
    assert model.embed_tokens.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(model.head(hidden), softcap(hidden @ model.embed_tokens.weight.t(),
                                                        model.config.final_logit_softcapping))
