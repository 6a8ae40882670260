"""What each token of a vocabulary can be inside a JSON document: the token classes a JSON layout restricts to.

`JsonVocab.of(tokenizer, vocab_size)` reads every token's text once (cached per tokenizer) and builds bool [V]
classes over the MODEL's vocabulary (ids past the tokenizer's are never allowed):

    string      tokens that may stand inside a JSON string as they are: non-empty text with no '"', no '\\', no
                control character, and complete UTF-8 (byte-fallback pieces are left out), plus the closing '"'
    number      tokens made only of '0-9', '-', '.' (the number repair re-spells the value with single characters)
    ws          the one-space token: the filler that pads a slot after its value ends (valid JSON whitespace
                between tokens, and an ordinary space inside a string)
Single-character structural tokens ('"', ',', ']', '}', digits, '-', '.') must exist as tokens; a vocabulary
without them gets a clear error (every byte-fallback BPE, Gemma's included, has them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

STRUCTURAL = '"{}[],:-.0123456789 '


def token_texts(tokenizer) -> list[str | None]:
    """Text of every tokenizer id as it decodes in the middle of a sequence; None for special/added tokens and
    byte-fallback pieces (a lone byte may be half a character)."""
    from .decoding import to_pieces

    decoder = tokenizer.backend.decoder
    out: list[str | None] = []
    pieces = to_pieces(tokenizer, range(tokenizer.vocab_size), skip_special=False)
    for i, piece in enumerate(pieces):
        if i in tokenizer.added_id_set or isinstance(piece, int) or piece == "\ufffd":
            out.append(None)
            continue
        # decode after an anchor so a decoder that treats the first token specially (strips a space) cannot
        text = decoder.decode(["a", piece])[1:] if decoder is not None else piece
        out.append(text if text else None)
    return out


def _is_string_safe(text: str | None) -> bool:
    return bool(text) and '"' not in text and "\\" not in text and all(ord(ch) >= 0x20 for ch in text)


@dataclass(frozen=True, eq=False)
class JsonVocab:
    tokenizer: object
    texts: list[str | None]  # per tokenizer id
    vocab_size: int  # the model's (>= the tokenizer's)
    ids: dict[str, int]  # single structural characters -> their token id
    string: torch.Tensor  # bool [V], includes the closing quote
    number: torch.Tensor  # bool [V]

    @property
    def ws(self) -> int:
        return self.ids[" "]

    @property
    def quote(self) -> int:
        return self.ids['"']

    def one_of(self, ids) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[list(ids)] = True
        return mask

    def text(self, ids) -> str:
        """Decoded text of ids (byte-fallback pieces of a fixed literal decode to their characters)."""
        return self.tokenizer.decode(list(ids), skip_special=False)

    @staticmethod
    def of(tokenizer, vocab_size: int) -> "JsonVocab":
        return _build(tokenizer, vocab_size)


@functools.lru_cache(maxsize=4)
def _build(tokenizer, vocab_size: int) -> JsonVocab:
    texts = token_texts(tokenizer)[:vocab_size]
    ids = {}
    for ch in STRUCTURAL:
        found = [i for i in tokenizer.encode(ch, add_bos=False)]
        if len(found) != 1 or texts[found[0]] != ch:
            raise ValueError(f"this tokenizer has no single token for {ch!r}, which JSON output needs; structured "
                             "output is not available for this model")
        ids[ch] = found[0]
    string = torch.zeros(vocab_size, dtype=torch.bool)
    number = torch.zeros(vocab_size, dtype=torch.bool)
    for i, t in enumerate(texts):
        if _is_string_safe(t):
            string[i] = True
        if t and all(ch in "0123456789-." for ch in t):
            number[i] = True
    string[ids['"']] = True
    return JsonVocab(tokenizer, texts, vocab_size, ids, string, number)
