"""In-place edits (dgemma/engine/edit.py): only the span changes; line spans; the old span seeds the canvas."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.cli import main
from dgemma.engine.edit import edit_lengths, line_span

TEXT = "line one\nline two é\nline three\n\nline five\n"


def test_line_span():
    s, e = line_span(TEXT, 2, 3)
    assert TEXT[s:e] == "line two é\nline three"
    s, e = line_span(TEXT, 5, 5)
    assert TEXT[s:e] == "line five"
    s, e = line_span("a\r\nb\r\n", 1, 1)
    assert (s, e) == (0, 1)
    text = "x = 1\f\ny\u2028z\nlast"  # a form feed and U+2028 do not end lines (editors, wc -l and sed agree)
    assert [text[slice(*line_span(text, n, n))] for n in (1, 2, 3)] == ["x = 1\f", "y\u2028z", "last"]
    for bad, message in (((0, 1), "outside"), ((3, 2), "comes after the last"), ((2, 9), "outside")):
        with pytest.raises(ValueError, match=message):
            line_span(TEXT, *bad)


@pytest.mark.parametrize("first,last,options", [(2, 3, {}), (1, 1, {"strength": 1.0}), (5, 5, {"strength": 0.0}),
                                                (4, 4, {"instruction": "Write a haiku."})])
def test_edit_changes_only_the_span(random_engine, first, last, options):
    start, end = line_span(TEXT, first, last)
    r = random_engine.edit(TEXT, start, end, max_denoising_steps=3, seed=1, num_candidates=2, **options)
    after = TEXT[end:]
    assert r.text == TEXT[:start] + r.new_span + after
    assert r.text.startswith(TEXT[:start]) and r.text.endswith(after)
    assert r.old_span == TEXT[start:end]


def test_strength_zero_starts_from_the_old_span(random_engine):
    """With nothing renoised the first decoder step reads the old span in place (observed through the plan)."""
    from dgemma.engine import infill as I

    seen = {}
    original = I.InfillPlan.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        seen["start"] = self.start.clone()

    start, end = line_span(TEXT, 2, 2)
    old_ids = random_engine.tokenizer.encode(TEXT[start:end], add_bos=False)
    I.InfillPlan.__init__ = spy
    try:
        random_engine.edit(TEXT, start, end, strength=0.0, span_tokens=len(old_ids), max_denoising_steps=2, seed=0)
    finally:
        I.InfillPlan.__init__ = original
    assert seen["start"][0, : len(old_ids)].tolist() == old_ids


def test_edit_lengths_centre_on_the_old_length():
    assert edit_lengths(20, 3) == [15, 20, 30]
    assert edit_lengths(1, 5) == [1, 2]


def test_a_span_at_the_end_keeps_its_length(random_engine):
    """Nothing after the span: no junction to score (every length tied and the shortest won); the old length stays."""
    old_tokens = len(random_engine.tokenizer.encode(TEXT[5:], add_bos=False))
    r = random_engine.edit(TEXT, 5, len(TEXT), max_denoising_steps=2, seed=0)
    assert [n for n, _ in r.infill.candidates] == [old_tokens] and r.text.startswith(TEXT[:5])


def test_bad_edits_are_refused(random_engine):
    with pytest.raises(ValueError, match="outside the text"):
        random_engine.edit(TEXT, 5, 500)
    with pytest.raises(ValueError, match="strength"):
        random_engine.edit(TEXT, 0, 4, strength=2)
    with pytest.raises(ValueError, match="after its end"):  # was "outside the text"
        random_engine.edit(TEXT, 5, 2)
    with pytest.raises(ValueError, match="lines 3-1: the first line comes after the last"):  # was "outside the text"
        line_span(TEXT, 3, 1)
    with pytest.raises(ValueError, match="span_tokens"):  # was a message about middle_tokens
        random_engine.edit(TEXT, 0, 4, span_tokens=0)
    with pytest.raises(ValueError, match="span_tokens"):  # was a TypeError (infill got middle_tokens twice)
        random_engine.edit(TEXT, 0, 4, middle_tokens=2)
    with pytest.raises(ValueError, match="span_tokens"):  # was the infill's "give middle_tokens or max_..."
        random_engine.edit(TEXT, 0, 4, max_middle_tokens=2)
    for bad in (0, -1, 1.5, True):  # as infill refuses them (edit quietly used 1)
        for call in (random_engine.edit, lambda *a, **k: random_engine.infill("a", "b", **k)):
            with pytest.raises(ValueError, match=f"num_candidates must be an int >= 1, got {bad!r}"):
                call(TEXT, 0, 4, num_candidates=bad)
    with pytest.raises(ValueError, match="max_middle_tokens must be an int >= 1, got 0"):  # was: quietly 1
        random_engine.infill("a", "b", max_middle_tokens=0)


def test_cli_edit(random_model_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    assert main(["edit", str(f), "--lines", "2-3", "--model", str(random_model_dir), "--steps", "2", "--seed", "0",
                 "--candidates", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("line one\n") and out.endswith("\n\nline five\n")
    assert main(["edit", str(f), "--lines", "7-9", "--model", str(random_model_dir)]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["edit", str(f), "--lines", "two", "--model", str(random_model_dir)]) == 2
    assert "--lines" in capsys.readouterr().err
    assert main(["edit", str(f), "--lines", "1", "--model", str(random_model_dir), "--steps", "2", "--in-place",
                 "--candidates", "1"]) == 0
    assert f.read_text().endswith("\nline two é\nline three\n\nline five\n")


def test_cli_edit_keeps_crlf_bytes_and_in_place_with_json_writes(random_model_dir, tmp_path, capsys):
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"one\r\ntwo\r\nthree\r\n")
    flags = ["--model", str(random_model_dir), "--steps", "2", "--seed", "0", "--candidates", "1"]
    assert main(["edit", str(f), "--lines", "2", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("one\r\n") and out.endswith("\r\nthree\r\n")
    assert main(["edit", str(f), "--lines", "2", "--in-place", "--json", *flags]) == 0
    r = json.loads(capsys.readouterr().out)
    assert f.read_bytes() == ("one\r\n" + r["new"] + "\r\nthree\r\n").encode()


def test_cli_edit_in_place_never_leaves_the_file_half_written(random_model_dir, tmp_path):
    """A write that fails part way (here a file-size limit, as a full disk would) leaves the original file as it
    was, and no temporary file: --in-place used to truncate the file first and then write into it."""
    f = tmp_path / "t.txt"
    original = ("line %02d of a text that is long enough\r\n" * 20) % tuple(range(20))
    f.write_bytes(original.encode())

    def limit():  # in the child: writes past 256 bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "dgemma", "edit", str(f), "--lines", "2", "--in-place", "--model",
                        str(random_model_dir), "--steps", "1", "--candidates", "1"],
                       capture_output=True, text=True, env=env, preexec_fn=limit, timeout=120)
    assert p.returncode == 2 and "File too large" in p.stderr, p.stderr
    assert f.read_bytes() == original.encode()
    assert [x.name for x in tmp_path.iterdir()] == ["t.txt"]


def test_every_raced_span_length_sees_the_text_after_it(random_engine):
    """A span of exactly one canvas (64 tokens) raced its own length as a row whose middle filled the canvas: the
    text after it fell into the next canvas, unseen, and the row had no junction to score (-inf, never chosen)."""
    tok, L = random_engine.tokenizer, random_engine.config.canvas_length
    old = " ".join(["x"] * 200)
    old = tok.decode(tok.encode(old, add_bos=False)[:L])
    assert len(tok.encode(old, add_bos=False)) == L
    text = "before\n" + old + "\nafter the span\n"
    r = random_engine.edit(text, 7, 7 + len(old), num_candidates=3, max_denoising_steps=1, seed=0)
    assert len(r.infill.candidates) == 3 and all(score > float("-inf") for _, score in r.infill.candidates)
    assert all(m % L and L - m % L >= 4 for m, _ in r.infill.candidates)
    assert r.text.startswith("before\n") and r.text.endswith("\nafter the span\n")
    assert edit_lengths(64, 3, 64, 5) == [48, 60, 96]
