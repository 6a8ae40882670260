"""Tool calls in the model's format -> OpenAI's {"name", "arguments": JSON string}, best effort.

The model writes a call as `call:NAME{key:value,...}` with strings between <|"|> quotes, bare numbers, true,
false, null, and nested {...} / [...] (the format the chat template writes for past calls); another bare word is
kept as a string (so is NaN or a number too large for a float: JSON has neither). A call that does not parse (a
missing value or key, an unclosed bracket, text after the arguments, nesting too deep) keeps its raw text as
`arguments`, so nothing is lost; the caller decides what to do with it. `arguments` is otherwise always strict
JSON.
"""

from __future__ import annotations

import json
import math

from .specials import QUOTE


def parse_tool_call(raw: str) -> dict:
    head, brace, _ = raw.partition("{")
    name = head.strip().removeprefix("call:").strip()
    if not brace:
        return {"name": name, "arguments": raw}
    try:
        value, end = _value(raw, len(head))
        if raw[end:].strip():
            raise ValueError("text after the arguments")
        return {"name": name, "arguments": json.dumps(value, ensure_ascii=False, allow_nan=False)}
    except (ValueError, IndexError, RecursionError):
        return {"name": name, "arguments": raw[len(head):]}


def _value(s: str, i: int):
    """Parse one value starting at s[i] -> (value, index after it)."""
    while s[i].isspace():
        i += 1
    if s.startswith(QUOTE, i):
        end = s.index(QUOTE, i + len(QUOTE))
        return s[i + len(QUOTE):end], end + len(QUOTE)
    if s[i] in "{[":
        is_map, close, out = s[i] == "{", "}" if s[i] == "{" else "]", {} if s[i] == "{" else []
        i += 1
        while True:
            while s[i].isspace():
                i += 1
            if s[i] == close:  # empty, or after a trailing comma
                break
            if is_map:
                colon = s.index(":", i)
                key, (value, i) = _key(s[i:colon]), _value(s, colon + 1)
                out[key] = value
            else:
                value, i = _value(s, i)
                out.append(value)
            while s[i].isspace():
                i += 1
            if s[i] == ",":
                i += 1
            elif s[i] != close:
                raise ValueError(f"expected ',' or {close!r} at {i}")
        return out, i + 1
    end = i
    while end < len(s) and s[end] not in ",}]":
        end += 1
    token = s[i:end].strip()
    if not token:
        raise ValueError(f"missing value at {i}")
    try:
        value = json.loads(token, parse_constant=_no_constant)  # numbers, true, false, null
    except ValueError:
        return token, end  # a bare word: keep it as a string
    if isinstance(value, float) and not math.isfinite(value):
        return token, end  # 1e400: too large for a float, kept as written
    return value, end


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN, Infinity, -Infinity


def _key(text: str) -> str:
    """A map key: bare (city), or quoted as <|"|>city<|"|> or "city"; empty or with brackets/commas is an error."""
    key = text.strip()
    if len(key) >= 2 * len(QUOTE) and key.startswith(QUOTE) and key.endswith(QUOTE):
        key = key[len(QUOTE):-len(QUOTE)]
    elif len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or any(c in key for c in ",{}[]"):
        raise ValueError(f"bad key {text!r}")
    return key
