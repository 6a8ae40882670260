"""A normalised schema (jsonschema.py) -> a canvas layout: fixed scaffold tokens, free slots, decisions; and the
repair that turns each committed canvas into valid JSON.

The layout is one flat row of positions, cut into canvases of L by the engine:
  * scaffold: keys, braces, brackets, commas, literals, all CLAMPED (`{"name": ` is never denoised);
  * slots: a value of unknown content: a string (opening '"' clamped, then `size` free positions whose class is
    string-safe tokens + '"'), a number (digits/'-'/'.' + space), a choice among literals (enum, boolean: per
    position the options' tokens + space) or a union of scalar kinds. A slot never straddles a canvas: clamped
    spaces push it into the next one, so each value is denoised, and repaired, inside one canvas;
  * decisions: one free position per optional array item / map entry, class {',' , ']'} (or '}'; {' ', ']'} for
    "empty"). The first closing token the model puts there ends the container. And one per optional object
    property (not in `required`; required ones are always laid out), at its separator, class {',', ' '}: ','
    keeps the property, ' ' skips it (its key and value become filler).
Lengths the layout cannot know (a string's, a number's, how many items, which optional properties) are chosen by
the model inside a budget of positions, and what it leaves unused is the filler: one-space tokens, valid JSON
whitespace.

Why an optional property's decision is the separator position right before its key: (1) its keep token is the
comma the kept document has there, so the canvas the denoiser reads is the JSON it becomes (`"Ada", "nickname": `);
(2) its key follows it clamped, in the same canvas (clamped spaces push both, and the value too when it is a scalar
that fits, into one canvas), so the denoiser decides seeing which property it is deciding about and what it is
writing as its value; a decision in the canvas before its key would be taken blind; (3) a LEADING comma depends only
on the properties before it, which are decided already (left to right; earlier canvases are in the cache), where a
trailing one would depend on decisions still to come. So the comma is right for any subset kept: a kept optional
property gets ',' only if a property before it is present, ' ' otherwise (the first property's ',' too); a
required property that only optional ones precede has a clamped ',' (`Layout.separators`) that the repair turns
into ' ' when none of them was kept, and that the plan clamps to ' ' when they were decided in an earlier canvas.
When max_tokens is short, `Budget.cap` bounds the optional properties laid out per object too.

The repair (`repair_canvas`) runs at every commit over the committed canvas, left to right: a string ends at the
model's first '"' (or gets one at its last position), everything after it in the slot becomes filler; a number is
the first valid number in the slot's characters, clamped into its bounds; a choice is the option with the highest
total log-probability under the last step's ℓ̃ over the slot (the whole option scored jointly, padding included);
a decision that closes turns the rest of its container (here and in every later canvas) into filler, one that skips
an optional property turns its key and value into filler, and a comma before a property stays only if a property
before it is present. The result is valid JSON for ANY token the model may have put at a free position, so validity
comes from the construction, not from the model, and no retry is ever needed. Earlier canvases are never touched:
they are already in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .json_vocab import JsonVocab
from .jsonschema import literal


@dataclass(frozen=True)
class Budget:
    """Free positions per value kind and item counts used when the schema gives no bound."""

    string: int = 12  # content tokens of a string
    number: int = 10
    integer: int = 6
    items: int = 3  # array items beyond minItems when maxItems is absent
    entries: int = 2  # free-form object entries
    key: int = 6
    cap: int | None = None  # at most this many items/entries in any array or map (never below minItems), and
    # optional properties laid out in any object (the first ones in schema order)

    def smaller(self) -> "Budget | None":
        if self.string > 2 or self.items > 1 or self.entries > 1:
            return replace(self, string=max(2, self.string // 2), items=max(1, self.items - 1),
                           entries=max(1, self.entries - 1), key=max(2, self.key // 2))
        if self.cap != 0 or (self.string, self.number, self.integer) == (0, 1, 1):
            return None
        # the last resort, every container at its minItems: shorter values (a number keeps room for its fallback)
        return replace(self, string=self.string // 2, number=max(1, self.number // 4),
                       integer=max(1, self.integer // 4))


@dataclass
class Slot:
    node: dict
    start: int
    size: int


@dataclass
class Decision:
    close: int  # the token id that ends the container (' ' skips an optional property)
    keep: int  # the token that goes on (',' before another item or a kept property; ' ' for "not empty")
    end: int = -1  # positions (pos, end) become filler when it closes
    after: tuple[int, ...] | None = None  # an optional property's: keep writes ',' only if one of these earlier
    # decisions of its object kept its property (None: always; () for the first property: never, a space)


@dataclass
class Layout:
    vocab: JsonVocab
    clamp: list[int] = field(default_factory=list)  # token id, or -1 at a free position
    cls: list[int] = field(default_factory=list)  # class index per position (0 for clamped ones)
    classes: list[torch.Tensor] = field(default_factory=list)  # bool [V]
    slots: dict[int, Slot] = field(default_factory=dict)  # by first free position
    decisions: dict[int, Decision] = field(default_factory=dict)  # by position
    # clamped ',' before a required property that only optional ones precede -> their decisions: ' ' if none kept
    separators: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clamp)


class LayoutTooLong(ValueError):
    """The layout grew past the position limit it was built with (it could never run)."""


class _Builder:
    def __init__(self, vocab: JsonVocab, tokenizer, canvas_length: int, budget: Budget, limit: int | None = None):
        self.v, self.tok, self.L, self.b, self.limit = vocab, tokenizer, canvas_length, budget, limit
        self.out = Layout(vocab, classes=[torch.ones(vocab.vocab_size, dtype=torch.bool)])
        self.pending = ""
        self._class_index: dict = {}

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode_literal(text)
        if self.v.text(ids) != text:
            raise ValueError(f"the tokenizer does not round-trip {text!r}; cannot lay it out")
        return ids

    def flush(self) -> None:
        if self.pending:
            for i in self.encode(self.pending):
                self.fixed(i)
            self.pending = ""

    def fixed(self, token: int) -> None:
        self.grow()
        self.out.clamp.append(token)
        self.out.cls.append(0)

    def grow(self) -> None:
        """Stop as soon as the layout passes the limit: maxItems 10**9 must not be laid out item by item."""
        if self.limit is not None and len(self.out.clamp) >= self.limit:
            raise LayoutTooLong(f"the layout needs more than {self.limit} positions")

    def free(self, mask_key, make) -> None:
        self.grow()
        if mask_key not in self._class_index:
            self._class_index[mask_key] = len(self.out.classes)
            self.out.classes.append(make())
        self.out.clamp.append(-1)
        self.out.cls.append(self._class_index[mask_key])

    def in_one_canvas(self, n: int) -> None:
        """Pad with clamped spaces so the next n positions sit in one canvas."""
        if n > self.L:
            raise ValueError(f"a value needs {n} positions, more than a canvas of {self.L}: each string, number or "
                             "enum value is written inside one canvas, so lower the schema's minLength, the number's "
                             "bounds or the enum values' lengths")
        pos = len(self.out.clamp)
        if pos % self.L + n > self.L:
            for _ in range(self.L - pos % self.L):
                self.fixed(self.v.ws)

    def options(self, values) -> list[list[int]]:
        out = []
        for value in values:
            text = literal(value)
            ids = self.tok.encode_literal(text)
            if self.v.text(ids) != text:
                raise ValueError(f"the tokenizer does not round-trip the literal {text!r}")
            out.append(ids)
        return out

    def slot(self, node: dict, size: int, head: list[int], per_position) -> None:
        self.flush()
        self.in_one_canvas(len(head) + size)
        for t in head:
            self.fixed(t)
        self.out.slots[len(self.out.clamp)] = Slot(node, len(self.out.clamp), size)
        for j in range(size):
            self.free(*per_position(j))

    def decision(self, choices: tuple[int, int], close: int, after: tuple[int, ...] | None = None) -> Decision:
        self.flush()
        d = Decision(close, keep=choices[0], after=after)
        self.out.decisions[len(self.out.clamp)] = d
        self.free(("one_of", choices), lambda: self.v.one_of(choices))
        return d

    def emit(self, node: dict) -> None:
        v, b, kind = self.v, self.b, node["kind"]
        if kind == "fixed":
            self.pending += literal(node["value"])
        elif kind == "object":
            self.object(node)
        elif kind in ("array", "map"):
            self.container(node)
        elif kind == "string":
            self.slot(node, self.positions(node) - 1, [v.quote], lambda j: ("string", lambda: v.string))
        elif kind == "number":
            self.slot(node, number_size(node, b), [], lambda j: ("number", lambda: v.number | v.one_of([v.ws])))
        elif kind == "options":
            node = {**node, "ids": self.options(node["values"])}
            size = max(len(o) for o in node["ids"])
            at = [tuple(sorted({o[j] for o in node["ids"] if len(o) > j} | {v.ws})) for j in range(size)]
            self.slot(node, size, [], lambda j: (("one_of", at[j]), lambda: v.one_of(at[j])))
        elif kind == "union":
            node, size, key = self.union(node)
            self.slot(node, size, [], lambda j: (key, lambda: self.union_mask(node)))
        else:
            raise AssertionError(kind)

    def positions(self, node: dict) -> int | None:
        """Positions a scalar value's slot takes (its clamped opening quote included); None for other kinds."""
        kind = node["kind"]
        if kind == "string":
            return 1 + string_size(node, self.b.key if node.get("key") else self.b.string)
        if kind == "number":
            return number_size(node, self.b)
        if kind == "options":
            return max(map(len, self.options(node["values"])))
        if kind == "union":
            return self.union(node)[1]
        return None

    def object(self, node: dict) -> None:
        """Properties in schema order: a required one always, an optional one (the first `cap` of them) behind a
        decision at its separator (see the module docstring). A separator that only optional properties precede
        depends on their decisions (`Decision.after`, `Layout.separators`); after a required one it is a comma."""
        v = self.v
        required = node["required"]
        optional = [k for k, _ in node["props"] if k not in required]
        laid_out = set(optional if self.b.cap is None else optional[: self.b.cap])
        self.pending += "{"
        first, after = True, ()  # after: the decisions before this property; None once a required one is laid out
        for key, value in node["props"]:
            head = literal(key) + ": "
            if key in required:
                if first:
                    self.pending += head
                elif after is None:
                    self.pending += ", " + head
                else:  # only optional properties before it: a comma only if one of them is kept
                    self.flush()
                    self.out.separators[len(self.out.clamp)] = after
                    self.fixed(v.ids[","])
                    self.pending += " " + head
                self.emit(value)
                first, after = False, None
            elif key in laid_out:
                self.flush()
                key_ids = self.encode(" " + head)
                n = 1 + len(key_ids)  # the decision sees its key (and a scalar value) in its own canvas
                value_n = self.positions(value)
                if value_n is not None and n + value_n <= self.L:
                    n += value_n
                if n <= self.L:
                    self.in_one_canvas(n)
                at = len(self.out.clamp)
                d = self.decision((v.ids[","], v.ws), v.ws, after)
                for t in key_ids:
                    self.fixed(t)
                self.emit(value)
                self.flush()
                d.end = len(self.out.clamp)
                first, after = False, None if after is None else after + (at,)
        self.pending += "}"

    def union(self, node: dict):
        branches, size = [], 1
        for br in node["branches"]:
            if br["kind"] in ("options", "fixed"):
                values = br["values"] if br["kind"] == "options" else [br["value"]]
                br = {"kind": "options", "values": values, "ids": self.options(values)}
                size = max(size, *(len(o) for o in br["ids"]))
            elif br["kind"] == "string":
                size = max(size, 1 + string_size(br, self.b.string))
            else:
                size = max(size, number_size(br, self.b))
            branches.append(br)
        return {"kind": "union", "branches": branches}, size, ("union", id(node))

    def union_mask(self, node: dict) -> torch.Tensor:
        mask = self.v.one_of([self.v.ws])
        for br in node["branches"]:
            if br["kind"] == "string":
                mask |= self.v.string
            elif br["kind"] == "number":
                mask |= self.v.number
            else:
                mask |= self.v.one_of([t for o in br["ids"] for t in o])
        return mask

    def container(self, node: dict) -> None:
        v, is_map = self.v, node["kind"] == "map"
        open_, close = ("{", "}") if is_map else ("[", "]")
        lo = node["min"]
        hi = node["max"] if node["max"] is not None else max(lo, self.b.entries if is_map else self.b.items)
        if self.b.cap is not None:  # maxItems is an upper bound: fewer items are valid too
            hi = max(lo, min(hi, self.b.cap))
        self.pending += open_
        if hi == 0:
            self.pending += close
            return
        decisions = []
        if lo == 0:
            decisions.append(self.decision((v.ws, v.ids[close]), v.ids[close]))
        for i in range(hi):
            if is_map:
                self.emit({"kind": "string", "min": 0, "max": None, "key": True})
                self.pending += ": "
                self.emit(node["value"])
            else:
                self.emit(node["item"])
            if i == hi - 1:
                break
            if i < lo - 1:
                self.pending += ", "
            else:
                decisions.append(self.decision((v.ids[","], v.ids[close]), v.ids[close]))
        self.flush()
        self.fixed(v.ids[close])
        for d in decisions:
            d.end = len(self.out.clamp)


def string_size(node: dict, budget: int) -> int:
    """Free positions of a string slot: content tokens + the closing quote; room for minLength spaces."""
    size = budget if node.get("max") is None else max(1, min(budget, node["max"]))
    return max(size, node.get("min", 0)) + 1


def number_size(node: dict, budget: Budget) -> int:
    """Free positions of a number slot: the budget, room for the bounds, and always room for the value the repair
    falls back to (`spell_valid(node, 0)`), so a repaired slot never outgrows its positions."""
    bounds = [x for x in (node.get(k) for k in ("lo", "hi", "xlo", "xhi")) if x is not None]
    longest = max([len(_spell(x + s, False)) for x in bounds for s in (-2, 0, 2)], default=0)
    longest = max(longest, len(spell_valid(node, 0)))
    return max(budget.integer if node["integer"] else budget.number, longest + 1)


def in_bounds(node: dict, x) -> bool:
    return ((node.get("lo") is None or x >= node["lo"]) and (node.get("hi") is None or x <= node["hi"])
            and (node.get("xlo") is None or x > node["xlo"]) and (node.get("xhi") is None or x < node["xhi"]))


def spell_valid(node: dict, x) -> str:
    """The spelling of the value closest to x (a number) that satisfies the slot's bounds and type: the fewest
    decimals (6 to 17) that keep it inside the bounds, which a narrow range like [0.1234567, 0.1234568] needs."""
    if node["integer"]:
        x = int(x)
        lo = -math.inf if node.get("lo") is None else math.ceil(node["lo"])
        if node.get("xlo") is not None:
            lo = max(lo, math.floor(node["xlo"]) + 1)
        hi = math.inf if node.get("hi") is None else math.floor(node["hi"])
        if node.get("xhi") is not None:
            hi = min(hi, math.ceil(node["xhi"]) - 1)
        return str(int(min(max(x, lo), hi)))
    candidates = [x, 0, node.get("lo"), node.get("hi")]
    lo = max([b for b in (node.get("lo"), node.get("xlo")) if b is not None], default=None)
    hi = min([b for b in (node.get("hi"), node.get("xhi")) if b is not None], default=None)
    if lo is not None and hi is not None:
        candidates.append((lo + hi) / 2)
    candidates += [b for b in (lo + 1 if lo is not None else None, hi - 1 if hi is not None else None)]
    for c in sorted((c for c in candidates if c is not None), key=lambda c: abs(c - x)):
        for digits in range(6, 18):
            text = _spell(c, False, digits)
            if in_bounds(node, float(text)):
                return text
    raise ValueError(f"no decimal number of up to 17 decimals lies within the bounds {lo}..{hi}; widen them")


def build_layout(node: dict, vocab: JsonVocab, tokenizer, canvas_length: int, budget: Budget = Budget(),
                 limit: int | None = None) -> Layout:
    """The layout of `node`; with `limit`, LayoutTooLong as soon as it would take more than `limit` positions."""
    b = _Builder(vocab, tokenizer, canvas_length, budget, limit)
    b.emit(node)
    b.flush()
    return b.out


def _spell(value, integer: bool, digits: int = 6) -> str:
    if integer:
        return str(int(value))
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
