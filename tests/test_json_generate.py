"""JSON output through the one canvas loop (dgemma/engine/structured.py) on a tiny RANDOM-weight model: its content
is noise, so every document validating against its schema shows validity comes from the construction."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dgemma.cli import main
from dgemma.engine.stream import Done, Text
from dgemma.engine.structured import compact_json, json_plan, schema_of
from json_schemas import random_schema

FAST = {"max_denoising_steps": 2}


def test_random_schemas_always_validate(random_engine):
    canvases = []
    for seed in range(24):
        schema = random_schema(1000 + seed)
        r = random_engine.generate_json(f"Give me JSON number {seed}", schema=schema, seed=seed, **FAST)
        jsonschema.validate(r.value, schema)
        assert json.loads(r.text) == r.value and r.done.finish_reason == "stop"
        canvases.append(r.done.canvases)
    assert max(canvases) >= 3  # documents spanning several 64-token canvases are among them


def test_optional_properties_are_the_models_choice_and_always_valid(random_engine):
    """A random model's decisions are noise: over a few seeds each optional property is sometimes left out, the
    required ones never, and every document validates (commas right whichever subset is kept)."""
    schema = {"type": "object", "required": ["name"], "properties": {
        "nickname": {"type": "string", "maxLength": 8}, "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {"type": "string"}},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}}}}}
    seen = {}
    for seed in range(10):
        r = random_engine.generate_json("Describe someone", schema=schema, seed=seed, **FAST)
        jsonschema.validate(r.value, schema)
        for key in schema["properties"]:
            seen.setdefault(key, set()).add(key in r.value)
    assert seen["name"] == {True}
    assert all(seen[k] == {True, False} for k in ("nickname", "age", "tags", "pet")), seen


def test_stream_text_is_the_document_and_ends_with_eos(random_engine):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 5},
                                               "b": {"type": "string"}}, "required": ["a", "b"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    events = list(random_engine.stream("Hi", response_format=fmt, seed=3, **FAST))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop" and done.canvases >= 2
    text = "".join(e.text for e in events if isinstance(e, Text))
    assert text == done.output.answer
    value = json.loads(text)  # valid as streamed, filler spaces included
    jsonschema.validate(value, schema)
    assert json.loads(compact_json(text)) == value
    assert done.completion_ids[-1] in random_engine.tokenizer.stop_ids


def test_json_object_mode_and_max_tokens_fitting(random_engine):
    r = random_engine.generate_json("Anything", seed=0, **FAST)
    assert isinstance(r.value, dict)
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in "abcdef"}}
    small = random_engine.generate_json("x", schema=schema, max_tokens=70, seed=0, **FAST)
    assert small.done.completion_tokens <= 70
    jsonschema.validate(small.value, schema)
    tiny = random_engine.generate_json("x", schema=schema, max_tokens=10, seed=0, **FAST)
    assert tiny.value == {} and tiny.done.completion_tokens <= 10  # optional properties are left out to fit
    with pytest.raises(ValueError, match="raise max_tokens"):
        random_engine.generate_json("x", schema={**schema, "required": list("abcdef")}, max_tokens=10)


def test_max_items_is_an_upper_bound_that_shrinks_to_fit_max_tokens(random_engine):
    ints = {"type": "array", "items": {"type": "integer"}, "maxItems": 300}
    r = random_engine.generate_json("x", schema=ints, max_tokens=100, seed=0, **FAST)  # was "needs at least 2134"
    jsonschema.validate(r.value, ints)
    assert r.done.completion_tokens <= 100 and r.done.finish_reason == "stop"
    assert len(json_plan(random_engine, ints, max_tokens=100).layout.decisions) >= 4  # several items, not just []
    nested = {"type": "object", "required": ["tags", "rows"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 2, "maxItems": 40},
        "rows": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "number"}}},
                 "minItems": 1, "maxItems": 10**6}}}
    r = random_engine.generate_json("x", schema=nested, max_tokens=64, seed=1, **FAST)
    jsonschema.validate(r.value, nested)  # minItems still honoured
    assert r.done.completion_tokens <= 64
    context = random_engine.config.max_position_embeddings
    assert len(json_plan(random_engine, {**ints, "maxItems": 10**9}).layout) < context  # no max_tokens: the context


def test_when_only_the_minimum_fits_values_get_shorter_too(random_engine):
    schema = {"type": "array", "items": {"type": "number"}, "minItems": 5}  # unbounded numbers had 10 positions each
    r = random_engine.generate_json("x", schema=schema, max_tokens=30, seed=2, **FAST)
    jsonschema.validate(r.value, schema)
    assert len(r.value) == 5 and r.done.completion_tokens <= 30
    words = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 3, "maxItems": 9}
    r = random_engine.generate_json("x", schema=words, max_tokens=16, seed=3, **FAST)
    jsonschema.validate(r.value, words)
    assert r.done.completion_tokens <= 16


def test_max_tokens_error_names_only_the_minimums_that_do_not_fit(random_engine):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 300}
    with pytest.raises(ValueError, match="raise max_tokens .* lower its minItems$"):
        json_plan(random_engine, schema, max_tokens=10)
    words = {"type": "object", "properties": {"w": {"type": "string", "minLength": 40}}, "required": ["w"]}
    with pytest.raises(ValueError, match="lower its minLength$"):
        json_plan(random_engine, words, max_tokens=20)
    assert len(json_plan(random_engine, {**words, "required": []}, max_tokens=20).layout) < 20  # "w" left out
    mixed = {"type": "object", "required": ["n"], "properties": {"w": words["properties"]["w"], "n": schema}}
    with pytest.raises(ValueError, match="lower its minItems$"):  # the optional "w" is no floor: it can go
        json_plan(random_engine, mixed, max_tokens=10)
    with pytest.raises(ValueError, match="context of .* lower its minItems$"):
        json_plan(random_engine, {**schema, "minItems": 10**9, "maxItems": 10**9})
    fits_today = {"type": "array", "items": {"type": "boolean"}, "maxItems": 5}
    full = json_plan(random_engine, fits_today, max_tokens=200).layout
    assert len(full.decisions) == 5  # all maxItems slots where they fit, as before


@pytest.mark.parametrize("fmt,match", [
    ({"type": "xml"}, "must be 'text'"),
    ({"type": "json_schema"}, "json_schema.schema"),
    ("json", "must be an object"),
])
def test_bad_response_format(random_engine, fmt, match):
    with pytest.raises(ValueError, match=match):
        list(random_engine.stream("x", response_format=fmt))


def test_response_format_text_and_stop_conflict(random_engine):
    assert schema_of({"type": "text"}) is None
    with pytest.raises(ValueError, match="stop strings"):
        list(random_engine.stream("x", response_format={"type": "json_object"}, stop=["}"]))


def test_compact_json_keeps_strings():
    assert compact_json('{ "a b" :  [1 ,  "x, \\" y" ] ,"c":null }') == '{"a b": [1, "x, \\" y"], "c": null}'


def test_cli_json_schema_prints_only_the_document(random_model_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "pop": {"type": "integer", "minimum": 0}},
              "required": ["city", "pop"]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    assert main(["generate", "--model", str(random_model_dir), "--json-schema", str(f), "--steps", "2", "--seed", "0",
                 "A city"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    jsonschema.validate(json.loads(out), schema)
    f.write_text('{"type": "string", "pattern": "x"}')
    assert main(["generate", "--model", str(random_model_dir), "--json-schema", str(f), "A"]) == 2
    assert "pattern" in capsys.readouterr().err


def test_cli_checks_the_schema_before_loading_a_model(tmp_path, capsys):
    f = tmp_path / "s.json"
    missing = str(tmp_path / "no-model")  # a schema error must not wait for (or hide behind) the model
    for text, match in [('{"type": "string", "pattern": "x"}', "pattern"), ("[1]", "must hold a JSON object")]:
        f.write_text(text)
        assert main(["generate", "--model", missing, "--json-schema", str(f), "A"]) == 2
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--json-schema", str(f), "--json-object", "A"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--json", "--json-object"], ["--json-schema", "s.json", "--json-object"],
                                   ["--json", "--json-schema", "s.json"]])
def test_cli_output_flags_that_conflict_are_refused(random_model_dir, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(random_model_dir), *flags, "A city"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--json-object", "--think"], "--think cannot be combined with --json-object"),
    (["--json-schema", "s.json", "--think"], "--think cannot be combined with --json-schema"),
    (["--json-object", "--show-drafts"], "--show-drafts cannot be combined with --json-object"),
    (["--json-schema", "s.json", "--show-thinking"], "--show-thinking cannot be combined with --json-schema"),
    (["--json", "--show-drafts"], "--show-drafts draws on stdout, which --json keeps for the JSON object")])
def test_cli_flags_a_json_output_would_ignore_are_refused_before_loading(tmp_path, monkeypatch, flags, message,
                                                                         capsys):
    (tmp_path / "s.json").write_text('{"type": "object"}')
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "no-model"), *flags, "A city"]) == 2
    err = capsys.readouterr().err
    assert message in err and "does not exist" not in err, err  # refused before the model is looked for


def test_special_token_text_in_keys_and_literals_is_plain_text(random_engine):
    """A key, enum value or const holding a special token's string ("<eos>") is spelled with ordinary tokens: as
    the special id it ended the answer mid-key (the output was '{"', not JSON) or vanished from the decoded text."""
    tok = random_engine.tokenizer
    assert tok.encode("<eos>", add_bos=False) == [tok.eos_id]  # the tokenizer does read it as the special token
    schema = {"type": "object", "required": ["<eos>", "k"], "properties": {
        "<eos>": {"type": "integer"}, "k": {"enum": ["<pad>", "a<bos>b"]}, "c": {"const": "x<eos>"}}}
    for seed in range(3):
        r = random_engine.generate_json("Give JSON", schema=schema, seed=seed, **FAST)
        jsonschema.validate(r.value, schema)
        assert "<eos>" in r.value and r.value["k"] in ("<pad>", "a<bos>b")
    ids = tok.encode_literal("a<eos><bos>b<eos>")
    assert tok.added_id_set.isdisjoint(ids) and tok.decode(ids, skip_special=False) == "a<eos><bos>b<eos>"
