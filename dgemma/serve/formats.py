"""Engine events -> OpenAI JSON: whole responses, stream chunks and draft frames (decisions: see http.py).

One Format per request. Streaming: `start()`, then `piece(kind, text)` per delta and `draft(event)`, then
`finish(done)` and, with include_usage, `usage_chunk(done)`. Non-streaming: `add(text_event)` per Text event,
then `response(done)`. The text of either way is built from the same Text events, so they cannot disagree.
"""

from __future__ import annotations

import time
import uuid
from importlib.metadata import PackageNotFoundError, version

from ..engine.stream import Done, Draft, Text
from ..text.specials import TOOL_CALL_END, TOOL_CALL_START
from ..text.toolcalls import parse_tool_call


def package_version() -> str:
    try:
        return version("dgemma")
    except PackageNotFoundError:  # run from a source tree
        return "0+unknown"


class Format:
    prefix = object = chunk_object = ""

    def __init__(self, model: str, include_usage: bool, tokenizer):
        self.model, self.include_usage, self.tokenizer = model, include_usage, tokenizer
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.answer: list[str] = []
        self.thinking: str | None = None  # None: no thinking text at all
        self.tool_calls: list[str] = []

    def envelope(self, object: str, choices: list, **extra) -> dict:
        body = {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": f"dgemma-{package_version()}", "choices": choices}
        if self.include_usage and object == self.chunk_object:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        body.update(extra)
        return body

    def start(self) -> list[dict]:
        return []

    def draft(self, d: Draft) -> dict:
        draft = {"canvas": d.canvas_index, "step": d.step, "text": d.text,
                 "tokens": [self.tokenizer.decode([i], skip_special=False) for i in d.token_ids],
                 "confidence": [round(c, 4) for c in d.confidence]}
        return self.chunk({}, dgemma_draft=draft)

    def finish(self, done: Done) -> dict:
        return self.chunk({}, done.finish_reason, dgemma=done.stats())

    def usage_chunk(self, done: Done) -> dict:
        return self.envelope(self.chunk_object, [], usage=done.usage())

    def add(self, event: Text) -> None:
        if event.kind == "thinking":
            self.thinking = (self.thinking or "") + event.text
        elif event.kind == "tool_call":
            self.tool_calls.append(event.text)
        else:
            self.answer.append(event.text)


class ChatFormat(Format):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def chunk(self, delta: dict, finish_reason=None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_object, [choice], **extra)

    def start(self) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def piece(self, kind: str, text: str) -> dict:
        if kind == "tool_call":
            self.tool_calls.append(text)
            return self.chunk({"tool_calls": [{"index": len(self.tool_calls) - 1, **self.tool_call(text)}]})
        return self.chunk({"reasoning_content" if kind == "thinking" else "content": text})

    @staticmethod
    def tool_call(raw: str) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": parse_tool_call(raw)}

    def response(self, done: Done) -> dict:
        answer = "".join(self.answer)
        message = {"role": "assistant", "content": answer if answer or not self.tool_calls else None}
        if self.thinking is not None:
            message["reasoning_content"] = self.thinking
        if self.tool_calls:
            message["tool_calls"] = [self.tool_call(c) for c in self.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return self.envelope(self.object, [choice], usage=done.usage(), dgemma=done.stats())


class CompletionFormat(Format):
    """Raw text completion: tool calls stay in the text with their markers; thinking goes to reasoning_content."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def chunk(self, delta: dict, finish_reason=None, **extra) -> dict:
        choice = {"index": 0, "text": "", **delta, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_object, [choice], **extra)

    def piece(self, kind: str, text: str) -> dict:
        if kind == "thinking":
            return self.chunk({"reasoning_content": text})
        return self.chunk({"text": TOOL_CALL_START + text + TOOL_CALL_END if kind == "tool_call" else text})

    def add(self, event: Text) -> None:
        if event.kind == "tool_call":
            event = Text(TOOL_CALL_START + event.text + TOOL_CALL_END, "answer")
        super().add(event)

    def response(self, done: Done) -> dict:
        choice = {"index": 0, "text": "".join(self.answer), "logprobs": None, "finish_reason": done.finish_reason}
        if self.thinking is not None:
            choice["reasoning_content"] = self.thinking
        return self.envelope(self.object, [choice], usage=done.usage(), dgemma=done.stats())
