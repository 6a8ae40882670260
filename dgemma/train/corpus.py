"""Training data that every machine has offline: the Python standard library's own source code.

`build_stdlib_corpus(out_dir)` writes, deterministically for a given Python version:
* `train.jsonl` / `heldout.jsonl`: chat examples "write the function `name(args)`: <docstring summary>" ->
  the function's source, plus raw continuation examples (the first lines of a function -> the rest);
* `tokenizer_text.txt`: the text the tokenizer is trained on (training modules only).
Modules are split by a hash of their dotted name, so held-out functions come from modules the model never
saw (the infill evaluation of the default model uses the same split).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "__pycache__", "ensurepip",
             "tkinter", "pydoc_data", "venv"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(module: str, percent: int = 5) -> bool:
    """Stable split by module name (not by Python's randomised hash)."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100 < percent


def stdlib_modules(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(dotted module name, source) for every stdlib .py file outside SKIP_DIRS, in sorted order."""
    root = root or stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("test") for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield ".".join(rel.with_suffix("").parts), source


def functions(source: str) -> Iterator[tuple[str, str, str, str]]:
    """(name, signature line, dedented source, docstring) of every function or method with a docstring."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        body = lines[node.lineno - 1:node.end_lineno]
        indent = node.col_offset  # every line of the function is indented at least this much
        if any(line.strip() and not line[:indent].isspace() for line in body[1:]):
            continue  # odd layout (e.g. a line continuation at column 0): skip rather than mangle
        text = "\n".join(line[indent:] for line in body)
        yield node.name, text.splitlines()[0].strip(), text, doc


def summary(docstring: str) -> str:
    return docstring.strip().split("\n\n")[0].replace("\n", " ").strip()


def examples(module: str, source: str, rng: random.Random, max_chars: int) -> Iterator[dict]:
    for name, signature, text, doc in functions(source):
        if len(text) > max_chars:
            continue
        call = signature.removeprefix("async ").removeprefix("def ").rstrip(":")
        request = f"Write the Python function `{call}` from the `{module}` module: {summary(doc)}"
        yield {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": text}]}
        lines = text.splitlines()
        if len(lines) >= 4:  # raw continuation: a prefix of the function -> the rest
            cut = rng.randint(1, len(lines) - 2)
            yield {"prompt": "\n".join(lines[:cut]) + "\n", "completion": "\n".join(lines[cut:]), "raw": True}


def build_stdlib_corpus(out_dir: str | Path, *, seed: int = 0, max_chars: int = 1200,
                        heldout_percent: int = 5) -> dict:
    """Write the corpus files; returns counts. Deterministic for a given Python stdlib."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {"train": 0, "heldout": 0, "modules": 0}
    with open(out / "train.jsonl", "w") as train, open(out / "heldout.jsonl", "w") as heldout, \
            open(out / "tokenizer_text.txt", "w") as tok_text:
        for module, source in stdlib_modules():
            counts["modules"] += 1
            held = is_heldout(module, heldout_percent)
            if not held:
                tok_text.write(source + "\n")
            for ex in examples(module, source, rng, max_chars):
                (heldout if held else train).write(json.dumps(ex) + "\n")
                counts["heldout" if held else "train"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    """python -m dgemma.train.corpus OUT_DIR [--vocab-size N]: corpus files plus a tokenizer in OUT_DIR/tokenizer."""
    import argparse

    from ..text import save_tokenizer_files, train_tokenizer

    parser = argparse.ArgumentParser(prog="python -m dgemma.train.corpus", description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    counts = build_stdlib_corpus(args.out)
    text = (Path(args.out) / "tokenizer_text.txt").read_text()
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tokenizer = train_tokenizer(chunks, vocab_size=args.vocab_size)
    save_tokenizer_files(tokenizer, Path(args.out) / "tokenizer")
    print(json.dumps({**counts, "vocab_size": tokenizer.get_vocab_size()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
