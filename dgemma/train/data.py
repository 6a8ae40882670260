"""JSONL training data -> canvas-aligned examples -> right-padded batches (spec §7).

One record per line, one of:
    {"messages": [...chat...]}                 train on the LAST message (must be the assistant's); the messages
                                               before it are the prompt, rendered with the model's chat template
                                               and the generation prompt (`"enable_thinking": true` optional)
    {"prompt": "...", "completion": "..."}     a one-turn chat: prompt = the user message, completion = the answer
    {"prompt": ..., "completion": ..., "raw": true}
                                               plain text, no chat template: <bos> + prompt, then the completion
                                               (the Sudoku and code models use this; `raw=True` in
                                               `load_examples` makes it the default for records without the key)

Example = (prompt ids, response ids). The response is the answer's ids, then one end id (`<turn|>` after a chat
answer, `<eos>` after raw text: what inference stops on), then `<eos>` repeated up to a multiple of the canvas
length L. Training fills the tail of the last canvas with EOS (spec §6.5, §7), so the model learns to write EOS
after its answer, and every response canvas is a full L tokens: nothing inside a canvas is padding.

Too long (prompt + padded response > max_len): `on_too_long="truncate"` keeps the whole canvases that fit (the
answer is cut, so no end id: the model learns the text goes on), "drop" skips the example, "error" raises. A prompt
that leaves no room for one canvas is always dropped (or raises with "error"). Skips are summarised in ONE warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..text import ChatFormatError, normalize_messages

TOO_LONG = ("truncate", "drop", "error")


class DataError(ValueError):
    """A training file that cannot be used; the message starts with `file:line`."""


class DataWarning(UserWarning):
    """Examples were truncated or dropped (one summary per load)."""


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]  # clean context, starts with <bos>
    response: tuple[int, ...]  # answer + end id + <eos> fill; len is a multiple of the canvas length
    where: str  # "file:line", for messages about this example


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-blank line; a line that is not a JSON object raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; pass a JSONL file with "
                        "one training example per line")
    with path.open("rb") as f:  # lines decoded one by one, so a bad byte is reported at its line
        for number, data in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark is fine
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start + 1} of the "
                                "line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: no '{key}' key (a string); the record has {sorted(record)[:6]}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def record_ids(record: dict, tokenizer, where: str, raw_default: bool = False) -> tuple[list[int], list[int], int]:
    """One JSONL record -> (prompt ids, answer ids, end id). See the module docstring for the formats."""
    special = tokenizer.special
    eos = tokenizer.plain_eos_id
    turn_end = special.turn_end if special.turn_end is not None else eos
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no <eos> token; training needs it to pad responses")
    thinking = record.get("enable_thinking", False)
    if not isinstance(thinking, bool):
        raise DataError(f"{where}: 'enable_thinking' must be true or false")
    if "messages" in record and ("prompt" in record or "completion" in record):  # was: prompt/completion ignored
        raise DataError(f"{where}: has both 'messages' and 'prompt'/'completion'; a record is one example, in one "
                        "of the two formats: split it into two records or drop one")
    try:
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or len(messages) < 2:
                raise DataError(f"{where}: 'messages' must be a list with at least one prompt message followed by "
                                "the assistant answer to train on")
            last = messages[-1]
            if not isinstance(last, dict) or last.get("role") not in ("assistant", "model"):
                role = last.get("role") if isinstance(last, dict) else type(last).__name__
                raise DataError(f"{where}: the last message is the one trained on and must be the assistant's, "
                                f"got role {role!r}")
            if last.get("tool_calls"):
                raise DataError(f"{where}: training on an answer with 'tool_calls' is not supported yet; put the "
                                "call text in 'content'")
            answer = normalize_messages(messages)[-1]["content"]  # a string, or text parts joined as in prompts
            prompt = tokenizer.encode_chat(messages[:-1], add_generation_prompt=True, enable_thinking=thinking)
            return prompt, tokenizer.encode(answer, add_bos=False), turn_end
        if "prompt" in record or "completion" in record:
            prompt_text, answer = _string(record, "prompt", where), _string(record, "completion", where)
            raw = record.get("raw", raw_default)
            if not isinstance(raw, bool):
                raise DataError(f"{where}: 'raw' must be true or false, got {raw!r}")
            if raw:
                return tokenizer.encode(prompt_text, add_bos=True), tokenizer.encode(answer, add_bos=False), eos
            prompt = tokenizer.encode_chat([{"role": "user", "content": prompt_text}], add_generation_prompt=True,
                                           enable_thinking=thinking)
            return prompt, tokenizer.encode(answer, add_bos=False), turn_end
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    raise DataError(f"{where}: expected 'messages' (a chat) or 'prompt' and 'completion' keys, got "
                    f"{sorted(record)[:6]}")


def make_example(prompt: Sequence[int], answer: Sequence[int], end_id: int, fill_id: int, canvas_length: int,
                 max_len: int | None, on_too_long: str, where: str) -> tuple[Example | None, str | None]:
    """-> (example or None if dropped, "truncated" | "dropped" | None). Raises DataError when on_too_long="error"."""
    L = canvas_length
    if not prompt:
        raise DataError(f"{where}: the prompt is empty (raw prompts get <bos>; check the tokenizer)")
    response = list(answer) + [end_id]
    response += [fill_id] * (-len(response) % L)
    total = len(prompt) + len(response)
    if max_len is None or total <= max_len:
        return Example(tuple(prompt), tuple(response), where), None
    fits = (max_len - len(prompt)) // L
    message = (f"{where}: prompt {len(prompt)} + response {len(answer) + 1} tokens (padded to {len(response) // L} "
               f"canvases of {L}) = {total} positions > max_len {max_len}")
    if on_too_long == "error":
        raise DataError(message + "; raise --max-seq-len, shorten the example, or pass --on-too-long truncate|drop")
    if fits < 1 or on_too_long == "drop":
        return None, "dropped"
    return Example(tuple(prompt), tuple(response[:fits * L]), where), "truncated"


def load_examples(paths: str | Path | Iterable[str | Path], tokenizer, *, canvas_length: int,
                  max_len: int | None = None, raw: bool = False, on_too_long: str = "truncate") -> list[Example]:
    """Read JSONL file(s) into Examples, in file order. One DataWarning summarises truncated/dropped examples."""
    if on_too_long not in TOO_LONG:
        raise ValueError(f"on_too_long must be one of {TOO_LONG}, got {on_too_long!r}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    fill = tokenizer.plain_eos_id
    examples, skipped = [], {"truncated": [], "dropped": []}
    for path in paths:
        for where, record in read_jsonl(path):
            prompt, answer, end = record_ids(record, tokenizer, where, raw)
            example, fate = make_example(prompt, answer, end, fill, canvas_length, max_len, on_too_long, where)
            if fate is not None:
                skipped[fate].append(where)
            if example is not None:
                examples.append(example)
    for fate, wheres in skipped.items():
        if wheres:
            warnings.warn(f"{len(wheres)} example(s) longer than max_len {max_len} were {fate} "
                          f"({', '.join(wheres[:3])}{', ...' if len(wheres) > 3 else ''})", DataWarning, stacklevel=2)
    if not examples:
        why = f" (all {len(skipped['dropped'])} longer than max_len {max_len})" if skipped["dropped"] else ""
        raise DataError(f"{', '.join(map(str, paths))}: no usable examples{why}")
    return examples


def split_heldout(examples: Sequence[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): `count` examples chosen by a seeded permutation, both lists in their original order."""
    if not 0 <= count < len(examples):
        raise ValueError(f"cannot hold out {count} of {len(examples)} examples; keep at least one for training")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 over each value): noise seeds per example slot."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


class Order:
    """The example stream: epoch e is a permutation seeded by (seed, e); step s takes stream positions
    [s*G, (s+1)*G). A pure function of (seed, step), so resuming needs nothing but the step count."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples, self.seed, self._epochs = num_examples, seed, {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(mix(self.seed, epoch))
            if len(self._epochs) >= 2:  # a step spans at most two epochs unless G > N; keep memory bounded
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = torch.randperm(self.num_examples, generator=g).tolist()
        return self._epochs[epoch]

    def __getitem__(self, position: int) -> int:
        return self._epoch(position // self.num_examples)[position % self.num_examples]


@dataclass
class Batch:
    """Right-padded examples. Response canvases never contain padding (they are EOS-filled)."""

    tokens: torch.Tensor  # [B,T] int64: prompt + response, then pad
    valid: torch.Tensor  # [B,T] bool, False = padding
    prompt_len: torch.Tensor  # [B] int64
    num_canvases: torch.Tensor  # [B] int64, response length / L
    seeds: torch.Tensor | None = None  # [B] int64 noise seed per example (see loss.sample_noise)
    # Loss normalisers over the WHOLE optimizer step (all micro-batches and ranks); None = this batch's own counts.
    # With them, summing per-batch losses gives the global-batch mean however the examples are split.
    diffusion_denominator: float | None = None
    ar_denominator: float | None = None
    noise: object | None = None  # a loss.Noise drawn ahead (train/batches.py); None: diffusion_loss draws it

    def to(self, device) -> "Batch":
        move = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in vars(self).items()}
        return Batch(**move)


def ar_targets(example: Example) -> int:
    """Next-token targets an example contributes to the AR loss (every valid position but the first)."""
    return len(example.prompt) + len(example.response) - 1


def collate(examples: Sequence[Example], pad_id: int, canvas_length: int, seeds: Sequence[int] | None = None,
            diffusion_denominator: float | None = None, ar_denominator: float | None = None) -> Batch:
    """Examples -> a right-padded Batch (on CPU)."""
    lengths = [len(e.prompt) + len(e.response) for e in examples]
    tokens = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.int64)
    valid = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, (e, n) in enumerate(zip(examples, lengths)):
        tokens[row, :n] = torch.tensor(e.prompt + e.response, dtype=torch.int64)
        valid[row, :n] = True
    return Batch(tokens, valid, torch.tensor([len(e.prompt) for e in examples], dtype=torch.int64),
                 torch.tensor([len(e.response) // canvas_length for e in examples], dtype=torch.int64),
                 None if seeds is None else torch.tensor(list(seeds), dtype=torch.int64),
                 diffusion_denominator, ar_denominator)
