"""Schema subset, layout and repair (dgemma/text/jsonschema.py, json_layout.py, json_repair.py), without a model:
whatever tokens stand at the free positions, in their classes or not at all, the repaired document validates."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from dgemma.bundled import PACKAGED
from dgemma.text import Tokenizer
from dgemma.text.json_layout import Budget, build_layout
from dgemma.text.json_repair import number_fill, repair_canvas, string_fill
from dgemma.text.json_vocab import JsonVocab
from dgemma.text.jsonschema import SchemaError, normalise
from json_schemas import random_schema

L = 64


@pytest.fixture(scope="module")
def vocab():
    tok = Tokenizer.from_dir(PACKAGED)
    return tok, JsonVocab.of(tok, 4096)


def fill_and_repair(layout, vocab_size, seed, in_class: float, decide=None, length: int = L) -> str:
    """Random tokens at every free position (in the position's class with probability in_class, else any id),
    repaired canvas by canvas as the plan does, closed containers clamped to filler. `decide` overrides the
    decisions: "keep" / "close" every one, or a function (position, Decision) -> token."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    closed, out = [], []
    if decide in ("keep", "close"):
        decide = (lambda how: lambda p, d: getattr(d, how))(decide)
    for k in range(-(-len(layout) // length)):
        toks = []
        for p in range(k * length, min((k + 1) * length, len(layout))):
            if any(a <= p < b for a, b in closed):
                toks.append(layout.vocab.ws)
            elif layout.clamp[p] >= 0:
                toks.append(layout.clamp[p])
            elif decide is not None and p in layout.decisions:
                toks.append(decide(p, layout.decisions[p]))
            elif rng.random() < in_class:
                ids = layout.classes[layout.cls[p]].nonzero().flatten()
                toks.append(int(ids[torch.randint(len(ids), (1,), generator=g)]))
            else:
                toks.append(int(torch.randint(vocab_size, (1,), generator=g)))
        repaired = repair_canvas(layout, toks, k * length,
                                 lambda a, b: torch.randn(b - a, vocab_size, generator=g).log_softmax(-1), closed)
        assert len(repaired) == len(toks), "a repair must keep every position where the layout put it"
        out += repaired
    return layout.vocab.text(out)


@pytest.mark.parametrize("in_class,decide,length", [(1.0, None, L), (0.0, None, L), (1.0, "keep", L),
                                                    (1.0, "close", L), (0.5, None, 16)])
def test_repair_makes_any_canvas_valid(vocab, in_class, decide, length):
    """Random schemas (optional properties among them), random tokens; every decision kept, or every one closed
    (optional properties skipped, containers ended at once), or as the random tokens fall."""
    tok, v = vocab
    for seed in range(120):
        schema = random_schema(seed)
        layout = build_layout(normalise(schema), v, tok, length)
        text = fill_and_repair(layout, v.vocab_size, seed, in_class, decide, length)
        jsonschema.validate(json.loads(text), schema)


def key_after(layout, p: int) -> str | None:
    """The key an optional property's decision at p stands before (None for other decisions)."""
    ids = []
    for t in layout.clamp[p + 1:]:
        if t < 0:
            break
        ids.append(t)
    text = layout.vocab.text(ids)
    return json.loads(text.split(":")[0]) if '":' in text else None


OPTIONAL = {"type": "object", "properties": {
    "a": {"type": "string", "maxLength": 5}, "b": {"type": "integer"}, "c": {"enum": ["x", "yy"]},
    "d": {"type": "object", "properties": {"e": {"type": "boolean"}, "f": {"type": "null"}}, "required": ["f"]},
    "g": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}}


@pytest.mark.parametrize("required", [[], ["a"], ["c"], ["g"], ["b", "d"], ["a", "b", "c", "d", "g"]])
@pytest.mark.parametrize("length", [64, 16])  # 16: decisions, separators and values in different canvases
def test_every_subset_of_optional_properties_is_reachable_and_valid(vocab, required, length):
    """Each optional property kept or skipped by its decision (all 2^n combinations): the document parses, has the
    required properties and exactly the kept optional ones, whichever are first, middle or last."""
    tok, v = vocab
    schema = {**OPTIONAL, "required": required}
    layout = build_layout(normalise(schema), v, tok, length)
    top = [p for p in layout.decisions if key_after(layout, p) in list("abcdg")]
    keys = [key_after(layout, p) for p in top]
    assert keys == [k for k in "abcdg" if k not in required]  # one decision per optional property, in order
    for mask in range(2 ** len(top)):
        kept = {keys[i] for i in range(len(top)) if mask >> i & 1}
        choice = {p: (d.keep if (mask >> top.index(p) & 1) else d.close) if p in top else d.keep
                  for p, d in layout.decisions.items()}
        value = json.loads(fill_and_repair(layout, v.vocab_size, mask, 1.0, lambda p, d: choice[p], length))
        jsonschema.validate(value, schema)
        assert set(value) == set(required) | kept
        if "d" in value:
            assert "f" in value["d"] and "e" in value["d"]  # the nested decision was forced to keep


def test_an_optional_decision_sits_in_the_canvas_of_its_key_and_scalar_value(vocab):
    tok, v = vocab
    schema = {"type": "object", "properties": {"long": {"type": "string", "maxLength": 9},
                                               "nickname": {"type": "string", "maxLength": 6}}}
    for length in (16, 20, 24):
        layout = build_layout(normalise(schema), v, tok, length)
        assert len(layout.decisions) == 2
        for p, d in layout.decisions.items():
            slot = next(s for s in layout.slots.values() if s.start > p)
            assert p // length == (slot.start + slot.size - 1) // length  # decision, key and value: one canvas
            assert '":' in v.text(layout.clamp[p + 1: slot.start])  # the key follows its decision


def test_layout_clamps_the_scaffold_and_keeps_values_in_one_canvas(vocab):
    tok, v = vocab
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
    layout = build_layout(normalise(schema), v, tok, 16, Budget(string=6))
    scaffold = v.text([t for t in layout.clamp if t >= 0]).replace(" ", "")
    assert scaffold.startswith('{"name":"') and '"n":' in scaffold and '"tags":[' in scaffold
    for slot in layout.slots.values():
        assert slot.start // 16 == (slot.start + slot.size - 1) // 16  # never straddles a canvas
    assert len(layout) > 16  # the document spans several canvases


def test_string_and_number_repairs(vocab):
    tok, v = vocab
    ids = tok.encode('ab cd"xyz', add_bos=False)
    seg = ids + [v.ws] * (8 - len(ids))
    assert v.text(string_fill(seg, {"min": 0, "max": None}, v)).rstrip() == 'ab cd"'
    assert v.text(string_fill(seg, {"min": 0, "max": 3}, v)).rstrip() == 'ab"'
    assert v.text(string_fill([v.ws] * 6, {"min": 3, "max": None}, v)) == '     "'  # no quote: closed at the end
    seg = tok.encode("--07.50x", add_bos=False)
    node = {"kind": "number", "integer": False, "lo": None, "hi": None, "xlo": None, "xhi": None}
    assert v.text(number_fill(seg, node, v)).strip() == "-0"
    node = {**node, "integer": True, "xlo": 5, "hi": 9}
    assert v.text(number_fill(tok.encode("123", add_bos=False) + [v.ws] * 3, node, v)).strip() == "9"


@pytest.mark.parametrize("schema", [
    {"type": "number", "exclusiveMinimum": 0, "maximum": 0.0000001},  # no 6-decimal number inside
    {"type": "number", "minimum": 0.1234567, "maximum": 0.1234568},
    {"type": "number", "exclusiveMinimum": 1000000000, "exclusiveMaximum": 1000000001},  # only x.5: 12 characters
    {"anyOf": [{"type": "number", "exclusiveMinimum": 1e9, "exclusiveMaximum": 1e9 + 1}, {"type": "null"}]},
])
def test_narrow_or_long_number_ranges_repair_to_a_value_that_fits(vocab, schema):
    tok, v = vocab
    layout = build_layout(normalise(schema), v, tok, L)
    for seed in range(6):
        jsonschema.validate(json.loads(fill_and_repair(layout, v.vocab_size, seed, 0.5)), schema)


def test_a_value_longer_than_a_canvas_names_what_to_lower(vocab):
    tok, v = vocab
    with pytest.raises(ValueError, match="minLength"):
        build_layout(normalise({"type": "string", "minLength": 100}), v, tok, L)


@pytest.mark.parametrize("schema,match", [
    ({"type": "string", "const": 5}, "declared type"),
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "strin"}, "type must be one of"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, "recursive"),
    ({"$ref": "http://x/y"}, "local references"),
    ({"type": "object", "properties": {"child": {"$ref": "#"}}}, "recursive reference '#'"),  # was "only local"
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "bounds"),
    ({"type": "array", "items": [{"type": "string"}]}, "tuple-form"),
    ({"type": "string", "minLength": 4, "maxLength": 2}, "maxLength"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "anyOf"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, "required"),
    ({"type": "object", "required": [1]}, "property names"),
    ([], "must be an object"),
])
def test_unsupported_or_contradictory_schemas_are_refused(schema, match):
    with pytest.raises(SchemaError, match=match):
        normalise(schema)


def test_unique_items_false_is_the_default_and_accepted():
    """uniqueItems: false constrains nothing (it is the default), so it is taken like its absence, not refused."""
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
    assert normalise({**schema, "uniqueItems": False}) == normalise(schema)


@pytest.mark.parametrize("keep", [True, False])
def test_a_separator_decided_in_an_earlier_canvas_is_clamped_to_what_it_will_be(vocab, keep):
    """The comma before a required property that only skipped optional ones precede becomes a space; when they
    were decided in an earlier canvas, the plan clamps it so the denoiser sees the canvas as it will be."""
    from dgemma.engine.structured import JsonPlan
    tok, v = vocab
    schema = {"type": "object", "required": ["z"], "properties": {
        "a": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, "z": {"type": "integer"}}}
    layout = build_layout(normalise(schema), v, tok, 16)
    (s, after), = layout.separators.items()
    assert s // 16 > max(after) // 16  # the test needs the separator in a later canvas
    plan = JsonPlan(layout, tok.eos_id, 16)
    canvas0 = [t if t >= 0 else v.ws for t in layout.clamp[:16]]
    for p in after:
        canvas0[p] = layout.decisions[p].keep if keep else layout.decisions[p].close
    plan.commit(0, torch.tensor([canvas0]), None)
    c = plan.for_canvas(s // 16, None)
    assert int(c.clamp[0, s % 16]) == (v.ids[","] if keep else v.ws)


def test_a_required_name_listed_twice_is_laid_out_once():
    node = normalise({"type": "object", "required": ["x", "x"]})  # undeclared: laid out from additionalProperties
    assert [k for k, _ in node["props"]] == ["x"] and node["required"] == {"x"}
