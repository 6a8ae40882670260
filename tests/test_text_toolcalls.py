"""The model's tool-call text -> OpenAI's {"name", "arguments"}: quoted strings, numbers, literals, nesting,
and what is kept when a call does not parse."""

import json

import pytest

from dgemma.text import parse_tool_call


def test_tool_call_parsing():
    assert parse_tool_call('call:f{a:<|"|>x, y<|"|>,b:[1,true,null],c:{d:-2.5}}') == {
        "name": "f", "arguments": json.dumps({"a": "x, y", "b": [1, True, None], "c": {"d": -2.5}})}
    assert parse_tool_call("call:g{broken") == {"name": "g", "arguments": "{broken"}
    assert parse_tool_call("call:h") == {"name": "h", "arguments": "call:h"}


def test_tool_call_edge_cases():
    assert parse_tool_call('call:f{}') == {"name": "f", "arguments": "{}"}
    assert parse_tool_call('call:f{q:<|"|>a}b<|"|>, n: 3 }') == {"name": "f", "arguments": '{"q": "a}b", "n": 3}'}
    assert parse_tool_call("call:f{w:word}") == {"name": "f", "arguments": '{"w": "word"}'}  # bare word: a string
    assert parse_tool_call("call:f{a:1} tail") == {"name": "f", "arguments": "{a:1} tail"}  # trailing text: raw


def test_arguments_are_always_strict_json_or_the_raw_text():
    # The server hands `arguments` to OpenAI clients, which JSON.parse it: never NaN/Infinity, never an invented key.
    for raw, expected in [
        ("call:f{a:NaN,b:-Infinity,c:1e400}", {"a": "NaN", "b": "-Infinity", "c": "1e400"}),  # bare words, as written
        ("call:f{ }", {}), ("call:f{a:[ ]}", {"a": []}), ("call:f{ a : [ 1 , 2 , ] , }", {"a": [1, 2]}),
        ('call:f{<|"|>k<|"|>:1,"j":2}', {"k": 1, "j": 2}),  # quoted keys lose their quotes
    ]:
        call = parse_tool_call(raw)
        assert json.loads(call["arguments"], parse_constant=lambda c: pytest.fail(c)) == expected, raw
    # malformed: a missing value or key, a doubled comma (was the key ",b" / the value ""), nesting too deep
    # (was a RecursionError out of the server's response formatting)
    deep = "call:f" + "{a:" * 5000 + "1" + "}" * 5000
    for raw in ("call:f{a:1,,b:2}", "call:f{a:[,]}", "call:f{:1}", "call:f{a:,b:1}", deep):
        assert parse_tool_call(raw) == {"name": "f", "arguments": raw[len("call:f"):]}, raw[:40]
