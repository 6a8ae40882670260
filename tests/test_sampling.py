"""Unit tests for dgemma.sampling: rule edge cases, frozen rows, per-row steps, RNG hygiene. CPU, tiny V and L.

Expected values here are derived by hand from the spec (§6.2-§6.5), never by running our own code.
"""

import ast
import dataclasses
import pathlib
import re

import pytest
import torch

from dgemma import sampling as S

V, L = 37, 8


def test_linear_temperature_counts_down_and_is_per_row():
    t = S.linear_temperature(torch.tensor([48, 24, 1]), 48, 0.4, 0.8)
    assert t.dtype == torch.float32 and t.shape == (3,)
    torch.testing.assert_close(t, torch.tensor([0.8, 0.6, 0.4 + 0.4 / 48]))  # first step t_max, t_min never reached
    assert torch.equal(S.linear_temperature(torch.tensor([5, 2]), 8, None, 0.8), torch.ones(2))  # disabled: T = 1
    assert torch.equal(S.linear_temperature(3, 8, 0.4, None), torch.tensor(1.0))


def test_entropy_bound_edges():
    h = torch.tensor([
        [10.0] * L,                                       # all high: k >= 1 still accepts exactly one
        [0.0] * L,                                        # zero entropy: sum - max = 0 <= bound for every k
        [1.0] * L,                                        # all equal h=1, bound 2: (k-1)*1 <= 2 -> k = 3
        [0.5, 9.0, 0.25, 9.0, 0.5, 9.0, 0.25, 9.0],       # exact equality: 0.25+0.25+0.5 - 0.5 = 0.5 <= 0.5 -> k = 3
    ])
    bounds = [0.1, 0.1, 2.0, 0.5]
    got = torch.stack([S.entropy_bound_accept(h[i:i + 1], b)[0] for i, b in enumerate(bounds)])
    assert got.sum(-1).tolist() == [1, L, 3, 3]
    assert got[3].tolist() == [True, False, True, False, False, False, True, False] or \
        got[3].tolist() == [False, False, True, False, True, False, True, False]  # one of the tied 0.5s
    # Per-row independence: a batch gives each row the answer it gets alone.
    rows = torch.rand(4, L) * 2
    batch = S.entropy_bound_accept(rows, 0.3)
    assert torch.equal(batch, torch.cat([S.entropy_bound_accept(r[None], 0.3) for r in rows]))


def test_confidence_threshold_edges():
    c = torch.tensor([[0.5, 0.5, 0.9, 0.1], [0.2, 0.3, 0.3, 0.1], [0.6, 0.7, 0.0, 0.51]])
    got = S.confidence_threshold_accept(c, 0.5)
    assert got.tolist() == [
        [False, False, True, False],  # == threshold is NOT accepted (strict >)
        [False, True, False, False],  # none above: the single most confident, first index among ties
        [True, True, False, True],
    ]


def test_quota_edges():
    c = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.2, 0.0, 0.3, 0.4]] * 2)
    got = S.quota_accept(c, torch.tensor([1, 3]))
    assert got[0].nonzero().flatten().tolist() == [1]
    assert got[1].nonzero().flatten().tolist() == [1, 2, 3]  # tie 0.5/0.5 both in; rows independent
    assert S.quota_accept(c, 0).sum(-1).tolist() == [1, 1]  # clamped to >= 1
    assert S.quota_accept(c, 99).all()
    tie = S.quota_accept(torch.full((1, L), 0.5), 2)
    assert tie[0].nonzero().flatten().tolist() == [0, 1]  # ties: lower index wins
    rule = S.linear_quota(3)  # cumulative ceil(n * 8 / 3) = 3, 6, 8
    assert rule(None, c, torch.tensor([1, 3])).sum(-1).tolist() == [3, 8]


def test_stop_rules():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    empty = torch.full((1, 2, 3), -1)
    assert S.token_stable(0)(a, None, torch.empty(0, 2, 3, dtype=torch.long)).tolist() == [True, True]
    assert S.token_stable(1)(a, None, empty).tolist() == [False, False]  # never stable on the first step
    hist = torch.stack([torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 5, 0]])])
    assert S.token_stable(1)(a, None, hist).tolist() == [True, False]
    assert S.token_stable(2)(a, None, hist).tolist() == [True, False]
    hist2 = torch.stack([torch.tensor([[9, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 5, 6]])])
    assert S.token_stable(2)(a, None, hist2).tolist() == [False, True]
    assert S.token_stable(1)(a, None, hist2).tolist() == [True, True]  # reads only the most recent canvas
    h = torch.tensor([[0.005, 0.005], [0.004, 0.0059]])
    assert S.mean_entropy_below(0.005)(None, h, None).tolist() == [False, True]  # strict <
    rule = S.all_of(S.token_stable(2), S.mean_entropy_below(0.005))
    assert rule.num_history == 2 and S.any_of(S.token_stable(1)).num_history == 1
    assert rule(a, h, hist2).tolist() == [False, True]
    assert S.any_of(S.token_stable(2), S.mean_entropy_below(0.005))(a, h, hist2).tolist() == [False, True]
    assert S.any_of(S.token_stable(1), S.mean_entropy_below(1.0))(a, h, hist).tolist() == [True, True]
    with pytest.raises(ValueError):
        S.all_of()


def test_truncate_at_stop_ids():
    t = torch.tensor([[5, 1, 7, 106, 8], [1, 4, 4, 4, 4], [5, 6, 7, 8, 9], [3, 3, 50, 1, 2]])
    out, fin = S.truncate_at_stop_ids(t, [1, 106, 50], pad_id=0)
    assert out.tolist() == [[5, 1, 0, 0, 0], [1, 0, 0, 0, 0], [5, 6, 7, 8, 9], [3, 3, 50, 0, 0]]
    assert fin.tolist() == [True, True, False, True]
    assert t[0].tolist() == [5, 1, 7, 106, 8]  # input untouched
    out, fin = S.truncate_at_stop_ids(t, [1], 0, was_finished=torch.tensor([False, False, True, False]))
    assert out[2].tolist() == [0] * 5 and fin.tolist() == [True, True, True, True]
    out, fin = S.truncate_at_stop_ids(t, [106], None)
    assert torch.equal(out, t) and fin.tolist() == [True, False, False, False]


@pytest.mark.parametrize("bad", [dict(t_min=0.8, t_max=0.8), dict(t_min=-0.1), dict(t_max=float("inf")),
                                 dict(num_steps=0), dict(num_steps=2.0), dict(stop="stable"), dict(accept=0.1)])
def test_step_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        S.StepConfig(**bad)


@pytest.mark.parametrize("make", [lambda: S.entropy_bound(0.0), lambda: S.token_stable(-1), lambda: S.token_stable(1.0),
                                  lambda: S.mean_entropy_below(0), lambda: S.confidence_threshold(float("nan"))])
def test_rule_factories_reject_bad_values(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("text, message", [("confidence:2", "must be in (0, 1], got 2.0"),
                                           ("confidence:1.0001", "a probability"), ("confidence:0", "> 0")])
def test_a_confidence_threshold_is_a_probability(text, message):
    """--accept confidence:T (and the server's "acceptance") refuses T outside (0, 1] with a message saying why."""
    from dgemma.argtypes import accept_rule
    with pytest.raises(ValueError, match=re.escape(message)):
        accept_rule(text)
    with pytest.raises(ValueError, match="probability"):
        S.confidence_threshold(1.5)
    assert repr(accept_rule("confidence:1")) == "confidence_threshold(1.0)"  # 1: only each row's top position


@pytest.mark.parametrize("text, message", [
    ("quota:1.5", "'1.5' is not a whole number"), ("entropy:x", "'x' is not a number"),
    ("linear-quota:4", "linear-quota takes no number; its step count is the call's max_denoising_steps (--steps)")])
def test_a_rule_with_a_bad_number_says_what_it_takes(text, message):
    """'quota:1.5' said "'1.5' is not a int" and 'linear-quota:4' was an "unknown acceptance rule"."""
    with pytest.raises(ValueError, match=re.escape(message)):
        S.parse_accept(text)


def test_from_generation_config_none_disables_stop():
    assert S.StepConfig.from_generation_config(confidence_threshold=None).stop is None
    assert S.StepConfig.from_generation_config().stop.num_history == 1


def run(seed, cfg, logits):
    g = torch.Generator().manual_seed(seed)
    state = S.init_state(S.init_canvas(logits.shape[0], L, V, g), cfg)
    for _ in range(cfg.num_steps):
        state = S.step(logits, state, cfg, g)
    return state


def test_reproducible_and_global_rng_untouched():
    logits, cfg = torch.randn(3, L, V) * 3, S.StepConfig(num_steps=4, stop=None)
    before = torch.get_rng_state()
    a, b, c = run(7, cfg, logits), run(7, cfg, logits), run(8, cfg, logits)
    assert torch.equal(torch.get_rng_state(), before)  # an explicit generator never draws from the global one
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_frozen_rows_and_per_row_steps():
    cfg = S.StepConfig(num_steps=6, t_min=0.0, t_max=1.2, stop=None)
    g = torch.Generator().manual_seed(0)
    state = S.step(torch.randn(3, L, V), S.init_state(S.init_canvas(3, L, V, g), cfg), cfg, g)
    # Put the rows at different steps: row 0 done, row 1 after 2 steps, row 2 exhausted (n would be 0, T = t_min = 0).
    state = dataclasses.replace(state, done=torch.tensor([True, False, True]), num_steps_taken=torch.tensor([1, 2, 6]))
    logits = torch.randn(3, L, V)
    new = S.step(logits, state, cfg, g)  # must not raise on the exhausted row (multinomial on finite probs)
    for name in ("tokens", "argmax", "sc_logits", "entropy", "confidence", "accepted"):
        old, cur = getattr(state, name), getattr(new, name)
        assert torch.equal(cur[[0, 2]], old[[0, 2]]), name
    assert new.num_steps_taken.tolist() == [1, 3, 6]
    # Row 1 is at countdown n = 6 - 2 = 4: T = 0 + 1.2 * 4 / 6.
    torch.testing.assert_close(new.sc_logits[1], logits[1] / (1.2 * 4 / 6))
    assert not torch.equal(new.tokens[1], state.tokens[1])


def test_sampling_imports_no_model_or_engine():
    for path in pathlib.Path(S.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[-1] in ("model", "engine") or "dgemma.model" in n
                               or "dgemma.engine" in n for n in names), (path.name, names)


def test_inverse_cdf_sampler_matches_the_distribution():
    """Chi-square goodness of fit of the fast sampler against the exact probabilities (and the reference sampler
    against the same probabilities, as a control). 20k draws per row over 12 categories incl. zeros and a 1e-3."""
    from dgemma.sampling import sample_inverse_cdf, sample_reference

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 1, 12, generator=g) * 2, dim=-1)
    probs[0, 0, 3] = 0.0  # impossible category must never be drawn
    probs[1, 0, 5] = 1e-3
    probs = probs / probs.sum(-1, keepdim=True)
    n = 20_000
    big = probs.expand(3, n, 12).contiguous()
    for sampler in (sample_inverse_cdf, sample_reference):
        draws = sampler(big, torch.Generator().manual_seed(1))
        assert draws.shape == (3, n) and draws.dtype == torch.int64
        assert not (draws[0] == 3).any()
        counts = torch.stack([torch.bincount(draws[r], minlength=12) for r in range(3)]).double()
        expected = probs[:, 0].double() * n
        keep = expected > 5
        chi2 = (((counts - expected) ** 2 / expected.clamp(min=1e-12)) * keep).sum(-1)
        # 11 degrees of freedom: P(chi2 > 35) ~ 2.5e-4 per row under the null
        assert (chi2 < 35).all(), (sampler.__name__, chi2)


def test_inverse_cdf_sampler_is_reproducible_and_never_out_of_range():
    from dgemma.sampling import sample_inverse_cdf

    probs = torch.zeros(2, 4, 7)
    probs[..., -1] = 1.0  # all mass on the last id: rounding must not step past it
    assert (sample_inverse_cdf(probs, torch.Generator().manual_seed(3)) == 6).all()
    p = torch.softmax(torch.randn(2, 4, 7), -1)
    a = sample_inverse_cdf(p, torch.Generator().manual_seed(5))
    b = sample_inverse_cdf(p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
