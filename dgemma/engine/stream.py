"""Text streaming over the one canvas loop: typed events, exact max_tokens, stop ids and stop strings.

Events, in order, for one request (batch row 0):
    Draft  after every denoising step: the argmax canvas as text with per-position confidence
    Text   newly committed text, split by kind ("answer" or "thinking"), never anything past a stop
    Done   finish reason, usage and stats (steps per canvas, tokens per forward, time to first text, tok/s)

Committed tokens are cut at exactly `max_tokens`, and at the first stop id (kept, as the reference keeps
EOS). Stop strings apply to the answer text; the text before the stop string is emitted, nothing after.
Thinking, answer and tool calls are split at the marker tokens' ids (text/parse.py), never at their characters
written as ordinary pieces. An end marker (<eos>, <turn|>, <|tool_response>) whose token is not a stop id
(eos_token_id=[]: the server's ignore_eos) is dropped like <pad> and the text after it is kept, so the text covers
every counted token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..text.parse import OutputSplitter, ParsedOutput, StopStream
from .cache import KVCache
from .generate import seeded_generator, step_config
from .scheduler import Commit, Rows, run_alone


@dataclass
class Draft:
    canvas_index: int
    step: int
    text: str
    token_ids: list[int]
    confidence: list[float]  # per canvas position, max probability under this step's processed logits


@dataclass
class Text:
    text: str
    kind: str = "answer"  # or "thinking"


@dataclass
class Done:
    finish_reason: str  # "stop" (stop id or stop string), "length" (max_tokens), "tool_calls"
    output: ParsedOutput
    prompt_tokens: int
    completion_tokens: int
    completion_ids: list[int]
    steps_per_canvas: list[int] = field(default_factory=list)
    time_to_first_text_s: float | None = None
    wall_s: float = 0.0

    @property
    def canvases(self) -> int:
        return len(self.steps_per_canvas)

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / max(1, sum(self.steps_per_canvas))

    @property
    def tokens_per_s(self) -> float:
        """Effective speed: committed tokens / wall time (not canvas slots / step time)."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def stats(self) -> dict:
        return {"canvases": self.canvases, "steps_per_canvas": self.steps_per_canvas,
                "tokens_per_forward": round(self.tokens_per_forward, 3),
                "time_to_first_text_s": None if self.time_to_first_text_s is None else round(
                    self.time_to_first_text_s, 4), "wall_s": round(self.wall_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}

    def summary(self, *more: str) -> str:
        """The CLI's one-line stats: '[90 tokens, 2 canvases, steps [12, 9], 31.4 tok/s, finish=stop]'; `more`
        adds items before the closing bracket (chat: the reused prompt tokens)."""
        tokens = f"{self.completion_tokens} token{'' if self.completion_tokens == 1 else 's'}"
        canvases = f"{self.canvases} canvas{'' if self.canvases == 1 else 'es'}"
        items = [tokens, canvases, f"steps {self.steps_per_canvas}", f"{self.tokens_per_s:.1f} tok/s",
                 f"finish={self.finish_reason}", *more]
        return f"[{', '.join(items)}]"


class RowText:
    """One request's events -> what its client sees: Draft per step (if asked), Text as canvases commit (exact
    max_tokens, stop ids, stop strings, thinking/answer split), and `finish()` -> Done. Used by `stream_ids`
    (a request alone) and by the batched server worker (many requests' Rows in one scheduler) alike."""

    def __init__(self, tok, prompt_len: int, limit: int, stop_ids: set[int], stop: Sequence[str], drafts: bool):
        self.tok, self.prompt_len, self.limit, self.stop_ids, self.drafts = tok, prompt_len, limit, stop_ids, drafts
        self.started = time.perf_counter()
        # an end marker whose token is no stop id (ignore_eos: none is) does not end the text: generation goes on
        self.splitter = OutputSplitter(tok, ends=[i for i in tok.stop_ids if i in stop_ids])
        self.stopper = StopStream(stop)
        self.completion: list[int] = []
        self.steps: list[int] = []
        self.first_text: float | None = None
        self.reason: str | None = None  # set once the request has all it needs ("stop" or "length")
        self.step_index = 0
        self.answer: list[str] = []  # answer text as emitted
        self._pieces: list[Text] = []

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _route(self, deltas) -> None:
        """Deltas from the splitter -> Text pieces; answer text passes the stop strings first."""
        for delta in deltas:
            text = delta.text
            if delta.kind == "answer":
                text, _ = self.stopper.feed(text)
            if text:
                if self._pieces and self._pieces[-1].kind == delta.kind:
                    self._pieces[-1].text += text
                else:
                    self._pieces.append(Text(text, delta.kind))

    def on_event(self, event, row: int = 0) -> list:
        """A Step or Commit of the canvas loop (batch row `row`) -> the Draft / Text events it causes."""
        if not isinstance(event, Commit):
            self.step_index += 1
            if not self.drafts:
                return []
            ids = event.state.argmax[row].tolist()
            return [Draft(event.canvas_index, self.step_index, self.tok.decode(ids, skip_special=False), ids,
                          event.state.confidence[row].tolist())]
        self.step_index = 0
        self.steps.append(int(event.num_steps[row]))
        for token in event.tokens[row].tolist():
            if len(self.completion) >= self.limit:
                break
            self.completion.append(token)
            self._route(self.splitter.feed([token]))
            if self.stopper.stopped or token in self.stop_ids:
                self.reason = "stop"
                break
        if self.reason is None and len(self.completion) >= self.limit:
            self.reason = "length"
        if self.reason is not None and not self.stopper.stopped:  # release what the decoders held back
            self._route(self.splitter.finish())
            held = self.stopper.flush()  # a partial stop string that never completed is ordinary text
            if held:
                self._pieces.append(Text(held, "answer"))
        out, self._pieces = self._pieces, []
        for piece in out:
            if self.first_text is None:
                self.first_text = time.perf_counter() - self.started
            if piece.kind == "answer":
                self.answer.append(piece.text)
        return out

    def finish(self) -> Done:
        # the answer is what was emitted: the splitter also saw the text past a stop string, which was held back
        output = self.splitter.result()
        output = ParsedOutput(output.thinking, "".join(self.answer), output.tool_calls)
        reason, completion = self.reason, self.completion
        if reason == "stop" and output.tool_calls and completion and \
                completion[-1] == self.tok.special.tool_response_start:
            reason = "tool_calls"
        return Done(reason or "length", output, self.prompt_len, len(completion), completion, self.steps,
                    self.first_text, time.perf_counter() - self.started)


def check_max_tokens(max_tokens) -> None:
    """The text API's cap is named max_tokens; say so when it is bad (the generation config would name its own
    max_new_tokens, an option the caller did not pass)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1 (the most new tokens), got {max_tokens!r}")


# the text API's own options (stream, complete, chat turns), beside the generation knobs
STREAM_OPTIONS = ("max_tokens", "stop", "seed", "drafts", "cache", "cached_len", "accept", "sampling", "plan")


def open_request(engine, prompt_ids: Sequence[int], *, max_tokens: int | None = None,
                 stop: Sequence[str] | None = None, seed: int | None = None, drafts: bool = True,
                 cache: KVCache | None = None, cached_len: int = 0, accept=None, sampling: str = "fast",
                 plan=None, **knobs) -> tuple[Rows, RowText]:
    """One request -> its canvas-loop Rows (settings, seeded generator, cache) and its RowText; nothing runs yet.
    Options as in `stream_ids`; bad ones raise here, before the request takes a place anywhere."""
    tok = engine.require_tokenizer()
    stop = [stop] if isinstance(stop, str) else stop  # one stop string, as OpenAI's "stop": not its characters
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if stop is not None and "" in stop:  # it would match before every character: nothing could be generated
        raise ValueError("stop strings must not be empty; drop the empty one")
    if max_tokens is not None:
        check_max_tokens(max_tokens)
        if "max_new_tokens" in knobs:
            raise ValueError("give max_tokens or max_new_tokens (two names of the same exact cap), not both")
        knobs["max_new_tokens"] = max_tokens
    gen = engine.generation_settings(call_options=STREAM_OPTIONS, **knobs)
    stop_ids = set(gen.eos_token_id) if gen.eos_token_id is not None else set(tok.stop_ids)
    engine.check_context(len(prompt_ids), gen.max_new_tokens)
    generator = seeded_generator(seed, engine.device)
    suffix = torch.tensor([list(prompt_ids)[cached_len:]], dtype=torch.int64, device=engine.device)
    cache = cache if cache is not None else engine.new_cache(1)
    cfg = step_config(gen, accept, sampling, bound_given="entropy_bound" in knobs)
    rows = Rows(engine.module, suffix, gen, cfg, generator=generator, cache=cache,
                plan=plan)  # plan: constrained canvases (engine/structured.py)
    return rows, RowText(tok, len(prompt_ids), gen.max_new_tokens, stop_ids, stop or (), drafts)


def stream_ids(engine, prompt_ids: Sequence[int], **options) -> Iterator:
    """Stream one request. prompt_ids are the full prompt; when `cache` already holds its first
    `cached_len` tokens only the rest is encoded (multi-turn chat reuses its prefix this way).
    sampling="fast" (default) draws one uniform per position; "reference" reproduces the reference's stream.
    Options: STREAM_OPTIONS (max_tokens, stop, seed, drafts, cache, cached_len, accept, sampling, plan) and the
    generation knobs (Engine.generation_settings)."""
    rows, text = open_request(engine, prompt_ids, **options)
    for event in run_alone(engine.module, rows):
        yield from text.on_event(event)
        if text.done:
            break
    yield text.finish()
