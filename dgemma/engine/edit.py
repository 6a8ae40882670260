"""In-place edit: re-denoise one span of an existing text with everything else fixed (infill seeded by the old span).

An edit is an infill (engine/infill.py) whose prefix is the text before the span and whose suffix is the text after
it, with two differences:
  * the span's free positions START from the old span's tokens instead of uniform noise, each one kept with
    probability 1 - strength (strength 1.0 = a fresh infill, 0.0 = start from the old span exactly). Diffusion can
    do this and a left-to-right model cannot: the first step reads the old text in place, and self-conditioning
    carries what it made of it into the later steps;
  * with an instruction, the encoder context is a chat turn holding the instruction and the old span, and the
    answer starts with the text before the span (the model rewrites the span in place, mid-answer).
Candidate lengths centre on the old span's length (the same junction scoring picks one; a length that would fill
its last canvas, leaving the text after it unseen, is made a little shorter, as for an infill); a span that ends
the text has no junction to score and keeps its length. Text outside the span is returned byte-identical: the result is
before + new span + after, as strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .generate import seeded_generator
from .infill import InfillResult, check_count, infill, visible_length

LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+\Z")


@dataclass
class EditResult:
    text: str  # the whole edited text
    old_span: str
    new_span: str
    start: int  # character offsets of the span in the ORIGINAL text
    end: int
    infill: InfillResult


def line_span(text: str, first: int, last: int) -> tuple[int, int]:
    """Character offsets [start, end) of 1-based lines first..last (inclusive), without the last line's newline.
    Lines end at \n, \r\n or \r, as editors count them (not at form feeds or U+2028, which splitlines takes)."""
    lines = LINE.findall(text)
    if first > last:
        raise ValueError(f"lines {first}-{last}: the first line comes after the last; give N-M with N <= M")
    if not 1 <= first <= last <= len(lines):
        raise ValueError(f"lines {first}-{last} are outside the text's {len(lines)} lines (1-based, inclusive)")
    start = sum(len(x) for x in lines[: first - 1])
    end = start + sum(len(x) for x in lines[first - 1: last])
    if lines[last - 1].endswith(("\r\n",)):
        end -= 2
    elif lines[last - 1].endswith(("\n", "\r")):
        end -= 1
    return start, end


def edit_lengths(old: int, num_candidates: int, canvas_length: int | None = None, num_suffix: int = 0) -> list[int]:
    """Candidate span lengths around the old one: the old length first, then shorter and longer; with the canvas
    length, each one that would fill its last canvas (the suffix unseen, the row unscored) a little shorter."""
    factors = [1.0, 0.75, 1.5, 0.5, 2.0, 1.25][:num_candidates]
    lengths = [max(1, round(old * f)) for f in factors]
    if canvas_length is not None:
        lengths = [visible_length(m, canvas_length, num_suffix) for m in lengths]
    return sorted(set(lengths))


def edit(engine, text: str, start: int, end: int, *, instruction: str | None = None, strength: float = 0.5,
         span_tokens: int | None = None, num_candidates: int = 3, seed: int | None = None, **options) -> EditResult:
    """Rewrite text[start:end]; everything else stays byte-identical. Options as for `infill`."""
    if not isinstance(text, str):
        raise ValueError("text must be a string")
    if start > end:
        raise ValueError(f"span start {start} is after its end {end}; give start <= end (start == end inserts there)")
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"span [{start}, {end}) is outside the text of {len(text)} characters")
    if span_tokens is not None and (isinstance(span_tokens, bool) or not isinstance(span_tokens, int)
                                    or span_tokens < 1):
        raise ValueError(f"span_tokens must be an int >= 1 (the new span's length in tokens), got {span_tokens!r}")
    if {"middle_tokens", "max_middle_tokens", "seeds_from"} & set(options):
        raise ValueError("edit sets the middle itself: give span_tokens (the new span's length), not middle_tokens, "
                         "max_middle_tokens or seeds_from")
    check_count("num_candidates", num_candidates)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    tok = engine.require_tokenizer()
    before, old, after = text[:start], text[start:end], text[end:]
    old_ids = tok.encode(old, add_bos=False) if old else []
    g = seeded_generator(0 if seed is None else seed)
    keep = (torch.rand(len(old_ids), generator=g) >= strength).tolist()
    seeds = [i if k else -1 for i, k in zip(old_ids, keep)]
    prompt = None
    if instruction is not None:
        prompt = f"{instruction}\n\nThe part to rewrite:\n{old}" if old else instruction
    if span_tokens is not None:
        lengths = span_tokens
    elif not after:  # no text after the span, no junction to score: lengths would all tie (and the shortest win),
        lengths = max(1, len(old_ids))  # so the span keeps its length
    else:
        num_suffix = len(tok.encode(after, add_bos=False))
        lengths = edit_lengths(max(1, len(old_ids)), num_candidates, engine.config.canvas_length, num_suffix)
    result = infill(engine, before, after, instruction=prompt, seed=seed, seeds_from=seeds, middle_tokens=lengths,
                    **options)
    return EditResult(before + result.middle + after, old, result.middle, start, end, result)
