"""Tool calls in the model's format -> OpenAI's {"name", "arguments": JSON string}, best effort.

The model writes a call as `call:NAME{key:value,...}` with strings between <|"|> quotes, bare numbers, true,
false, null, and nested {...} / [...] (the format the chat template writes for past calls). A call that does not
parse keeps its raw text as `arguments`, so nothing is lost; the caller decides what to do with it.
"""

from __future__ import annotations

import json

QUOTE = '<|"|>'


def parse_tool_call(raw: str) -> dict:
    head, brace, _ = raw.partition("{")
    name = head.strip().removeprefix("call:").strip()
    if not brace:
        return {"name": name, "arguments": raw}
    try:
        value, end = _value(raw, len(head))
        if raw[end:].strip():
            raise ValueError("text after the arguments")
        return {"name": name, "arguments": json.dumps(value, ensure_ascii=False)}
    except (ValueError, IndexError):
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
        while s[i] != close:
            if is_map:
                colon = s.index(":", i)
                key, (value, i) = s[i:colon].strip(), _value(s, colon + 1)
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
    try:
        return json.loads(token), end  # numbers, true, false, null
    except ValueError:
        return token, end  # a bare word: keep it as a string
