"""Train and save small byte-fallback BPE tokenizers for the bundled models (DESIGN §6).

Id layout, chosen so the engine, the chat format and the stop ids behave exactly as with the real
262k Gemma-4 vocabulary (spec §8):

    0..106    the Gemma-4 specials at their real ids (<pad> 0, <eos> 1, <bos> 2, ..., <turn|> 106);
              the other reserved ids hold unused placeholder specials `<reserved_N>`
    107       "\\n", an ordinary token, as in Gemma-4
    108..363  the 256 byte-fallback tokens <0x00>..<0xFF>: any character outside the learned
              vocabulary is spelled as its UTF-8 bytes, so every string round-trips
    364..     learned pieces: printable ASCII + tab first, then the most frequent characters,
              then merges

Unlike Gemma's SentencePiece-style "▁" for spaces, pieces keep real spaces (" world"): nothing
needs escaping, so text containing "▁" round-trips too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from .chat import default_chat_template
from .specials import BOS, EOS, GEMMA4_SPECIALS, NEWLINE_ID, PAD

NUM_RESERVED = NEWLINE_ID + 1  # ids 0..107
FIRST_LEARNED_ID = NUM_RESERVED + 256
_ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n"]
MIN_VOCAB_SIZE = FIRST_LEARNED_ID + len(_ALPHABET) - 1  # "\n" lives at 107, not among learned

# Pre-tokenization (pieces never merge across these splits): words with one optional leading
# space, single digits (numbers stay compositional in a tiny vocab), punctuation runs with one
# optional leading space, newline runs, and runs of other whitespace that leave the last space to
# the next word (so "    if" is "   " + " if", as in the words' usual form).
_SPLIT = (
    r"\p{N}| ?[\p{L}\p{M}]+| ?[^\s\p{L}\p{M}\p{N}]+|[\r\n]+|[^\S\r\n]+(?!\S)|[^\S\r\n]+"
)


def reserved_tokens() -> list[str]:
    """The strings at ids 0..106: the Gemma-4 specials and `<reserved_N>` placeholders."""
    table = {i: s for s, i in GEMMA4_SPECIALS.values()}
    return [table.get(i, f"<reserved_{i}>") for i in range(NEWLINE_ID)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")


def _without_specials(texts: Iterable[str], specials: list[str]) -> Iterator[str]:
    # Training text may be rendered chats; special strings are atomic tokens, not text to learn.
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: texts must be strings, got {type(text).__name__}")
        yield pattern.sub(" ", text)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a byte-fallback BPE with the id layout above; deterministic for the same inputs.

    The result has at most `vocab_size` tokens (fewer if the text has too few distinct pairs).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {NUM_RESERVED} reserved ids, 256 byte tokens "
            f"and {len(_ALPHABET) - 1} ASCII characters need at least {MIN_VOCAB_SIZE}."
        )
    specials = reserved_tokens()
    budget = vocab_size - FIRST_LEARNED_ID + 1  # the trainer's vocabulary includes "\n"
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=_ALPHABET,
        # Rare characters are better spelled as bytes than given a slot each.
        limit_alphabet=max(len(_ALPHABET), budget // 4),
    )
    scratch = tokenizers.Tokenizer(models.BPE())
    scratch.pre_tokenizer = _pre_tokenizer()
    scratch.train_from_iterator(_without_specials(texts, specials), trainer=trainer)
    trained = json.loads(scratch.to_str())["model"]

    # Re-number: reserved, "\n", bytes, then learned pieces in the trainer's order
    # (alphabet, then merges).
    vocab = {s: i for i, s in enumerate(specials)}
    vocab["\n"] = NEWLINE_ID
    vocab.update({f"<0x{b:02X}>": NUM_RESERVED + b for b in range(256)})
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # Already in the vocabulary, so they keep their ids; marking them added+special makes encode
    # match them as whole strings and lets decode skip them.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # Hugging Face tokenizers add <bos> in the post-processor (our Tokenizer.encode does it itself).
    bos = vocab[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos)]
    )
    return tok


def save_tokenizer_files(
    tokenizer: tokenizers.Tokenizer,
    directory: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int = 131072,
    eos_token: str = EOS,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (Hugging Face layout).

    `chat_template=None` writes dgemma's default Gemma-4-format template. `tokenizer` may also be
    a `dgemma.text.Tokenizer`. Returns the directory.
    """
    backend = getattr(tokenizer, "backend", tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        # The generic fast class loads tokenizer.json as is (transformers' Gemma classes may
        # rebuild the pipeline with SentencePiece-style "▁" spaces, which ours does not use).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": eos_token,
        "pad_token": PAD,
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched prompts are left-padded (spec §6.6)
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    template = default_chat_template() if chat_template is None else chat_template
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return directory
