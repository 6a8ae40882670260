"""`dgemma infill`, `dgemma edit` and `dgemma generate --json-schema`: flags -> the constrained-canvas library calls.

cli.py passes in its model-loading helpers, so the commands share --model/--device/--dtype with the others.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .argtypes import positive_int


def _read(path: str, what: str) -> str:
    """The file's text with its line endings as they are (\r\n stays \r\n: the output keeps its bytes)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}: "
                         f"{e.reason}); give a text file, or convert it first, e.g. iconv -f LATIN1 -t UTF-8") from None
    except OSError as e:
        raise ValueError(f"could not read {what} {path}: {e}") from None


def write_in_place(path: str, text: str) -> None:
    """Replace the file's content with `text` (UTF-8, line endings as they are) so that a failure (a full disk, a
    size limit, Ctrl-C) never leaves it half written: the text goes to a new file beside it, with its permissions,
    and only a complete one is renamed over it (through a symlink, onto the file the link names)."""
    target = os.path.realpath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path} in place: no new file can be made beside it in "
                               f"{os.path.dirname(target)} ({e.strerror}); drop --in-place and redirect stdout"
                      ) from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _lines(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--lines takes N or N-M (1-based, inclusive), got {text!r}") from None
    return a, b


def json_format(args) -> dict | None:
    """`--json-schema FILE | --json-object` -> the response_format, the schema checked (before any model loads, so a
    bad schema fails in a second, not after loading the weights); None without either flag."""
    if args.json_schema is None:
        return {"type": "json_object"} if args.json_object else None
    from .engine.structured import check_response_format

    text = _read(args.json_schema, "JSON schema file")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"JSON schema file {args.json_schema} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"JSON schema file {args.json_schema} must hold a JSON object (a schema), got "
                         f"{type(schema).__name__}")
    fmt = {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}
    check_response_format(fmt)
    return fmt


def run_json(args, engine, prompt: str, options: dict, fmt: dict) -> int:
    """`dgemma generate --json-schema FILE | --json-object`: print the compact document, stats to stderr."""
    where = {"prompt": prompt} if args.raw else {"messages": [{"role": "user", "content": prompt}]}
    r = engine.generate_json(**where, response_format=fmt, **options)
    print(r.text)
    if args.stats:
        print(r.done.summary(), file=sys.stderr)
    return 0


def _options(args) -> dict:
    options = {"seed": args.seed, "sampling": args.sampling, "num_candidates": args.candidates}
    if args.steps is not None:
        options["max_denoising_steps"] = args.steps
    for name in ("entropy_bound", "t_min", "t_max", "instruction"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def cmd_infill(args, load_engine) -> int:
    prefix, suffix = _read(args.prefix_file, "prefix file"), _read(args.suffix_file, "suffix file")
    engine = load_engine(args)
    options = _options(args)
    if args.middle_tokens is not None:
        options["middle_tokens"] = args.middle_tokens
    if args.max_middle_tokens is not None:
        options["max_middle_tokens"] = args.max_middle_tokens
    r = engine.infill(prefix, suffix, **options)
    if args.json:
        out = {"middle": r.middle, "middle_tokens": r.middle_tokens, "candidates": r.candidates,
               "steps_per_canvas": r.steps_per_canvas, "wall_s": round(r.wall_s, 4)}
        print(json.dumps({**out, "text": r.text} if args.full else out))
    else:
        sys.stdout.write(r.text if args.full else r.middle)
    return 0


def cmd_edit(args, load_engine) -> int:
    from .engine.edit import line_span

    text = _read(args.file, "file")
    start, end = line_span(text, *_lines(args.lines))
    engine = load_engine(args)
    options = _options(args)
    options["strength"] = args.strength
    if args.span_tokens is not None:
        options["span_tokens"] = args.span_tokens
    r = engine.edit(text, start, end, **options)
    if args.in_place:
        write_in_place(args.file, r.text)
    if args.json:
        print(json.dumps({"old": r.old_span, "new": r.new_span, "start": r.start, "end": r.end,
                          "span_tokens": r.infill.middle_tokens, "candidates": r.infill.candidates}))
    elif not args.in_place:
        sys.stdout.write(r.text)
    return 0


def _add_flags(p, add_model_flags) -> None:
    add_model_flags(p)
    p.add_argument("--instruction", default=None, help="what to do (a chat turn before the text; for chat models)")
    p.add_argument("--steps", type=positive_int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible output")
    p.add_argument("--candidates", type=positive_int, default=4,
                   help="candidate lengths denoised together as batch rows (default 4); the junction score picks")
    p.add_argument("--entropy-bound", type=float, default=None,
                   help="EntropyBound budget in nats (default: the preset's, else the model's generation_config)")
    p.add_argument("--t-min", type=float, default=None, help="final temperature of the schedule")
    p.add_argument("--t-max", type=float, default=None, help="first temperature of the schedule")
    p.add_argument("--sampling", choices=["fast", "reference"], default="fast", help="proposal sampler")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result and the candidates")


def add_canvas_parsers(sub, add_model_flags, load_engine) -> None:
    p = sub.add_parser("infill", help="write the middle between a prefix file and a suffix file")
    p.add_argument("--prefix-file", required=True, help="text before the gap (UTF-8)")
    p.add_argument("--suffix-file", required=True,
                   help="text after the gap (UTF-8); an empty file continues the prefix up to --max-middle-tokens")
    length = p.add_mutually_exclusive_group()  # an exact length leaves nothing for a longest length to bound
    length.add_argument("--middle-tokens", type=positive_int, default=None, help="exact middle length in tokens")
    length.add_argument("--max-middle-tokens", type=positive_int, default=None,
                        help="longest candidate length (default: what fits in one canvas beside the suffix)")
    p.add_argument("--full", action="store_true", help="print prefix + middle + suffix (default: the middle only); "
                                                          "with --json: a 'text' field beside 'middle'")
    _add_flags(p, add_model_flags)
    p.set_defaults(func=lambda args: cmd_infill(args, load_engine))

    p = sub.add_parser("edit", help="rewrite some lines of a file in place; everything else stays byte-identical")
    p.add_argument("file", help="the text file to edit (UTF-8)")
    p.add_argument("--lines", required=True, help="N or N-M: the lines to rewrite (1-based, inclusive)")
    p.add_argument("--strength", type=float, default=0.5,
                   help="fraction of the old span's tokens renoised at the start (1.0 = write afresh; default 0.5)")
    p.add_argument("--span-tokens", type=positive_int, default=None, help="exact new span length in tokens")
    p.add_argument("--in-place", action="store_true",
                   help="write the result back to FILE instead of stdout (a new file renamed over it: never half "
                        "written)")
    _add_flags(p, add_model_flags)
    p.set_defaults(func=lambda args: cmd_edit(args, load_engine))
