"""Text streaming over the one canvas loop: typed events, exact max_tokens, stop ids and stop strings.

Events, in order, for one request (batch row 0):
    Draft  after every denoising step: the argmax canvas as text with per-position confidence
    Text   newly committed text, split by kind ("answer" or "thinking"), never anything past a stop
    Done   finish reason, usage and stats (steps per canvas, tokens per forward, time to first text, tok/s)

Committed tokens are cut at exactly `max_tokens`, and at the first stop id (kept, as the reference keeps
EOS). Stop strings apply to the answer text; the text before the stop string is emitted, nothing after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..text.parse import OutputSplitter, ParsedOutput, StopStream
from .cache import KVCache
from .generate import Commit, canvas_loop, step_config


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


def stream_ids(engine, prompt_ids: Sequence[int], *, max_tokens: int | None = None,
               stop: Sequence[str] | None = None, seed: int | None = None, drafts: bool = True,
               cache: KVCache | None = None, cached_len: int = 0, accept=None, sampling: str = "fast",
               plan=None, **knobs) -> Iterator:
    """Stream one request. prompt_ids are the full prompt; when `cache` already holds its first
    `cached_len` tokens only the rest is encoded (multi-turn chat reuses its prefix this way).
    sampling="fast" (default) draws one uniform per position; "reference" reproduces the reference's stream."""
    tok = engine.require_tokenizer()
    started = time.perf_counter()
    gen = engine.generation_settings(**knobs, **({} if max_tokens is None else {"max_new_tokens": max_tokens}))
    stop_ids = set(gen.eos_token_id) if gen.eos_token_id is not None else set(tok.stop_ids)
    limit = gen.max_new_tokens
    engine.check_context(len(prompt_ids), limit)
    generator = None
    if seed is not None:
        generator = torch.Generator(engine.device).manual_seed(seed)
    suffix = torch.tensor([list(prompt_ids)[cached_len:]], dtype=torch.int64, device=engine.device)
    cache = cache if cache is not None else engine.new_cache(1)
    decoder, splitter, stopper = tok.stream(skip_special=False), OutputSplitter(), StopStream(stop or ())
    completion, steps, first_text, reason, step_index = [], [], None, None, 0
    pieces: list[Text] = []
    answer: list[str] = []  # answer text as emitted

    def route(deltas) -> None:
        """Deltas from the splitter -> Text pieces; answer text passes the stop strings first."""
        for delta in deltas:
            text = delta.text
            if delta.kind == "answer":
                text, _ = stopper.feed(text)
            if text:
                if pieces and pieces[-1].kind == delta.kind:
                    pieces[-1].text += text
                else:
                    pieces.append(Text(text, delta.kind))

    for event in canvas_loop(engine.module, suffix, gen, step_config(gen, accept, sampling), generator=generator,
                             cache=cache, plan=plan):  # plan: constrained canvases (engine/structured.py)
        if not isinstance(event, Commit):
            step_index += 1
            if drafts:
                ids = event.state.argmax[0].tolist()
                yield Draft(event.canvas_index, step_index, tok.decode(ids, skip_special=False), ids,
                            event.state.confidence[0].tolist())
            continue
        step_index = 0
        steps.append(int(event.num_steps[0]))
        for token in event.tokens[0].tolist():
            if len(completion) >= limit:
                break
            completion.append(token)
            route(splitter.feed(decoder.push([token])))
            if stopper.stopped or token in stop_ids:
                reason = "stop"
                break
        if reason is None and len(completion) >= limit:
            reason = "length"
        if reason is not None and not stopper.stopped:  # release what the decoders held back
            route(splitter.feed(decoder.flush()))
            route(splitter.finish())
            held = stopper.flush()  # a partial stop string that never completed is ordinary text
            if held:
                pieces.append(Text(held, "answer"))
        for piece in pieces:
            if first_text is None:
                first_text = time.perf_counter() - started
            if piece.kind == "answer":
                answer.append(piece.text)
            yield piece
        pieces.clear()
        if reason is not None:
            break
    # the answer is what was emitted: the splitter also saw the text past a stop string, which was held back
    output = splitter.result()
    output = ParsedOutput(output.thinking, "".join(answer), output.tool_calls)
    if reason == "stop" and output.tool_calls and completion and completion[-1] == tok.special.tool_response_start:
        reason = "tool_calls"
    yield Done(reason or "length", output, len(prompt_ids), len(completion), completion, steps, first_text,
               time.perf_counter() - started)
