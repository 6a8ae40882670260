"""Tokenizer training, loading, special ids, round-trips and streaming decode (dgemma.text)."""

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

import dgemma.text

from dgemma.text import (
    GEMMA4_SPECIALS,
    Tokenizer,
    decode_incremental,
    render_chat,
    save_tokenizer_files,
    train_tokenizer,
)
from dgemma.text.build import FIRST_LEARNED_ID, MIN_VOCAB_SIZE

WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have "
    "an they you were there been one all we can has more if no out so said what up its about into "
    "than them only other new some could time these two may then do first any now such like over "
    "model answer think tool call weather city user system def return print self value"
).split()
RARE = ["café", "naïve", "Größe", "日本語", "привет", "Ελληνικά", "😀", "🚀", "€", "e\u0301"]
# Never in the training text: these must come out as byte-fallback tokens.
UNSEEN = "鼎🦀ᚠ\u2581ﬁ\U0010fffd"


def corpus(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(WORDS if rng.random() < 0.9 else RARE) for _ in range(12))
        if rng.random() < 0.2:
            line = "    " + line + f" = {rng.randint(0, 9999)}."
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(train_tokenizer(corpus(400), 1024), directory)
    return directory


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


def test_special_ids_sit_at_gemma4_ids(tok):
    for name, (string, gemma_id) in GEMMA4_SPECIALS.items():
        assert tok.token_to_id(string) == gemma_id, string
        assert getattr(tok.special, name) == gemma_id
    assert tok.token_to_id("\n") == 107
    assert [tok.id_to_token(108 + b) for b in (0, 0x41, 255)] == ["<0x00>", "<0x41>", "<0xFF>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.stop_ids == (1, 106, 50)


def test_files_in_hf_layout(model_dir):
    assert {p.name for p in model_dir.iterdir()} >= {
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
    }
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert cfg["model_max_length"] > 0


@pytest.mark.parametrize(
    "text",
    ["", "hello world", "  two  spaces\n\n\ttab\r\n", "Größe 日本語 😀🚀 e\u0301", UNSEEN,
     "<0x41> is not a byte token", "▁leading ▁marks▁", "\x00\x7f control", "👩‍👩‍👧 family"],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.backend.decode(ids) == text  # on valid text we decode exactly as the library does


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("鼎", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["<0xE9>", "<0xBC>", "<0x8E>"]
    assert tok.token_to_id("鼎") is None and 3 not in ids  # no <unk>


def test_encode_bos_and_specials(tok):
    ids = tok.encode("hi")
    assert ids[0] == 2 and ids[1:] == tok.encode("hi", add_bos=False)
    prompt = render_chat([{"role": "user", "content": "hi"}])
    ids = tok.encode(prompt)  # the template already starts with <bos>: never doubled
    assert ids[:3] == [2, 105, *tok.encode("user", add_bos=False)[:1]] and ids[1] != 2
    assert ids.count(106) == 1 and ids[-1] == 101
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == ids
    assert tok.decode(ids) == "user\nhi\nmodel\nthought\n"  # specials skipped
    assert tok.decode(ids, skip_special=False) == prompt


def test_training_is_deterministic_and_sized():
    texts = corpus(200, seed=3)
    assert train_tokenizer(texts, 700).to_str() == train_tokenizer(texts, 700).to_str()
    # ~1 MB of pseudo-words: enough distinct pairs to fill a 4096 vocabulary
    rng = random.Random(1)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"] + RARE
    big = [
        " ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(16))
        for _ in range(10000)
    ]
    assert sum(map(len, big)) > 900_000
    start = time.perf_counter()
    backend = train_tokenizer(big, 4096)
    assert time.perf_counter() - start < 30  # a fraction of a second in practice
    assert backend.get_vocab_size() == 4096
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(texts, MIN_VOCAB_SIZE - 1)


def test_training_is_deterministic_across_processes():
    # Hash-map seeds differ per process; bundled tokenizers must still come out byte-identical.
    code = (
        "import hashlib, random; from dgemma.text import train_tokenizer; "
        "rng = random.Random(5); words = 'ab bc cd de ef fa x y z'.split(); "
        "texts = [' '.join(rng.choice(words) for _ in range(30)) for _ in range(300)]; "
        "print(hashlib.sha256(train_tokenizer(texts, 600).to_str().encode()).hexdigest())"
    )
    root = str(Path(dgemma.text.__file__).parents[2])  # so the child imports this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(code, {})
    assert child == here.getvalue().strip() and len(child) == 64


def test_special_strings_in_training_text_stay_atomic():
    backend = train_tokenizer(["<|turn>user\nhi there<turn|>\n"] * 200 + corpus(50), 600)
    learned = [backend.id_to_token(i) for i in range(FIRST_LEARNED_ID, backend.get_vocab_size())]
    assert not any("turn" in p and ("<" in p or "|" in p) for p in learned)


def test_transformers_loads_and_agrees(model_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    text = "Größe 😀 " + UNSEEN + " <|turn>user\nhi<turn|>\n" + " ".join(corpus(5))
    assert hf(text)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    for thinking in (False, True):
        hf_prompt = hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert hf_prompt == tok.render_chat(msgs, enable_thinking=thinking)


def test_lookup_by_string_not_by_id(tmp_path):
    # A vocabulary with specials elsewhere (like any non-bundled model): ids come from lookup.
    vocab = {"[UNK]": 0, "a": 1, "<bos>": 5, "<turn|>": 7, "<eos>": 9}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<turn|>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.special.bos, tok.special.eos, tok.special.turn_end) == (5, 9, 7)
    assert tok.special.pad is None and tok.special.channel_start is None
    assert tok.eos_id == 7 and tok.stop_ids == (9, 7)  # configured eos joins, <eos> stays a stop
    assert tok.chat_template is None


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*model directory"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    save_tokenizer_files(train_tokenizer(corpus(50), 600), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json.*damaged"):
        Tokenizer.from_dir(tmp_path)


# -- decoding ---------------------------------------------------------------------------------


def test_invalid_bytes_are_replaced_locally(tok):
    byte = {b: 108 + b for b in range(256)}
    assert tok.decode([byte[0xC3], byte[0xA9], byte[0xA9]]) == "é\ufffd"  # library: "���"
    assert tok.decode([byte[0xE2], byte[0x82]]) == "\ufffd"  # unfinished at the end
    assert tok.decode([tok.vocab_size + 5]) == "\ufffd"  # id beyond the vocabulary
    assert tok.decode([2**40, 2**70]) == "\ufffd\ufffd"  # however far beyond (was an OverflowError)


@pytest.mark.parametrize("bad, message", [(-1, "token id -1 is negative"), (-(2**70), "is negative"),
                                          (1.5, "token ids must be integers, got 1.5")])
def test_a_bad_id_is_a_value_error_naming_it(tok, bad, message):
    for decode in (lambda: tok.decode([5, bad]), lambda: tok.stream().push([bad])):
        with pytest.raises(ValueError, match=re.escape(message)):
            decode()
    assert tok.id_to_token(-1) is None and tok.id_to_token(2**70) is None
    assert tok.decode(torch.tensor([5])) == tok.decode([5]) == tok.decode([np.int64(5)])


def chunked(ids, rng):
    i = 0
    while i < len(ids):
        n = rng.randint(0, 5)
        yield ids[i : i + n]
        i += n


@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_equals_full_decode_on_random_ids(tok, skip_special):
    rng = random.Random(7)
    byte_ids = list(range(108, 364))
    for _ in range(300):
        # Heavy on byte tokens so runs are valid, invalid and split in every way.
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randint(0, 40))
        ]
        deltas = list(decode_incremental(tok, chunked(ids, rng), skip_special=skip_special))
        assert "".join(deltas) == tok.decode(ids, skip_special=skip_special)


def test_stream_never_emits_partial_characters(tok):
    text = "x " + UNSEEN + " Größe 😀 done"
    ids = tok.encode(text, add_bos=False)
    stream = tok.stream()
    deltas = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas[:-1])
    assert "" in deltas  # some pushes had to wait for the rest of a character
    emitted = ""
    for d in deltas:  # each delta extends the text: nothing is re-emitted or taken back
        emitted += d
        assert text.startswith(emitted)


def test_sentencepiece_style_vocabulary(tmp_path):
    # The real Gemma tokenizer spells spaces as "▁" and decodes with Replace + ByteFallback + Fuse;
    # a small imitation checks that decode and streaming go through such a decoder chain intact.
    from tokenizers import decoders, normalizers

    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for piece in ["▁", "a", "b", "▁a", "ab", "▁ab"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<turn|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.special.turn_end, tok.special.mask) == (2, len(vocab), None)
    text = "ab a 鼎 b😀<turn|>"
    ids = tok.encode(text, add_bos=False)
    assert vocab["▁a"] in ids and tok.decode(ids, skip_special=False) == text
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        assert "".join(decode_incremental(tok, chunked(ids, rng))) == tok.decode(ids)


def test_template_from_tokenizer_config(tmp_path):
    save_tokenizer_files(train_tokenizer(corpus(50), 600), tmp_path, chat_template="X")
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "a"}]) == "X"
    (tmp_path / "chat_template.jinja").unlink()
    named = [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).encode_chat([{"role": "user", "content": "a"}]) == [
        2, *Tokenizer.from_dir(tmp_path).encode("a", add_bos=False)
    ]


def test_surrogates_encode_as_utf8_would_allow(tok):
    # JSON's "\ud83d\ude00" escapes and text cut inside a pair give Python strings UTF-8 cannot spell; the
    # tokenizer library raised "TypeError: TextInputSequence must be str" (a server 500).
    assert tok.encode("a\ud83d\ude00b", add_bos=False) == tok.encode("a😀b", add_bos=False)
    assert tok.encode("x\ud800y\udfff", add_bos=False) == tok.encode("x\ufffdy\ufffd", add_bos=False)
    chat = tok.encode_chat([{"role": "user", "content": "hi \udc00"}])
    assert chat == tok.encode_chat([{"role": "user", "content": "hi \ufffd"}])
