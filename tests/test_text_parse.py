"""Output parsing (thinking / answer / tool calls), its streaming form, and stop strings."""

import random

import pytest

from dgemma.text import OutputSplitter, ParsedOutput, StopStream, find_stop, parse_output

CALL = 'call:get_weather{city:<|"|>Paris<|"|>}'
CASES = [
    ("Hello there.<turn|>", ParsedOutput(None, "Hello there.", [])),
    ("no end marker", ParsedOutput(None, "no end marker", [])),
    (
        "<|channel>thought\nLet me think.\n2+2=4<channel|>It is 4.<turn|><pad><pad>",
        ParsedOutput("Let me think.\n2+2=4", "It is 4.", []),
    ),
    ("<|channel>thought\nhmm, so the", ParsedOutput("hmm, so the", "", [])),  # cut off thinking
    ("<|channel>thought<channel|>Hi", ParsedOutput("", "Hi", [])),  # empty channel
    ("<|channel>thou", ParsedOutput("", "", [])),  # cut off inside the header
    (
        f"Checking.<|tool_call>{CALL}<tool_call|><|tool_response>ignored",
        ParsedOutput(None, "Checking.", [CALL]),
    ),
    (
        "<|channel>thought\nneed two<channel|><|tool_call>a{}<tool_call|><|tool_call>b{}<tool_call|>",
        ParsedOutput("need two", "", ["a{}", "b{}"]),
    ),
    # an unfinished call stays visible as text and is never reported as a call
    ("x<|tool_call>call:f{a:", ParsedOutput(None, "x<|tool_call>call:f{a:", [])),
    ("x<|tool_call>call:f{a:<eos>more", ParsedOutput(None, "x<|tool_call>call:f{a:", [])),
    # pads vanish anywhere; other specials are kept, not blindly stripped
    ('a<pad>b <|"|>q<|"|> <|turn>c<eos>after', ParsedOutput(None, 'ab <|"|>q<|"|> <|turn>c', [])),
    ("answer<channel|>tail", ParsedOutput(None, "answer<channel|>tail", [])),
    ("<tool_call|>", ParsedOutput(None, "<tool_call|>", [])),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_parse_output(text, expected):
    assert parse_output(text) == expected


def run_stream(text, sizes):
    splitter, deltas, i = OutputSplitter(), [], 0
    for n in sizes:
        deltas += splitter.feed(text[i : i + n])
        i += n
    deltas += splitter.feed(text[i:]) + splitter.finish()
    return splitter, deltas


def check_stream_matches(text, sizes):
    splitter, deltas = run_stream(text, sizes)
    expected = parse_output(text)
    assert splitter.result() == expected
    assert "".join(d.text for d in deltas if d.kind == "answer") == expected.answer
    assert "".join(d.text for d in deltas if d.kind == "thinking") == (expected.thinking or "")
    assert [d.text for d in deltas if d.kind == "tool_call"] == expected.tool_calls
    assert all(d.text for d in deltas if d.kind != "tool_call")  # no empty text deltas


@pytest.mark.parametrize("text, expected", CASES)
def test_stream_char_by_char_equals_one_shot(text, expected):
    check_stream_matches(text, [1] * len(text))


def test_stream_random_fragments_and_chunks():
    rng = random.Random(11)
    parts = ["<|channel>", "thought\n", "<channel|>", "<|tool_call>", "<tool_call|>", "<pad>",
             "<|tool", "<|chan", "<", "|", ">", "\n", "text ", "é😀", "<turn|>", "<eos>", '<|"|>']
    for _ in range(500):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 14)))
        check_stream_matches(text, [rng.randint(0, 6) for _ in range(len(text))])


def test_stream_emits_early_and_holds_only_partial_markers():
    s = OutputSplitter()
    assert s.feed("<|channel>thought\nI reason") == [("thinking", "I reason")]
    assert s.feed(" more<chan") == [("thinking", " more")]  # "<chan" may start <channel|>
    assert s.feed("nel|>Ans") == [("answer", "Ans")]
    assert s.feed("wer <|tool_c") == [("answer", "wer ")]
    assert s.feed("all>f{}") == []  # a call is reported whole, at its end marker
    assert s.feed("<tool_call|><turn|>junk") == [("tool_call", "f{}")]
    assert s.done and s.feed("more") == [] and s.finish() == []


# -- stop strings ------------------------------------------------------------------------------


def test_find_stop():
    assert find_stop("Hello STOP there", ["STOP"]) == 6
    assert find_stop("Hello", ["STOP", ""]) is None  # empty stop strings are ignored
    assert find_stop("a\n\nb", ["\n\n", "b"]) == 1
    assert find_stop("abcd", ["abcd", "bc"]) == 1  # the one that completes first, as streamed
    assert find_stop("xab", ["ab", "b"]) == 1  # same end: the earlier start


def test_stop_stream_across_chunks():
    s = StopStream(["STOP"])
    assert s.feed("Hello wor") == ("Hello wor", False)
    assert s.feed("ld! ST") == ("ld! ", False)  # "ST" might begin STOP: held
    assert s.feed("O") == ("", False)
    assert s.feed("P here") == ("", True)
    assert s.feed("more") == ("", True) and s.flush() == ""
    s = StopStream(["STOP"])
    assert s.feed("a ST") == ("a ", False)
    assert s.feed("ART") == ("START", False)  # the hold is released once it cannot match
    assert s.feed("ST") == ("", False) and s.flush() == "ST"  # stream ended without a stop


def test_stop_stream_random_equals_one_shot():
    rng = random.Random(3)
    for _ in range(1000):
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 3))) for _ in range(2)]
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
        s, out = StopStream(stops), ""
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            out += s.feed(text[a:b])[0]
        out += s.flush()
        cut = find_stop(text, stops)
        assert out == (text if cut is None else text[:cut]), (text, stops)


def test_an_end_marker_left_out_of_ends_is_dropped_and_the_text_goes_on():
    s = OutputSplitter(ends=["<turn|>"])
    deltas = s.feed("a<eos>b<|tool_response>c") + s.feed("<turn|>d") + s.finish()
    assert "".join(d.text for d in deltas) == s.result().answer == "abc"
    with pytest.raises(ValueError, match="ends must be among"):
        OutputSplitter(ends=["<pad>"])
