"""`dgemma serve`: the real server (uvicorn on a free loopback port) over the tiny random model, driven by the
official openai client and by raw HTTP for bad input, disconnects, auth, admission limits and 8 concurrent clients.
Requests use few denoising steps and few tokens so the whole file runs in seconds on CPU."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import running

httpx = pytest.importorskip("httpx")  # the test extra
openai = pytest.importorskip("openai")

import dgemma
from dgemma.bundled import build_random_model
from dgemma.cli import build_parser
from dgemma.engine.stream import Done, Text
from dgemma.serve import create_app, server
from dgemma.serve.schemas import MAX_BODY_BYTES, MAX_DENOISING_STEPS
from dgemma.serve.worker import Cancelled, Job, Overloaded, SerialWorker, Ticket
from dgemma.text.parse import ParsedOutput

MODEL = "tiny"
FAST = {"max_denoising_steps": 4}  # extra body: few steps per canvas keep every request cheap
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("m") / "random")


def new_engine(model_dir):
    return dgemma.load(model_dir, quiet=True)  # one Engine per server: Engines are not shared between threads


@pytest.fixture(scope="module")
def url(model_dir):
    with running(create_app(new_engine(model_dir), model_name=MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    kw.setdefault("extra_body", dict(FAST))
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", HI), **kw)


def stream_chat(client, **kw):
    kw.setdefault("extra_body", dict(FAST))
    chunks = list(client.chat.completions.create(model=MODEL, messages=kw.pop("messages", HI), stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def sse(response) -> list:
    """Data payloads of a server-sent event stream ('[DONE]' kept as the string)."""
    out = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in out]


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# -- the openai client ---------------------------------------------------------------------------------------------


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_the_readme_client_example_runs_against_dgemma_serve(model_dir):
    """README 'Server': its Python example, as written, against a server named as `dgemma serve` names it."""
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("## Server", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:8000" in example
    engine = new_engine(model_dir)
    with running(create_app(engine, model_name=Path(engine.directory).name)) as base:  # cmd_serve's default name
        exec(example.replace("http://127.0.0.1:8000", base), {})  # streams an answer (the random model's may be empty)


def test_streamed_chat_equals_the_non_streamed_answer(client):
    full = chat(client, max_tokens=70, seed=3)
    text, chunks = stream_chat(client, max_tokens=70, seed=3, stream_options={"include_usage": True})
    assert text == full.choices[0].message.content and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # small deltas, not one lump
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.model_extra["dgemma"]["canvases"] >= 1


@pytest.mark.parametrize("max_tokens", [1, 65])
def test_max_tokens_is_exact(client, max_tokens):
    r = chat(client, max_tokens=max_tokens, seed=1, extra_body={**FAST, "ignore_eos": True})
    assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
    r = chat(client, max_completion_tokens=max_tokens, seed=2)  # the newer name; may stop earlier at an end token
    assert 1 <= r.usage.completion_tokens <= max_tokens


def test_seed_reproducibility(client):
    a, b, c = (chat(client, max_tokens=30, seed=s, extra_body={**FAST, "ignore_eos": True}) for s in (5, 5, 6))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_stop_strings(client):
    body = {**FAST, "ignore_eos": True}
    for seed in range(10):  # a seed whose (random-model) answer is long enough to cut
        full = chat(client, max_tokens=60, seed=seed, extra_body=body).choices[0].message.content
        if len(full) > 20:
            break
    stop = full[8:12]
    expected = full[: full.find(stop)]
    r = chat(client, max_tokens=60, seed=seed, stop=[stop, "never-appears"], extra_body=body)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    text, _ = stream_chat(client, max_tokens=60, seed=seed, stop=stop, extra_body=body)
    assert text == expected


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=20, seed=4, extra_body=FAST)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=20, seed=4, stream=True,
                                            extra_body=FAST))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert 1 <= r.usage.completion_tokens <= 20 and r.choices[0].finish_reason in ("stop", "length")
    ids = client.completions.create(model=MODEL, prompt=[2, 10, 20], max_tokens=3, extra_body=FAST)
    assert ids.usage.prompt_tokens == 3


def test_thinking_switch_reaches_the_template(client):
    on = chat(client, max_tokens=1, extra_body={**FAST, "chat_template_kwargs": {"enable_thinking": True}})
    top = chat(client, max_tokens=1, extra_body={**FAST, "enable_thinking": True})
    off = chat(client, max_tokens=1)
    assert on.usage.prompt_tokens == top.usage.prompt_tokens != off.usage.prompt_tokens


def test_draft_frames_are_an_extension_standard_clients_ignore(url, client):
    plain, _ = stream_chat(client, max_tokens=20, seed=9)
    with_drafts, _ = stream_chat(client, max_tokens=20, seed=9, extra_body={**FAST, "dgemma_drafts": True})
    assert with_drafts == plain
    with httpx.stream("POST", url + "/v1/chat/completions", json={
            "model": MODEL, "messages": HI, "max_tokens": 20, "seed": 9, "stream": True, "dgemma_drafts": True,
            **FAST}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    drafts = [e["dgemma_draft"] for e in events[:-1] if "dgemma_draft" in e]
    assert [d["step"] for d in drafts] == list(range(1, len(drafts) + 1)) and 1 <= len(drafts) <= 4
    for d in drafts:
        assert len(d["confidence"]) == len(d["tokens"]) == 64 and all(0 <= c <= 1 for c in d["confidence"])
    assert all(e["choices"][0]["delta"] == {} for e in events[:-1] if "dgemma_draft" in e)


class ScriptedTicket:
    """A ticket over a timeline [(arrival_s, event)] on a clock the test owns: next(timeout) moves the clock to the
    next event's arrival and returns it, or, when that is later than the timeout, moves it by the timeout and returns
    None (as Ticket.next). No wall-clock time passes, so the pacing is checked exactly."""

    def __init__(self, timeline):
        self.now, self.timeline = 0.0, list(timeline)

    def monotonic(self) -> float:
        return self.now

    async def next(self, timeout=None):
        arrival, event = self.timeline[0]
        if timeout is not None and arrival > self.now + timeout:
            self.now += timeout
            return None
        self.now = max(self.now, arrival)
        return self.timeline.pop(0)[1]

    def cancel(self):
        pass


def test_committed_text_keeps_its_pace_while_drafts_of_the_next_canvas_arrive(monkeypatch):
    """Each piece of committed text is due MAX_PIECE_DELAY_S after the one before it. The wait for the next event was
    a timeout restarted by every event, so with draft steps closer together than that (few words per canvas, many
    steps) the first piece went out and the rest waited for Done, a canvas later. Now the wait ends at a deadline,
    whatever drafts arrive in between; drafts and text keep their order of arrival otherwise."""
    from types import SimpleNamespace

    from dgemma.engine.stream import Draft
    from dgemma.serve import http
    from dgemma.serve.formats import ChatFormat

    text = "one two three four five six"
    first = [(0.1 * step, Draft(0, step, "x", [7], [0.5])) for step in range(1, 9)]  # the canvas that commits `text`
    drafts = [Draft(1, step, "x", [7], [0.5]) for step in range(1, 41)]  # the next canvas, a step per 15 ms
    timeline = [*first, (1.0, Text(text)), *((1.0 + 0.015 * k, d) for k, d in enumerate(drafts, 1)),
                (1.7, Done("stop", ParsedOutput(None, text), 3, 6, [5] * 6, [8, 40], 0.5, 1.7))]
    ticket = ScriptedTicket(timeline)
    monkeypatch.setattr(http, "time", SimpleNamespace(monotonic=ticket.monotonic))  # the stream's clock only
    fmt = ChatFormat(MODEL, True, SimpleNamespace(decode=lambda ids, skip_special=False: "x"))

    async def sent():
        return [(ticket.now, json.loads(c[len("data: "):])) async for c in http._sse(ticket, ticket, fmt)
                if c != "data: [DONE]\n\n"]

    chunks = asyncio.run(sent())
    content = [(t, c["choices"][0]["delta"]["content"]) for t, c in chunks[1:]
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(p for _, p in content) == text and len(content) == 6
    delay = http.MAX_PIECE_DELAY_S  # 0.8 s per commit so far spread over 5 pieces: the cap
    for i, (t, _) in enumerate(content):  # paced, not flushed at once, and never late
        assert 1.0 + i * delay - 1e-9 <= t <= 1.0 + i * delay + 1e-9, (i, t, content)
    frames = [(c["dgemma_draft"]["canvas"], c["dgemma_draft"]["step"]) for _, c in chunks if "dgemma_draft" in c]
    assert frames == [(0, s) for s in range(1, 9)] + [(1, s) for s in range(1, 41)]
    for t, c in chunks:  # a draft goes out when it arrives
        if "dgemma_draft" in c and c["dgemma_draft"]["canvas"] == 1:
            assert t == pytest.approx(1.0 + 0.015 * c["dgemma_draft"]["step"])
    kinds = ["draft" if "dgemma_draft" in c else "text" if c["choices"] and c["choices"][0]["delta"].get("content")
             else "other" for _, c in chunks]
    assert kinds[:10] == ["other"] + ["draft"] * 8 + ["text"]  # role; the committing canvas's drafts; its text
    assert chunks[-2][1]["choices"][0]["finish_reason"] == "stop" and chunks[-1][1]["usage"]["total_tokens"] == 9


def test_diffusion_knobs_and_ignored_openai_fields(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        for extra in ({"acceptance": "linear-quota"}, {"acceptance": "confidence:0.5"}, {"acceptance": "quota:16"},
                      {"acceptance": f"quota:{10**20}"}, {"stability_threshold": 6},  # a quota past int64: all
                      {"sampling": "reference", "seed": 1}, {"t_min": None, "t_max": None},
                      {"stability_threshold": None, "confidence_threshold": None, "entropy_bound": 0.5},
                      {"temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.1, "user": "u", "stop": []},
                      {"response_format": {"type": "text"}, "tool_choice": "none", "reasoning_effort": "low"}):
            r = http.post("/v1/chat/completions", json={**OK, **extra})
            assert r.status_code == 200, (extra, r.text)
            assert r.json()["usage"]["completion_tokens"] <= 2
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, **FAST})  # no max_tokens
        assert 1 <= r.json()["usage"]["completion_tokens"] <= 64  # the model's generation_config default


# -- bad input: 4xx with an OpenAI-style error, never a crash ------------------------------------------------------

OK = {"model": MODEL, "messages": HI, "max_tokens": 2, **FAST}
BAD_CHAT = [
    ({"model": "gpt-4"}, 404, "model"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, 400, "ignore_eos"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"max_tokens": 10**6}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
    ({"stop": 5}, 400, "stop"),
    ({"stop": ""}, 400, "stop"),
    ({"stop": ["x", ""]}, 400, "stop"),
    ({"seed": "x"}, 400, "seed"),
    ({"n": 2}, 400, "n"),
    ({"stream": "yes"}, 400, "stream"),
    ({"t_min": 0.9, "t_max": 0.5}, 400, "t_max"),
    ({"max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ({"max_denoising_steps": 10**6}, 400, "max_denoising_steps"),
    ({"stability_threshold": MAX_DENOISING_STEPS + 1}, 400, "stability_threshold"),  # [threshold, 64] ids a canvas
    ({"entropy_bound": -1}, 400, "entropy_bound"),
    ({"confidence_threshold": 0}, 400, "confidence_threshold"),
    ({"acceptance": "bogus"}, 400, "acceptance"),
    ({"acceptance": "quota:x"}, 400, "acceptance"),
    ({"acceptance": "confidence:0.9", "entropy_bound": 0.5}, 400, "acceptance"),  # the bound would be unused
    ({"sampling": "exact"}, 400, "sampling"),
    ({"temperature": 5}, 400, "temperature"),
    ({"max_denoise_steps": 3}, 400, "max_denoise_steps"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"response_format": {"type": "xml"}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                        "pattern": "a+"}}}},
     400, "response_format"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, 400, "stop"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"dgemma_drafts": True}, 400, "dgemma_drafts"),
    ({"chat_template_kwargs": {"template": "{{ x }}"}}, 400, "chat_template_kwargs"),
    ({"tools": [{"type": "function"}]}, 400, "tools"),
]


def test_a_prompt_that_leaves_no_canvas_says_how_long_a_prompt_fits(url):
    card = httpx.get(url + "/v1/models/" + MODEL).json()
    fits = card["max_model_len"] - card["canvas_length"]
    with httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": MODEL, "prompt": [5] * (fits + 1), **FAST}  # no max_tokens: the server picks what fits
        err = assert_error(http.post("/v1/completions", json=body), 400, "prompt")
        assert f"at most {fits} prompt tokens" in err["message"] and "max_tokens" not in err["message"], err
        # with max_tokens given, too: lowering it cannot help, so the message must not advise it
        err = assert_error(http.post("/v1/completions", json={**body, "max_tokens": 1}), 400, "prompt")
        assert f"at most {fits} prompt tokens" in err["message"] and "max_tokens" not in err["message"], err
        assert http.post("/v1/completions", json={**body, "prompt": [5] * fits, "max_tokens": 2}).status_code == 200


def test_null_means_the_default_as_in_openai(client):
    """The OpenAI client types n, stream and echo as Optional: an explicit None is sent as null."""
    r = chat(client, max_tokens=2, n=None, stream=None)
    assert r.object == "chat.completion" and len(r.choices) == 1
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=None, stream=None, echo=None,
                                  extra_body=dict(FAST))
    assert r.object == "text_completion" and len(r.choices) == 1


def test_bad_chat_requests(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        for change, status, param in BAD_CHAT:
            assert_error(http.post("/v1/chat/completions", json={**OK, **change}), status, param)
        for raw in (b"{bad json", b"[1, 2]", b'{"model": "tiny", "t_min": NaN}', b"\xff\xfe"):
            assert_error(http.post("/v1/chat/completions", content=raw), 400)
        deep = json.dumps(OK)[:-1].encode() + b', "metadata": {"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}}"
        assert "nested too deeply" in assert_error(http.post("/v1/chat/completions", content=deep), 400)["message"]
        params = {"type": "string"}
        for _ in range(100):  # the chat template renders tool parameters with a recursive macro
            params = {"type": "object", "properties": {"a": params}}
        tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
        err = assert_error(http.post("/v1/chat/completions", json={**OK, "tools": tools}), 400)
        assert "nested too deeply" in err["message"]
        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        for fn, said in (({"name": "f", "parameters": json.dumps(schema)}, "tools[0].function.parameters must be"),
                         ({"name": "f", "parameters": [schema]}, "tools[0].function.parameters must be"),
                         ({"name": "f", "description": 5}, "tools[0].function.description must be")):
            tools = [{"type": "function", "function": fn}]  # the template would print these as they are
            assert said in assert_error(http.post("/v1/chat/completions", json={**OK, "tools": tools}), 400,
                                        "tools")["message"]
        tools = [{"type": "web_search", "function": {"name": "f"}}]
        assert "'function'" in assert_error(http.post("/v1/chat/completions", json={**OK, "tools": tools}), 400,
                                            "tools")["message"]
        for tools in ([{"type": "function", "function": {"name": "f", "parameters": schema, "description": None}}],
                      [{"name": "f", "parameters": schema}]):  # the bare form stays accepted
            assert http.post("/v1/chat/completions", json={**OK, "tools": tools}).status_code == 200
        for knob in ("entropy_bound", "t_max"):  # 1e999 is JSON, but Python reads it as inf: refused, not run
            raw = json.dumps(OK)[:-1] + f', "{knob}": 1e999}}'
            assert "out of range" in assert_error(http.post("/v1/chat/completions", content=raw), 400)["message"]
        assert_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")
        assert_error(http.post("/v1/chat/completions", content=b" " * (MAX_BODY_BYTES + 1)), 413)
        for method, path, allowed in (("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"),
                                      ("DELETE", "/v1/completions", "POST")):
            r = http.request(method, path)
            assert allowed in assert_error(r, 405)["message"] and r.headers["allow"] == allowed  # RFC 9110: Allow
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/models/other"), 404, "model")
        for change, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [10**7]}, "prompt"),
                              ({"prompt": []}, "prompt"), ({"prompt": {"a": 1}}, "prompt"), ({"echo": True}, "echo"),
                              ({"best_of": 3}, "best_of"), ({"suffix": "x", "prompt": [5, 6]}, "prompt"),
                              ({"suffix": "x", "stop": ["y"]}, "stop"),
                              ({"suffix": "x", "stream": True, "dgemma_drafts": True}, "dgemma_drafts")):
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **FAST, **change}
            assert_error(http.post("/v1/completions", json=body), 400, param)
        assert http.post("/v1/chat/completions", json=OK).status_code == 200  # still serving
        assert http.get("/health").json()["running"] == 0


# -- disconnects, admission limits, auth -------------------------------------------------------------------------

LONG = {"model": MODEL, "messages": HI, "max_tokens": 4000, "ignore_eos": True, "stream": True,
        "max_denoising_steps": 48}  # ~60 canvases: runs for many seconds unless cancelled


def wait_until_idle(http, limit_s=3.0) -> float:
    start = time.monotonic()
    while (h := http.get("/health").json())["running"] or h["waiting"]:
        assert time.monotonic() - start < limit_s, f"slot not freed: {h}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_cancels_and_limits_give_429(model_dir):
    app = create_app(new_engine(model_dir), model_name=MODEL, max_concurrency=1, max_queue=1)
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=LONG) as first:
            lines = first.iter_lines()  # kept referenced: closing this generator would close the connection
            for line in lines:  # wait for committed text: the request is generating
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            with http.stream("POST", "/v1/chat/completions", json=LONG) as second:  # queued, not refused
                assert second.status_code == 200
                h = http.get("/health").json()
                assert h["waiting"] == 1, h
                err = assert_error(http.post("/v1/chat/completions", json={**OK}), 429)
                assert "busy" in err["message"] and err["code"] == "server_busy"
        # both streams closed early: the running one stops within a step, the queued one leaves the queue
        freed_s = wait_until_idle(http)
        print(f"slot freed {freed_s:.3f} s after the clients closed")
        assert freed_s < 2.0
        started = time.monotonic()
        assert http.post("/v1/chat/completions", json=OK).status_code == 200
        assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("scheduling", ["serial", "batched"])
def test_a_stopping_server_answers_503_not_busy(model_dir, scheduling):
    """Once the worker is stopping it admits nothing: a 503 saying so, not the 429 'busy' (whose Retry-After invites
    the client to retry a server that will not answer)."""
    app = create_app(new_engine(model_dir), model_name=MODEL, scheduling=scheduling)
    with running(app) as base:
        app.state.worker.stop()
        r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4})
        assert r.status_code == 503 and "Retry-After" not in r.headers, (r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]


def test_the_worker_interleaves_admitted_requests(model_dir):
    """A short request admitted beside a long one finishes first: running requests take turns step by step."""
    engine = new_engine(model_dir)
    ids = engine.prompt_ids("Hello")
    worker = SerialWorker(engine, max_concurrency=2, max_queue=0)

    async def scenario():
        long = worker.submit(Job(ids, {"max_tokens": 640, "eos_token_id": [], **FAST}))  # 10 canvases
        short = worker.submit(Job(ids, {"max_tokens": 8, **FAST}))  # 1 canvas
        with pytest.raises(Overloaded, match="busy"):
            worker.submit(Job(ids, {}))
        while not isinstance(await short.next(timeout=10), Done):
            pass
        while (load := worker.load())["running"] == 2:  # the short one leaves its slot...
            await asyncio.sleep(0.005)
        assert load["running"] == 1  # ...while the long one (40 steps to go at most) still runs
        long.cancel()
        with pytest.raises(Cancelled):
            await long.next()

    worker.start()
    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
    assert worker.load()["running"] == 0


def test_shutdown_ends_an_open_stream_with_an_error_and_done(model_dir):
    """Ctrl-C (should_exit) with a long stream open: after the grace time the stream ends properly, with an error
    chunk that says why and [DONE], instead of being cut mid-body by uvicorn's graceful-shutdown timeout."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = server(create_app(new_engine(model_dir), model_name=MODEL), grace_s=0.5, log_level="critical")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.stream("POST", base + "/v1/chat/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:  # committed text: the request is generating
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break
        srv.should_exit = True
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    thread.join(10)
    sock.close()
    assert rest[-1] == "[DONE]" and "shut down" in json.loads(rest[-2])["error"]["message"], rest[-3:]


def test_api_key(model_dir):
    with running(create_app(new_engine(model_dir), model_name=MODEL, api_key="s3cret")) as base:
        assert httpx.get(base + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
            assert_error(httpx.get(base + "/v1/models", headers=headers), 401)
            assert_error(httpx.post(base + "/v1/chat/completions", json=OK, headers=headers), 401)
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110 11.1), the key is not
            assert httpx.get(base + "/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer S3CRET"}), 401)
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert chat(good, max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_eight_concurrent_streaming_clients(url, client):
    seeds = list(range(8))
    expected = [chat(client, max_tokens=70, seed=s).choices[0].message.content for s in seeds]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda s: stream_chat(client, max_tokens=70, seed=s)[0], seeds))
    assert got == expected
    assert httpx.get(url + "/health").json()["running"] == 0


# -- the adapter's mapping of thinking and tool calls (a scripted worker stands in for a trained model) -------------


class ScriptedWorker:
    """The worker interface http.py uses, replaying fixed events: a swap-in like a future batched scheduler."""

    def __init__(self, events):
        self.events, self.jobs = events, []

    def start(self):
        pass

    def stop(self):
        pass

    def load(self):
        return {"running": 0, "waiting": 0}

    def submit(self, job):
        self.jobs.append(job)
        ticket = Ticket(asyncio.get_running_loop(), lambda t: None)
        for event in self.events:
            ticket.push(event)
        return ticket


CALL = 'call:get_weather{city:<|"|>Paris<|"|>,days:3}'
SCRIPT = [Text("Paris is in France.", "thinking"), Text("Let me check the weather.", "answer"), Text(CALL, "tool_call"),
          Done("tool_calls", ParsedOutput("", "", []), 7, 12, list(range(12)), [4], 0.01, 0.02)]


def test_reasoning_and_tool_calls_are_separated(model_dir):
    worker = ScriptedWorker(SCRIPT)
    with running(create_app(new_engine(model_dir), model_name=MODEL, worker=worker)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=HI, tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object"}}}])
        message = r.choices[0].message
        assert message.content == "Let me check the weather." and r.choices[0].finish_reason == "tool_calls"
        assert message.model_extra["reasoning_content"] == "Paris is in France."
        assert message.tool_calls[0].function.name == "get_weather"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
        assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 12
        chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Paris is in France."
        assert "".join(d.content or "" for d in deltas) == "Let me check the weather."
        assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_weather"]
        text = client.completions.create(model=MODEL, prompt="x").choices[0].text
        assert text == "Let me check the weather.<|tool_call>" + CALL + "<tool_call|>"  # markers kept
        assert worker.jobs[0].options["max_tokens"] >= 1


def test_markers_spelled_in_ordinary_pieces_stay_in_their_channel(model_dir, monkeypatch):
    """The model's output, fixed, through the real request path (the serial worker's RowText): the thought channel,
    the answer and a call's arguments each hold the characters of a marker written as ordinary pieces, which used
    to close the channel, end the answer and cut the call. Only the special ids are markers."""
    from dgemma.engine.scheduler import Commit
    engine = new_engine(model_dir)
    tok = engine.tokenizer
    spell = lambda text: [i for c in text for i in tok.encode(c, add_bos=False)]  # noqa: E731  one id per character
    words = lambda text: tok.encode(text, add_bos=False)  # noqa: E731  markers written in `text` are special ids
    ids = (words("<|channel>thought\nabout ") + spell("<channel|>") + words("<channel|>Answer: ") + spell("<eos>")
           + words("<|tool_call>call:f{s:") + spell("<tool_call|>") + words("}<tool_call|><|tool_response>"))
    monkeypatch.setattr("dgemma.serve.worker.run_alone", lambda module, rows: iter(
        [Commit(0, torch.tensor([ids]), torch.tensor([True]), torch.tensor([3]))]))
    with running(create_app(engine, model_name=MODEL, scheduling="serial")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=HI)
        message = r.choices[0].message
        assert message.content == "Answer: <eos>" and r.choices[0].finish_reason == "tool_calls"
        assert message.model_extra["reasoning_content"] == "about <channel|>"
        assert json.loads(message.tool_calls[0].function.arguments) == {"s": "<tool_call|>"}
        assert r.usage.completion_tokens == len(ids)
        chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "about <channel|>"
        assert "".join(d.content or "" for d in deltas) == "Answer: <eos>"
        assert [d.tool_calls[0].function.arguments for d in deltas if d.tool_calls] == ['{"s": "<tool_call|>"}']


def test_a_failing_generation_is_reported_not_fatal(model_dir):
    worker = ScriptedWorker([Text("partial", "answer"), RuntimeError("boom")])
    with running(create_app(new_engine(model_dir), model_name=MODEL, worker=worker)) as base:
        err = assert_error(httpx.post(base + "/v1/chat/completions", json=OK), 500)
        assert "boom" in err["message"]
        with httpx.stream("POST", base + "/v1/chat/completions", json={**OK, "stream": True}) as r:
            events = sse(r)
        assert events[-1] == "[DONE]" and "boom" in events[-2]["error"]["message"]
        assert httpx.get(base + "/health").status_code == 200


class BacklogWorker(ScriptedWorker):
    """The scripted events at once; `release()` pushes 100 more (while `busy_loop` holds the loop: a backlog)."""

    def submit(self, job):
        self.ticket = super().submit(job)
        return self.ticket

    def busy_loop(self, seconds):
        """Keep the server's event loop busy for a while (as another request's work would)."""
        self.ticket._loop.call_soon_threadsafe(time.sleep, seconds)
        time.sleep(0.05)

    def release(self):
        for _ in range(100):
            self.ticket.push(Text("x", "tool_call"))  # one chunk each


def test_a_stream_whose_client_reset_writes_no_storm_to_the_dead_socket(model_dir, caplog):
    """A backlog of chunks for a client that is gone: the server notices the lost connection after one failed
    write, instead of writing on (asyncio logs 'socket.send() raised exception.' for every write after 5)."""
    import socket
    import struct

    worker = BacklogWorker([Text("first", "answer")])
    with running(create_app(new_engine(model_dir), model_name=MODEL, worker=worker)) as base:
        body = json.dumps({**OK, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"first" not in got:
            got += sock.recv(65536)
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            worker.busy_loop(0.3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, as a client killed mid-stream sends
            worker.release()  # meanwhile the rest of the answer arrives
            time.sleep(0.6)
        assert httpx.get(base + "/health").status_code == 200
    storm = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not storm, f"{len(storm)} writes to a dead connection logged: {storm[:2]}"


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None
    assert build_parser().parse_args(["serve", "--max-queue", "0"]).max_queue == 0


def test_a_negative_queue_is_refused_before_the_model_loads(capsys):
    with pytest.raises(SystemExit):  # argparse's usage error, not a ValueError after minutes of loading
        build_parser().parse_args(["serve", "--max-queue", "-1"])
    assert "--max-queue: must be at least 0, got -1" in capsys.readouterr().err


# -- structured output and infill (issue 8's server side) ------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"]}


def test_response_format_json_schema_and_json_object(client):
    """Even the random model's answer is valid JSON that validates: the layout is clamped, not hoped for."""
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (0, 1):
        reply = chat(client, response_format=fmt, seed=seed)
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        assert reply.choices[0].finish_reason == "stop"
    text, chunks = stream_chat(client, response_format=fmt, seed=0)
    assert json.loads(text) == json.loads(chat(client, response_format=fmt, seed=0).choices[0].message.content)
    assert isinstance(json.loads(chat(client, response_format={"type": "json_object"}).choices[0].message.content),
                      dict)


def test_a_schema_too_long_for_the_context_is_refused_without_laying_it_out(url):
    """maxItems 10**9 was laid out item by item in a server thread (minutes of CPU, gigabytes): now building stops
    at the model's context: minItems 10**4 gets a 400 at once, maxItems 10**9 (an upper bound) fewer items."""
    with httpx.Client(base_url=url, timeout=30) as http:
        for bounds in ({"maxItems": 10**9}, {"minItems": 10**4}):
            schema = {"type": "array", "items": {"type": "integer"}, **bounds}
            fmt = {"type": "json_schema", "json_schema": {"name": "many", "schema": schema}}
            start = time.monotonic()
            body = {**OK, "max_tokens": 200, "response_format": fmt}
            r = http.post("/v1/chat/completions", json=body)
            if "maxItems" in bounds:
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 200, r.text
                assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), list)
            else:
                err = assert_error(r, 400, "response_format")
                assert "context" in err["message"] and "minItems" in err["message"], err
            assert time.monotonic() - start < 10


def test_completion_suffix_is_an_infill(client):
    prefix, suffix = "def add(a, b):\n", "\n    return total\n"
    reply = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=12, seed=3,
                                      extra_body=dict(FAST))
    middle = reply.choices[0].text
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")
    again = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=12, seed=3,
                                      extra_body=dict(FAST))
    assert again.choices[0].text == middle  # seeded
    streamed = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=12, seed=3,
                                         extra_body=dict(FAST), stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == middle


def test_infill_says_length_when_the_middle_used_max_tokens_and_honours_ignore_eos(client):
    """finish_reason was always "stop", even for a middle of exactly max_tokens; ignore_eos was silently ignored.
    Now "length" iff the middle used all of max_tokens, and ignore_eos makes the middle exactly max_tokens long."""
    prefix, suffix = "def add(a, b):\n", "\n    return total\n"
    reasons = set()
    for seed in range(4):
        r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=12, seed=seed,
                                      extra_body=dict(FAST))
        used = r.usage.completion_tokens
        assert r.choices[0].finish_reason == ("length" if used == 12 else "stop"), (seed, used)
        reasons.add(r.choices[0].finish_reason)
    for max_tokens in (5, 12):
        r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=max_tokens, seed=1,
                                      extra_body={**FAST, "ignore_eos": True})
        assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
    print("finish reasons seen without ignore_eos:", reasons)


def test_misplaced_fields_tool_choice_and_stream_options_are_explained(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **FAST}
        body = {**completion, "response_format": {"type": "json_object"}}
        err = assert_error(http.post("/v1/completions", json=body), 400, "response_format")
        assert "/v1/chat/completions field" in err["message"], err  # was "unknown field"
        err = assert_error(http.post("/v1/chat/completions", json={**OK, "prompt": "hi"}), 400, "prompt")
        assert "/v1/completions field" in err["message"], err  # was "missing required field 'messages'"
        for choice, code in (("sometimes", "invalid_value"), ({"type": "function"}, "invalid_value"),
                             (3, "invalid_value"), ("required", "unsupported"),
                             ({"type": "function", "function": {"name": "f"}}, "unsupported")):
            r = http.post("/v1/chat/completions", json={**OK, "tool_choice": choice})
            err = assert_error(r, 400, "tool_choice")  # "sometimes" was "unsupported", not invalid
            assert err["code"] == code and ("'required'" if code == "invalid_value" else "'auto'") in err["message"]
        for path, body in (("/v1/chat/completions", OK), ("/v1/completions", completion)):
            options = {"stream_options": {"include_usage": True}}
            err = assert_error(http.post(path, json={**body, **options}), 400, "stream_options")  # was accepted
            assert "stream=true" in err["message"], err
            assert http.post(path, json={**body, "stream_options": None}).status_code == 200  # null: not given
            assert http.post(path, json={**body, **options, "stream": True}).status_code == 200


@pytest.mark.parametrize("limits, admitted, message", [
    ((1, 0), 1, "1 request running (at most 1 at a time) and no queue (max_queue 0)"),  # was "0 running, 1 waiting"
    ((2, 1), 3, "2 requests running (at most 2 at a time) and 1 waiting (the queue holds 1 request)"),
    ((1, 2), 3, "1 request running (at most 1 at a time) and 2 waiting (the queue holds 2 requests)"),
])
def test_the_429_message_reads_right_for_every_limit(model_dir, limits, admitted, message):
    """Requests admitted but not yet taken by the worker thread (not started here) count as running while a slot is
    free: they run as soon as the thread gets to them."""
    worker = SerialWorker(new_engine(model_dir), max_concurrency=limits[0], max_queue=limits[1])

    async def scenario():
        for _ in range(admitted):
            worker.submit(Job([2], {}))
        with pytest.raises(Overloaded) as e:
            worker.submit(Job([2], {}))
        return str(e.value)

    assert asyncio.run(scenario()) == f"server busy: {message}; retry shortly"
