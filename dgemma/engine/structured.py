"""JSON output as a CanvasPlan: `response_format` -> schema -> layout (text/json_layout.py) -> constrained canvases.

    schema --normalise--> value tree --build_layout--> scaffold (clamped) + slots/decisions (classes)
    canvas k: clamps and classes of positions [kL, (k+1)L) (filler where a container closed earlier)
    commit k: repair_canvas (strings end, numbers parse, choices scored, closed containers and skipped optional
              properties emptied, commas only between present properties) -> valid JSON

The document is laid out from the first generated position, followed by one <eos>; it may span any number of
canvases (each canvas is committed, repaired and cached before the next is denoised). What the stream emits, and
what `Done.output.answer` holds, is the committed text: valid JSON with runs of filler spaces; `compact_json`
removes them (whitespace outside strings only), which `generate_json` and the CLI do.

`response_format` follows OpenAI's: {"type": "text"} | {"type": "json_object"} (any JSON object: a free-form
object of scalar values) | {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from ..sampling import CanvasConstraints
from ..text.json_layout import Budget, Layout, LayoutTooLong, build_layout
from ..text.json_repair import repair_canvas
from ..text.json_vocab import JsonVocab
from ..text.jsonschema import SchemaError, normalise
from .stream import check_max_tokens

__all__ = ["JsonPlan", "JsonResult", "SchemaError", "check_response_format", "compact_json", "json_plan", "schema_of"]


def schema_of(response_format) -> dict | None:
    """OpenAI-style response_format -> the JSON schema to follow (None for plain text); clear errors otherwise."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError("response_format must be an object with a 'type': 'text', 'json_object' or 'json_schema'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema (an object), e.g. "
                             '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}')
        return spec["schema"]
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def check_response_format(response_format) -> None:
    """Raise the error a request with this response_format would get (its shape, its schema), without a model."""
    schema = schema_of(response_format)
    if schema is not None:
        normalise(schema)


class JsonPlan:
    """CanvasPlan for one JSON document per row (all rows share the layout; each row closes its own containers)."""

    def __init__(self, layout: Layout, eos_id: int, canvas_length: int, batch: int = 1, device=None):
        self.layout, self.L, self.batch, self.device = layout, canvas_length, batch, device
        self.num_tokens = len(layout) + 1  # the document, then <eos>
        self.num_canvases = math.ceil(self.num_tokens / canvas_length)
        pad = self.num_canvases * canvas_length - len(layout)
        self.clamp = torch.tensor(layout.clamp + [eos_id] * pad, dtype=torch.long)
        self.cls = torch.tensor(layout.cls + [0] * pad, dtype=torch.long)
        self.allowed = torch.stack(layout.classes).to(device)
        self.closed: list[list[tuple[int, int]]] = [[] for _ in range(batch)]

    def for_canvas(self, index: int, committed) -> CanvasConstraints | None:
        if index >= self.num_canvases:
            return None
        lo, hi = index * self.L, (index + 1) * self.L
        clamp = self.clamp[lo:hi].repeat(self.batch, 1)
        for r, ranges in enumerate(self.closed):
            for a, b in ranges:
                if a < hi and b > lo:
                    clamp[r, max(a, lo) - lo: min(b, hi) - lo] = self.layout.vocab.ws
        return CanvasConstraints(clamp.to(self.device), self.allowed, self.cls[lo:hi].repeat(self.batch, 1)
                                 .to(self.device))

    def commit(self, index: int, argmax: torch.Tensor, processed: torch.Tensor | None) -> torch.Tensor:
        if index >= self.num_canvases:
            return argmax
        out = argmax.clone()
        for r in range(argmax.shape[0]):
            def logp(a, b, r=r):
                return None if processed is None else processed[r, a:b].float().log_softmax(-1).cpu()
            repaired = repair_canvas(self.layout, argmax[r].tolist(), index * self.L, logp, self.closed[r])
            out[r] = torch.tensor(repaired, dtype=out.dtype, device=out.device)
        return out


def json_plan(engine, schema: dict, *, max_tokens: int | None = None, batch: int = 1,
              budget: Budget | None = None) -> JsonPlan:
    """A plan for `schema` on this engine's tokenizer. With max_tokens, budgets shrink until the document (and its
    <eos>) fits: first the lengths the schema leaves open, then the item slots of every array and map (maxItems
    included, an upper bound) and the optional properties laid out per object, halved down to minItems and the
    required properties. An error says how many tokens the smallest layout needs."""
    tok = engine.require_tokenizer()
    vocab = JsonVocab.of(tok, engine.config.vocab_size)
    node = normalise(schema)
    budget = budget or Budget()
    context = engine.config.max_position_embeddings  # no longer layout can ever run: building stops there
    room = context if max_tokens is None else min(context, max_tokens)

    def build(b: Budget, limit: int = room) -> Layout | None:
        try:
            return build_layout(node, vocab, tok, engine.config.canvas_length, b, limit=limit)
        except LayoutTooLong:
            return None

    def fits(layout: Layout | None) -> bool:
        return layout is not None and len(layout) + 1 <= room

    caps, cap = [budget.cap], room  # no cap first: the layouts that fit without one stay as they are
    while cap > 0:
        cap //= 2
        caps.append(cap)
    for cap in caps:
        ladder = [replace(budget, cap=cap)]
        while (smaller := ladder[-1].smaller()) is not None:
            ladder.append(smaller)
        if cap is not None and not fits(build(ladder[-1])):
            continue
        layout = next((lay for lay in map(build, ladder) if fits(lay)), None)
        if layout is not None:
            eos = tok.eos_id if tok.eos_id is not None else tok.stop_ids[0]
            return JsonPlan(layout, eos, engine.config.canvas_length, batch, engine.device)
    smallest = build(ladder[-1], context)
    floors = sorted(_floors(node))
    lower = (f"lower its {' or '.join(floors)}" if floors else
             "make the schema smaller (fewer properties, shorter enum or const values)")
    if smallest is None:
        raise ValueError(f"this schema needs more than this model's context of {context} tokens even with the "
                         f"fewest items and shortest values it allows; {lower}")
    raise ValueError(f"this schema needs at least {len(smallest) + 1} tokens even with the fewest items and shortest "
                     f"values it allows; raise max_tokens (got {max_tokens}) or {lower}")


def _floors(node: dict) -> set[str]:
    """The keywords of a normalised schema that make its smallest document longer (for the error's advice)."""
    kind = node["kind"]
    if kind == "string":
        return {"minLength"} if node["min"] else set()
    if kind == "object":
        children = [value for key, value in node["props"] if key in node["required"]]  # optional ones can go
    elif kind in ("array", "map"):
        children = [node["item" if kind == "array" else "value"]]
    else:
        children = node.get("branches", []) if kind == "union" else []
    out = {"minItems"} if kind in ("array", "map") and node["min"] else set()
    return out.union(*map(_floors, children))


def structured_options(engine, options: dict) -> dict:
    """Engine.stream's (or ChatSession.send's) options with `response_format` replaced by a plan (and max_tokens set
    to the layout's); without one (absent, None or {"type": "text"}), the options without the key."""
    options = dict(options)
    schema = schema_of(options.pop("response_format", None))
    if schema is None:
        return options
    if options.get("stop"):
        raise ValueError("stop strings cannot be combined with response_format: they could cut the JSON document")
    if options.get("plan") is not None:
        raise ValueError("give either response_format or plan, not both")
    if options.get("max_tokens") is not None:
        check_max_tokens(options["max_tokens"])
    plan = json_plan(engine, schema, max_tokens=options.get("max_tokens"))
    options["plan"], options["max_tokens"] = plan, plan.num_tokens
    return options


def compact_json(text: str) -> str:
    """Remove whitespace outside strings, then write ', ' and ': ' separators: the filler of a layout goes away,
    the values (and the model's spelling of numbers) stay as they are."""
    out, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch in " \t\r\n":
            continue
        else:
            out.append(ch + " " if ch in ",:" else ch)
    return "".join(out)


@dataclass
class JsonResult:
    value: object  # the parsed document
    text: str  # compact JSON text
    done: object  # the stream's Done event (usage, stats, finish_reason)


def generate_json(engine, prompt: str | None = None, *, messages=None, schema: dict | None = None,
                  response_format: dict | None = None, **options) -> JsonResult:
    """A JSON document for a prompt or chat, valid for `schema` by construction (or any JSON object)."""
    if schema is not None and response_format is not None:
        raise ValueError("give schema or response_format, not both")
    if response_format is None:
        response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}} \
            if schema is not None else {"type": "json_object"}
    done = engine.complete(prompt, messages=messages, response_format=response_format, **options)
    text = compact_json(done.output.answer)
    return JsonResult(json.loads(text), text, done)
