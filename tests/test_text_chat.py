"""Chat rendering (dgemma.text.chat): exact Gemma-4 prompt strings, validation, templates."""

import json

import pytest

from dgemma.text import ChatFormatError, default_chat_template, load_chat_template, render_chat

USER = {"role": "user", "content": "Hi"}
GEN_NO_THINK = "<|turn>model\n<|channel>thought\n<channel|>"


def test_single_turn_thinking_off():
    assert render_chat([USER]) == "<bos><|turn>user\nHi<turn|>\n" + GEN_NO_THINK


def test_thinking_on_with_and_without_system():
    system = {"role": "system", "content": "Be brief."}
    assert render_chat([system, USER], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    assert render_chat([USER], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    assert render_chat([system, USER]) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n" + GEN_NO_THINK
    )


def test_multi_turn_and_no_generation_prompt():
    msgs = [USER, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\n2+2?<turn|>\n"
    assert render_chat(msgs, add_generation_prompt=False) == expected
    assert render_chat(msgs) == expected + GEN_NO_THINK
    # "model" is accepted as Gemma's name for the assistant; list-of-text-parts content is joined
    alt = [
        {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
        {"role": "model", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    assert render_chat(alt, add_generation_prompt=False) == expected


def test_tools_calls_and_results():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp": 15, "sun": True})},
    ]
    head = (
        "<bos><|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Weather now<|\"|>,"
        "parameters:{type:<|\"|>object<|\"|>,properties:{city:{type:<|\"|>string<|\"|>}}}}<tool|>"
        "<turn|>\n<|turn>user\nWeather?<turn|>\n<|turn>model\n"
        "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>"
        "<|tool_response>response:get_weather{temp:15,sun:true}<tool_response|>"
    )
    # The model turn stays open after tool results: the generation prompt continues it.
    assert render_chat(msgs, tools=tools) == head
    done = msgs + [{"role": "assistant", "content": "15 and sunny."}]
    assert render_chat(done, tools=tools, add_generation_prompt=False) == head + "15 and sunny.<turn|>\n"
    # A plain-text result (not a JSON object) and a result named directly
    text = [msgs[0], msgs[1], {"role": "tool", "name": "get_weather", "content": "sunny"}]
    assert render_chat(text).endswith("response:get_weather{result:<|\"|>sunny<|\"|>}<tool_response|>")


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([], "messages is empty"),
        ("Hi", "must be a list"),
        ([USER, "Hi"], r"messages\[1\] is str"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\] has unknown role 'bot'.*user"),
        ([{"role": ["user"], "content": "x"}], r"messages\[0\] has unknown role \['user'\]"),  # was a TypeError
        ([USER, {"role": "tool", "tool_call_id": {"id": "c1"}, "content": "x"}], "without a tool name"),
        ([{"role": "user", "content": 42}], r"messages\[0\]\['content'\] is int.*string"),
        ([{"role": "user"}], r"content'\] is NoneType"),
        ([USER, {"role": "system", "content": "x"}], r"messages\[1\] is a system message.*first"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"\[0\] is a 'image_url' part"),
        # were "has a None part" and "content'] is list; content must be a string"
        ([{"role": "user", "content": [{"text": "a"}]}], r"content'\]\[0\] has no 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}],
         r"content'\]\[1\]\['text'\] is NoneType; it must be a string"),
        ([USER, {"role": "tool", "content": "x"}], "without a tool name"),
        ([USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
         "not valid JSON"),
        ([USER, {"role": "assistant", "tool_calls": [{"function": {}}]}], "needs a name"),
    ],
)
def test_invalid_messages_say_what_to_fix(messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        render_chat(messages)


def test_invalid_tools():
    with pytest.raises(ChatFormatError, match=r"tools\[0\] needs a 'name'"):
        render_chat([USER], tools=[{"description": "no name"}])
    for tools in ({"name": "f"}, "f", 5):  # one definition not in a list: was "tools[0] needs a 'name'" / TypeError
        with pytest.raises(ChatFormatError, match=f"tools must be a list of tool .*, got {type(tools).__name__}"):
            render_chat([USER], tools=tools)


def test_custom_template_and_context():
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    assert render_chat([USER], template=template, bos_token="<s>") == "<s>[user:Hi]"
    # tojson must not HTML-escape (Jinja's own does), or prompts with <tags> are corrupted
    assert render_chat([USER], template="{{ tools | tojson }}", tools=[{"name": "<b>&"}]) == (
        '[{"type": "function", "function": {"name": "<b>&"}}]'
    )
    with pytest.raises(ChatFormatError, match="chat template: nope"):
        render_chat([USER], template="{{ raise_exception('nope') }}")
    with pytest.raises(ChatFormatError, match="failed to render"):
        render_chat([USER], template="{% for %}")


def test_template_is_sandboxed():
    with pytest.raises(ChatFormatError):
        render_chat([USER], template="{{ messages.__class__.__mro__[1].__subclasses__() }}")


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert load_chat_template(tmp_path) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the separate file wins (HF layout)
    assert load_chat_template(tmp_path) == "J"
    assert "<|turn>" in default_chat_template()


def test_generation_blocks_render_as_their_body():
    # Templates written for training wrap the assistant's text in {% generation %} (Hugging Face's loss-mask
    # marker); they failed with "unknown tag 'generation'". transformers renders them: the oracle.
    from dgemma.bundled import PACKAGED

    marked = "{%- generation -%}{{- m.content -}}{% set x = 5 %}{%- endgeneration -%}{{- x is defined -}}"
    template = default_chat_template().replace("{{- m.content -}}", marked)
    msgs = [USER, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    ours = render_chat(msgs, template=template, add_generation_prompt=False)
    assert ours == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!False<turn|>\n<|turn>user\n2+2?<turn|>\n"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(PACKAGED))
    assert hf.apply_chat_template(msgs, chat_template=template, tokenize=False) == ours


@pytest.mark.parametrize("args, dumps", [
    ("", {}), ("(indent=2)", {"indent": 2}), ("(sort_keys=True)", {"sort_keys": True}),
    ("(separators=(',', ':'))", {"separators": (",", ":")}), ("(ensure_ascii=True)", {"ensure_ascii": True}),
    ("(indent=1, sort_keys=True, separators=(',', ': '))", {"indent": 1, "sort_keys": True, "separators": (",", ": ")}),
])
def test_tojson_takes_json_dumps_keywords_as_transformers_does(args, dumps):
    # sort_keys and separators were silently ignored (another prompt than the reference renders)
    from dgemma.bundled import PACKAGED

    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>", "parameters": {"b": 1, "a": [1]}}}]
    template = "{{ tools | tojson" + args + " }}"
    ours = render_chat([USER], tools=tools, template=template)
    assert ours == json.dumps(tools, **{"ensure_ascii": False, **dumps})
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(PACKAGED))
    assert hf.apply_chat_template([USER], tools=tools, chat_template=template, tokenize=False) == ours
