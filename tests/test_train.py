"""Training: data format and padding, the objective's geometry against the inference path, corruption statistics,
an overfit run, exact resume, checkpoints that dgemma and transformers 5.23 both load, LoRA and CLI wiring.

Everything runs on the tiny config (canvas 16, sliding window 8) with a tokenizer trained on the spot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from conftest import make_config, randomise

from dgemma.config import ConfigError, ModelConfig
from dgemma.engine.cache import KVCache
from dgemma.model import DiffusionGemma
from dgemma.model.decoder import denoise
from dgemma.model.encoder import encode
from dgemma.text import Tokenizer, save_tokenizer_files, train_tokenizer
from dgemma.train import (Batch, DataError, LossConfig, TrainConfig, collate, diffusion_loss, load_examples,
                          split_heldout, train)
from dgemma.train.data import DataWarning, Order, make_example, mix
from dgemma.train.loss import Noise, canvas_logits, sample_noise
from dgemma.train.plot import plot_losses

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
         "one two three four five six seven eight nine ten", "a canvas of tokens is denoised in parallel"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tokenizer directory, a tiny config.json and a small chat + raw data file."""
    root = tmp_path_factory.mktemp("train")
    save_tokenizer_files(train_tokenizer(TEXTS * 10, vocab_size=500), root / "tok")
    (root / "config.json").write_text(json.dumps(make_config()))
    with (root / "data.jsonl").open("w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": t}]}) + "\n")
            f.write(json.dumps({"prompt": f"{i}:", "completion": t, "raw": True}) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(work):
    return Tokenizer.from_dir(work / "tok")


def tiny_model(dtype=torch.float32, seed=0) -> DiffusionGemma:
    model = DiffusionGemma(ModelConfig.from_dict(make_config()))
    randomise(model, seed)  # weights at a scale where a wrong key or position changes the logits
    return model.to(dtype)


def base_config(work, out, **kw) -> TrainConfig:
    args = dict(data=(str(work / "data.jsonl"),), out=str(out), config=str(work / "config.json"),
                tokenizer=str(work / "tok"), steps=4, batch_size=4, lr=3e-3, progress=False)
    return TrainConfig(**{**args, **kw})


# --- data ----------------------------------------------------------------------------------------------------
def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_chat_raw_and_prompt_completion_examples(tmp_path, tok):
    L = 16
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello world"}]
    path = write_lines(tmp_path / "d.jsonl", [{"messages": chat}, {"prompt": "hi", "completion": "hello world"},
                                              {"prompt": "1 2", "completion": " 3 4", "raw": True}])
    ex = load_examples(path, tok, canvas_length=L)
    answer = tok.encode("hello world", add_bos=False)
    turn_end, eos = tok.special.turn_end, tok.special.eos
    assert ex[0].prompt == tuple(tok.encode_chat(chat[:-1], add_generation_prompt=True))
    assert ex[0].where == f"{path}:1" and ex[2].where == f"{path}:3"
    assert ex[0].response == tuple(answer + [turn_end] + [eos] * (L - len(answer) - 1))  # EOS-filled to one canvas
    assert ex[1].prompt == tuple(tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    assert ex[1].response == ex[0].response
    assert ex[2].prompt == tuple(tok.encode("1 2")) and ex[2].prompt[0] == tok.bos_id  # raw: no template
    assert ex[2].response[:len(tok.encode(" 3 4", add_bos=False)) + 1] == tuple(tok.encode(" 3 4", add_bos=False)
                                                                                + [eos])
    # the loader-wide raw default applies to records without the key
    path = write_lines(tmp_path / "r.jsonl", [{"prompt": "1 2", "completion": " 3 4"}])
    assert load_examples(path, tok, canvas_length=L, raw=True)[0] == dataclasses.replace(ex[2], where=f"{path}:1")
    # the answer may be OpenAI-style text parts, as the prompt's messages may (it was refused: "must be a string")
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    path = write_lines(tmp_path / "p.jsonl", [{"messages": chat[:-1] + [{"role": "assistant", "content": parts}]}])
    assert load_examples(path, tok, canvas_length=L)[0] == dataclasses.replace(ex[0], where=f"{path}:1")


@pytest.mark.parametrize("answer_len, canvases", [(0, 1), (14, 1), (15, 1), (16, 2), (40, 3)])
def test_responses_are_eos_filled_to_whole_canvases(answer_len, canvases):
    ex, fate = make_example([2, 5], list(range(200, 200 + answer_len)), 106, 1, 16, None, "truncate", "x:1")
    assert fate is None and len(ex.response) == 16 * canvases
    assert ex.response[answer_len] == 106 and set(ex.response[answer_len + 1:]) <= {1}


def test_too_long_examples_truncate_drop_or_raise(tmp_path, tok):
    prompt, answer = [2] * 10, list(range(200, 240))  # 10 + 3 canvases of 16 = 58 positions
    ex, fate = make_example(prompt, answer, 106, 1, 16, 45, "truncate", "f:7")
    assert fate == "truncated" and ex.response == tuple(answer[:32])  # the 2 whole canvases that fit
    assert make_example(prompt, answer, 106, 1, 16, 45, "drop", "f:7") == (None, "dropped")
    assert make_example(prompt, answer, 106, 1, 16, 25, "truncate", "f:7") == (None, "dropped")  # < one canvas
    with pytest.raises(DataError, match=r"f:7: prompt 10 \+ response 41 tokens .* > max_len 45"):
        make_example(prompt, answer, 106, 1, 16, 45, "error", "f:7")
    path = write_lines(tmp_path / "long.jsonl", [{"prompt": "x", "completion": "word " * 60, "raw": True},
                                                 {"prompt": "x", "completion": "ok", "raw": True}])
    with pytest.warns(DataWarning, match=r"1 example\(s\) longer than max_len 40 were truncated \(.*long.jsonl:1\)"):
        examples = load_examples(path, tok, canvas_length=16, max_len=40)
    assert [len(e.prompt) + len(e.response) <= 40 for e in examples] == [True, True]
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no usable examples \(all 2 longer than max_len 5"):
        load_examples(path, tok, canvas_length=16, max_len=5)


def test_cli_prints_a_warning_as_one_line(tmp_path, capsys):
    """`dgemma train`'s data warnings (any command's warnings) are one 'warning:' line, not Python's file:line plus a
    line of source code; the display is Python's again once main returns."""
    from dgemma.bundled import PACKAGED
    from dgemma.cli import main

    path = write_lines(tmp_path / "long.jsonl", [{"prompt": "x", "completion": "word " * 40}] * 2)
    shown = warnings.showwarning
    assert main(["train", "--model", str(PACKAGED), "--data", str(path), "--max-seq-len", "70", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2  # every example dropped: an error after the warning
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"dgemma train: warning: 2 example(s) longer than max_len 70 were dropped ({path}:1, {path}:2)"
    assert err[1].startswith("dgemma train: error: ") and len(err) == 2, err
    assert warnings.showwarning is shown


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:3: not valid JSON"),
    ("[1, 2]", r"bad.jsonl:3: expected a JSON object, got list"),
    ({"text": "hi"}, r"bad.jsonl:3: expected 'messages' \(a chat\) or 'prompt' and 'completion'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"bad.jsonl:3: the last message .* must be the assistant's, got role 'user'"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, r"bad.jsonl:3: 'messages' must be a list with at least"),
    ({"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"bad.jsonl:3: .*unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     r"bad.jsonl:3: messages\[1\]\['content'\] is NoneType; content must be a string"),
    ({"prompt": "a", "completion": 5}, r"bad.jsonl:3: 'completion' must be a string, got int"),
    ({"prompt": "a", "completion": "b", "raw": "yes"}, r"bad.jsonl:3: 'raw' must be true or false"),
    ({"prompt": "a", "answer": "b"}, r"bad.jsonl:3: no 'completion' key \(a string\); the record has \['answer', "),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "c",
      "completion": "d"}, r"bad.jsonl:3: has both 'messages' and 'prompt'/'completion'"),  # was: c, d ignored
    ('{"prompt": "caf\xe9", "completion": "b"}', r"bad.jsonl:3: not UTF-8 text \(byte 0xe9 at byte 16 of the line\)"),
])
def test_bad_lines_name_file_and_line(tmp_path, tok, line, message):
    good = {"prompt": "a", "completion": "b"}
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line])  # line 2 is blank and skipped, not miscounted
    if isinstance(line, str) and "\xe9" in line:  # a Latin-1 file
        path.write_bytes(path.read_text().encode("latin-1"))
    with pytest.raises(DataError, match=message):
        load_examples(path, tok, canvas_length=16)


def test_data_file_with_byte_order_mark_or_not_a_file(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
    assert len(load_examples(path, tok, canvas_length=16)) == 1
    with pytest.raises(DataError, match=f"{tmp_path}: is a directory; pass a JSONL file"):
        load_examples(tmp_path, tok, canvas_length=16)


def test_order_split_and_collate_are_deterministic(tok, work):
    order = Order(5, seed=3)
    epochs = [[order[e * 5 + i] for i in range(5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and epochs[0] != epochs[1]  # a fresh shuffle per epoch
    assert [Order(5, 3)[i] for i in range(15)] == sum(epochs, []) != [Order(5, 4)[i] for i in range(15)]
    examples = load_examples(work / "data.jsonl", tok, canvas_length=16)
    train_a, held_a = split_heldout(examples, 2, seed=1)
    assert (train_a, held_a) == split_heldout(examples, 2, seed=1) and len(held_a) == 2
    assert not set(map(id, train_a)) & set(map(id, held_a)) and len(train_a) + 2 == len(examples)
    batch = collate(examples[:3], pad_id=0, canvas_length=16, seeds=[1, 2, 3])
    lengths = [len(e.prompt) + len(e.response) for e in examples[:3]]
    assert batch.tokens.shape == (3, max(lengths)) and batch.valid.sum(1).tolist() == lengths
    assert (batch.tokens[~batch.valid] == 0).all() and batch.valid[:, 0].all()  # right padding
    assert batch.prompt_len.tolist() == [len(e.prompt) for e in examples[:3]]
    assert batch.num_canvases.tolist() == [len(e.response) // 16 for e in examples[:3]]


# --- the objective -------------------------------------------------------------------------------------------
def test_corruption_statistics():
    cfg, L, V, n = LossConfig(), 64, 500, 4000
    seeds = [mix(0, i) for i in range(n)]
    noise = sample_noise(seeds, [3] * n, L, V, cfg)
    t, frac = noise.t.double(), noise.corrupt.double().mean(1)
    assert t.min() >= cfg.t_min and t.max() < 1
    assert abs(t.mean() - (1 + cfg.t_min) / 2) < 0.015  # t ~ U(t_min, 1)
    # each position is corrupted independently with probability t: frac - t has mean 0, variance E[t(1-t)]/L
    resid = frac - t
    expected_var = (t * (1 - t)).mean() / L
    assert abs(resid.mean()) < 4 * (expected_var / n) ** 0.5
    assert abs(resid.var() / expected_var - 1) < 0.1
    assert torch.corrcoef(torch.stack([t, frac]))[0, 1] > 0.95
    assert abs(noise.self_cond.double().mean() - 0.5) < 0.03
    counts = torch.bincount(noise.canvas, minlength=3).double() / n
    assert (counts - 1 / 3).abs().max() < 0.03 and noise.canvas.max() == 2
    ids = noise.noise_ids.flatten()
    assert ids.min() >= 0 and ids.max() < V and abs(ids.double().mean() - (V - 1) / 2) < 3  # uniform over the vocab
    again = sample_noise(seeds[:5], [3] * 5, L, V, cfg)
    assert torch.equal(again.corrupt, noise.corrupt[:5]) and torch.equal(again.noise_ids, noise.noise_ids[:5])
    none = sample_noise(seeds[:50], [1] * 50, L, V, LossConfig(self_cond_prob=0.0))
    assert not none.self_cond.any() and (none.canvas == 0).all()


def geometry_batch(cfg, seed=1):
    """Rows with prompts shorter and longer than the window, padding, and canvases far past the window."""
    L = cfg.canvas_length
    g = torch.Generator().manual_seed(seed)
    plens, ncan = [3, 11, 5, 20], [3, 1, 2, 2]
    rows = [torch.randint(3, cfg.vocab_size, (p + n * L,), generator=g) for p, n in zip(plens, ncan)]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int64)
    valid = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], valid[i, :len(r)] = r, True
    batch = Batch(tokens, valid, torch.tensor(plens), torch.tensor(ncan))
    noise = Noise(torch.tensor([2, 0, 1, 1]), torch.full((4,), 0.5), torch.rand(4, L, generator=g) < 0.5,
                  torch.randint(0, cfg.vocab_size, (4, L), generator=g), torch.tensor([True, False, True, False]))
    return batch, noise


def inference_logits(model, batch, noise, row, cache_config=None):
    """The serving path, engine-style: encode the prompt, commit each earlier canvas, denoise with SC."""
    cfg, L = model.config, model.config.canvas_length
    p, b = int(batch.prompt_len[row]), int(noise.canvas[row])
    tokens = batch.tokens[row:row + 1]
    cache = KVCache(cache_config or cfg, 1)
    encode(model, tokens[:, :p], cache)
    for k in range(b):
        encode(model, tokens[:, p + k * L:p + (k + 1) * L], cache)
    assert cache.length == p + b * L
    start = p + b * L
    noised = torch.where(noise.corrupt[row], noise.noise_ids[row], tokens[0, start:start + L])[None]
    soft = model.soft_embedding(denoise(model, noised, cache)) if noise.self_cond[row] else None
    return denoise(model, noised, cache, soft)[0]


@torch.no_grad()
def test_training_geometry_equals_inference():
    """Every row's training logits equal the inference path's: encode prompt, commit canvases 0..b-1 into the real
    (window-trimmed) KVCache, denoise canvas b with self-conditioning. Contexts reach 52 keys, window 8.

    fp64: bit-equal. In fp32 both paths are right but the random model is sensitive (a 1e-7 relative nudge of the
    embedding moves its logits by ~2e-5), so the batched/unbatched matmul order alone shows ~1e-4; the fp32 check
    bounds that, and a deliberately wrong window (one key too many) must differ far beyond it."""
    model = tiny_model(torch.float64)
    batch, noise = geometry_batch(model.config)
    train_logits, clean, _ = canvas_logits(model, batch, noise)
    assert train_logits.shape == (4, 16, model.config.vocab_size)
    for row in range(4):
        ref = inference_logits(model, batch, noise, row)
        assert (train_logits[row] - ref).abs().max() <= 1e-10, f"row {row}"
        start = int(batch.prompt_len[row] + noise.canvas[row] * 16)
        assert torch.equal(clean[row], batch.tokens[row, start:start + 16])
    wide = dataclasses.replace(model.config, sliding_window=model.config.sliding_window + 1)
    wrong = inference_logits(model, batch, noise, 3, cache_config=wide)
    assert (train_logits[3] - wrong).abs().max() > 1e-2

    model32 = model.float()
    train32, _, _ = canvas_logits(model32, batch, noise)
    for row in range(4):
        assert (train32[row] - inference_logits(model32, batch, noise, row)).abs().max() <= 1e-3, f"fp32 row {row}"


@torch.no_grad()
def test_loss_equals_transformers_forward_pieces(reference_checkpoint):
    """transformers 5.23 computes no training loss, but its forward takes the pieces (spec §7): the second pass's
    self_conditioning_logits / self_conditioning_mask and the encoder_last_hidden_state for the AR loss. The loss
    built from them, per row with the clean context before its canvas as input_ids, equals diffusion_loss."""
    import torch.nn.functional as F

    from dgemma.model import load_module

    ref, path = reference_checkpoint()
    model = load_module(path, dtype=torch.float32, quiet=True)
    batch, _ = geometry_batch(model.config, seed=3)
    batch.seeds = torch.tensor([mix(9, i) for i in range(4)])
    L, cap = model.config.canvas_length, ref.final_logit_softcapping
    batch.noise = sample_noise(batch.seeds.tolist(), batch.num_canvases.tolist(), L, model.config.vocab_size,
                               LossConfig())
    noise = batch.noise
    assert noise.canvas.max() > 0 and noise.self_cond.any() and not noise.self_cond.all()
    loss, metrics = diffusion_loss(model, batch)
    diffusion, ar = 0.0, 0.0
    for r in range(4):
        start, n = int(batch.prompt_len[r] + noise.canvas[r] * L), int(batch.valid[r].sum())
        clean = batch.tokens[r, start:start + L]
        noised = torch.where(noise.corrupt[r], noise.noise_ids[r], clean)[None]
        context = batch.tokens[r:r + 1, :start]
        first = ref(input_ids=context, decoder_input_ids=noised).logits
        second = ref(input_ids=context, decoder_input_ids=noised, self_conditioning_logits=first,
                     self_conditioning_mask=noise.self_cond[r:r + 1]).logits
        diffusion += F.cross_entropy(second[0], clean, reduction="sum").item()
        hidden = ref(input_ids=batch.tokens[r:r + 1, :n], decoder_input_ids=noised).encoder_last_hidden_state
        ar_logits = torch.tanh(ref.lm_head(hidden).float() / cap) * cap
        ar += F.cross_entropy(ar_logits[0, :-1], batch.tokens[r, 1:n], reduction="sum").item()
    assert abs(metrics["diffusion_sum"].item() - diffusion) <= 1e-4 * diffusion
    assert abs(metrics["ar_sum"].item() - ar) <= 1e-4 * ar
    assert abs(loss.item() - (diffusion / (4 * L) + ar / float(batch.valid[:, 1:].sum()))) <= 1e-4 * loss.item()


def test_loss_is_independent_of_how_the_batch_is_split():
    """Per-example seeds + global denominators: two halves add up to the whole (loss and gradient), which is what
    makes DDP and gradient accumulation equal a single big batch. fp64, so only the split can make a difference."""
    model = tiny_model(torch.float64)
    batch, _ = geometry_batch(model.config, seed=2)
    batch.seeds = torch.tensor([mix(5, i) for i in range(4)])
    ar_total = float(batch.valid[:, 1:].sum())
    whole = dataclasses.replace(batch, diffusion_denominator=4 * 16.0, ar_denominator=ar_total)
    loss, metrics = diffusion_loss(model, whole)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = 0.0
    for rows in ([0, 1], [2, 3]):
        half = Batch(batch.tokens[rows], batch.valid[rows], batch.prompt_len[rows], batch.num_canvases[rows],
                     batch.seeds[rows], 4 * 16.0, ar_total)
        part, _ = diffusion_loss(model, half)
        part.backward()
        parts = parts + part.item()
    assert abs(parts - loss.item()) < 1e-6 * loss.item()  # the soft-capped logits and CE are fp32
    for (name, p), g in zip(model.named_parameters(), grads):
        assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max(), name
    assert metrics["diffusion_count"] == 64 and metrics["ar_count"] == ar_total
    assert metrics["tokens"] == batch.valid.sum()


def test_ar_weight_zero_skips_the_ar_loss():
    model = tiny_model()
    batch, _ = geometry_batch(model.config)
    batch.seeds = torch.arange(4)
    loss0, m0 = diffusion_loss(model, batch, cfg=LossConfig(ar_weight=0.0))
    loss1, m1 = diffusion_loss(model, batch, cfg=LossConfig(ar_weight=1.0))
    assert m0["ar_count"] == 0 and m1["ar_count"] > 0
    assert torch.isclose(loss1, loss0 + m1["ar_sum"].float() / m1["ar_count"].float())


# --- the trainer ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overfit(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    cfg = base_config(work, out, steps=50, eval_holdout=2, eval_every=25)
    return cfg, train(cfg)


def test_overfit_run_reduces_the_loss(overfit):
    cfg, result = overfit
    records = [json.loads(x) for x in (result.out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 50 and [r["step"] for r in records if r["kind"] == "eval"] == [25, 50]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"
    assert all(r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in records if r["kind"] == "train")
    png = (result.out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (640, 360)
    assert [p.name for p in sorted((result.out / "checkpoints").iterdir())] == ["step-000050"]
    assert json.loads((result.out / "train_config.json").read_text())["steps"] == 50


def test_checkpoint_loads_in_dgemma_and_transformers(overfit):
    from transformers import DiffusionGemmaForBlockDiffusion

    import dgemma

    _, result = overfit
    engine = dgemma.load(result.model_dir, quiet=True)
    assert engine.tokenizer is not None and engine.generation_config.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(result.model_dir).eval()
    g = torch.Generator().manual_seed(0)
    V, L = engine.config.vocab_size, engine.config.canvas_length
    prompt, canvas = torch.randint(0, V, (2, 11), generator=g), torch.randint(0, V, (2, L), generator=g)
    cache = engine.new_cache(2)
    engine.encode(prompt, cache)
    ours = engine.denoise(canvas, cache)
    with torch.no_grad():
        theirs = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    print(f"\ntrained checkpoint: max |dgemma - transformers| decoder logits = {(ours - theirs).abs().max():.2e}")
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # trained weights, not a constant output


def test_resume_gives_the_same_weights(work, tmp_path):
    from safetensors.torch import load_file

    a = tmp_path / "a"
    cfg = base_config(work, a, steps=4, save_every=2, keep_checkpoints=3)
    train(cfg)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # pretend the run died after the step-2 checkpoint
    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "model")
    # ... while writing the step-4 checkpoint, before renaming it into place (resuming read "step-000004.partial")
    shutil.copytree(a / "checkpoints" / "step-000004", b / "checkpoints" / "step-000004.partial")
    resumed = train(dataclasses.replace(cfg, out=str(b), resume=True))
    assert resumed.step == 4
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(a / "checkpoints" / "step-000002" / "model.safetensors")
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # steps 3-4 did change the weights
    log_a, log_b = ((d / "log.jsonl").read_text().splitlines() for d in (a, b))
    strip = [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "seconds")} for x in log_a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "seconds")} for x in log_b]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg)
    with pytest.warns(UserWarning, match=r"resuming with changed settings \['max_seq_len', 'grad_clip'\]"):
        train(dataclasses.replace(cfg, out=str(b), resume=True, grad_clip=0.5, max_seq_len=500))  # different examples
    # fewer steps than the checkpoint has: refused (it exported the step-4 weights labelled as step 3)
    with pytest.raises(ValueError, match=r"step-000004 is at step 4, past steps=3; resume with more steps"):
        train(dataclasses.replace(cfg, out=str(b), resume=True, steps=3))


def test_a_run_started_with_relative_paths_resumes_from_another_directory(work, tmp_path, monkeypatch):
    """train_config.json (what `--resume` alone reads) holds the paths as given: relative ones named other files
    (or none) once the working directory changed; pathlib.Path values could not be saved at all."""
    from dgemma.train.commands import add_train_parser, config_from_args

    monkeypatch.chdir(work)
    cfg = base_config(work, tmp_path / "run", data=(Path("data.jsonl"),), config=Path("config.json"),
                      tokenizer="tok", steps=1)
    train(cfg)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["data"], saved["config"], saved["tokenizer"]) == \
        ([str(work / "data.jsonl")], str(work / "config.json"), str(work / "tok"))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    resumed = train(config_from_args(parser.parse_args(["train", "--out", "run", "--resume", "--steps", "2"])))
    assert resumed.step == 2 and (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()


def test_batches_prepared_by_a_worker_process_give_the_same_weights(work, tmp_path):
    """train/batches.py: a background process collating and drawing noise ahead (the CUDA default) feeds the very
    same batches as the training process itself (the CPU default), with grad accumulation and from a resume."""
    from safetensors.torch import load_file

    a = tmp_path / "a"
    cfg = base_config(work, a, steps=4, save_every=2, keep_checkpoints=3, grad_accum=2, data_workers=0)
    train(cfg)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "model")
    train(dataclasses.replace(cfg, out=str(b), resume=True, data_workers=1))
    c = tmp_path / "c"
    train(dataclasses.replace(cfg, out=str(c), data_workers=2))
    wa = load_file(a / "model" / "model.safetensors")
    for other in (b, c):
        wo = load_file(other / "model" / "model.safetensors")
        assert wa.keys() == wo.keys() and all(torch.equal(wa[k], wo[k]) for k in wa), other.name
    with pytest.raises(ValueError, match="data_workers must be an integer >= 0"):
        dataclasses.replace(cfg, data_workers=-1)


def test_full_fine_tune_freezes_the_router(work, overfit, tmp_path):
    from safetensors.torch import load_file

    _, result = overfit
    cfg = TrainConfig(data=(str(work / "data.jsonl"),), out=str(tmp_path), init="full", model=str(result.model_dir),
                      steps=2, batch_size=2, lr=1e-3, progress=False)
    assert cfg.router_frozen
    train(cfg)
    before = load_file(result.model_dir / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    routers = [k for k in before if ".router." in k]
    assert routers and all(torch.equal(before[k], after[k]) for k in routers)
    assert not torch.equal(before["model.decoder.embed_tokens.weight"], after["model.decoder.embed_tokens.weight"])
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "model" / "generation_config.json").read_text()) == \
        json.loads((result.model_dir / "generation_config.json").read_text())


def test_lora_run_merges_into_a_loadable_model(work, overfit, tmp_path):
    from safetensors.torch import load_file

    import dgemma

    _, result = overfit
    cfg = TrainConfig(data=(str(work / "data.jsonl"),), out=str(tmp_path), init="lora", model=str(result.model_dir),
                      steps=3, batch_size=2, lr=1e-2, lora_rank=2, lora_targets=("attention",), save_every=2,
                      keep_checkpoints=2, progress=False)
    train(cfg)
    before = load_file(result.model_dir / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k and k.endswith("_proj.weight") for k in changed)
    assert (tmp_path / "adapter").is_dir() and (tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt").exists()
    merged = dgemma.load(tmp_path / "model", quiet=True).module.state_dict()
    # the adapter directory loads as the merged model (it was an error saying to merge it by hand)
    adapter = dgemma.load(tmp_path / "adapter", quiet=True).module.state_dict()
    assert all(torch.equal(adapter[k], merged[k]) for k in merged)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"] == \
        str(result.model_dir)
    # resume from the step-2 adapter checkpoint (base weights come from `model` again): the same merged weights
    again = tmp_path.with_name(tmp_path.name + "-resumed")
    shutil.copytree(tmp_path, again)
    for name in ("checkpoints/step-000003", "model", "adapter"):
        shutil.rmtree(again / name)
    train(dataclasses.replace(cfg, out=str(again), resume=True))
    resumed = load_file(again / "model" / "model.safetensors")
    assert all(torch.equal(resumed[k], after[k]) for k in after)


def test_lora_on_a_bf16_base_keeps_it_bf16_and_merges_into_a_bf16_model(work, overfit, tmp_path):
    """A LoRA run under --dtype bfloat16 on a bf16 checkpoint holds its frozen base in bf16 (it was loaded as fp32
    masters: twice the memory, 104 GB for 26B-A4B) and writes a bf16 merged model (it was fp32, twice the size), equal
    to folding the saved fp32 adapter onto the bf16 base with one rounding per weight; under --dtype float32 the
    base is computed, and written, in fp32 as before."""
    from safetensors.torch import load_file

    from dgemma.model import lora
    from dgemma.model.loading import load_module
    from dgemma.model.saving import save_checkpoint
    from dgemma.train.train import base_dtype

    _, result = overfit
    base = tmp_path / "base-bf16"
    save_checkpoint(load_module(result.model_dir, dtype=torch.bfloat16, quiet=True), base)
    for f in (result.model_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, base / f.name)
    cfg = TrainConfig(data=(str(work / "data.jsonl"),), out=str(tmp_path / "run"), init="lora", model=str(base),
                      steps=2, batch_size=2, lr=1e-2, lora_rank=2, lora_targets=("attention", "experts"),
                      dtype="bfloat16", progress=False)
    train(cfg)
    merged = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    expected = load_module(base, quiet=True)  # bf16, as stored
    lora.load_adapter(expected, tmp_path / "run" / "adapter")
    lora.merge_lora(expected)
    before = load_file(base / "model.safetensors")
    assert any(not torch.equal(before[k], merged[k]) for k in merged)
    ours = merged
    save_checkpoint(expected, tmp_path / "expected")
    theirs = load_file(tmp_path / "expected" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert base_dtype(cfg) is None and base_dtype(dataclasses.replace(cfg, dtype="float32")) == torch.float32


def test_cli_flags_build_the_config(work, tmp_path):
    from dgemma.train.commands import add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "a.jsonl", "--data", "b.jsonl", "--model", "m", "--mode", "lora",
                              "--out", str(tmp_path), "--steps", "7", "--batch-size", "6", "--grad-accum", "3",
                              "--lr", "2e-4", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets",
                              "attention, experts", "--seed", "9", "--ar-weight", "0",
                              "--eval-data", "e.jsonl", "--betas", "0.9", "0.95", "--raw"])
    cfg = config_from_args(args)
    here = Path.cwd()
    assert (cfg.data, cfg.init, cfg.model, cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.lr) == \
        ((str(here / "a.jsonl"), str(here / "b.jsonl")), "lora", str(here / "m"), 7, 6, 3, 2e-4)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed, cfg.loss.ar_weight) == \
        (4, 8.0, ("attention", "experts"), 9, 0.0)
    assert cfg.freeze_router is None and cfg.router_frozen and cfg.eval_data == (str(here / "e.jsonl"),) and cfg.raw
    assert cfg.betas == (0.9, 0.95)
    full = config_from_args(parser.parse_args(["train", "--data", "a", "--model", "m", "--out", "o",
                                               "--no-freeze-router"]))
    assert full.init == "full" and full.freeze_router is False and not full.router_frozen
    scratch = config_from_args(parser.parse_args(["train", "--data", "a.jsonl", "--config", "c.json", "--tokenizer",
                                                  "t", "--out", str(tmp_path)]))
    assert scratch.init == "scratch" and scratch.router_frozen is False
    (tmp_path / "train_config.json").write_text(json.dumps(scratch.to_json()))
    again = config_from_args(parser.parse_args(["train", "--out", str(tmp_path), "--resume"]))
    assert again == dataclasses.replace(scratch, resume=True) and scratch.steps == 1000
    # a moved run resumes where it is now (not into the saved "out"), and --steps lengthens it; other flags would
    # be silently ignored, so they are refused
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "train_config.json").write_text(json.dumps({**scratch.to_json(), "out": "/gone/elsewhere"}))
    longer = config_from_args(parser.parse_args(["train", "--out", str(moved), "--resume", "--steps", "1500"]))
    assert longer == dataclasses.replace(scratch, out=str(moved), steps=1500, resume=True)
    with pytest.raises(ValueError, match=r"without --data continues .* which --batch-size, --lr would not change"):
        config_from_args(parser.parse_args(["train", "--out", str(moved), "--resume", "--lr", "1", "--batch-size",
                                            "2"]))
    with pytest.raises(ValueError, match=r"--lora-rank only apply to --mode lora \(this run is --mode full\)"):
        config_from_args(parser.parse_args(["train", "--data", "a", "--model", "m", "--out", "o", "--lora-rank", "4"]))
    with pytest.raises(ValueError, match="init='lora' trains adapters only, never the router"):
        config_from_args(parser.parse_args(["train", "--data", "a", "--model", "m", "--out", "o", "--mode", "lora",
                                            "--no-freeze-router"]))
    with pytest.raises(ValueError, match="eval_every=5 has nothing to evaluate: pass eval_data"):
        dataclasses.replace(scratch, eval_every=5)  # was silently never evaluated
    with pytest.raises(ValueError, match="batch_size 7 must be a multiple of grad_accum 2"):
        dataclasses.replace(scratch, batch_size=7, grad_accum=2)
    with pytest.raises(ValueError, match="needs config .* and tokenizer"):
        TrainConfig(data=("a",), out="o")


def test_config_and_model_together_are_refused(work, tmp_path):
    """`--config C --model M` trained random weights from scratch, silently dropping --model; `--mode full|lora`
    with --config silently dropped --config."""
    from dgemma.train.commands import add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    both = ["train", "--data", "a.jsonl", "--config", "c.json", "--model", "m", "--tokenizer", "t", "--out", "o"]
    with pytest.raises(ValueError, match=r"init='scratch' trains random weights .* model .*m would be ignored; drop "
                                         r"config \(--config\) to fine-tune"):
        config_from_args(parser.parse_args(both))
    for mode in ("full", "lora"):
        with pytest.raises(ValueError, match=rf"init='{mode}' fine-tunes model .* config .*c.json would be ignored"):
            config_from_args(parser.parse_args(both + ["--mode", mode]))


@pytest.mark.parametrize("knob, value", [("weight_decay", float("nan")), ("lr", float("inf")),
                                          ("grad_clip", float("inf")), ("time_budget", float("nan"))])
def test_non_finite_numbers_are_refused(work, tmp_path, knob, value):
    """NaN / inf slip through `x < 0`-style checks; weight_decay=nan trained a model of NaN weights."""
    with pytest.raises(ValueError, match=f"need finite numbers, got {knob}="):
        base_config(work, tmp_path, **{knob: value})
    with pytest.raises(ValueError, match="ar_weight must be a finite number >= 0"):
        LossConfig(ar_weight=float("inf"))


def test_max_seq_len_past_the_models_positions_is_refused(work, tmp_path):
    """It trained positions that inference then refuses (Engine.check_context)."""
    with pytest.raises(ValueError, match="max_seq_len 1040 exceeds the model's max_position_embeddings 1024"):
        train(base_config(work, tmp_path, max_seq_len=1040))


def test_bad_out_or_model_path_is_a_clear_error(work, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; pass a directory"):  # was FileExistsError from mkdir
        train(base_config(work, tmp_path / "file"))
    adapter = tmp_path / "adapter"  # a directory without config.json (was: "no tokenizer found")
    adapter.mkdir()
    with pytest.raises(ConfigError, match=f"{adapter}/config.json: no such file; pass a model directory"):
        train(base_config(work, tmp_path / "o", init="lora", model=str(adapter), config=None))


def test_bad_device_is_a_clear_error(work, tmp_path):
    with pytest.raises(ValueError, match="device 'tpu' is not a torch device; use cpu or cuda"):
        train(base_config(work, tmp_path, device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': this torch sees no CUDA device; use cpu"):
            train(base_config(work, tmp_path, device="cuda"))


def test_png_writer_round_trips(tmp_path):
    path = plot_losses(tmp_path / "p.png", [(1, 5.0), (2, 3.0), (3, 2.5)], [(3, 2.8)], width=50, height=40)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        tag, body, crc = data[i + 4:i + 8], data[i + 8:i + 8 + n], struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc
        chunks[tag] = body
        i += 12 + n
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (50, 40, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == 40 * (1 + 50 * 3) and all(raw[y * 151] == 0 for y in range(40))
    assert len(set(raw)) > 3  # something was drawn


def test_time_budget_fixes_the_step_count_after_calibration(work, tmp_path):
    from safetensors.torch import load_file

    from dgemma.train.config import CALIBRATION_STEPS, fit_steps_to_budget

    # pure arithmetic: median step time, 10% + 10 s kept back, capped by steps, never below the current step
    cfg = base_config(work, tmp_path / "x", steps=10_000, warmup_steps=20, time_budget=110.0)
    assert fit_steps_to_budget(cfg, 20, 0.0, [0.1, 0.5, 0.1]) == 20 + int((0.9 * 110 - 10) / 0.1)
    assert fit_steps_to_budget(dataclasses.replace(cfg, steps=50), 20, 0.0, [0.1]) == 50
    assert fit_steps_to_budget(cfg, 20, 200.0, [0.1]) == 20
    with pytest.raises(ValueError, match="warmup_steps >= 20"):
        base_config(work, tmp_path / "y", warmup_steps=5, time_budget=60.0)

    # a spent budget ends the run right after the calibration steps, and the saved config says so
    spent = train(base_config(work, tmp_path / "spent", steps=500, warmup_steps=20, time_budget=1e-3, batch_size=2))
    assert spent.step == CALIBRATION_STEPS and (spent.model_dir / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "spent" / "train_config.json").read_text())
    assert saved["steps"] == CALIBRATION_STEPS and saved["time_budget"] == 0.0
    budget = [json.loads(x) for x in (tmp_path / "spent" / "log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in budget if r["kind"] == "budget"] == [CALIBRATION_STEPS]

    # a run stopped before its step count was fixed: resuming it is not the --steps N run, and says so
    early = base_config(work, tmp_path / "early", steps=4, warmup_steps=20, time_budget=1000.0, batch_size=2)
    train(early)
    with pytest.warns(UserWarning, match="resuming with a time budget: the step count is fitted again after 20"):
        train(dataclasses.replace(early, resume=True))

    # ... and is exactly the run that the fixed step count gives
    fixed = train(base_config(work, tmp_path / "fixed", steps=CALIBRATION_STEPS, warmup_steps=20, batch_size=2))
    wa, wb = (load_file(r.model_dir / "model.safetensors") for r in (spent, fixed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_train_flag_says_what_it_does():
    """`dgemma train --help` listed --lr, --lora-rank, --eval-every and a dozen others with no word on them or
    their defaults."""
    from dgemma.train.commands import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    silent = [a.option_strings[0] for a in train_parser._actions if a.option_strings and not a.help]
    assert not silent, f"flags without help: {silent}"
