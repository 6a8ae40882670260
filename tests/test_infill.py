"""Infill (dgemma/engine/infill.py): prefix and suffix come back byte-identical, the suffix is clamped in the canvas,
the middle holds no special token, and the junction score picks the right length when the model knows the answer."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.engine.engine import Engine
from dgemma.engine.generate import Commit, canvas_loop, step_config
from dgemma.engine.infill import InfillPlan, candidate_lengths, middle_class, row_layout

FAST = {"max_denoising_steps": 3, "seed": 0}


@pytest.mark.parametrize("prefix,suffix,options", [
    ("def main():\n    ", "\n    return 0\n", {}),
    ("", "tail only ü", {"middle_tokens": 5}),
    ("héllo wörld {", "", {"num_candidates": 2}),
    ("A causal encoder ", " the prompt. " * 30, {"num_candidates": 2}),  # suffix longer than a canvas
    ("x = [", "]\n", {"middle_tokens": 80}),  # the middle spans two canvases
])
def test_prefix_and_suffix_are_byte_identical(random_engine, prefix, suffix, options):
    r = random_engine.infill(prefix, suffix, **FAST, **options)
    assert r.text == prefix + r.middle + suffix
    assert r.text.startswith(prefix) and r.text.endswith(suffix)
    assert len(r.middle_ids) == r.middle_tokens
    tok = random_engine.tokenizer
    assert not set(r.middle_ids) & (tok.added_id_set | set(tok.stop_ids))
    assert r.candidates[0][0] == r.middle_tokens if suffix else r.candidates == []  # empty suffix: a continuation
    if "middle_tokens" in options:
        assert r.middle_tokens == options["middle_tokens"]


def test_suffix_and_eos_are_clamped_in_the_committed_canvases(random_engine):
    tok, L = random_engine.tokenizer, random_engine.config.canvas_length
    suffix_ids = tok.encode(" the prompt; the same weights", add_bos=False)
    lengths = [10, 30, 70]
    plan = InfillPlan(lengths, suffix_ids, tok.eos_id, L, middle_class(tok, random_engine.config.vocab_size))
    gen = random_engine.generation_settings(max_new_tokens=plan.num_canvases * L, eos_token_id=[],
                                            max_denoising_steps=3)
    ctx = torch.tensor([tok.encode("A causal encoder")] * 3)
    commits = [e for e in canvas_loop(random_engine.module, ctx, gen, step_config(gen, sampling="fast"),
                                      generator=torch.Generator().manual_seed(0), plan=plan) if isinstance(e, Commit)]
    tokens = torch.cat([c.tokens for c in commits], dim=1)
    clamped = plan.layout >= 0
    assert torch.equal(tokens[clamped], plan.layout[clamped])
    for r, m in enumerate(lengths):  # the suffix starts right after the middle, in the middle's last canvas
        assert tokens[r, m: m + len(suffix_ids)].tolist() == suffix_ids
    assert plan.num_canvases == 2 and commits[1].num_steps[:2].tolist() == [0, 0]  # rows done in canvas 0: no steps
    assert torch.isfinite(plan.scores).all()


def test_layout_and_candidates():
    assert row_layout(3, [7, 8], 1, 4, 8) == [-1, -1, -1, 7, 1, 1, 1, 1]
    assert row_layout(5, [7, 8, 9], 1, 4, 8) == [-1, -1, -1, -1, -1, 7, 8, 9]
    for m in candidate_lengths(64, 20, max_middle=200, num_candidates=7):
        assert m % 64 and 64 - m % 64 >= 4  # the junction stays visible in the middle's last canvas
    with pytest.raises(ValueError, match="max_middle_tokens"):
        candidate_lengths(64, 3, max_middle=0, num_candidates=2)


class KnowingModel(torch.nn.Module):
    """A stand-in denoiser that has memorised one canvas, `truth`: it predicts truth[p] at every position p
    whatever the input. (The infill plan, the sampler and the loop are the real ones.)"""

    def __init__(self, config, truth: list[int]):
        super().__init__()
        self.config = config
        self.embed_tokens = torch.nn.Embedding(1, 1)
        logits = torch.full((config.canvas_length, config.vocab_size), -8.0)
        logits[torch.arange(len(truth)), torch.tensor(truth)] = 8.0
        self.logits = logits

    def encode(self, tokens, cache, valid=None, return_hidden=False):
        return None

    def soft_embedding(self, sc_logits, chunk=None):
        return None

    def denoise(self, tokens, cache, soft=None, return_hidden=False):
        return self.logits[None].expand(tokens.shape[0], -1, -1).clone()  # its "hidden states" are the logits

    def head(self, hidden, out=None):
        return hidden if out is None else out.copy_(hidden)


def test_junction_score_picks_the_true_length(random_engine):
    tok = random_engine.tokenizer
    middle_ids = tok.encode(" denoise a canvas of tokens in parallel", add_bos=False)
    suffix = ". Each step samples every position"
    suffix_ids = tok.encode(suffix, add_bos=False)
    L = random_engine.config.canvas_length
    truth = middle_ids + suffix_ids + [tok.eos_id] * (L - len(middle_ids) - len(suffix_ids))
    knowing = Engine(KnowingModel(random_engine.config, truth), tokenizer=tok)
    n = len(middle_ids)
    r = knowing.infill("The same weights", suffix, middle_tokens=[n - 2, n, n + 3, n + 9], seed=0,
                       max_denoising_steps=4)
    assert r.middle_tokens == n and r.middle_ids == middle_ids
    assert r.candidates[0][1] > r.candidates[1][1]


def test_an_empty_suffix_continues_the_prefix(random_engine):
    """No suffix, no junction to score: one free row, cut exactly at max_middle_tokens or at the first stop id
    (before, candidate lengths raced on scores that all tied, and the shortest won whatever the text)."""
    tok = random_engine.tokenizer
    for limit in (5, 20, 70):  # inside one canvas, and past it (two canvases)
        r = random_engine.infill("x = ", "", max_middle_tokens=limit, **FAST)
        assert r.candidates == [] and r.text == "x = " + r.middle and len(r.middle_ids) == r.middle_tokens
        assert r.middle_tokens == limit and not set(r.middle_ids) & set(tok.stop_ids)  # the random model never stops
    from dgemma.bundled import PACKAGED
    engine = dgemma.load(PACKAGED, quiet=True)  # a trained model: its answer ends with a stop id
    r = engine.infill("def is_prime(n):\n    ", "", seed=0, max_denoising_steps=8)
    assert r.candidates == [] and 0 < r.middle_tokens < engine.config.canvas_length  # it ended before the limit
    assert r.steps_per_canvas and max(r.steps_per_canvas) <= 8


def test_bad_input_is_refused(random_engine):
    with pytest.raises(ValueError, match="middle_tokens"):
        random_engine.infill("a", "b", middle_tokens=0)
    with pytest.raises(ValueError, match="strings"):
        random_engine.infill(None, "b")
    with pytest.raises(ValueError, match="middle_tokens .* or max_middle_tokens .*, not both"):  # was: max ignored
        random_engine.infill("a", "b", middle_tokens=3, max_middle_tokens=8)
    with pytest.raises(ValueError, match="max_middle_tokens"):  # the engine's own advice named max_tokens
        random_engine.infill("a", "b", max_middle_tokens=random_engine.config.max_position_embeddings)


def test_an_explicit_length_that_hides_the_suffix_is_warned_about(random_engine):
    """middle_tokens = a whole canvas puts the suffix in the next canvas, where the middle never sees it: the
    caller's length is kept (the result has it) but a warning says so and names a length that keeps it in sight;
    a length that leaves room warns nothing."""
    import warnings

    L = random_engine.config.canvas_length
    options = dict(max_denoising_steps=2, seed=0)
    with pytest.warns(UserWarning, match=rf"middle_tokens {L}: .*{L} -> {L - 4} would keep the suffix in sight"):
        r = random_engine.infill("def f(x):\n", "\n    return y\n", middle_tokens=L, **options)
    assert r.middle_tokens == L
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random_engine.infill("def f(x):\n", "\n    return y\n", middle_tokens=L - 4, **options)


def test_cli_infill(random_model_dir, tmp_path, capsys):
    (tmp_path / "a.py").write_text("def main():\n    ")
    (tmp_path / "b.py").write_text("\n    return 0\n")
    assert main(["infill", "--model", str(random_model_dir), "--prefix-file", str(tmp_path / "a.py"), "--suffix-file",
                 str(tmp_path / "b.py"), "--steps", "2", "--seed", "0", "--full"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def main():\n    ") and out.endswith("\n    return 0\n")
    assert main(["infill", "--model", str(random_model_dir), "--prefix-file", str(tmp_path / "a.py"), "--suffix-file",
                 str(tmp_path / "b.py"), "--steps", "2", "--seed", "0", "--full", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # --full beside --json: the whole text too (it was silently dropped)
    assert r["text"] == "def main():\n    " + r["middle"] + "\n    return 0\n"
    assert main(["infill", "--model", str(random_model_dir), "--prefix-file", str(tmp_path / "missing"),
                 "--suffix-file", str(tmp_path / "b.py")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    assert main(["infill", "--model", str(random_model_dir), "--prefix-file", str(tmp_path / "latin1.py"),
                 "--suffix-file", str(tmp_path / "b.py")]) == 2  # said only "'utf-8' codec can't decode byte ..."
    assert "latin1.py is not UTF-8 text (byte 0xe9 at offset 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an exact length and a longest one: refused before anything loads
        main(["infill", "--prefix-file", str(tmp_path / "a.py"), "--suffix-file", str(tmp_path / "b.py"),
              "--middle-tokens", "3", "--max-middle-tokens", "8"])
    assert e.value.code == 2 and "not allowed with argument --middle-tokens" in capsys.readouterr().err
