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


def fill_and_repair(layout, vocab_size, seed, in_class: float) -> str:
    """Random tokens at every free position (in the position's class with probability in_class, else any id),
    repaired canvas by canvas as the plan does, closed containers clamped to filler."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    closed, out = [], []
    for k in range(-(-len(layout) // L)):
        toks = []
        for p in range(k * L, min((k + 1) * L, len(layout))):
            if any(a <= p < b for a, b in closed):
                toks.append(layout.vocab.ws)
            elif layout.clamp[p] >= 0:
                toks.append(layout.clamp[p])
            elif rng.random() < in_class:
                ids = layout.classes[layout.cls[p]].nonzero().flatten()
                toks.append(int(ids[torch.randint(len(ids), (1,), generator=g)]))
            else:
                toks.append(int(torch.randint(vocab_size, (1,), generator=g)))
        repaired = repair_canvas(layout, toks, k * L,
                                 lambda a, b: torch.randn(b - a, vocab_size, generator=g).log_softmax(-1), closed)
        assert len(repaired) == len(toks), "a repair must keep every position where the layout put it"
        out += repaired
    return layout.vocab.text(out)


@pytest.mark.parametrize("in_class", [1.0, 0.0])
def test_repair_makes_any_canvas_valid(vocab, in_class):
    tok, v = vocab
    for seed in range(120):
        schema = random_schema(seed)
        layout = build_layout(normalise(schema), v, tok, L)
        text = fill_and_repair(layout, v.vocab_size, seed, in_class)
        jsonschema.validate(json.loads(text), schema)


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
    ({"type": "integer", "minimum": 3, "maximum": 2}, "bounds"),
    ({"type": "array", "items": [{"type": "string"}]}, "tuple-form"),
    ({"type": "string", "minLength": 4, "maxLength": 2}, "maxLength"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "anyOf"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, "required"),
    ([], "must be an object"),
])
def test_unsupported_or_contradictory_schemas_are_refused(schema, match):
    with pytest.raises(SchemaError, match=match):
        normalise(schema)
