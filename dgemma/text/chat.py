"""Chat messages -> prompt text, through a Jinja chat template (the model's own or dgemma's).

Messages are checked and brought into one shape first, so a template only ever sees
`{"role": system|user|assistant|tool, "content": str, ...}` with tool calls as
`{"type": "function", "function": {"name": str, "arguments": dict}}` (the Hugging Face convention,
which the real checkpoint's template also expects). Thinking is a prompt-level switch
(`enable_thinking`, spec §6.7); the sampler knows nothing about it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .specials import BOS, EOS, PAD

ROLES = ("system", "user", "assistant", "tool")
_ALIASES = {"model": "assistant", "developer": "system"}  # Gemma's and OpenAI's other names


class ChatFormatError(ValueError):
    """Messages or a template that cannot be rendered; the message says what to change."""


def default_chat_template() -> str:
    """dgemma's own Gemma-4-format template (`chat_template.jinja` beside this file)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text("utf-8")


def load_chat_template(directory: str | Path) -> str | None:
    """The model directory's template: `chat_template.jinja`, else tokenizer_config.json's."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) for p in content):
        # OpenAI-style content parts: text parts are joined; anything else is not supported yet.
        for j, p in enumerate(content):
            if "type" not in p:
                raise ChatFormatError(f"{where}[{j}] has no 'type'; a text part is {{'type': 'text', 'text': ...}}")
            if p["type"] != "text":
                raise ChatFormatError(f"{where}[{j}] is a {p['type']!r} part: only text is supported for now "
                                      "(images and audio are not); send the text parts alone")
            if not isinstance(p.get("text"), str):
                raise ChatFormatError(f"{where}[{j}]['text'] is {type(p.get('text')).__name__}; it must be a string")
        return "".join(p["text"] for p in content)
    raise ChatFormatError(
        f"{where} is {type(content).__name__}; content must be a string "
        "(or a list of {'type': 'text', 'text': ...} parts)"
    )


def _arguments(args: Any, where: str) -> dict:
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where} is not valid JSON ({e}); pass a dict or a JSON object")
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"{where} must be a dict or a JSON object string")
    return dict(args)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise ChatFormatError(f"{where} must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(
                f"{where}[{j}] needs a name: {{'function': {{'name': ..., 'arguments': {{...}}}}}}"
            )
        args = _arguments(fn.get("arguments", {}), f"{where}[{j}] arguments")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Check `messages` and return them in the one shape templates see (see module docstring)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(
            f"messages must be a list of dicts, got {type(messages).__name__}; "
            "e.g. [{'role': 'user', 'content': 'Hi'}]"
        )
    if not messages:
        raise ChatFormatError("messages is empty: pass at least one, e.g. [{'role': 'user', ...}]")
    out: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, to name tool results
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatFormatError(
                f"{where} is {type(m).__name__}; expected a dict with role and content"
            )
        role = m.get("role")
        role = _ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatFormatError(f"{where} has unknown role {m.get('role')!r}; use one of {ROLES}")
        if role == "system" and i > 0:
            raise ChatFormatError(
                f"{where} is a system message; only the first message may be one "
                "(merge the system text into messages[0])"
            )
        entry: dict[str, Any] = {"role": role}
        content = m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}['tool_calls']")
            for c in entry["tool_calls"]:
                call_names[c.get("id", "")] = c["function"]["name"]
            content = "" if content is None else content
        if role == "tool":
            call_id = m.get("tool_call_id") or ""
            name = m.get("name") or (call_names.get(call_id) if isinstance(call_id, str) else None)
            if not isinstance(name, str) or not name:
                raise ChatFormatError(
                    f"{where} is a tool result without a tool name: give it 'name', or a "
                    "'tool_call_id' that matches an earlier assistant tool call's 'id'"
                )
            entry["name"] = name
            if isinstance(content, Mapping):
                entry["response"], content = dict(content), json.dumps(content, ensure_ascii=False)
            else:
                content = _text(content, f"{where}['content']")
                # A JSON object result is shown as structured data, anything else as text.
                try:
                    parsed = json.loads(content)
                except json.JSONDecodeError:
                    parsed = None
                entry["response"] = parsed if isinstance(parsed, dict) else {"result": content}
        entry["content"] = _text(content, f"{where}['content']")
        out.append(entry)
    return out


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict] | None:
    """Accept OpenAI-style `{"type": "function", "function": {...}}` or bare `{"name": ...}`."""
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, (Sequence, type(None))):
        raise ChatFormatError(
            f"tools must be a list of tool definitions, got {type(tools).__name__}; "
            "e.g. [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {...}}}]"
        )
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tools[{i}] needs a 'name' (or 'function': {{'name': ...}})")
        out.append({"type": "function", "function": dict(fn)})
    return out


def _raise(message: str) -> None:
    raise ChatFormatError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would corrupt a prompt. The keywords are json.dumps's,
    # which templates use (compact separators, sorted keys) and Hugging Face's renderer honours.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: templates written for training mark the assistant's text with it (a
    loss mask in Hugging Face's renderer); for a prompt only the text matters, so the block renders as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **context: Any,
) -> str:
    """Prompt text for `messages`. `template` is Jinja source (None: dgemma's default template).

    Extra keyword arguments reach the template as variables (`bos_token` etc. default to the
    Gemma-4 strings). The result starts with `<bos>`: encode it with `Tokenizer.encode`, which
    never adds a second one.
    """
    variables = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, **context}
    variables.update(
        messages=normalize_messages(messages),
        tools=normalize_tools(tools),
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    try:
        return _compile(template if template is not None else default_chat_template()).render(
            **variables
        )
    except TemplateError as e:
        raise ChatFormatError(f"chat template failed to render: {e}") from e
    except RecursionError:  # the template renders nested values (tool parameters) with a recursive macro
        raise ChatFormatError("chat template failed to render: a value in messages or tools is nested too deeply; "
                              "flatten it") from None
