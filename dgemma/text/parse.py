"""Generated text -> thinking / answer / tool calls, one-shot or streaming; stop strings.

Input is text decoded with `skip_special=False`: the special-token strings are the structure.

    <|channel>thought\\n ... <channel|>     thinking (the header line up to "\\n" is dropped)
    <|tool_call> ... <tool_call|>          one tool call, its text kept verbatim (including the
                                           <|"|> string quotes), for the caller to interpret
    <turn|> | <eos> | <|tool_response>     end of the output: the rest is ignored (spec §2.3); one that is
                                           not a stop id is dropped instead (OutputSplitter's `ends`)
    <pad>                                  dropped
    anything else                          answer text, other specials kept as written

An unterminated thought channel is thinking up to the end (the model was cut off while thinking);
an unterminated tool call is left in the answer verbatim, so nothing is lost and a half-written
call is never run. `parse_output` is `OutputSplitter` fed at once, so streaming and one-shot
parsing cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .specials import (
    CHANNEL_END,
    CHANNEL_START,
    EOS,
    PAD,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    TURN_END,
)

END_MARKERS = (TURN_END, EOS, TOOL_RESPONSE_START)
_ENDS = (*END_MARKERS, PAD)  # PAD is in every state's list too
# Markers each state reacts to. No marker occurs inside another, so the earliest complete match in
# the buffer is always the right one, even when another marker's start is still arriving.
_MARKERS = {
    "answer": (CHANNEL_START, TOOL_CALL_START, *_ENDS),
    "header": ("\n", CHANNEL_END, *_ENDS),
    "thinking": (CHANNEL_END, *_ENDS),
    "tool": (TOOL_CALL_END, *_ENDS),
}


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
    """Classify text as it arrives: `feed(text)` -> list[Delta], then `finish()`; `result()`.

    `ends`: the end markers that end the output (default all three); one left out is dropped like <pad> and the
    text after it is kept (generation that does not stop at that token, e.g. the server's ignore_eos)."""

    def __init__(self, ends: Iterable[str] = END_MARKERS) -> None:
        ends = tuple(ends)
        if not set(ends) <= set(END_MARKERS):
            raise ValueError(f"ends must be among {END_MARKERS}, got {ends}")
        self.ends = ends
        self.state = "answer"  # answer | header | thinking | tool | done
        self._buf = ""  # text not yet classified (at most a partial marker between feeds)
        self._tool = ""  # body of the tool call being read
        self.thinking: str | None = None
        self.answer = ""
        self.tool_calls: list[str] = []

    @property
    def done(self) -> bool:
        """True once an end marker was seen: later text is ignored."""
        return self.state == "done"

    def feed(self, text: str) -> list[Delta]:
        if self.state == "done":
            return []
        self._buf += text
        out: list[Delta] = []
        while self.state != "done":
            markers = _MARKERS[self.state]  # an end marker not in `ends` is still matched (and dropped)
            hits = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
            if not hits:
                keep = _partial_len(self._buf, markers)
                self._emit(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                break
            i, marker = min(hits)
            self._emit(self._buf[:i], out)
            self._buf = self._buf[i + len(marker) :]
            self._transition(marker, out)
        return out

    def finish(self) -> list[Delta]:
        """End of input: release held text; an unterminated tool call becomes answer text."""
        out: list[Delta] = []
        if self.state != "done":
            self._emit(self._buf, out)
            if self.state == "tool":
                self._emit_as("answer", TOOL_CALL_START + self._tool, out)
            self.state = "done"
        self._buf = ""
        return out

    def result(self) -> ParsedOutput:
        return ParsedOutput(self.thinking, self.answer, list(self.tool_calls))

    def _transition(self, marker: str, out: list[Delta]) -> None:
        if marker == PAD or (marker in END_MARKERS and marker not in self.ends):
            return
        if marker in END_MARKERS:
            if self.state == "tool":  # cut off inside a call: keep it as text, never run it
                self._emit_as("answer", TOOL_CALL_START + self._tool, out)
            self.state = "done"
        elif marker == CHANNEL_START:
            self.state = "header"
            self.thinking = self.thinking or ""
        elif marker == "\n":
            self.state = "thinking"  # the header line ("thought") is not part of the thinking
        elif marker == CHANNEL_END:
            self.state = "answer"
        elif marker == TOOL_CALL_START:
            self.state, self._tool = "tool", ""
        elif marker == TOOL_CALL_END:
            self.tool_calls.append(self._tool)
            out.append(Delta("tool_call", self._tool))
            self.state = "answer"

    def _emit(self, text: str, out: list[Delta]) -> None:
        if self.state == "tool":
            self._tool += text
        elif self.state in ("answer", "thinking"):
            self._emit_as(self.state, text, out)
        # header text (the channel name) is dropped

    def _emit_as(self, kind: str, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if kind == "answer":
            self.answer += text
        else:
            self.thinking = (self.thinking or "") + text
        out.append(Delta(kind, text))


def parse_output(text: str, ends: Iterable[str] = END_MARKERS) -> ParsedOutput:
    """Split one generated output (decoded with specials kept) into thinking, answer, tool calls; `ends` as for
    OutputSplitter."""
    splitter = OutputSplitter(ends)
    splitter.feed(text)
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
