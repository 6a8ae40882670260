"""Text streaming, chat sessions and the CLI on a small random model with a real tokenizer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.bundled import build_random_model
from dgemma.cli import main
from dgemma.engine.chat import ChatSession
from dgemma.engine.presets import PRESETS
from dgemma.engine.stream import Done, Draft, Text, stream_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("m") / "random")


@pytest.fixture(scope="module")
def engine(model_dir):
    return dgemma.load(model_dir, quiet=True)


class Terminal(io.StringIO):  # stdin as a terminal gives it
    def isatty(self):
        return True


def run(engine, prompt="Hello there", **options):
    return list(engine.stream(prompt, **options))


def test_event_order_and_draft_count(engine):
    events = run(engine, seed=0, max_tokens=100, eos_token_id=[])
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    done = events[-1]
    L = engine.config.canvas_length
    assert done.canvases == 2  # 100 tokens need two 64-token canvases
    # per canvas: its drafts (one per denoising step), then its committed text
    drafts_per_canvas = [sum(isinstance(e, Draft) and e.canvas_index == c for e in events) for c in range(2)]
    assert drafts_per_canvas == done.steps_per_canvas
    first_text = next(i for i, e in enumerate(events) if isinstance(e, Text))
    assert all(isinstance(e, Draft) and e.canvas_index == 0 for e in events[:first_text])
    for e in events:
        if isinstance(e, Draft):
            assert len(e.token_ids) == L and len(e.confidence) == L
            assert all(0.0 <= c <= 1.0 for c in e.confidence)


@pytest.mark.parametrize("max_tokens", [1, 5, 63, 64, 65, 130])
def test_exact_max_tokens(engine, max_tokens):
    done = run(engine, seed=1, max_tokens=max_tokens, eos_token_id=[], drafts=False)[-1]
    assert done.completion_tokens == max_tokens == len(done.completion_ids)
    assert done.finish_reason == "length"
    assert done.canvases == -(-max_tokens // engine.config.canvas_length)


def test_text_events_concatenate_to_the_answer(engine):
    events = run(engine, seed=2, max_tokens=90, eos_token_id=[], drafts=False)
    done = events[-1]
    answer = "".join(e.text for e in events if isinstance(e, Text) and e.kind == "answer")
    assert answer == done.output.answer
    from dgemma.text import parse_output
    # no stop ids: an end marker the model writes does not end the text (it is dropped, the text goes on)
    assert parse_output(engine.tokenizer, done.completion_ids, ends=()).answer == answer


def test_stop_id_ends_the_stream_and_is_kept(engine):
    stops = list(range(200, engine.config.vocab_size))  # most of the vocabulary: a stop lands early
    done = run(engine, seed=3, max_tokens=200, eos_token_id=stops, drafts=False)[-1]
    assert done.finish_reason == "stop"
    assert done.completion_ids[-1] in stops
    assert not any(t in stops for t in done.completion_ids[:-1])


def test_stop_string_cuts_the_answer_exactly(engine):
    full = run(engine, seed=4, max_tokens=120, eos_token_id=[], drafts=False)[-1].output.answer
    assert len(full) > 20
    stop = full[10:14]
    first = full.find(stop)
    events = run(engine, seed=4, max_tokens=120, eos_token_id=[], drafts=False, stop=[stop])
    streamed = "".join(e.text for e in events if isinstance(e, Text) and e.kind == "answer")
    assert streamed == full[:first] == events[-1].output.answer
    assert events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens <= 120


def test_one_stop_string_is_one_stop_not_its_characters(engine):
    full = run(engine, seed=4, max_tokens=120, eos_token_id=[], drafts=False)[-1].output.answer
    # two characters that first appear together at i, the first of them alone earlier
    stop = next(full[i:i + 2] for i in range(5, len(full) - 1) if full[i:i + 2] not in full[:i + 1]
                and full[i] in full[:i])
    one = run(engine, seed=4, max_tokens=120, eos_token_id=[], drafts=False, stop=stop)[-1]
    assert one.output.answer == full[: full.find(stop)] and one.finish_reason == "stop"  # was cut at either char
    for bad in ([5], 5, [None]):
        with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
            run(engine, stop=bad)
    for empty in ("", ["x", ""]):  # an empty stop string was silently dropped
        with pytest.raises(ValueError, match="stop strings must not be empty"):
            run(engine, stop=empty)


def test_seed_reproducibility(engine):
    a = run(engine, seed=7, max_tokens=40, drafts=False)[-1].completion_ids
    b = run(engine, seed=7, max_tokens=40, drafts=False)[-1].completion_ids
    c = run(engine, seed=8, max_tokens=40, drafts=False)[-1].completion_ids
    assert a == b and a != c


def test_done_stats(engine):
    done = run(engine, seed=5, max_tokens=70, eos_token_id=[], drafts=False)[-1]
    stats = done.stats()
    assert stats["canvases"] == 2 and sum(stats["steps_per_canvas"]) > 0
    assert stats["tokens_per_s"] > 0 and 0 < stats["time_to_first_text_s"] <= stats["wall_s"]
    assert done.usage()["total_tokens"] == done.prompt_tokens + 70


def test_chat_reuses_the_cache_and_it_matches_a_fresh_encode(engine):
    session = ChatSession(engine, system="Be brief.")
    list(session.send("First question", seed=0, max_tokens=100, eos_token_id=[]))
    assert session.reused_tokens == 0
    list(session.send("Second question", seed=1, max_tokens=30))
    assert session.reused_tokens > 0
    cached = session.cached_ids
    assert cached == session.ids[: len(cached)]
    fresh = engine.new_cache(1)
    engine.encode(torch.tensor([cached]), fresh)
    for i in range(engine.config.num_hidden_layers):
        torch.testing.assert_close(session.cache.keys[i], fresh.keys[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(session.cache.values[i], fresh.values[i], atol=1e-4, rtol=1e-4)


def cancel_at_first_text(session, monkeypatch):
    turn = session.send("A question left unanswered", seed=1, max_tokens=200, eos_token_id=[])
    next(e for e in turn if isinstance(e, Text))
    turn.close()


def fail_inside_the_encoder(session, monkeypatch):
    from dgemma.engine.cache import KVCache
    write = KVCache.write

    def interrupted(cache, layer, k, v):  # layers 0 and 1 written, the length not yet advanced
        write(cache, layer, k, v)
        if layer == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(KVCache, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(session.send("A question left unanswered", seed=1, max_tokens=30, eos_token_id=[]))
    monkeypatch.setattr(KVCache, "write", write)


@pytest.mark.parametrize("stop_turn", [cancel_at_first_text, fail_inside_the_encoder])
def test_chat_turn_after_a_stopped_turn_is_computed_on_a_consistent_cache(engine, monkeypatch, stop_turn):
    """A caller that stops iterating a turn leaves the session as before that turn; the cache that turn grew
    (its prompt, its canvases) was reused by the next turn at the wrong positions: silently different tokens.
    A turn stopped inside an encoder pass (Ctrl-C, an out-of-memory error) had written some layers' K/V but not
    advanced the cache's length, and the next turn reused that cache too. Oracle: the prompt encoded afresh."""
    def session_after_first_turn():
        s = ChatSession(engine, system="Be brief.")
        list(s.send("First question", seed=0, max_tokens=100, eos_token_id=[]))
        return s
    stopped = session_after_first_turn()
    before = list(stopped.ids)
    stop_turn(stopped, monkeypatch)
    assert stopped.ids == before  # the stopped turn left no trace in the history
    third = list(stopped.send("Third question", seed=2, max_tokens=30, eos_token_id=[]))[-1]
    fresh = session_after_first_turn()
    fresh.cache = None  # the same conversation, its prompt encoded from scratch as the rebuilt cache is
    assert list(fresh.send("Third question", seed=2, max_tokens=30, eos_token_id=[]))[-1].completion_ids == \
        third.completion_ids
    assert stopped.cache.length == len(stopped.cached_ids) and stopped.ids == fresh.ids


def test_chat_opens_with_one_system_turn_and_follows_changes_to_it(engine):
    """With thinking on, every later turn added a second system turn (<|think|>) mid-conversation; a system prompt
    set between turns was silently ignored."""
    tok = engine.tokenizer
    session = ChatSession(engine, system="Be brief.", enable_thinking=True)
    list(session.send("One", seed=0, max_tokens=5, eos_token_id=[]))
    first = list(session.ids)
    list(session.send("Two", seed=0, max_tokens=5, eos_token_id=[]))
    text = tok.decode(session.ids, skip_special=False)
    assert text.count("<|turn>system") == 1 and text.count("<|think|>") == 1, text
    # the second turn is what the template writes after the first: user turn, then a generation prompt in which
    # thinking stays on (no empty thought channel)
    assert session.ids[: len(first)] == first
    second = tok.decode(session.ids[len(first):], skip_special=False)
    assert second.startswith("<|turn>user\nTwo<turn|>\n<|turn>model\n") and "<channel|>" not in second, second
    session.system, session.enable_thinking = "Be verbose.", False
    list(session.send("Three", seed=0, max_tokens=5, eos_token_id=[]))
    assert session.reused_tokens == 0  # the opening changed: the conversation is encoded afresh
    text = tok.decode(session.ids, skip_special=False)
    assert text.startswith(tok.render_chat([{"role": "system", "content": "Be verbose."}], add_generation_prompt=False))
    assert "Be brief." not in text and "<|think|>" not in text and text.count("<|turn>system") == 1
    assert "<|turn>user\nOne<turn|>" in text and "<|turn>user\nTwo<turn|>" in text  # the history is kept


def test_chat_history_closes_a_model_turn_with_turn_end_not_eos():
    """An answer that ended at <eos> was kept as answer<eos><turn|> in the history: off the chat format."""
    from dgemma.bundled import default_model_path
    engine = dgemma.load(default_model_path(), quiet=True)
    eos, turn_end = engine.tokenizer.special.eos, engine.tokenizer.special.turn_end
    session = ChatSession(engine)
    done = list(session.send("def add(a, b):", seed=2, max_tokens=128, eos_token_id=[eos], drafts=False))[-1]
    assert done.completion_ids[-1] == eos  # the trained model ends its answer with <eos>
    assert eos not in session.ids
    answer = done.completion_ids[:-1]
    assert session.ids[-len(answer) - 2:] == answer + [turn_end] + engine.tokenizer.encode("\n", add_bos=False)
    list(session.send("More", seed=1, max_tokens=5, drafts=False))
    assert session.reused_tokens > 0


def test_accept_takes_the_clis_text_of_a_rule(engine):
    """accept="confidence:0.9" (the README's --accept spelling) was refused as "accept and sample must be
    callables", naming a `sample` the caller never passed."""
    from dgemma.sampling import confidence_threshold, linear_quota, quota

    def ids(accept, **knobs):
        return run(engine, seed=3, max_tokens=40, eos_token_id=[], drafts=False, accept=accept, **knobs)[-1]
    assert ids("confidence:0.9").completion_ids == ids(confidence_threshold(0.9)).completion_ids
    assert ids("linear-quota", max_denoising_steps=6).steps_per_canvas == [6]  # resolved with the call's steps
    assert ids("linear-quota", max_denoising_steps=6).completion_ids == \
        ids(linear_quota(6), max_denoising_steps=6).completion_ids
    prompt = torch.tensor([[2, 10, 11]])
    assert torch.equal(engine.generate(prompt, generator=torch.Generator().manual_seed(0), accept="quota:4"),
                       engine.generate(prompt, generator=torch.Generator().manual_seed(0), accept=quota(4)))
    for bad, message in (("confidence:x", "'x' is not a number"), ("bogus", "unknown acceptance rule"),
                         (0.9, "accept must be an acceptance rule")):
        with pytest.raises(ValueError, match=message):
            run(engine, accept=bad)


def test_an_entropy_bound_beside_an_acceptance_rule_is_refused_not_ignored(engine, model_dir, capsys):
    """accept= (--accept) replaces the entropy-bound rule: an entropy_bound given beside it was silently unused
    (`--accept confidence:0.9 --entropy-bound 0.5` ran the confidence rule alone). A preset's bound is only a
    default, which accept overrides without complaint."""
    prompt = torch.tensor([[2, 10, 11]])
    for call in (lambda: run(engine, max_tokens=4, accept="confidence:0.9", entropy_bound=0.5),
                 lambda: engine.generate(prompt, accept="quota:4", entropy_bound=0.5),
                 lambda: engine.generate(prompt, accept="quota:4", sampler_config={"entropy_bound": 0.5}),
                 lambda: engine.infill("def f(", "):", accept="quota:4", entropy_bound=0.5)):
        with pytest.raises(ValueError, match=r"entropy_bound \(--entropy-bound\) given beside it would be ignored"):
            call()
    assert main(["generate", "hi", "--model", str(model_dir), "--max-tokens", "4", "--accept", "entropy:0.2",
                 "--entropy-bound", "0.4"]) == 2
    assert "would be ignored: give one of them" in capsys.readouterr().err
    fast = dgemma.load(model_dir, quiet=True, preset="fast")  # the preset's entropy_bound 0.5: a default
    done = run(fast, seed=3, max_tokens=8, eos_token_id=[], drafts=False, accept="quota:5")[-1]
    same = run(engine, seed=3, max_tokens=8, eos_token_id=[], drafts=False, accept="quota:5",
               max_denoising_steps=PRESETS["fast"].knobs["max_denoising_steps"])[-1]
    assert done.completion_ids == same.completion_ids  # the rule ran, the preset's bound did not


def test_an_unknown_option_lists_the_text_apis_own_options(engine):
    """A typo of max_tokens was answered with a 'known' list of generation knobs that lacked max_tokens itself."""
    with pytest.raises(TypeError, match=r"unknown option 'max_token': neither an option of this call \(max_tokens, "
                                        r"stop, seed, .*\) nor a generation knob \(confidence_threshold, "):
        run(engine, max_token=5)
    with pytest.raises(TypeError, match=r"'temperature' \(the temperature here is the t_max -> t_min schedule\)"):
        engine.complete("Hi", temperature=0.7)


def test_max_tokens_and_max_new_tokens_are_one_cap(engine):
    assert run(engine, seed=1, max_new_tokens=5, eos_token_id=[], drafts=False)[-1].completion_tokens == 5
    with pytest.raises(ValueError, match="give max_tokens or max_new_tokens"):
        run(engine, max_tokens=5, max_new_tokens=5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "5"])
def test_a_bad_max_tokens_names_max_tokens(engine, bad):
    """The caller passed max_tokens: the error names it, not the generation config's max_new_tokens."""
    for call in (lambda: engine.complete("Hi", max_tokens=bad), lambda: run(engine, max_tokens=bad),
                 lambda: list(ChatSession(engine).send("Hi", max_tokens=bad)),
                 lambda: engine.generate_json("Hi", max_tokens=bad)):
        with pytest.raises(ValueError, match=r"^max_tokens must be an integer >= 1") as e:
            call()
        assert "max_new_tokens" not in str(e.value)


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(ValueError, match="exceeds this model's context"):
        run(engine, "word " * 9000, max_tokens=10)


def test_a_prompt_that_leaves_no_canvas_is_refused_without_advising_a_lower_max_tokens(engine):
    """Past context - canvas_length prompt tokens no max_tokens fits: the error says how long a prompt fits."""
    fits = engine.config.max_position_embeddings - engine.config.canvas_length
    for n in (fits + 1, engine.config.max_position_embeddings):
        ids = [engine.tokenizer.bos_id] + [5] * (n - 1)
        for call in (lambda: list(stream_ids(engine, ids, max_tokens=1)),
                     lambda: list(stream_ids(engine, ids))):
            with pytest.raises(ValueError, match=f"prompt of {n} tokens .*at most {fits} prompt tokens") as e:
                call()
            assert "max_tokens" not in str(e.value)


def test_cli_generate_json(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--json", "--max-tokens", "7", "--seed", "1", "Hi"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] <= 7
    assert out["finish_reason"] in ("stop", "length") and out["stats"]["canvases"] == 1


def test_cli_streams_its_text_to_stdout_as_it_is_at_the_call(model_dir, capsys):
    """The streamed answer goes to sys.stdout as it is when the command runs (a caller that redirects stdout after
    importing dgemma.cli, as pytest's capsys does, gets it); it was bound at import time."""

    from dgemma import cli

    options = ["generate", "--model", str(model_dir), "--max-tokens", "6", "--seed", "1", "hi"]
    assert main(options + ["--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    sink = io.StringIO()
    real, cli.sys.stdout = cli.sys.stdout, sink
    try:
        assert main(options) == 0
    finally:
        cli.sys.stdout = real
    assert expected and sink.getvalue().rstrip("\n") == expected


def test_cli_show_thinking_without_think_warns(model_dir, capsys):
    """--show-thinking alone showed nothing, silently (the template switches thinking off without --think)."""
    base = ["generate", "--model", str(model_dir), "--max-tokens", "4", "--seed", "1"]
    assert main(base + ["--show-thinking", "hi"]) == 0
    assert "warning: --show-thinking shows the model's thinking" in capsys.readouterr().err
    assert main(base + ["--show-thinking", "--think", "hi"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--show-thinking", "--raw", "hi"]) == 0  # a raw prompt has no template to switch it off
    assert "warning" not in capsys.readouterr().err


def test_cli_stats_line_matches_the_run(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-tokens", "3", "--seed", "1", "--stats", "hi"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    done = Done("length", None, 5, 1, [7], steps_per_canvas=[4], wall_s=0.5)
    assert done.summary() == "[1 token, 1 canvas, steps [4], 2.0 tok/s, finish=length]"
    done.completion_tokens, done.steps_per_canvas = 3, [4, 2]
    assert done.summary().startswith("[3 tokens, 2 canvases, steps [4, 2], 6.0 tok/s")
    assert line.startswith("[") and " canvas" in line and "finish=" in line, line
    n = int(line[1:].split()[0])
    assert 1 <= n <= 3 and line.split(", ")[0] == f"[{n} token{'' if n == 1 else 's'}", line


def test_cli_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "Hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(model_dir), "--max-tokens", "0", "Hi"])
    assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--t-min", "0.9", "--t-max", "0.5", "Hi"]) == 2
    assert "t_max must be greater than t_min" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--raw", "--think", "Hi"]) == 2
    assert "--think switches thinking on in the chat template" in capsys.readouterr().err


def test_cli_unusable_device_is_an_error_not_a_traceback(model_dir, capsys):
    device = "bogus" if torch.cuda.is_available() else "cuda"
    assert main(["generate", "--model", str(model_dir), "--device", device, "Hi"]) == 2
    assert f"dgemma generate: error: device '{device}' is not usable here" in capsys.readouterr().err


def test_a_seed_torch_cannot_take_is_a_clear_error(engine, model_dir, capsys):
    for seed in (2**64, -(2**63) - 1, "1", 1.5, True):
        with pytest.raises(ValueError, match=f"seed must be an integer in .*got {seed!r}"):
            engine.complete("Hi", seed=seed, max_tokens=1)
    for call in (lambda: engine.infill("a", "b", seed=2**64), lambda: engine.edit("a b", 0, 1, seed=2**64)):
        with pytest.raises(ValueError, match="seed must be an integer"):
            call()
    assert main(["generate", "--model", str(model_dir), "--seed", str(2**64), "Hi"]) == 2
    assert "seed must be an integer" in capsys.readouterr().err
    assert engine.complete("Hi", seed=2**64 - 1, max_tokens=1).completion_tokens == 1  # the range's ends work


@pytest.mark.parametrize("flags,message", [(["--port", "70000"], "a TCP port is 1-65535, got 70000"),
                                           (["--max-queue", "-1"], "must be at least 0, got -1")])
def test_cli_serve_flags_are_checked_before_the_model_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_ctrl_c_stops_quietly(model_dir, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("dgemma.engine.stream.stream_ids", interrupted)  # as if Ctrl-C came mid-generation
    try:
        status = main(["generate", "--model", str(model_dir), "Hi"])
    except KeyboardInterrupt:
        status = "escaped main"
    assert status == 130 and "Traceback" not in capsys.readouterr().err


def test_cli_inspect_26b(capsys):
    path = Path(__file__).parent.parent / "bench" / "configs" / "26b-a4b.json"  # the released text config
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the checkpoint index's 25,823,778,864 parameters less the vision tower's 572,792,112 (spec §2.5); the 60
    # layer_scalar values are buffers, reported apart
    assert out["total_parameters"] == 25_250_986_752 and out["layer_scalar_buffers"] == 60
    assert round(out["active_parameters_per_token"] / 1e9, 2) == 3.84


def test_cli_chat_two_turns_reuses_the_cache(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n/quit\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "70", "--seed", "0", "--stats"]) == 0
    err = capsys.readouterr().err
    reused = [int(line.split("reused ")[1].split()[0]) for line in err.splitlines() if "reused" in line]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 0, err


def test_cli_chat_goes_on_after_a_turn_past_the_context(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n" + "word " * 9000 + "\nsecond question\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "5", "--seed", "0", "--stats"]) == 2
    err = capsys.readouterr().err
    assert "dgemma chat: error: prompt of" in err and "exceeds this model's context" in err
    reused = [int(line.split("reused ")[1].split()[0]) for line in err.splitlines() if "reused" in line]
    assert len(reused) == 2 and reused[1] > 0, err  # both other turns answered; the refused one left no trace


def test_cli_chat_ends_on_settings_no_turn_can_use(model_dir, capsys, monkeypatch):
    """Bad settings end the chat with one error: --entropy-bound inf passed the generation config and failed in the
    acceptance rule as a per-turn error, repeated for every turn while the chat went on."""
    for flags, message in ((["--entropy-bound", "inf"], "entropy_bound must be a finite number > 0, got inf"),
                           (["--accept", "quota:4", "--entropy-bound", "0.3"], "would be ignored")):
        monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n"))
        assert main(["chat", "--model", str(model_dir), "--max-tokens", "5", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count(message) == 1 and "/reset" not in err, err


def test_cli_chat_reset_starts_over_once_the_conversation_fills_the_context(model_dir, capsys, monkeypatch):
    """A full conversation refuses every later turn; the refusal names /reset, and /reset starts a fresh one."""
    long = "word " * 2500  # ~5,000 tokens: one fits the 8192 positions, two do not
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long}\n{long}\n/reset\n{long}\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "5", "--seed", "0", "--stats"]) == 2
    err = capsys.readouterr().err
    assert "exceeds this model's context" in err and "already holds" in err and "/reset in dgemma chat" in err, err
    assert "new conversation (history and cache cleared)" in err
    reused = [int(line.split("reused ")[1].split()[0]) for line in err.splitlines() if "reused" in line]
    assert reused == [0, 0], err  # the first turn, then the turn after /reset: nothing cached to reuse
    session = ChatSession(dgemma.load(model_dir, quiet=True), system="Be brief.")
    first = session._opening_and_turn("Hi")
    list(session.send("Hi", seed=0, max_tokens=5))
    session.reset()
    assert session.ids == [] and session.cache is None and session._opening_and_turn("Hi") == first  # system prompt kept


def test_a_full_conversation_says_so_and_names_reset(model_dir):
    """ChatSession: a turn refused because the conversation outgrew the context says how much of the prompt is
    history and that reset() starts over (it read 'prompt of N tokens ... shorten the prompt', N being the whole
    conversation); a first message too long alone gets the plain message. Both are ContextError, a ValueError."""
    from dgemma.engine.generate import ContextError

    session = ChatSession(dgemma.load(model_dir, quiet=True))
    long = "word " * 2500  # ~5,000 tokens: one fits the 8192 positions, two do not
    list(session.send(long, seed=0, max_tokens=5, max_denoising_steps=2))
    held = len(session.ids)
    with pytest.raises(ContextError, match=rf"already holds {held} of those tokens .*reset\(\) starts a new one"):
        list(session.send(long, seed=0, max_tokens=5))
    session.reset()
    with pytest.raises(ValueError) as info:
        list(session.send("word " * 9000, seed=0, max_tokens=5))
    assert isinstance(info.value, ContextError) and "already holds" not in str(info.value)


def record_turns(monkeypatch, stop_turn=None):
    """Spy on the chat command's turns: (message, history ids before it) per ChatSession.send call; stop_turn(i)
    true makes turn i raise KeyboardInterrupt after its first Text event, as Ctrl-C would."""
    turns = []
    send = ChatSession.send

    def spied(self, text, **options):
        turns.append((text, list(self.ids)))
        for event in send(self, text, **options):
            yield event
            if isinstance(event, Text) and stop_turn is not None and stop_turn(len(turns) - 1):
                raise KeyboardInterrupt
    monkeypatch.setattr(ChatSession, "send", spied)
    return turns


def test_cli_chat_ctrl_c_stops_the_answer_and_the_chat_goes_on(model_dir, capsys, monkeypatch):
    """Ctrl-C mid-answer ended the whole chat (status 130), its conversation lost; on a terminal it now stops that
    answer, says so, and the next message continues the conversation as it was before the stopped turn."""
    turns = record_turns(monkeypatch, stop_turn=lambda i: i == 1)
    monkeypatch.setattr("sys.stdin", Terminal("first\nsecond\nthird\n"))
    flags = ["--model", str(model_dir), "--max-tokens", "70", "--seed", "0", "--stats"]
    assert main(["chat", *flags]) == 0
    err = capsys.readouterr().err
    assert "answer stopped; this turn is left out of the history" in err and "Traceback" not in err, err
    assert [text for text, _ in turns] == ["first", "second", "third"]
    assert turns[2][1] == turns[1][1] != []  # the third turn follows the first as if the second never was
    assert err.count("reused ") == 2, err  # the first and third turns answered
    turns.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\nthird\n"))
    assert main(["chat", *flags]) == 130  # piped: nobody to type the next message, so Ctrl-C ends the command
    assert len(turns) == 2


def test_cli_chat_commands_are_never_sent_as_messages(model_dir, capsys, monkeypatch):
    """/help and a mistyped command (/rest, /reset now) were sent to the model as messages."""
    turns = record_turns(monkeypatch)
    monkeypatch.setattr("sys.stdin", Terminal("/help\n/rest\n/reset now\n /etc is a path\n/etc/hosts?\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "3", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("/reset (or /clear) starts a new conversation") == 2, err  # the banner, then /help
    assert "'/rest' is not a command here" in err and "/reset takes nothing after it" in err, err
    assert "begin it with a space" in err
    assert [text for text, _ in turns] == [" /etc is a path", "/etc/hosts?"]


def test_cli_chat_a_line_ending_in_a_backslash_goes_on(model_dir, capsys, monkeypatch):
    """Each line was a message of its own: a pasted or typed multi-line message became several turns."""
    turns = record_turns(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("def f(x):\\\n    return x\nnext\nopen at the end\\"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "3", "--seed", "0"]) == 0
    assert [text for text, _ in turns] == ["def f(x):\n    return x", "next", "open at the end"]


def test_cli_chat_stats_line_is_the_generate_summary(model_dir, capsys, monkeypatch):

    monkeypatch.setattr("sys.stdin", Terminal("Hi\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "1", "--seed", "0", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "/reset (or /clear) starts a new conversation" in err.splitlines()[0]  # the banner names the commands
    line = err.strip().splitlines()[-1]
    assert line.startswith("[1 token, 1 canvas, steps [") and line.endswith(", reused 0 cached prompt tokens]"), line


def test_cli_generate_reads_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a prompt from stdin"))
    assert main(["generate", "--model", str(model_dir), "--json", "--max-tokens", "3", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["usage"]["completion_tokens"] <= 3
    monkeypatch.setattr("sys.stdin", io.StringIO("   "))
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "empty prompt" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", Terminal(""))
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "no PROMPT given; type it, then Ctrl-D" in capsys.readouterr().err


def test_the_callers_code_between_events_does_not_run_in_inference_mode(engine):
    modes = [torch.is_inference_mode_enabled() for _ in engine.stream("Hi", seed=0, max_tokens=5)]
    assert modes and not any(modes)


def test_fast_and_reference_sampling_modes(engine):
    """The text API defaults to the fast sampler; 'reference' reproduces Engine.generate's reference stream."""
    ids = engine.prompt_ids("Hello there")
    torch.manual_seed(11)
    ref = engine.generate(torch.tensor([ids]), max_new_tokens=64, eos_token_id=[], pad_token_id=None)
    torch.manual_seed(11)
    streamed = run(engine, max_tokens=64, eos_token_id=[], sampling="reference", drafts=False)[-1]
    assert streamed.completion_ids == ref[0, len(ids):].tolist()
    fast = [run(engine, seed=s, max_tokens=64, eos_token_id=[], drafts=False)[-1].completion_ids for s in (1, 1, 2)]
    assert fast[0] == fast[1] and fast[0] != fast[2]
    with pytest.raises(ValueError, match="sampling must be one of"):
        run(engine, sampling="exact")


def test_the_bundled_default_model_loads_and_generates():
    from dgemma.bundled import PACKAGED, default_model_path

    assert default_model_path(quiet=True) == PACKAGED, "the package must ship its default model"
    engine = dgemma.load(PACKAGED, quiet=True)
    done = engine.complete("Write the Python function add(a, b).", seed=0, max_tokens=20, max_denoising_steps=4)
    assert 0 < done.completion_tokens <= 20 and done.steps_per_canvas == [4] * done.canvases


def test_with_no_stop_ids_the_text_goes_on_past_an_end_marker(engine):
    """ignore_eos (eos_token_id=[]) counts every token up to max_tokens, so the text must hold them all: an <eos> or
    <turn|> the model writes is dropped like <pad>, not taken as the end of the text (it was: usage said 300 tokens,
    the text stopped at the first <eos>). With the default stop ids the text still ends there."""
    from dgemma.engine.scheduler import Commit
    from dgemma.engine.stream import RowText

    tok = engine.tokenizer
    a, b, c = (tok.encode(w, add_bos=False) for w in ("one", " two", " three"))
    ids = [*a, tok.special.eos, *b, tok.special.turn_end, *c]
    commit = Commit(0, torch.tensor([ids]), torch.tensor([False]), torch.tensor([3]))
    for stop_ids, answer, tokens in ((set(), "one two three", len(ids)), (set(tok.stop_ids), "one", len(a) + 1)):
        text = RowText(tok, 1, 64, stop_ids, (), drafts=False)
        pieces = text.on_event(commit)
        done = text.finish()
        assert "".join(p.text for p in pieces) == done.output.answer == answer
        assert done.completion_tokens == tokens


def test_a_tokenizer_bigger_than_the_model_is_a_clear_error(model_dir, tmp_path):
    """The bundled default's tokenizer (4,096 tokens) beside the random model (640): text input used to die with an
    IndexError inside the embedding (the server: 'generation failed'); now a ValueError names both sizes."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(model_dir, mixed)
    default = Path(dgemma.__file__).parent / "models" / "default"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / name, mixed / name)
    engine = dgemma.load(mixed, quiet=True)
    assert engine.tokenizer.vocab_size > engine.config.vocab_size
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model only \d+"):
        engine.complete("hello there", max_tokens=4)
    ids = torch.tensor([[2, 5, 7]])  # token ids still work without the tokenizer
    assert engine.generate(ids, max_new_tokens=4, max_denoising_steps=2).shape[1] > 3


def test_draft_view_ends_on_the_answer_alone(engine):
    """--show-drafts: a last canvas that commits no text (it starts at a stop id) left its draft, <eos> pieces and
    all, in the view's final frame under the answer (seen in the README's first command)."""
    from types import SimpleNamespace

    from rich.console import Console

    from dgemma.view import DraftView

    out = io.StringIO()
    view = DraftView(engine.tokenizer, console=Console(file=out, force_terminal=True, width=80))
    view.commit(SimpleNamespace(kind="answer", text="the answer"))
    eos = engine.tokenizer.eos_id
    view.update(SimpleNamespace(token_ids=[eos] * 8, confidence=[0.9] * 8, canvas_index=1, step=3))
    view.close()
    final = out.getvalue().split("\x1b[2K")[-1]  # the last frame, after the live view erased the ones before
    final = final.replace("\x1b[?25l", "").replace("\x1b[?25h", "")  # the cursor hidden while live, shown again
    assert "the answer" in final and "<eos>" not in final and "step 3" not in final, final
    assert final == "the answer\n", repr(final)  # nothing under it: no blank line for the empty header


def test_draft_view_piped_prints_the_answer_as_is(engine, capsys, monkeypatch):
    """--show-drafts with stdout piped or redirected: the output was the live view's last frame, the answer
    re-wrapped at 80 columns ($COLUMNS) with spaces and newlines added; it must be the plain printer's bytes."""
    from types import SimpleNamespace

    from dgemma.cli import _run_stream
    from dgemma.engine.stream import Draft

    monkeypatch.setenv("COLUMNS", "20")
    answer = "déjà vu — a line well past twenty columns, 日本語テキスト ✓\n  second line, indented   \n"
    events = [Draft(0, 1, "abc", [5, 6, 7], [0.2, 0.5, 0.9]), Text(answer[:30], "answer"),
              Draft(1, 1, "ab", [5, 6], [0.3, 0.4]), Text(answer[30:], "answer")]
    args = SimpleNamespace(show_drafts=True, json=False, show_thinking=False)
    _run_stream(iter(events), args, engine.tokenizer)  # capsys: stdout is not a terminal
    printed = io.StringIO()
    _run_stream(iter(events), SimpleNamespace(show_drafts=False, json=False, show_thinking=False), engine.tokenizer,
                out=printed)
    assert capsys.readouterr().out == printed.getvalue() == answer


def test_draft_view_shows_thinking_only_with_show_thinking(engine, capsys):
    """--think --show-drafts without --show-thinking left the committed thinking text on screen."""
    from types import SimpleNamespace

    from dgemma.cli import _run_stream

    events = [Text("secret thoughts", "thinking"), Text("the answer", "answer")]
    for show_thinking in (False, True):
        args = SimpleNamespace(show_drafts=True, json=False, show_thinking=show_thinking)
        _run_stream(iter(events), args, engine.tokenizer)
        out = capsys.readouterr().out
        assert "the answer" in out and ("secret thoughts" in out) == show_thinking, out
        args.show_drafts, printed = False, io.StringIO()  # the plain printer agrees
        _run_stream(iter(events), args, engine.tokenizer, out=printed)
        out = printed.getvalue()
        assert "the answer" in out and ("secret thoughts" in out) == show_thinking, out
        assert "\x1b" not in out  # piped: no terminal escapes around the thinking text

    printed = Terminal()  # on a terminal the thinking text is dimmed
    _run_stream(iter(events), SimpleNamespace(show_drafts=False, json=False, show_thinking=True), engine.tokenizer,
                out=printed)
    assert printed.getvalue() == "\x1b[2msecret thoughts\x1b[0mthe answer"


def test_complete_with_drafts_points_to_stream(engine):
    with pytest.raises(TypeError, match="use stream"):  # was Python's "got multiple values for keyword 'drafts'"
        engine.complete("hi", max_tokens=2, drafts=True)


def test_chat_turn_takes_response_format_as_stream_does(engine):
    """ChatSession.send(response_format=...) constrains that turn's answer to the schema, as Engine.stream does for
    the same conversation (the same seed gives the same document), and the next turn is plain text again."""
    import jsonschema

    from dgemma.engine.structured import compact_json

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    session = ChatSession(engine)
    *_, done = session.send("Answer as JSON", seed=0, response_format=fmt)
    value = json.loads(compact_json(done.output.answer))
    jsonschema.validate(value, schema)
    *_, alone = engine.stream(messages=[{"role": "user", "content": "Answer as JSON"}], seed=0, response_format=fmt)
    assert alone.output.answer == done.output.answer
    *_, plain = session.send("Now in words", seed=0, max_tokens=8, response_format={"type": "text"})
    assert plain.completion_tokens <= 8
    with pytest.raises(ValueError, match="response_format"):
        list(session.send("Bad", response_format={"type": "yaml"}))


def scripted_commits(tok, canvases):
    """Commits that hand out `canvases` (lists of ids), the last one finished: the canvas loop's output, fixed."""
    from dgemma.engine.scheduler import Commit
    return [Commit(k, torch.tensor([ids]), torch.tensor([k == len(canvases) - 1]), torch.tensor([2]))
            for k, ids in enumerate(canvases)]


def spell(tok, text):
    """Ids of ordinary pieces, one character each, that spell `text`: never a special id, markers' characters too."""
    return [i for c in text for i in tok.encode(c, add_bos=False)]


def test_a_marker_the_model_spells_in_ordinary_pieces_is_answer_text(engine, monkeypatch):
    """Asked about the string "<turn|>", the model may write its characters as ordinary pieces ('<', 'turn', '|>'):
    the answer used to end there (the decoded text was searched for markers), a spelled <|channel> opened a thought
    channel. Only the special ids are markers: here a spelled marker split over two canvases is text, and the
    <turn|> id after it still ends the answer. Stop strings stay text (OpenAI's contract) and match the spelling."""
    tok = engine.tokenizer
    first = tok.encode("Write ", add_bos=False) + spell(tok, "<tu")
    second = spell(tok, "rn|> or <|channel>x") + [tok.special.turn_end] + tok.encode(" junk", add_bos=False)
    monkeypatch.setattr("dgemma.engine.stream.run_alone", lambda module, rows: iter(scripted_commits(tok, [
        first, second])))
    events = run(engine, max_tokens=64, drafts=False)
    done = events[-1]
    answer = "".join(e.text for e in events if isinstance(e, Text) and e.kind == "answer")
    assert answer == done.output.answer == "Write <turn|> or <|channel>x" and done.output.thinking is None
    assert done.finish_reason == "stop"
    assert done.completion_ids == first + second[: second.index(tok.special.turn_end) + 1]  # the stop id kept
    done = engine.complete("Hello there", max_tokens=64, stop=["<turn|>"])
    assert done.output.answer == "Write " and done.finish_reason == "stop"
    chat = ChatSession(engine)
    assert [e for e in chat.send("Hi", max_tokens=64)][-1].output.answer == "Write <turn|> or <|channel>x"
