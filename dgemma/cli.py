"""`dgemma` command line: parse flags, build configs, call the library. No model or sampling logic here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .argtypes import accept_rule, non_negative_int, port, positive_int


def _fmt_count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def _stored_quantization(metadata: dict) -> dict | None:
    """The `dgemma quantize` record in a checkpoint's metadata (scheme, group size, scale dtype), None for full
    precision."""
    from .quant.modules import read_metadata

    record = read_metadata(metadata)
    return None if record is None else {**record, "scale_dtype": str(record["scale_dtype"]).removeprefix("torch.")}


def cmd_inspect(args) -> int:
    from .config import ModelConfig, is_adapter
    from .model.checkpoint import list_tensors
    from .model.summary import census, describe, describe_adapter, stored_bytes

    path = Path(args.path)
    cfg = ModelConfig.from_file(path)  # a LoRA adapter: its base model's (checked to exist and fit)
    adapter = describe_adapter(path) if is_adapter(path) else None
    weights = Path(adapter["model"]) if adapter else path  # the merged model's weights are its base model's
    counts = census(cfg)
    stored = quant = None
    if weights.is_dir():  # the headers once: bytes per dtype and the quantization record
        infos, metadata = list_tensors(weights)
        stored, quant = stored_bytes(infos), _stored_quantization(metadata)
    if args.json:
        print(json.dumps({"config": str(path), "total_parameters": counts["total"],
                          "quantization": quant,
                          "active_parameters_per_token": counts["active_per_token"],
                          "by_component": counts["by_component"],
                          "layer_scalar_buffers": counts["layer_scalar_buffers"], "stored_bytes_by_dtype": stored,
                          **({"adapter": adapter} if adapter else {})}))
        return 0
    if adapter:
        print(f"LoRA adapter: {path} (loads as its base model with the adapter merged in)")
        chain = "" if adapter["model"] == adapter["base_model"] else f" (itself an adapter, on {adapter['model']})"
        print(f"  base model        {adapter['base_model']}{chain}")
        print(f"  rank              {adapter['rank']} (alpha {adapter['alpha']:g}, update scale alpha/rank "
              f"{adapter['alpha'] / adapter['rank']:g}), dropout {adapter['dropout']:g}")
        print(f"  targets           {', '.join(adapter['targets'])}")
        sizes = ", ".join(f"{dtype} {n / 2**20:.2f} MiB" for dtype, n in adapter["stored_bytes_by_dtype"].items())
        print(f"  adapter tensors   {_fmt_count(adapter['parameters'])} parameters, stored {sizes}")
        print(f"Merged model (the base model's shape and weights): {weights}")
    else:
        print(f"DiffusionGemma text model: {path}")
    for line in describe(cfg):
        print("  " + line)
    print(f"  parameters        {_fmt_count(counts['total'])} total, "
          f"{_fmt_count(counts['active_per_token'])} active per token")
    for name, n in sorted(counts["by_component"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:<22}{n:>16,}")
    print(f"  buffers           {counts['layer_scalar_buffers']:,} layer scalars (decoder and encoder; not parameters)")
    if quant is not None:
        group = f", group {quant['group_size']}" if quant["group_size"] else ""
        print(f"  quantized         {quant['scheme']}{group}, scales in {quant['scale_dtype']} (dgemma quantize; the "
              "routers, norms and embedding stay in float)")
    if stored is not None:
        for dtype, nbytes in sorted(stored.items()):
            print(f"  stored {dtype:<10} {nbytes / 2**30:10.3f} GiB")
    else:
        for label, size in (("bf16", 2), ("fp32", 4)):
            print(f"  weights in {label:<6} {counts['total'] * size / 2**30:10.3f} GiB")
    return 0


def _accept_rule(text: str):
    """--accept entropy:0.1 | confidence:0.9 | quota:8 | linear-quota (linear-quota takes the call's step count)"""
    try:
        return accept_rule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load_engine(args):
    from .bundled import default_model_path
    from .engine.engine import load

    path = Path(args.model) if args.model else default_model_path()
    return load(path, dtype=args.dtype, device=args.device, quiet=True, preset=args.preset,
                int8_dynamic=args.int8_dynamic, compile=args.compile, prefill_chunk=args.prefill_chunk)


def _engine_options(args) -> dict:
    options = {"max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop or None,
               "sampling": args.sampling}
    if args.steps is not None:
        options["max_denoising_steps"] = args.steps
    for name in ("entropy_bound", "t_min", "t_max"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.accept is not None:  # "linear-quota" is resolved with the call's step count (engine step_config)
        options["accept"] = args.accept
    return options


def _warn_thinking_off(args) -> None:
    """--show-thinking without --think: the chat template closes the thought channel, so nothing would show."""
    if args.show_thinking and not args.think:
        warnings.warn("--show-thinking shows the model's thinking, which the chat template switches off without "
                      "--think; add --think", stacklevel=2)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _run_stream(events, args, tokenizer, out=None) -> "object":
    """Print Text events as they arrive (or hand them to the live draft view) to `out` (default: sys.stdout as it is
    at the call, so a redirected stdout is honoured); return the Done event."""
    from .engine.stream import Done, Draft, Text

    out = sys.stdout if out is None else out
    view = None
    if args.show_drafts and not args.json:
        from .view import DraftView
        view = DraftView(tokenizer)
    done = None
    try:
        for event in events:
            if isinstance(event, Draft):
                if view is not None:
                    view.update(event)
            elif isinstance(event, Text):
                if event.kind != "answer" and not args.show_thinking:
                    continue  # thinking is shown only with --show-thinking, in the live view too
                if view is not None:
                    view.commit(event)
                elif not args.json:  # thinking dimmed on a terminal; piped, the text alone
                    dim = event.kind != "answer" and _isatty(out)
                    out.write(f"\x1b[2m{event.text}\x1b[0m" if dim else event.text)
                    out.flush()
            elif isinstance(event, Done):
                done = event
    finally:
        if view is not None:
            view.close()
    return done


def cmd_generate(args) -> int:
    if args.prompt is None and sys.stdin.isatty():  # not piped: say why the command waits
        print("dgemma generate: no PROMPT given; type it, then Ctrl-D (or pass it as an argument)", file=sys.stderr)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass PROMPT or pipe text on stdin")
    if args.raw and args.think:
        raise ValueError("--think switches thinking on in the chat template, which --raw leaves out; drop one")
    output = "--json-schema" if args.json_schema else "--json-object" if args.json_object else None
    for flag, given, why in (("--think", args.think, "the JSON document starts at the first token: no room for "
                              "thinking"), ("--show-thinking", args.show_thinking, "there is no thinking to show"),
                             ("--show-drafts", args.show_drafts, "stdout holds the JSON document alone")):
        if given and output:
            raise ValueError(f"{flag} cannot be combined with {output} ({why}); drop one")
    if args.show_drafts and args.json:
        raise ValueError("--show-drafts draws on stdout, which --json keeps for the JSON object; drop one")
    if not args.raw:
        _warn_thinking_off(args)
    from .canvas_cli import json_format, run_json

    fmt = json_format(args)
    engine = _load_engine(args)
    options = _engine_options(args)
    if fmt is not None:  # only the JSON document is printed
        return run_json(args, engine, prompt, options, fmt)
    if args.raw:
        events = engine.stream(prompt, drafts=args.show_drafts, **options)
    else:
        events = engine.stream(messages=[{"role": "user", "content": prompt}], enable_thinking=args.think,
                               drafts=args.show_drafts, **options)
    done = _run_stream(events, args, engine.tokenizer)
    if args.json:
        print(json.dumps({"text": done.output.answer, "thinking": done.output.thinking,
                          "tool_calls": done.output.tool_calls, "finish_reason": done.finish_reason,
                          "usage": done.usage(), "stats": done.stats()}))
    else:
        print()
        if args.stats:
            print(done.summary(), file=sys.stderr)
    return 0


CHAT_COMMANDS = ("type a message, then Enter (a line ending in \\ goes on to the next line); /reset (or /clear) "
                 "starts a new conversation, /help shows this, /exit (or Ctrl-D) ends; Ctrl-C stops an answer")
CHAT_EXIT, CHAT_RESET, CHAT_HELP = ("/exit", "/quit"), ("/reset", "/clear"), ("/help",)


def _read_message(stdin, interactive: bool) -> str | None:
    """One chat message from stdin: a line, or several while each ends in a backslash (dropped, the line break
    kept); None at the end of the input."""
    lines: list[str] = []
    while True:
        if interactive:
            print("> " if not lines else "  ", end="", flush=True)
        line = stdin.readline()
        if not line:  # Ctrl-D or the end of piped input: a message left open is still sent
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def cmd_chat(args) -> int:
    import re

    from .config import ConfigError
    from .engine.chat import ChatSession

    _warn_thinking_off(args)
    engine = _load_engine(args)
    session = ChatSession(engine, system=args.system, enable_thinking=args.think)
    options = _engine_options(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"dgemma chat: {CHAT_COMMANDS}", file=sys.stderr)
    refused = False  # a turn the model could not take (e.g. past its context): reported, the chat goes on
    while True:
        message = _read_message(sys.stdin, interactive)
        command = None if message is None else message.strip()
        if message is None or command in CHAT_EXIT:
            return 2 if refused else 0
        if not command:
            continue
        if command in CHAT_RESET:
            session.reset()
            print("dgemma chat: new conversation (history and cache cleared)", file=sys.stderr)
            continue
        if command in CHAT_HELP:
            print(f"dgemma chat: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        if re.match(r"/[A-Za-z]+(\s|$)", message):  # a command mistyped: never sent to the model as a message
            word = message.split()[0]
            wrong = f"{word} takes nothing after it" if word in CHAT_EXIT + CHAT_RESET + CHAT_HELP \
                else f"{word!r} is not a command here"
            print(f"dgemma chat: error: {wrong} (the commands: {', '.join(CHAT_RESET + CHAT_HELP + CHAT_EXIT)}, "
                  "each alone on its line); to send a message that starts with '/', begin it with a space",
                  file=sys.stderr)
            refused = True
            continue
        turn = session.send(message, drafts=args.show_drafts, **options)
        try:
            done = _run_stream(turn, args, engine.tokenizer)
        except ConfigError:  # bad settings fail every turn alike: end the command
            raise
        except ValueError as e:  # raised before the turn changed the session (a full conversation says /reset)
            print(f"dgemma chat: error: {e}", file=sys.stderr)
            refused = True
            continue
        except KeyboardInterrupt:  # Ctrl-C mid-answer: on a terminal the chat goes on without that turn
            if not interactive:  # piped input would go on unattended: stop as generate does
                raise
            turn.close()
            print(file=sys.stdout, flush=True)
            kept = f"keeps the {len(session.ids)} tokens of the turns before" if session.ids else "is still empty"
            print(f"dgemma chat: answer stopped; this turn is left out of the history, which {kept} (/exit or "
                  "Ctrl-D ends the chat)", file=sys.stderr)
            continue
        print()
        if args.stats:
            print(done.summary(f"reused {session.reused_tokens} cached prompt tokens"), file=sys.stderr)


def cmd_serve(args) -> int:
    import ipaddress
    import os

    from .serve import run

    api_key = args.api_key or os.environ.get("DGEMMA_API_KEY") or None
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and not api_key:
        print(f"dgemma serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    engine = _load_engine(args)
    engine.require_tokenizer()
    name = args.served_model_name or Path(engine.directory).name
    print(f"dgemma serve: model {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max concurrency {args.max_concurrency}, queue {args.max_queue}, {args.scheduling} scheduling)",
          file=sys.stderr)
    run(engine, host=args.host, port=args.port, model_name=name, api_key=api_key,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, default_max_tokens=args.default_max_tokens,
        scheduling=args.scheduling)
    return 0


def _add_model_flags(p) -> None:
    p.add_argument("--model", help="model directory (Hugging Face layout) or a LoRA adapter directory that "
                                    "`dgemma train --mode lora` wrote; default: the bundled model")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: as stored; if mixed, the one holding most bytes)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help="prefill a long prompt in pieces of N tokens: the memory of one piece instead of the whole "
                        "prompt (`dgemma plan --prefill-chunk N` shows it), not the same bits as one pass "
                        "(default: one pass, as the reference)")
    from .engine.presets import add_speed_flags
    add_speed_flags(p)


def _add_sampling_flags(p) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="exact cap on new tokens (default: the model's generation_config)")
    p.add_argument("--steps", type=positive_int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible output")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--entropy-bound", type=float, default=None,
                   help="EntropyBound budget in nats (default: the preset's, else the model's generation_config)")
    p.add_argument("--t-min", type=float, default=None, help="final temperature of the schedule")
    p.add_argument("--t-max", type=float, default=None, help="first temperature of the schedule")
    p.add_argument("--accept", type=_accept_rule, default=None,
                   help="acceptance rule: entropy:B (default), confidence:T, quota:K or linear-quota (the steps: "
                        "--steps); it replaces the rule --entropy-bound sets, so not both")
    p.add_argument("--sampling", choices=["fast", "reference"], default="fast",
                   help="fast: one random number per position (default); reference: the reference's random "
                        "stream, token for token")
    p.add_argument("--think", action="store_true", help="enable thinking mode in the chat template")
    p.add_argument("--show-thinking", action="store_true", help="print thinking text (dimmed)")
    p.add_argument("--show-drafts", action="store_true",
                   help="show each canvas converging live (on a terminal; piped or redirected, the plain text)")
    p.add_argument("--stats", action="store_true", help="print speed and step statistics to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma: load, inspect and generate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="architecture summary and parameter counts, without loading weights")
    p.add_argument("path", help="model directory, LoRA adapter directory or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text for one prompt, streamed as canvases commit")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin if omitted)")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    output = p.add_mutually_exclusive_group()  # each decides what stdout is: one of them at most
    output.add_argument("--json", action="store_true", help="print one JSON object with text, usage and stats")
    output.add_argument("--json-schema", metavar="FILE", default=None,
                        help="answer with one JSON document valid for the JSON schema in FILE (printed alone)")
    output.add_argument("--json-object", action="store_true", help="answer with one JSON object (printed alone)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat on stdin; reuses the cached prefix across turns",
                       description=f"Multi-turn chat on stdin: {CHAT_COMMANDS}.")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat, json=False)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, streaming)")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every path but / and /health (or set DGEMMA_API_KEY)")
    p.add_argument("--max-concurrency", type=positive_int, default=8, help="requests generating at once (default 8)")
    p.add_argument("--max-queue", type=non_negative_int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--default-max-tokens", type=positive_int, default=None,
                   help="max_tokens when a request gives none (default: the model's generation_config)")
    p.add_argument("--scheduling", choices=("batched", "serial"), default="batched",
                   help="batched (default): running requests share decoder forwards; serial: they take turns "
                        "(the slow reference)")
    p.set_defaults(func=cmd_serve)

    from .canvas_cli import add_canvas_parsers
    from .sudoku.commands import add_sudoku_parser
    from .train.commands import add_train_parser
    add_canvas_parsers(sub, _add_model_flags, _load_engine)
    add_sudoku_parser(sub)
    add_train_parser(sub)
    from .plan import add_plan_parser
    from .quant.commands import add_quantize_parser
    add_quantize_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .model.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # one line, like the errors: Python's default adds the file, the category and a line of source code
        print(f"dgemma {args.command}: warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():  # restores the default display when main returns (tests call main)
        warnings.showwarning = show_warning
        try:
            return args.func(args)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
            print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout closed early (`dgemma plan ... | head`): stop quietly, as cat does
            try:  # and keep Python's exit-time flush of stdout from failing again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # no real file behind sys.stdout: nothing left to flush
                pass
            return 141  # the shell's status for SIGPIPE
        except OSError as e:  # a file the command cannot read or write (permissions, a directory, a full disk)
            print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
