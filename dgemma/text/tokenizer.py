"""`Tokenizer`: the `tokenizers` library plus what dgemma needs around it.

Loads a Hugging Face model directory (`tokenizer.json`, optional `tokenizer_config.json` and
`chat_template.jinja`), the same files for the real 262k Gemma-4 tokenizer and our small bundled
ones. Special ids are found by looking their strings up in the loaded vocabulary, never assumed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tokenizers

from .chat import load_chat_template, render_chat
from .decoding import StreamDecoder, render, to_pieces
from .specials import GEMMA4_SPECIALS, STOP_NAMES


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the Gemma-4 special tokens in the loaded vocabulary (None: it has no such token)."""

    pad: int | None = None
    eos: int | None = None
    bos: int | None = None
    unk: int | None = None
    mask: int | None = None
    tool_start: int | None = None
    tool_end: int | None = None
    tool_call_start: int | None = None
    tool_call_end: int | None = None
    tool_response_start: int | None = None
    tool_response_end: int | None = None
    quote: int | None = None
    think: int | None = None
    channel_start: int | None = None
    channel_end: int | None = None
    turn_start: int | None = None
    turn_end: int | None = None


assert [f.name for f in fields(SpecialIds)] == list(GEMMA4_SPECIALS)  # one table, kept in sync

_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """`text` with UTF-16 surrogates made valid: a pair becomes its character, a lone one U+FFFD. Python strings
    can hold them (JSON's "\\ud83d\\ude00" escapes, text cut inside a pair); UTF-8, and so the tokenizer, cannot."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _token_string(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as "<bos>" or as {"content": "<bos>", ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"could not read {what} {path}: {e}. The file is damaged or not JSON; "
            "re-download the model directory or re-save it (dgemma.text.save_tokenizer_files)."
        ) from e


class Tokenizer:
    """Text <-> ids for one model. Build with `Tokenizer.from_dir(path)` or from a backend."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.config = dict(config or {})
        # None: callers fall back to dgemma's default template (see render_chat).
        self.chat_template = chat_template or None
        added = backend.get_added_tokens_decoder()
        self.added_id_set = frozenset(added)
        self.special_id_set = frozenset(i for i, t in added.items() if t.special)
        self.special = SpecialIds(
            **{name: backend.token_to_id(s) for name, (s, _) in GEMMA4_SPECIALS.items()}
        )
        # bos/eos/pad as the model configures them: tokenizer_config.json may name other strings
        # (Gemma-4 probably names <turn|> as eos_token, spec §8); the plain name is the fallback.
        self.bos_id, self.eos_id, self.pad_id = (
            self._configured(name) for name in ("bos", "eos", "pad")
        )
        # Ids that end generation (spec §2.3): <eos>, <turn|>, <|tool_response>, plus the
        # configured eos, those that exist in this vocabulary.
        stops = [getattr(self.special, n) for n in STOP_NAMES] + [self.eos_id]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))

    def _configured(self, name: str) -> int | None:
        s = _token_string(self.config.get(f"{name}_token"))
        i = self.backend.token_to_id(s) if s is not None else None
        return i if i is not None else getattr(self.special, name)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a directory."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
        directory = file.parent
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer found: {file} does not exist. Pass a model directory in the Hugging "
                "Face layout (it must contain tokenizer.json), or build one with "
                "dgemma.text.train_tokenizer + save_tokenizer_files."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for any parse error
            raise ValueError(
                f"could not load tokenizer {file}: {e}. The file is damaged or was written by an "
                "incompatible tool; re-download the model directory or re-save the tokenizer."
            ) from e
        cfg_file = directory / "tokenizer_config.json"
        config = _read_json(cfg_file, "tokenizer config") if cfg_file.is_file() else {}
        return cls(backend, config=config, chat_template=load_chat_template(directory))

    # -- sizes and lookups -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def plain_eos_id(self) -> int | None:
        """The `<eos>` token itself (what ends a raw answer and fills a response's canvases), else the configured
        eos (`eos_id` may name `<turn|>` instead, spec §8); None when the vocabulary has neither."""
        return self.special.eos if self.special.eos is not None else self.eos_id

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """The token string of id `i`; None when the vocabulary has no such id (negative ones included)."""
        i = int(i)
        return self.backend.id_to_token(i) if 0 <= i < self.vocab_size else None

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Ids of `text`. Special-token strings in it (e.g. `<|turn>`) become their special ids.

        `add_bos` prepends `<bos>` unless the text already starts with it (a rendered chat prompt
        does), so a prompt never gets two: the model never saw a doubled `<bos>` in training. A lone UTF-16
        surrogate (no character; UTF-8 cannot spell it) is read as U+FFFD, a surrogate pair as its character.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        # The post-processor is skipped: it is where HF tokenizers add <bos>, and we do that here.
        ids = self.backend.encode(_encodable(text), add_special_tokens=False).ids
        bos = self.bos_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_literal(self, text: str) -> list[int]:
        """Ids of `text` as plain characters (no `<bos>`): where it holds an added token's string (a JSON key
        "<eos>"), that string is spelled with ordinary tokens, never with the added id, which would mean something
        else to the model (an `<eos>` ends the answer there). Decodes back to `text`."""
        ids = self.encode(text, add_bos=False)
        if self.added_id_set.isdisjoint(ids):
            return ids
        contents = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.content},
                          key=len, reverse=True)
        out, at = [], 0
        for m in re.finditer("|".join(map(re.escape, contents)), text):  # each one character by character
            out += self.encode(text[at: m.start()], add_bos=False) if m.start() > at else []
            for ch in m.group():
                out += self.encode(ch, add_bos=False)
            at = m.end()
        out += self.encode(text[at:], add_bos=False) if at < len(text) else []
        if not self.added_id_set.isdisjoint(out):
            raise ValueError(f"cannot spell {text!r} without special tokens in this vocabulary")
        return out

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; `skip_special` drops special tokens. To split an output into thinking, answer and tool
        calls, parse its ids (`parse_output`): in text, a marker cannot be told from its characters."""
        return render(self, to_pieces(self, ids, skip_special=skip_special))

    def stream(self, *, skip_special: bool = True) -> StreamDecoder:
        """A decoder for ids that arrive in chunks; see `StreamDecoder`."""
        return StreamDecoder(self, skip_special=skip_special)

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """Prompt text for `messages` with this model's chat template (or dgemma's default)."""
        for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if i is not None:
                kwargs.setdefault(f"{name}_token", self.backend.id_to_token(i))
        return render_chat(messages, template=kwargs.pop("template", self.chat_template), **kwargs)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        """Prompt ids for `messages`: `render_chat`, then `encode` (never a doubled `<bos>`)."""
        return self.encode(self.render_chat(messages, **kwargs), add_bos=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_dir(path)
