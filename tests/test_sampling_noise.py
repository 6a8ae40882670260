"""`noise.exponential_` against torch's own `Tensor.exponential_(1)` (the slow reference): the same fp32 values bit for
bit and the same generator state afterwards, at every kind of stream position, size and sub-chunk split."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma.sampling import noise


def pair(seed: int, skip: int) -> tuple[torch.Generator, torch.Generator]:
    """Two generators at the same stream position: `skip` mt19937 words consumed (torch.rand draws one per fp32)."""
    a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    torch.rand(skip, generator=a), torch.rand(skip, generator=b)
    return a, b


def assert_same(a: torch.Generator, b: torch.Generator, shape) -> None:
    want = torch.empty(shape).exponential_(1, generator=a)
    got = noise.exponential_(torch.empty(shape), b)
    assert torch.equal(got, want)
    assert torch.equal(a.get_state(), b.get_state())
    assert torch.equal(torch.rand(700, generator=a), torch.rand(700, generator=b))  # the streams continue alike


def test_fast_path_is_verified_and_used(monkeypatch):
    assert noise._check()  # on this platform the fast path must be on, or the reference-RNG mode is slow again
    calls = []
    fill = noise._fill
    monkeypatch.setattr(noise, "_fill", lambda out, gen: calls.append(out.numel()) or fill(out, gen))
    assert_same(*pair(0, 0), (3, 50))
    assert calls == [150]


@pytest.mark.parametrize("skip", [0, 1, 5, 623, 624, 625, 1247, 1248, 5000])
def test_every_stream_position(skip):
    assert_same(*pair(skip, skip), (2, 777))


@pytest.mark.parametrize("shape,sub", [((1,), 4), ((5, 1000), 1 << 18), ((4, 1001), 999), ((3, 8), 7)])
def test_sizes_and_sub_chunks(monkeypatch, shape, sub):
    monkeypatch.setattr(noise, "SUB_ENTRIES", sub)
    assert_same(*pair(3, 11), shape)


def test_default_generator_and_consecutive_slices():
    torch.manual_seed(5)
    want = torch.empty(6, 900).exponential_(1)
    after = torch.rand(10)
    torch.manual_seed(5)
    got = torch.empty(6, 900)
    for rows in ((0, 2), (2, 3), (3, 6)):  # slice by slice consumes the stream as one call does
        noise.exponential_(got[rows[0]:rows[1]])
    assert torch.equal(got, want) and torch.equal(torch.rand(10), after)


def test_ambiguous_roundings_go_to_the_c_library(monkeypatch):
    """A wide guard sends most entries through math.log1p: still torch's values (and the fix-up really runs)."""
    monkeypatch.setattr(noise, "GUARD", 1 << 27)
    log1p_calls = []
    real = noise.math.log1p
    monkeypatch.setattr(noise.math, "log1p", lambda x: log1p_calls.append(x) or real(x))
    assert_same(*pair(8, 3), (4, 500))
    assert len(log1p_calls) > 500


@pytest.mark.parametrize("make", [
    lambda: torch.empty(40, 30).t(),  # not contiguous
    lambda: torch.empty(3, 300, dtype=torch.float64),  # not fp32
])
def test_other_tensors_fall_back_to_torch(make):
    a, b = pair(2, 9)
    want = make().exponential_(1, generator=a)
    got = noise.exponential_(make(), b)
    assert torch.equal(got, want) and torch.equal(a.get_state(), b.get_state())


def test_unverified_platform_falls_back(monkeypatch):
    monkeypatch.setattr(noise, "_verified", False)
    monkeypatch.setattr(noise, "_fill", None)  # must not be reached
    assert_same(*pair(4, 4), (2, 100))


def test_edge_words_follow_torchs_formula():
    """float32(-1.0 * log1p(-u)), u = (w & (2^53 - 1)) * 2^-53, for words at the edges: u = 0 gives +0.0 (not -0.0),
    the top bits are ignored, u next to 1 gives the largest values."""
    top = (1 << 53) - 1
    words = [0, 1 << 53, 0x7FE0000000000000, 1, 2, top, top - 1, 1 << 52, (1 << 52) - 1, 0x7FFFFFFFFFFFFFFF,
             0x0123456789ABCDEF, 0x5EADBEEFCAFEF00D] + list(range(3, 40))
    n = len(words)
    got = torch.empty(n)
    noise._from_words(torch.tensor(words), torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.int64), got)
    want = torch.tensor([-1.0 * math.log1p(-((w & top) * 2.0 ** -53)) for w in words], dtype=torch.float32)
    assert torch.equal(got, want)
    assert not torch.signbit(got[:3]).any() and got[0] == 0  # +0.0: a -0.0 noise would turn p / q into -inf
