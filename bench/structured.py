"""Held-out evaluation of constrained canvases on the bundled default model (issue 8, item 5).

    python bench/structured.py [--json-only | --infill-only] [--infill-count 40] [--threads 1]

JSON: 32 schemas of varied shape, each with a prompt, generated with response_format (schema-valid rate by
`jsonschema`, wall time) next to unconstrained generation of the same prompt with the same token budget (how often
THAT parses and validates, wall time). Infill: bodies of functions from held-out standard-library modules (split by
the corpus builder's module hash, so the model never trained on them): one to three body lines are removed, the
model infills them between prefix and suffix; rate of results that parse (`ast`) and exact matches, next to the
same model's plain left-to-right completion of the prefix (cut to the true number of lines, which gives the
baseline the length for free). Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dgemma  # noqa: E402
from dgemma.argtypes import positive_int  # noqa: E402
from dgemma.bundled import PACKAGED  # noqa: E402
from dgemma.train.corpus import functions, is_heldout, stdlib_modules  # noqa: E402

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required=None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


SCHEMAS = [
    ("A person with a name and an age.", obj({"name": S, "age": {**I, "minimum": 0, "maximum": 150}})),
    ("A book: title, author, year.", obj({"title": S, "author": S, "year": I})),
    ("Is 17 prime?", obj({"answer": B})),
    ("Pick a colour.", {"enum": ["red", "green", "blue"]}),
    ("A list of three tags.", {"type": "array", "items": S, "minItems": 3, "maxItems": 3}),
    ("Some numbers.", {"type": "array", "items": N}),
    ("A point in 3D.", obj({"x": N, "y": N, "z": N})),
    ("A function signature.", obj({"name": S, "args": {"type": "array", "items": S}, "returns": S})),
    ("A city and its population.", obj({"city": S, "population": {**I, "minimum": 0}})),
    ("A nullable middle name.", obj({"first": S, "middle": {"type": ["string", "null"]}, "last": S})),
    ("An HTTP response.", obj({"status": {"enum": [200, 404, 500]}, "body": S, "headers": {
        "type": "object", "additionalProperties": S}})),
    ("A config file.", obj({"debug": B, "level": {"enum": ["info", "warn", "error"]}, "retries": {
        **I, "minimum": 0, "maximum": 10}, "timeout": {**N, "exclusiveMinimum": 0}})),
    ("A short to-do list.", {"type": "array", "items": obj({"task": S, "done": B}), "maxItems": 4}),
    ("A matrix of integers.", {"type": "array", "items": {"type": "array", "items": I, "minItems": 2, "maxItems": 2},
                               "minItems": 2, "maxItems": 2}),
    ("A product with a price.", obj({"sku": {**S, "maxLength": 8}, "price": {**N, "minimum": 0}, "currency": {
        "const": "EUR"}})),
    ("Any JSON object.", {"type": "object"}),
    ("A tree node with children.", obj({"value": I, "children": {"type": "array", "items": obj({"value": I})}})),
    ("A date split in fields.", obj({"year": {**I, "minimum": 1900, "maximum": 2100}, "month": {
        **I, "minimum": 1, "maximum": 12}, "day": {**I, "minimum": 1, "maximum": 31}})),
    ("A yes or no.", B),
    ("A number between 0 and 1.", {**N, "minimum": 0, "maximum": 1}),
    ("An error report.", obj({"error": {"anyOf": [S, {"type": "null"}]}, "code": I})),
    ("A user with optional email.", obj({"id": I, "email": S, "admin": B}, required=["id"])),
    ("A Python module summary.", obj({"module": S, "functions": {"type": "array", "items": S, "maxItems": 5},
                                      "lines": I})),
    ("A pair of words.", {"type": "array", "items": {**S, "maxLength": 10}, "minItems": 2, "maxItems": 2}),
    ("A game score board.", {"type": "object", "additionalProperties": I}),
    ("An address.", obj({"street": S, "number": I, "zip": {**S, "minLength": 4, "maxLength": 6}, "country": S})),
    ("A test result.", obj({"name": S, "passed": B, "duration_s": N, "output": {"type": ["string", "null"]}})),
    ("A shape.", obj({"kind": {"enum": ["circle", "square"]}, "size": {**N, "exclusiveMinimum": 0,
                                                                      "maximum": 100}})),
    ("A nested settings object.", obj({"ui": obj({"theme": {"enum": ["dark", "light"]}, "font": I}),
                                       "net": obj({"proxy": {"type": ["string", "null"]}, "port": I})})),
    ("A list of people.", {"type": "array", "items": {"$ref": "#/$defs/P"}, "minItems": 1, "maxItems": 3,
                           "$defs": {"P": obj({"name": S, "age": I})}}),
    ("A version.", obj({"major": I, "minor": I, "patch": I, "pre": {"type": ["string", "null"]}})),
    ("A weather report.", obj({"city": S, "temp_c": {**N, "minimum": -90, "maximum": 60}, "rain": B,
                               "wind": {"enum": ["calm", "breeze", "storm", None]}})),
]


def validates(value, schema) -> bool:
    import jsonschema
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def run_json(engine, seed: int) -> dict:
    rows = []
    for i, (prompt, schema) in enumerate(SCHEMAS):
        t = time.perf_counter()
        r = engine.generate_json(prompt, schema=schema, seed=seed + i)
        constrained_s = time.perf_counter() - t
        t = time.perf_counter()
        done = engine.complete(messages=[{"role": "user", "content": prompt + " Answer with JSON only."}],
                               max_tokens=r.done.completion_tokens, seed=seed + i)
        plain_s = time.perf_counter() - t
        try:
            plain_value, parses = json.loads(done.output.answer), True
        except json.JSONDecodeError:
            plain_value, parses = None, False
        rows.append({"valid": validates(r.value, schema), "constrained_s": constrained_s, "plain_s": plain_s,
                     "tokens": r.done.completion_tokens, "canvases": r.done.canvases,
                     "plain_parses": parses, "plain_valid": parses and validates(plain_value, schema)})
        print(f"json {i:2d} valid={rows[-1]['valid']} {r.done.completion_tokens:3d} tok {r.done.canvases} canvases "
              f"{constrained_s:.2f}s (plain {plain_s:.2f}s, parses={parses})  {r.text[:90]}", flush=True)
    n = len(rows)
    return {"schemas": n, "schema_valid_rate": sum(r["valid"] for r in rows) / n,
            "plain_parse_rate": sum(r["plain_parses"] for r in rows) / n,
            "plain_valid_rate": sum(r["plain_valid"] for r in rows) / n,
            "constrained_s_mean": sum(r["constrained_s"] for r in rows) / n,
            "plain_s_mean": sum(r["plain_s"] for r in rows) / n,
            "tokens_mean": sum(r["tokens"] for r in rows) / n,
            "max_canvases": max(r["canvases"] for r in rows)}


def heldout_cases(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) from functions of held-out modules: 1-3 body lines after the docstring removed."""
    rng, cases = random.Random(seed), []
    for module, source in stdlib_modules():
        if not is_heldout(module):
            continue
        for name, _, text, doc in functions(source):
            tree = ast.parse(text).body[0]
            body = tree.body[1:]  # after the docstring
            if len(body) < 3 or len(text) > 1200:
                continue
            lines = text.splitlines(keepends=True)
            first = body[1].lineno - 1
            last = min(first + rng.randint(1, 3), body[-1].lineno - 1)
            prefix, middle, suffix = "".join(lines[:first]), "".join(lines[first:last]), "".join(lines[last:])
            if middle.strip() and len(middle) < 160:
                cases.append((prefix, middle.rstrip("\n"), "\n" + suffix if not suffix.startswith("\n") else suffix))
    rng.shuffle(cases)
    return cases[:count]


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def run_infill(engine, count: int, seed: int) -> dict:
    cases = heldout_cases(count, seed)
    stats = {"valid": 0, "exact": 0, "plain_valid": 0, "plain_exact": 0, "infill_s": 0.0, "plain_s": 0.0}
    for i, (prefix, middle, suffix) in enumerate(cases):
        t = time.perf_counter()
        r = engine.infill(prefix, suffix, seed=seed + i)
        stats["infill_s"] += time.perf_counter() - t
        t = time.perf_counter()
        done = engine.complete(prefix, max_tokens=engine.config.canvas_length, seed=seed + i)
        stats["plain_s"] += time.perf_counter() - t
        n_lines = middle.count("\n") + 1
        plain = "\n".join(done.output.answer.split("\n")[:n_lines])
        stats["valid"] += parses(r.text)
        stats["exact"] += r.middle.strip() == middle.strip()
        stats["plain_valid"] += parses(prefix + plain + suffix)
        stats["plain_exact"] += plain.strip() == middle.strip()
        print(f"infill {i:2d} valid={parses(r.text)} len={r.middle_tokens:2d} | truth {middle.strip()[:50]!r} | "
              f"infill {r.middle.strip()[:50]!r} | plain {plain.strip()[:50]!r}", flush=True)
    n = max(1, len(cases))
    return {"functions": len(cases), "syntax_valid_rate": stats["valid"] / n, "exact_match_rate": stats["exact"] / n,
            "plain_syntax_valid_rate": stats["plain_valid"] / n, "plain_exact_match_rate": stats["plain_exact"] / n,
            "infill_s_mean": stats["infill_s"] / n, "plain_s_mean": stats["plain_s"] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--infill-only", action="store_true")
    ap.add_argument("--infill-count", type=positive_int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = dgemma.load(PACKAGED, quiet=True)
    out = {"model": "dgemma/models/default", "threads": args.threads, "python": sys.version.split()[0]}
    if not args.infill_only:
        out["json"] = run_json(engine, args.seed)
    if not args.json_only:
        out["infill"] = run_infill(engine, args.infill_count, args.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
