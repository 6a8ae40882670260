"""Generated ids -> thinking / answer / tool calls, one-shot or streaming; stop strings.

Markers are special token IDS, never text: the output is decoded with the specials kept, but a marker is only ever
recognised by its id, so the model writing the characters of one as ordinary pieces ("<", "turn", "|>"), e.g. when
asked about the string "<turn|>", is answer text like any other (as the reference's tokenizer decodes it, and as
its generation stops only on the ids). The markers, by `SpecialIds` name:

    channel_start thought\\n ... channel_end    thinking (the header line up to "\\n" is dropped)
    tool_call_start ... tool_call_end         one tool call, its text kept verbatim (including the
                                              <|"|> string quotes), for the caller to interpret
    the tokenizer's stop ids                  end of the output: the rest is ignored (spec §2.3: <eos>, <turn|>,
                                              <|tool_response>, and a configured eos); one not in `ends` is
                                              dropped instead (generation that does not stop at it)
    pad                                       dropped
    any other id                              answer text, other specials kept as written

An unterminated thought channel is thinking up to the end (the model was cut off while thinking);
an unterminated tool call is left in the answer verbatim, so nothing is lost and a half-written
call is never run. `parse_output` is `OutputSplitter` fed at once, so streaming and one-shot
parsing cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .decoding import as_ids
from .specials import TOOL_CALL_START

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# The special tokens that switch the output's channel (SpecialIds names); with the tokenizer's stop ids (the end
# markers) and pad, the whole marker set: `output_markers` is its one definition.
SWITCHES = ("channel_start", "channel_end", "tool_call_start", "tool_call_end")


def output_markers(tok: Tokenizer) -> dict[int, str]:
    """Marker id -> what it does: a SWITCHES name, "end" (the tokenizer's stop ids) or "pad". Ids only: the same
    characters written as ordinary pieces are text."""
    markers = {i: name for name in SWITCHES if (i := getattr(tok.special, name)) is not None}
    markers.update({i: "pad" for i in (tok.special.pad, tok.pad_id) if i is not None})
    markers.update({i: "end" for i in tok.stop_ids})
    return markers


@dataclass
class ParsedOutput:
    thinking: str | None  # None: no thought channel in the output; "" : an empty one
    answer: str
    tool_calls: list[str] = field(default_factory=list)


class Delta(NamedTuple):
    kind: str  # "thinking" | "answer" | "tool_call" (a tool call arrives whole)
    text: str


def _partial_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class OutputSplitter:
    """Classify generated ids as they arrive: `feed(ids)` -> list[Delta], then `finish()`; `result()`.

    `ends`: the end-marker ids that end the output (default: all, the tokenizer's stop ids); one left out is
    dropped like <pad> and the text after it is kept (generation that does not stop at that token, e.g. the
    server's ignore_eos). Text is decoded as `tok.decode(ids, skip_special=False)` decodes it, streamed (an
    unfinished UTF-8 character is held until its last byte arrives)."""

    def __init__(self, tok: Tokenizer, ends: Iterable[int] | None = None) -> None:
        self.markers = output_markers(tok)
        ends = tok.stop_ids if ends is None else tuple(ends)
        if not set(ends) <= set(tok.stop_ids):
            names = ", ".join(f"{i} {tok.id_to_token(i)}" for i in tok.stop_ids)
            raise ValueError(f"ends must be among this tokenizer's end-marker ids ({names}), got {list(ends)}")
        self.ends = frozenset(ends)
        self._decoder = tok.stream(skip_special=False)
        self.state = "answer"  # answer | header | thinking | tool | done
        self._tool = ""  # body of the tool call being read
        self.thinking: str | None = None
        self.answer = ""
        self.tool_calls: list[str] = []

    @property
    def done(self) -> bool:
        """True once an end marker was seen: later ids are ignored."""
        return self.state == "done"

    def feed(self, ids: Iterable[int]) -> list[Delta]:
        ids = as_ids(self._decoder.tokenizer, ids)
        out: list[Delta] = []
        start = 0  # ids[start:i] are ordinary: decoded as one run
        for i, token in enumerate(ids):
            if self.state == "done":
                return out
            role = self.markers.get(token)
            if role is None:
                continue
            # the text before the marker is final (a marker ends any byte run); the marker's own text is decoded
            # too (the decoder's context for the text after it) but is output only where the marker is out of place
            self._text(self._decoder.push(ids[start:i]) + self._decoder.flush(), out)
            start = i + 1
            self._mark(role, token, self._decoder.push([token]), out)
        if self.state != "done":
            self._text(self._decoder.push(ids[start:]), out)
        return out

    def finish(self) -> list[Delta]:
        """End of input: release held text; an unterminated tool call becomes answer text."""
        out: list[Delta] = []
        if self.state != "done":
            self._text(self._decoder.flush(), out)
            if self.state == "tool":
                self._emit_as("answer", TOOL_CALL_START + self._tool, out)
            self.state = "done"
        return out

    def result(self) -> ParsedOutput:
        return ParsedOutput(self.thinking, self.answer, list(self.tool_calls))

    def _mark(self, role: str, token: int, written: str, out: list[Delta]) -> None:
        if role == "pad" or (role == "end" and token not in self.ends):
            return
        if role == "end":
            if self.state == "tool":  # cut off inside a call: keep it as text, never run it
                self._emit_as("answer", TOOL_CALL_START + self._tool, out)
            self.state = "done"
        elif role == "channel_start" and self.state == "answer":
            self.state = "header"
            self.thinking = self.thinking or ""
        elif role == "channel_end" and self.state in ("header", "thinking"):
            self.state = "answer"
        elif role == "tool_call_start" and self.state == "answer":
            self.state, self._tool = "tool", ""
        elif role == "tool_call_end" and self.state == "tool":
            self.tool_calls.append(self._tool)
            out.append(Delta("tool_call", self._tool))
            self.state = "answer"
        else:  # a marker out of place (a channel end in the answer, ...) is kept as written, as other specials are
            self._text(written, out)

    def _text(self, text: str, out: list[Delta]) -> None:
        if self.state == "header":  # the header line (the channel name, "thought") is dropped
            _, newline, text = text.partition("\n")
            if not newline:
                return
            self.state = "thinking"
        if self.state == "tool":
            self._tool += text
        elif self.state in ("answer", "thinking"):
            self._emit_as(self.state, text, out)

    def _emit_as(self, kind: str, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if kind == "answer":
            self.answer += text
        else:
            self.thinking = (self.thinking or "") + text
        out.append(Delta(kind, text))


def parse_output(tok: Tokenizer, ids: Iterable[int], ends: Iterable[int] | None = None) -> ParsedOutput:
    """Split one generated output (its token ids) into thinking, answer, tool calls; `ends` as for OutputSplitter."""
    splitter = OutputSplitter(tok, ends)
    splitter.feed(ids)
    splitter.finish()
    return splitter.result()


# -- stop strings ------------------------------------------------------------------------------


def find_stop(text: str, stop_strings: Iterable[str]) -> int | None:
    """Start index of the stop string that *completes* first in `text`, or None.

    "Completes first" (not "starts first") is what a stream sees, so one-shot and streaming agree:
    with stops "abcd" and "bc", text "abcd" stops at 1. Ties go to the earlier start.
    """
    best: tuple[int, int] | None = None  # (end, start)
    for s in stop_strings:
        if s and (i := text.find(s)) >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]


class StopStream:
    """Apply stop strings to streamed text: hold back a possible partial stop, cut at a full one.

    `feed(text)` -> (text safe to emit, stopped); after a stop nothing more is emitted.
    `flush()` releases held text when the stream ends without a stop.
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + text
        i = find_stop(buf, self.stop_strings)
        if i is not None:
            self._held, self.stopped = "", True
            return buf[:i], True
        keep = _partial_len(buf, self.stop_strings)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = ("" if self.stopped else self._held), ""
        return held
