"""Constrained canvases (dgemma/sampling/constraints.py): clamps never change, classes bound every token, the lean
step stays bit-equal to `step`, and acceptance/stop rules count free positions only. Synthetic logits; one test runs
the canvas loop on a tiny random model with a plan."""

from __future__ import annotations

import dataclasses
import pytest
import torch

import dgemma.sampling as S
from dgemma.sampling import constraints as C
from dgemma.sampling.lean import step_lean

FAST = S.StepConfig(num_steps=8, sample=S.sample_inverse_cdf)
FIELDS = ("tokens", "argmax", "sc_logits", "history", "stopped", "done", "num_steps_taken", "entropy", "confidence",
          "accepted")


def make_constraints(rows, length, vocab, seed, with_classes=True, with_start=False):
    g = torch.Generator().manual_seed(seed)
    clamped = torch.rand(rows, length, generator=g) < 0.4
    clamp = torch.where(clamped, torch.randint(0, vocab, (rows, length), generator=g), -1)
    allowed = classes = start = None
    if with_classes:
        allowed = torch.rand(3, vocab, generator=g) < 0.3
        allowed[:, 0] = True  # never empty
        allowed[2] = False
        allowed[2, 5] = True  # a one-token class
        classes = torch.randint(0, 3, (rows, length), generator=g)
    if with_start:
        start = torch.where(torch.rand(rows, length, generator=g) < 0.5,
                            torch.randint(0, vocab, (rows, length), generator=g), -1)
    return C.CanvasConstraints(clamp, allowed, classes, start)


def run_steps(c, rows, length, vocab, cfg, seed, lean=False, num=8):
    g = torch.Generator().manual_seed(seed)
    state = S.init_state(c.start_canvas(S.init_canvas(rows, length, vocab, g)), cfg)
    states = [state]
    for _ in range(num):
        logits = torch.randn(rows, length, vocab, generator=g) * 3
        state = step_lean(logits, state, cfg, g, chunk=5, constraints=c) if lean else \
            S.step(logits, state, cfg, g, constraints=c)
        states.append(state)
    return states


@pytest.mark.parametrize("lean", [False, True])
def test_clamped_positions_never_change_and_classes_bound_every_token(lean):
    rows, length, vocab = 3, 12, 50
    c = make_constraints(rows, length, vocab, 0)
    cfg = S.StepConfig(num_steps=8, stop=None, sample=S.sample_inverse_cdf)
    states = run_steps(c, rows, length, vocab, cfg, 1, lean=lean)
    clamped = c.clamped
    allowed_here = c.allowed[c.classes]  # [B,L,V]
    for st in states:
        assert torch.equal(st.tokens[clamped], c.clamp[clamped])
    for st in states[1:]:
        assert torch.equal(st.argmax[clamped], c.clamp[clamped])
        assert bool(st.accepted[clamped].all())
        free = ~clamped
        # the committed candidate and every kept proposal lie in the position's class
        assert bool(allowed_here.gather(-1, st.argmax[..., None]).squeeze(-1)[free].all())
        kept = free & st.accepted
        assert bool(allowed_here.gather(-1, st.tokens[..., None]).squeeze(-1)[kept].all())
        assert bool((st.entropy[clamped] == 0).all()) and bool((st.confidence[clamped] == 1).all())
        assert torch.isfinite(st.entropy).all()
        # each row keeps at least one FREE position (the rule's progress guarantee is not spent on clamps)
        assert bool((st.accepted & free).any(dim=-1).all())
    one_token = (c.classes == 2) & ~clamped
    assert bool((states[-1].argmax[one_token] == 5).all())


@pytest.mark.parametrize("rows,length,vocab,chunk", [(2, 16, 512, 5), (3, 17, 1000, 7), (2, 4, 40000, 1)])
def test_lean_step_equals_step_with_constraints(rows, length, vocab, chunk):
    c = make_constraints(rows, length, vocab, rows + length, with_start=True)
    g = torch.Generator().manual_seed(3)
    state = S.init_state(c.start_canvas(S.init_canvas(rows, length, vocab, g)), FAST)
    for i in range(3):
        logits = torch.randn(rows, length, vocab, generator=g) * 4
        ga, gb = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        a = S.step(logits.clone(), state, FAST, ga, constraints=c)
        b = step_lean(logits.clone(), state, FAST, gb, chunk=chunk, constraints=c)
        for name in FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y), name
        state = a


def test_no_constraints_is_the_unconstrained_step():
    rows, length, vocab = 2, 10, 300
    g = torch.Generator().manual_seed(0)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), FAST)
    logits = torch.randn(rows, length, vocab, generator=g)
    a = S.step(logits, state, FAST, torch.Generator().manual_seed(1))
    b = S.step(logits, state, FAST, torch.Generator().manual_seed(1), constraints=S.free_constraints(rows, length))
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_start_tokens_seed_free_positions_and_clamps_win():
    clamp = torch.tensor([[7, -1, -1, 3]])
    start = torch.tensor([[1, 2, -1, 4]])
    c = C.CanvasConstraints(clamp, start=start)
    assert c.start_canvas(torch.tensor([[9, 9, 9, 9]])).tolist() == [[7, 2, 9, 3]]


def test_acceptance_rules_rank_clamped_positions_last():
    entropy = torch.tensor([[0.0, 0.0, 0.5, 0.05, 2.0]])
    confidence = torch.tensor([[1.0, 1.0, 0.5, 0.97, 0.1]])
    c = C.CanvasConstraints(torch.tensor([[4, 4, -1, -1, -1]]))
    h, conf = C.rule_scores(entropy, confidence, c)
    kept = C.accept(S.quota_accept(conf, 1), c)
    assert kept.tolist() == [[True, True, False, True, False]]  # the quota of 1 goes to the best FREE position
    kept = C.accept(S.entropy_bound_accept(h, 0.01), c)  # 0.05 + 0.5 - 0.5 > 0.01: one free
    assert kept.tolist() == [[True, True, False, True, False]]
    kept = C.accept(S.confidence_threshold_accept(conf, 0.99), c)  # nothing free above: the free maximum is kept
    assert kept.tolist() == [[True, True, False, True, False]]


def test_stop_rules_see_free_positions_only():
    entropy = torch.tensor([[0.0] * 8 + [0.3, 0.1], [0.2, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    clamp = torch.full((2, 10), -1)
    clamp[0, :8] = 1
    clamp[1, 2:] = 1
    c = C.CanvasConstraints(clamp)
    seen = C.stop_entropy(entropy, c)
    assert torch.allclose(seen.mean(-1), torch.tensor([0.2, 0.3]))
    assert seen.amax(-1).tolist() == pytest.approx([0.3, 0.4]) and seen.amin(-1).tolist() == pytest.approx([0.1, 0.2])
    rule = S.mean_entropy_below(0.1)
    assert not bool(rule(torch.zeros(2, 10, dtype=torch.long), seen, torch.empty(0, 2, 10)).any())
    # a canvas with no free position is confident
    all_clamped = C.CanvasConstraints(torch.ones(1, 4, dtype=torch.long))
    assert C.stop_entropy(torch.zeros(1, 4), all_clamped).tolist() == [[0.0] * 4]


def test_clamped_logprob_reads_the_last_processed_logits():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    c = C.CanvasConstraints(torch.tensor([[1, -1]]))
    assert C.clamped_logprob(logits, c)[0].tolist() == pytest.approx([torch.log(torch.tensor(0.25)).item(), 0.0])


@pytest.mark.parametrize("kwargs,match", [
    ({"clamp": torch.zeros(4, dtype=torch.long)}, "int64 tensor"),
    ({"clamp": torch.zeros(1, 4, dtype=torch.long), "allowed": torch.zeros(2, 9, dtype=torch.bool),
      "classes": torch.zeros(1, 4, dtype=torch.long)}, "allow no token"),
    ({"clamp": torch.zeros(1, 4, dtype=torch.long), "allowed": torch.ones(2, 9, dtype=torch.bool)}, "together"),
    ({"clamp": torch.zeros(1, 4, dtype=torch.long), "allowed": torch.ones(2, 9, dtype=torch.bool),
      "classes": torch.full((1, 4), 2)}, "index"),
])
def test_bad_constraints_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.CanvasConstraints(**kwargs)


def test_step_refuses_mismatched_constraints():
    state = S.init_state(torch.zeros(1, 4, dtype=torch.long), FAST)
    with pytest.raises(ValueError, match="canvas"):
        S.step(torch.zeros(1, 4, 9), state, FAST, constraints=S.free_constraints(1, 5))
    with pytest.raises(ValueError, match="vocabulary"):
        C.CanvasConstraints(torch.full((1, 4), 12)).check_ids(9)


@dataclasses.dataclass
class FixedPlan:
    """Canvas 0 half clamped, canvas 1 fully clamped (no decoder steps)."""

    clamp0: torch.Tensor
    clamp1: torch.Tensor

    def for_canvas(self, index, committed):
        return C.CanvasConstraints(self.clamp0 if index == 0 else self.clamp1)

    def commit(self, index, argmax, processed):
        return argmax


def test_canvas_loop_with_a_plan_keeps_clamps_and_skips_fully_clamped_canvases(random_engine):
    from dgemma.engine.generate import Commit, Step, canvas_loop, step_config

    engine = random_engine
    L, V = engine.config.canvas_length, engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    clamp0 = torch.where(torch.arange(L) % 2 == 0, torch.randint(10, V, (L,), generator=g), -1)[None].repeat(2, 1)
    clamp1 = torch.randint(10, V, (2, L), generator=g)
    gen = engine.generation_settings(max_new_tokens=2 * L, eos_token_id=[])
    events = list(canvas_loop(engine.module, torch.tensor([[2, 40, 41], [2, 42, 43]]), gen,
                              step_config(gen, sampling="fast"), generator=g, plan=FixedPlan(clamp0, clamp1)))
    commits = [e for e in events if isinstance(e, Commit)]
    steps = [e for e in events if isinstance(e, Step)]
    assert len(commits) == 2 and steps and all(s.canvas_index == 0 for s in steps)
    clamped0 = clamp0 >= 0
    for s in steps:
        assert torch.equal(s.state.tokens[clamped0], clamp0[clamped0])
    assert torch.equal(commits[0].tokens[clamped0], clamp0[clamped0])
    assert torch.equal(commits[1].tokens, clamp1) and commits[1].num_steps.tolist() == [0, 0]
