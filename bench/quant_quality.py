"""Quality of int8 / int4 / fp8 weights against full precision on the bundled trained models (issue 7, item 4).

    python bench/quant_quality.py                       # default model; Sudoku too when dgemma/models/sudoku exists
    python bench/quant_quality.py --examples 64 --prompts 24 --puzzles 100 --threads 2

For each scheme the full-precision checkpoint is converted with `dgemma quantize` (group 64 for int4, or
--group-size) into a temporary directory and loaded with `dgemma.load`, so the measured path is the shipped one.

* logits: held-out chat examples (functions of Python stdlib modules the default model never saw: the trainer's
  held-out split, `dgemma.train.corpus.is_heldout`), and for the Sudoku model generated puzzles (seed 12345)
  with their solutions. Prompt -> encoder; the answer's first canvas, corrupted by
  uniform replacement at t in {0.3, 0.7} (fixed seed, the same canvas for every model), -> decoder logits.
  top-1 agreement = share of canvas positions where argmax equals full precision's; KL = mean over positions
  of KL(p_full || p_quant) in nats, both softmaxes in fp32.
* steps: `generate` with the checkpoint's own adaptive settings (EntropyBound, stability / confidence stop) on
  held-out prompts, the same seed per prompt for every model: mean denoising steps per committed canvas.
* Sudoku (if the model exists): `dgemma.sudoku.evaluate` on generated puzzles (fixed seed): solved_rate and
  mean steps per canvas.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dgemma  # noqa: E402
from dgemma.argtypes import positive_int  # noqa: E402
from dgemma.quant.convert import quantize_checkpoint  # noqa: E402
from dgemma.quant.schemes import SCHEMES, QuantError  # noqa: E402
from dgemma.sudoku.commands import BUNDLED as SUDOKU  # noqa: E402
from dgemma.train.corpus import examples, is_heldout, stdlib_modules  # noqa: E402

DEFAULT = ROOT / "dgemma" / "models" / "default"


def heldout_chats(count: int, seed: int = 0) -> list[list[dict]]:
    rng, out = random.Random(seed), []
    for module, source in stdlib_modules():
        if is_heldout(module):
            out += [ex["messages"] for ex in examples(module, source, rng, 1200) if "messages" in ex]
    random.Random(seed).shuffle(out)
    return out[:count]


def chat_pairs(engine, chats) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of held-out chats: the user turn with the generation prompt, the model's answer."""
    tok = engine.tokenizer
    return [(tok.encode_chat(m[:1], add_generation_prompt=True), tok.encode(m[1]["content"], add_bos=False))
            for m in chats]


def sudoku_puzzles(count: int) -> list:
    """(puzzle, solution) pairs, 30-36 givens, seed 12345 (never a training seed); a prefix of a longer list is the
    shorter list, so one generation serves the logit comparison and the solved rate."""
    from dgemma.sudoku.puzzles import iter_puzzles
    return list(iter_puzzles(count, seed=12345))


def sudoku_pairs(engine, puzzles) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of (puzzle, solution) pairs."""
    from dgemma.sudoku.format import answer_text, prompt_ids
    tok = engine.tokenizer
    return [(prompt_ids(tok, puzzle), tok.encode(answer_text(solution), add_bos=False)) for puzzle, solution in puzzles]


@torch.inference_mode()
def canvas_logits(engine, pairs, levels=(0.3, 0.7), seed=0):
    """Decoder logits [n, L, V] on corrupted answer canvases (the same canvases for every engine): the answer's
    first canvas, padded with <eos>, each position replaced by a uniform id with probability t."""
    L, V = engine.config.canvas_length, engine.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in pairs:
        answer = answer[:L] + [engine.config.eos_token_id[0]] * max(0, L - len(answer))
        for t in levels:
            canvas = torch.tensor([answer])
            noise = torch.rand(1, L, generator=g) < t
            canvas = torch.where(noise, torch.randint(0, V, (1, L), generator=g), canvas)
            cache = engine.new_cache(1)
            engine.encode(torch.tensor([prompt]), cache)
            out.append(engine.denoise(canvas, cache)[0].float())
    return torch.stack(out)


def compare(full: torch.Tensor, quant: torch.Tensor) -> dict:
    logp, logq = full.log_softmax(-1), quant.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"top1_agreement": round(float((full.argmax(-1) == quant.argmax(-1)).float().mean()), 4),
            "kl_mean": round(float(kl.mean()), 5), "kl_p99": round(float(kl.flatten().quantile(0.99)), 4)}


def mean_steps(engine, chats, max_new_tokens: int) -> float:
    steps = []
    for i, messages in enumerate(chats):
        ids = torch.tensor([engine.tokenizer.encode_chat(messages[:1], add_generation_prompt=True)])
        out = engine.generate(ids, max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(i),
                              sampling="fast", return_dict=True)
        steps += [int(s[0]) for s in out.steps_per_canvas]
    return sum(steps) / len(steps)


def sudoku_scores(engine, puzzles) -> dict:
    from dgemma.sudoku.evaluate import evaluate
    result = evaluate(engine, puzzles, seed=0)
    accuracy = result["cell_accuracy"]  # None: no blank cell to fill
    return {"solved_rate": result["solved_rate"], "cell_accuracy": accuracy and round(accuracy, 4),
            "mean_steps_per_canvas": round(result["mean_steps_per_canvas"], 3)}


def convert(src: Path, dst: Path, scheme: str, group_size: int) -> int | None:
    """`dgemma quantize` into dst; int4 takes the largest group size <= group_size (halving) that divides every
    input width of the model (the Sudoku model's expert width 96 takes 32). Returns the group size used."""
    if scheme != "int4":
        quantize_checkpoint(src, dst, scheme, None, log=None)
        return None
    while True:
        try:
            quantize_checkpoint(src, dst, scheme, group_size, log=None)
            return group_size
        except QuantError as e:
            if "not a multiple of the int4 group size" not in str(e) or group_size <= 16:
                raise
            group_size //= 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT), help="full-precision text model (default: the bundled one)")
    p.add_argument("--sudoku-model", default=str(SUDOKU), help="Sudoku model; skipped when it does not exist")
    p.add_argument("--examples", type=positive_int, default=48,
                   help="held-out examples (and puzzles) for the logit comparison")
    p.add_argument("--prompts", type=positive_int, default=16, help="held-out prompts for steps per canvas")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--puzzles", type=positive_int, default=100)
    p.add_argument("--group-size", type=positive_int, default=64,
                   help="int4 group size (halved until it divides the widths)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {', '.join(SCHEMES)} "
                   "(fp8 runs dequantized on a CPU: its quality, not its GPU speed)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.schemes.split(",")) - set(SCHEMES))
    if unknown:
        p.error(f"--schemes: unknown {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    chats = heldout_chats(max(args.examples, args.prompts))
    rows, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in (("text", Path(args.model)), ("sudoku", Path(args.sudoku_model))):
            if not (path / "config.json").exists():
                print(f"{label}: {path} does not exist; skipped", file=sys.stderr)
                continue
            engines = {"full": dgemma.load(path, quiet=True)}
            groups = {}
            for scheme in args.schemes.split(","):
                dst = Path(tmp) / f"{label}-{scheme}"
                groups[scheme] = convert(path, dst, scheme, args.group_size)
                engines[scheme] = dgemma.load(dst, quiet=True)
            full = engines["full"]
            if label == "text":
                pairs = chat_pairs(full, chats[:args.examples])
            else:
                puzzles = sudoku_puzzles(max(args.examples, args.puzzles))
                pairs = sudoku_pairs(full, puzzles[:args.examples])
            ref = canvas_logits(full, pairs)
            for name, eng in engines.items():
                row = compare(ref, canvas_logits(eng, pairs))
                if label == "text":
                    row["mean_steps_per_canvas"] = round(mean_steps(eng, chats[:args.prompts], args.max_new_tokens), 3)
                else:
                    row.update(sudoku_scores(eng, puzzles[:args.puzzles]))
                rows[f"{label}/{name}"] = row
            for name in groups:
                rows[f"{label}/{name}"]["group_size"] = groups[name]
    print(f"{'model/weights':<16}{'top-1 agree':>12}{'KL mean':>10}{'KL p99':>9}{'steps/canvas':>14}{'solved':>8}")
    for name, r in rows.items():
        print(f"{name:<16}{r.get('top1_agreement', ''):>12}{r.get('kl_mean', ''):>10}{r.get('kl_p99', ''):>9}"
              f"{r['mean_steps_per_canvas']:>14}{r.get('solved_rate', ''):>8}")
    print(json.dumps({"bench": "quant_quality", "examples": args.examples, "prompts": args.prompts,
                      "puzzles": args.puzzles, "group_size": args.group_size, "threads": torch.get_num_threads(),
                      "seconds": round(time.perf_counter() - start, 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
