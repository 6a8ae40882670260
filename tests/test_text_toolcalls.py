"""The model's tool-call text -> OpenAI's {"name", "arguments"}: quoted strings, numbers, literals, nesting,
and what is kept when a call does not parse."""

import json

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
