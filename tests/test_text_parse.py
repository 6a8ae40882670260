"""Output parsing (thinking / answer / tool calls) by marker ids, its streaming form, and stop strings."""

import random

import pytest

from dgemma.bundled import PACKAGED
from dgemma.text import OutputSplitter, ParsedOutput, StopStream, Tokenizer, find_stop, parse_output
from dgemma.text.parse import output_markers

CALL = 'call:get_weather{city:<|"|>Paris<|"|>}'
# Written as text, the markers here become their special ids (Tokenizer.encode reads special strings as specials).
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
    # a marker out of place is kept as written
    ("answer<channel|>tail", ParsedOutput(None, "answer<channel|>tail", [])),
    ("<tool_call|>", ParsedOutput(None, "<tool_call|>", [])),
    ("<|channel>thought\na<|channel>b<|tool_call>c<channel|>d", ParsedOutput("a<|channel>b<|tool_call>c", "d", [])),
    ("<|tool_call>f{<|channel>x}<tool_call|>", ParsedOutput(None, "", ["f{<|channel>x}"])),
]
MARKERS = ["<turn|>", "<eos>", "<|tool_response>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<pad>"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(PACKAGED)


def ids_of(tok, text):
    return tok.encode(text, add_bos=False)


def spelled(tok, text):
    """Ids of ordinary pieces that spell `text`, a marker's characters included: never a special id."""
    ids = [i for c in text for i in tok.encode(c, add_bos=False)]
    assert not set(ids) & tok.special_id_set and tok.decode(ids, skip_special=False) == text
    return ids


@pytest.mark.parametrize("text, expected", CASES)
def test_parse_output(tok, text, expected):
    assert parse_output(tok, ids_of(tok, text)) == expected


def run_stream(tok, ids, sizes):
    splitter, deltas, i = OutputSplitter(tok), [], 0
    for n in sizes:
        deltas += splitter.feed(ids[i : i + n])
        i += n
    deltas += splitter.feed(ids[i:]) + splitter.finish()
    return splitter, deltas


def check_stream_matches(tok, ids, sizes):
    splitter, deltas = run_stream(tok, ids, sizes)
    expected = parse_output(tok, ids)
    assert splitter.result() == expected
    assert "".join(d.text for d in deltas if d.kind == "answer") == expected.answer
    assert "".join(d.text for d in deltas if d.kind == "thinking") == (expected.thinking or "")
    assert [d.text for d in deltas if d.kind == "tool_call"] == expected.tool_calls
    assert all(d.text for d in deltas if d.kind != "tool_call")  # no empty text deltas
    return expected


@pytest.mark.parametrize("text, expected", CASES)
def test_stream_id_by_id_equals_one_shot(tok, text, expected):
    ids = ids_of(tok, text)
    assert check_stream_matches(tok, ids, [1] * len(ids)) == expected


def test_stream_random_fragments_and_chunks(tok):
    """Marker ids and the same markers spelled as ordinary pieces, partial spellings, multi-byte characters split
    over byte tokens, in random chunks: streaming always equals one-shot, and a spelled marker is never a marker."""
    rng = random.Random(11)
    parts = [ids_of(tok, t) for t in ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<pad>",
                                      "<turn|>", "<eos>", '<|"|>', "thought\n", "\n", "text ", "é😀"]]
    parts += [spelled(tok, t) for t in [*MARKERS, "<|tool", "<|chan", "<", "|", ">"]]
    parts += [ids_of(tok, "é😀")[:k] for k in (1, 2, 5)]  # a character cut off inside its bytes
    for _ in range(500):
        ids = [i for _ in range(rng.randint(0, 14)) for i in rng.choice(parts)]
        parsed = check_stream_matches(tok, ids, [rng.randint(0, 6) for _ in range(len(ids))])
        if not set(ids) & set(output_markers(tok)):  # no marker id: the answer is the decoded text, all of it
            assert parsed == ParsedOutput(None, tok.decode(ids, skip_special=False), [])


def test_stream_emits_early(tok):
    s = OutputSplitter(tok)
    assert s.feed(ids_of(tok, "<|channel>thought\nI reason")) == [("thinking", "I reason")]
    assert s.feed(ids_of(tok, " more") + spelled(tok, "<chan")) == [("thinking", " more<chan")]  # text, never held
    assert s.feed(ids_of(tok, "<channel|>Ans")) == [("answer", "Ans")]
    assert s.feed(ids_of(tok, "wer <|tool_call>f{}")) == [("answer", "wer ")]  # a call is reported whole, at its end
    assert s.feed(ids_of(tok, "<tool_call|><turn|>junk")) == [("tool_call", "f{}")]
    assert s.done and s.feed(ids_of(tok, "more")) == [] and s.finish() == []


@pytest.mark.parametrize("marker", MARKERS)
def test_a_marker_spelled_as_ordinary_pieces_is_text(tok, marker):
    """The model writing a marker's characters (asked about the string "<turn|>", say) used to cut the answer there
    or switch its channel: only the special id is a marker. The special id still ends the output after it."""
    ids = ids_of(tok, "say ") + spelled(tok, marker) + ids_of(tok, " ok<turn|>junk")
    assert parse_output(tok, ids) == ParsedOutput(None, f"say {marker} ok", [])
    thought = ids_of(tok, "<|channel>thought\nabout ") + spelled(tok, marker) + ids_of(tok, "<channel|>done<eos>")
    assert parse_output(tok, thought) == ParsedOutput(f"about {marker}", "done", [])
    call = ids_of(tok, "<|tool_call>f{s:") + spelled(tok, marker) + ids_of(tok, "}<tool_call|><|tool_response>")
    assert parse_output(tok, call) == ParsedOutput(None, "", [f"f{{s:{marker}}}"])


def test_the_answer_is_what_the_reference_decodes_up_to_its_stop_id(tok):
    """The oracle: transformers' tokenizer for the same files decodes ordinary pieces spelling a marker as text and
    drops the special ids (skip_special_tokens), and its generation stops at the first of the generation config's
    eos ids; the answer of an output without channels or calls is that text."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(PACKAGED))
    stops = transformers.GenerationConfig.from_pretrained(str(PACKAGED)).eos_token_id
    rng = random.Random(5)
    parts = [hf.encode(t, add_special_tokens=False) for t in ["a", " word", "\n", "<turn|>", "<eos>", "<pad>",
                                                               "<|tool_response>"]]
    parts += [[i for c in m for i in hf.encode(c, add_special_tokens=False)] for m in MARKERS]
    for _ in range(300):
        ids = [i for _ in range(rng.randint(0, 10)) for i in rng.choice(parts)]
        end = next((k for k, i in enumerate(ids) if i in stops), len(ids))
        assert parse_output(tok, ids).answer == hf.decode(ids[:end], skip_special_tokens=True), ids


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


def test_an_end_marker_left_out_of_ends_is_dropped_and_the_text_goes_on(tok):
    s = OutputSplitter(tok, ends=[tok.special.turn_end])
    deltas = s.feed(ids_of(tok, "a<eos>b<|tool_response>c")) + s.feed(ids_of(tok, "<turn|>d")) + s.finish()
    assert "".join(d.text for d in deltas) == s.result().answer == "abc"
    with pytest.raises(ValueError, match=r"ends must be among this tokenizer's end-marker ids \(1 <eos>, 106 <turn"):
        OutputSplitter(tok, ends=[tok.special.pad])


def test_bad_ids_are_a_value_error(tok):
    with pytest.raises(ValueError, match="token ids must be integers, got 1.0"):
        OutputSplitter(tok).feed([5, 1.0])  # 1.0 is not <eos>: not quietly taken for one
