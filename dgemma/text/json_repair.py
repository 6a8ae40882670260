"""The commit-time repair of a JSON layout (see json_layout.py for the design): committed canvas -> valid JSON.

Every function maps ANY tokens at a slot's free positions to a valid value of the slot's kind that fits the slot,
so a document is valid whatever the model wrote. Values the model did write are kept where they are valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .json_layout import Layout, in_bounds, spell_valid
from .json_vocab import JsonVocab

NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def repair_canvas(layout: Layout, tokens: list[int], start: int,
                  logp: Callable[[int, int], torch.Tensor | None], closed: list[tuple[int, int]]) -> list[int]:
    """tokens: one row's committed canvas, at layout positions start.. -> repaired tokens. `logp(a, b)` gives the
    last step's log-probabilities [b-a, V] for canvas offsets a..b-1 (None if no step ran). `closed` lists the
    (from, to) position ranges that closed containers turned into filler; it is extended here."""
    v, out = layout.vocab, list(tokens)
    p, end = start, min(start + len(tokens), len(layout))
    while p < end:
        i = p - start
        if any(a <= p < b for a, b in closed):
            out[i] = v.ws
            p += 1
            continue
        decision = layout.decisions.get(p)
        if decision is not None:
            if out[i] == decision.close:
                closed.append((p + 1, decision.end))
            elif decision.after is None or any_kept(decision.after, closed):
                out[i] = decision.keep  # its class only allows the two, but the repair holds for any token
            else:  # a kept optional property with none present before it: no comma
                out[i] = v.ws
        if p in layout.separators:
            out[i] = v.ids[","] if any_kept(layout.separators[p], closed) else v.ws
        slot = layout.slots.get(p)
        if slot is not None:
            out[i: i + slot.size] = fill(slot.node, out[i: i + slot.size], v, lambda: logp(i, i + slot.size))
            p += slot.size
            continue
        p += 1
    for s, after in layout.separators.items():  # decided here, in a later canvas: clamp it to what it will be
        if s >= end and start <= max(after) < end and not any_kept(after, closed):
            closed.append((s, s + 1))
    return out


def any_kept(decisions: tuple[int, ...], closed: list[tuple[int, int]]) -> bool:
    """Whether one of these optional-property decisions (already repaired) kept its property: a skip turned the
    positions after it into filler, and so does a container closed around it (then nothing of it is present)."""
    return any(not any(a <= q + 1 < b for a, b in closed) for q in decisions)


def fill(node: dict, seg: list[int], v: JsonVocab, logp: Callable[[], torch.Tensor | None]) -> list[int]:
    kind = node["kind"]
    if kind == "string":
        return string_fill(seg, node, v)
    if kind == "number":
        return number_fill(seg, node, v)
    if kind == "options":
        return option_fill(seg, node["ids"], v, logp())
    return union_fill(seg, node, v, logp)


def string_fill(seg: list[int], node: dict, v: JsonVocab) -> list[int]:
    """Content up to the model's first '"' (string-safe tokens only), cut to maxLength and to the slot, padded with
    spaces to minLength, then '"' and filler. len(result) == len(seg)."""
    n = len(seg)
    content = []
    for t in seg:
        if t == v.quote:
            break
        if t < v.vocab_size and bool(v.string[t]):
            content.append(t)
    content = content[: n - 1]
    hi, lo = node.get("max"), node.get("min", 0)
    while hi is not None and len(v.text(content)) > hi:
        content.pop()
    chars = len(v.text(content))
    while chars < lo and len(content) + lo - chars > n - 1:
        content.pop()
        chars = len(v.text(content))
    content += [v.ws] * max(0, lo - chars)
    return content + [v.quote] + [v.ws] * (n - 1 - len(content))


def number_fill(seg: list[int], node: dict, v: JsonVocab) -> list[int]:
    """The first valid number in the slot's characters (its fraction dropped for an integer), moved into the bounds;
    0 (or the nearest bound) when there is none. Spelled with single-character tokens, then filler."""
    n = len(seg)
    chars = "".join(v.texts[t] or "" for t in seg if t < v.vocab_size and bool(v.number[t]))
    m = NUMBER.search(chars)
    spelled = None
    if m:
        text = m.group().split(".")[0] if node["integer"] else m.group()
        value = int(text) if node["integer"] else float(text)
        spelled = text if in_bounds(node, value) else spell_valid(node, value)
    if spelled is None or len(spelled) > n:
        spelled = spell_valid(node, 0)  # number_size leaves room for it
    return [v.ids[ch] for ch in spelled] + [v.ws] * (n - len(spelled))


def option_fill(seg: list[int], options: list[list[int]], v: JsonVocab, logp: torch.Tensor | None) -> list[int]:
    """The option with the highest summed log-probability over the whole slot (its tokens, then filler)."""
    n = len(seg)
    best = 0
    if logp is not None and len(options) > 1:
        scores = []
        for ids in options:
            padded = ids + [v.ws] * (n - len(ids))
            scores.append(float(logp[torch.arange(n), torch.tensor(padded)].sum()))
        best = max(range(len(options)), key=lambda i: scores[i])
    return options[best] + [v.ws] * (n - len(options[best]))


def union_fill(seg: list[int], node: dict, v: JsonVocab, logp: Callable[[], torch.Tensor | None]) -> list[int]:
    """The model's first non-space token picks the branch: '"' a string, a digit or '-' a number, anything else the
    best literal (null, true, false, enum values); with no such branch, the first branch's plainest value."""
    n = len(seg)
    kinds = {br["kind"]: br for br in reversed(node["branches"])}
    literals = [ids for br in node["branches"] if br["kind"] == "options" for ids in br["ids"]]
    first = next((i for i, t in enumerate(seg) if t != v.ws), None)
    t0 = seg[first] if first is not None else None
    rest = seg[first:] if first is not None else []
    if t0 == v.quote and "string" in kinds:
        return [v.quote] + string_fill(rest[1:] + [v.quote] * (n - len(rest)), kinds["string"], v)
    if t0 is not None and t0 < v.vocab_size and bool(v.number[t0]) and "number" in kinds:
        return number_fill(rest + [v.ws] * (n - len(rest)), kinds["number"], v)
    if literals:
        return option_fill(seg, literals, v, logp())
    if "string" in kinds:
        return [v.quote] + string_fill([v.quote] * (n - 1), kinds["string"], v)
    return number_fill([v.ws] * n, kinds["number"], v)
