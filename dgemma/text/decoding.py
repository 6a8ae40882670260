"""Ids -> text, one-shot and streaming, for byte-fallback vocabularies (Gemma family).

Why not just `tokenizers.Tokenizer.decode`? Its ByteFallback decoder turns a whole run of
`<0xNN>` tokens into U+FFFD as soon as one byte of the run is invalid, so the text of a prefix can
change when more ids arrive ("é" becomes "���" once a stray continuation byte follows). Streaming
must never take text back, so we decode byte runs ourselves with Python's UTF-8 decoder (which
replaces only the bad bytes and is local: text decoded up to a complete character never changes)
and hand everything else to the tokenizer's own decoder chain (Replace "▁", Fuse, Strip...), so
ordinary text decodes exactly as the library does. The two differ only on invalid byte sequences.
"""

from __future__ import annotations

import codecs
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

Piece = str | int  # a token's text, or the byte value of a byte-fallback token


def as_ids(tok: Tokenizer, ids: Iterable[int]) -> list[int]:
    """Ids as a list of ints; a negative or non-integer id is a ValueError naming it."""
    if hasattr(ids, "tolist"):  # a torch tensor / numpy array: one conversion, not one per id
        ids = ids.tolist()
    out: list[int] = []
    for i in ids:
        try:
            i = operator.index(i)  # ints, numpy and torch integers; not 1.5 (int() would quietly make it 1)
        except TypeError:
            raise ValueError(f"token ids must be integers, got {i!r}") from None
        if i < 0:
            raise ValueError(f"token id {i} is negative; token ids are in [0, {tok.vocab_size})")
        out.append(i)
    return out


def to_pieces(tok: Tokenizer, ids: Iterable[int], *, skip_special: bool) -> list[Piece]:
    """Ids -> pieces. A negative or non-integer id is a ValueError naming it; an id at or past the tokenizer's
    vocabulary becomes U+FFFD (a model head padded beyond it can sample one: a stream must not crash mid-answer)."""
    size = tok.vocab_size
    out: list[Piece] = []
    for i in as_ids(tok, ids):
        if skip_special and i in tok.special_id_set:
            continue
        piece = tok.backend.id_to_token(i) if i < size else None
        if piece is None:
            out.append("\ufffd")
            continue
        m = _BYTE_PIECE.fullmatch(piece)
        out.append(int(m.group(1), 16) if m and i not in tok.added_id_set else piece)
    return out


def render(tok: Tokenizer, pieces: Sequence[Piece]) -> str:
    """Join pieces: byte runs via UTF-8 (bad bytes -> U+FFFD), the rest via the decoder chain."""
    strings: list[str] = []
    run = bytearray()
    for p in pieces:
        if isinstance(p, int):
            run.append(p)
            continue
        if run:
            strings.append(run.decode("utf-8", "replace"))
            run.clear()
        strings.append(p)
    if run:
        strings.append(run.decode("utf-8", "replace"))
    decoder = tok.backend.decoder
    return decoder.decode(strings) if decoder is not None else "".join(strings)


def pending_bytes(pieces: Sequence[Piece]) -> int:
    """How many trailing byte pieces form an unfinished UTF-8 character (0-3).

    A pending character always starts at a lead byte within the last three bytes, and lead bytes
    are never valid continuation bytes, so looking at the last four bytes is enough.
    """
    tail = bytearray()
    for p in reversed(pieces[-4:]):
        if not isinstance(p, int):
            break
        tail.insert(0, p)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    dec.decode(bytes(tail), final=False)
    return len(dec.getstate()[0])


class StreamDecoder:
    """Turn ids arriving in chunks into text deltas that are final.

    `push(ids)` returns only text that no later id can change: an unfinished multi-byte character
    (split over byte-fallback tokens) is held back until its last byte arrives. Concatenating every
    `push` result and `flush()` gives exactly `tokenizer.decode(all_ids)`.

    Decoding is redone over a short window (the previous delta's pieces plus the new ones) rather
    than per piece, because some decoder chains treat the first token specially (e.g. strip a
    leading space); both window decodes share the same first token, so their difference is exact.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        # The window: the pieces of the last emitted delta, then pieces not yet emitted.
        self._pieces: list[Piece] = []
        self._read = 0  # how many pieces at the start of the window are already emitted

    def push(self, ids: Iterable[int]) -> str:
        self._pieces += to_pieces(self.tokenizer, ids, skip_special=self.skip_special)
        return self._emit_until(len(self._pieces) - pending_bytes(self._pieces))

    def flush(self) -> str:
        """Emit everything left, an unfinished character as U+FFFD (as the full decode does)."""
        return self._emit_until(len(self._pieces))

    def _emit_until(self, end: int) -> str:
        if end <= self._read:
            return ""
        before = render(self.tokenizer, self._pieces[: self._read])
        after = render(self.tokenizer, self._pieces[:end])
        # Slide the window: keep only this delta's pieces as context for the next one.
        del self._pieces[: self._read]
        self._read = end - self._read
        return after[len(before) :]


def decode_incremental(
    tokenizer: Tokenizer, chunks: Iterable[Iterable[int]], *, skip_special: bool = True
) -> Iterator[str]:
    """Yield final text for each chunk of ids (empty deltas are skipped), then the remainder."""
    stream = StreamDecoder(tokenizer, skip_special=skip_special)
    for ids in chunks:
        if delta := stream.push(ids):
            yield delta
    if tail := stream.flush():
        yield tail
