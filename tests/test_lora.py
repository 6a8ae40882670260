"""LoRA adapters (model/lora.py): unchanged output at init, only adapters train, exact merge back to a plain module,
experts adapters through the grouped dispatch and the reference loop, adapter-only save/load, clear errors."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as Fn

from dgemma.config import ModelConfig
from dgemma.engine.cache import KVCache
from dgemma.model import DiffusionGemma, load_module
from dgemma.model.lora import (apply_lora, load_adapter, load_lora_state_dict, lora_config, lora_state_dict,
                               merge_lora, save_adapter)
from dgemma.model.saving import save_checkpoint

from conftest import randomise

S, F = "sliding_attention", "full_attention"
ALL = ("attention", "mlp", "self_conditioning", "experts")


def tiny_model(seed: int = 0) -> DiffusionGemma:
    """Random 2-layer model. Norm weights, scales and layer scalars ~ U(0.5, 1.0): random enough to catch a wrong
    scale, mild enough that fp32 rounding (amplified by the unscaled q·k scores) stays well under 1e-5."""
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      top_k_experts=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      global_head_dim=16, num_global_key_value_heads=1, layer_types=(S, F), sliding_window=8,
                      canvas_length=8, max_position_embeddings=256)
    model = DiffusionGemma(cfg)
    randomise(model, seed, low=0.5, span=0.5)
    return model


TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
CANVAS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))


def outputs(model, with_soft=True):
    """(encoder hidden [B,T,D], AR logits, decoder logits [B,L,V]) with a self-conditioning signal on the canvas."""
    cache = KVCache(model.config, TOKENS.shape[0])
    hidden = model.encode(TOKENS, cache, return_hidden=True)
    sc = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(3)) if with_soft else None
    soft = None if sc is None else model.soft_embedding(sc)
    return hidden, model.logits(hidden), model.denoise(CANVAS, cache, soft=soft)


def loss_of(model):
    hidden, ar_logits, dec_logits = outputs(model)
    ar = Fn.cross_entropy(ar_logits[:, :-1].reshape(-1, 256), TOKENS[:, 1:].reshape(-1))
    return ar + Fn.cross_entropy(dec_logits.reshape(-1, 256), CANVAS.reshape(-1))


def randomise_adapters(model, seed=4, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_init_is_bit_identical_and_keys_are_kept():
    model = tiny_model()
    before = outputs(model)
    fresh_keys = set(model.state_dict())
    names = apply_lora(model, rank=4, alpha=8, targets=ALL, generator=torch.Generator().manual_seed(0))
    for a, b in zip(before, outputs(model)):
        assert torch.equal(a, b)
    keys = set(model.state_dict())
    assert fresh_keys <= keys and all(".lora_" in k or "_lora_" in k for k in keys - fresh_keys)
    assert set(names) == keys - fresh_keys == set(lora_state_dict(model))
    # sliding layer: q,k,v,o; full layer (no v_proj): q,k,o; 2 layers x mlp 3; self-cond 3; 2 experts modules x 2
    assert len(names) == 2 * (4 + 3) + 2 * 2 * 3 + 2 * 3 + 2 * 4
    assert "layers.1.self_attn.v_proj.lora_A" not in names and "layers.0.self_attn.v_proj.lora_A" in names
    assert model.state_dict()["layers.0.experts.gate_up_proj_lora_A"].shape == (4, 4, 32)
    assert model.state_dict()["layers.0.experts.down_proj_lora_B"].shape == (4, 32, 4)
    assert lora_config(model).targets == ALL and lora_config(model).rank == 4


def test_training_changes_only_adapters_and_merge_is_exact(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model.state_dict())
    fresh_keys = list(model.state_dict())
    names = apply_lora(model, rank=4, alpha=8, targets=ALL, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    for key, value in base.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is None for n, p in params.items() if n not in names)
    assert all(params[n].abs().sum() > 0 for n in names if "lora_B" in n), "every B got a gradient"

    adapted = outputs(model)
    merged = merge_lora(copy.deepcopy(model))
    assert list(merged.state_dict()) == fresh_keys
    assert type(merged.layers[0].self_attn.q_proj) is torch.nn.Linear
    for a, b, in zip(adapted, outputs(merged)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert (outputs(merged)[2] - outputs(tiny_model())[2]).abs().max() > 1e-2, "the adapters had no effect"

    # the merged module exports with the ordinary saver and loads back as a plain model
    save_checkpoint(merged, tmp_path / "merged")
    reloaded = load_module(tmp_path / "merged", quiet=True)
    for a, b in zip(adapted, outputs(reloaded)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_experts_adapters_grouped_dispatch_equals_reference_loop():
    model = tiny_model()
    apply_lora(model, rank=3, alpha=3, targets=("experts",), generator=torch.Generator().manual_seed(0))
    randomise_adapters(model)
    reference = copy.deepcopy(model)
    for layer in reference.layers:
        layer.use_reference_moe = True
    grouped_out, reference_out = outputs(model), outputs(reference)
    for a, b in zip(grouped_out, reference_out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # gradients agree too
    loss_of(model).backward()
    loss_of(reference).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
    # and merging the experts adapters is exact through both paths
    merged = merge_lora(copy.deepcopy(model))
    for a, b in zip(grouped_out, outputs(merged)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_adapter_state_roundtrip(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, targets=("attention", "self_conditioning"))
    randomise_adapters(model)
    expected = outputs(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny test model")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}

    other = tiny_model()  # same base weights, fresh adapters
    load_adapter(other, tmp_path / "adapter")
    assert lora_config(other) == lora_config(model)
    for a, b in zip(expected, outputs(other)):
        assert torch.equal(a, b)

    third = tiny_model()
    apply_lora(third, rank=2, alpha=4, targets=("attention", "self_conditioning"))
    load_lora_state_dict(third, {k: v.clone() for k, v in lora_state_dict(model).items()})
    assert torch.equal(outputs(third)[2], expected[2])
    wrong = tiny_model()
    apply_lora(wrong, rank=3, alpha=4, targets=("attention", "self_conditioning"))
    with pytest.raises(ValueError, match="rank"):
        load_lora_state_dict(wrong, lora_state_dict(model))
    wrong = tiny_model()
    apply_lora(wrong, rank=2, alpha=4, targets=("attention",))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(wrong, lora_state_dict(model))


def test_merge_is_exact_per_module_in_fp64():
    """The fold itself, without the model's fp32 norms around it: merged module == adapted module to fp64 rounding."""
    model = tiny_model().double()
    apply_lora(model, rank=3, alpha=5, targets=ALL, dtype=torch.float64)
    randomise_adapters(model)
    x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w, ids = torch.rand(6, 2, dtype=torch.float64) + 0.1, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    q, experts = model.layers[1].self_attn.q_proj, model.layers[0].experts
    before = q(x), experts(x, w, ids), experts.forward_reference(x, w, ids)
    merge_lora(model)
    q, experts = model.layers[1].self_attn.q_proj, model.layers[0].experts
    after = q(x), experts(x, w, ids), experts.forward_reference(x, w, ids)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert (before[1] - after[2]).abs().max() < 1e-12


def test_bf16_merge_is_one_rounding_of_the_fp32_sum():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, rank=4, alpha=16, targets=("mlp", "experts"))
    randomise_adapters(model, std=0.05)
    q = model.layers[0].mlp.up_proj
    w_gu = model.layers[1].experts.gate_up_proj
    e = model.layers[1].experts
    want = (q.weight.float() + 4.0 * q.lora_B @ q.lora_A).to(torch.bfloat16)
    want_gu = (w_gu.float() + 4.0 * torch.bmm(e.gate_up_proj_lora_B, e.gate_up_proj_lora_A)).to(torch.bfloat16)
    merge_lora(model)
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[0].mlp.up_proj.weight, want)
    assert torch.equal(model.layers[1].experts.gate_up_proj, want_gu)


def test_dropout_only_in_training_mode():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("attention", "mlp"), dropout=0.5)
    randomise_adapters(model)
    model.eval()
    assert torch.equal(outputs(model)[0], outputs(model)[0])
    model.train()
    assert not torch.equal(outputs(model)[0], outputs(model)[0])


def test_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(model, targets=("attention", "router"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=2.5)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(model, alpha=0)
    with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):  # inf * (B = 0) would be NaN
        apply_lora(model, alpha=float("inf"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)
    other = tiny_model()
    other.layers[1].mlp.up_proj = type("QuantLinear", (torch.nn.Linear,), {})(32, 48, bias=False)
    with pytest.raises(TypeError, match="QuantLinear"):
        apply_lora(other, targets=("attention", "mlp"))
    assert type(other.layers[0].self_attn.q_proj) is torch.nn.Linear, "a refused call must not wrap anything"
    assert all(p.requires_grad for p in model.parameters()), "a refused call must not freeze the model"
    apply_lora(model, targets="mlp")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_saved_weights_get_the_umask_permissions(tmp_path):
    """safetensors 0.8 writes 0600 files: an exported model that a server account could not read."""
    model = tiny_model()
    apply_lora(model, rank=2, targets=("attention",))
    old = os.umask(0o027)
    try:
        save_adapter(model, tmp_path / "adapter")
        save_checkpoint(merge_lora(model), tmp_path / "model")
    finally:
        os.umask(old)
    for path in (tmp_path / "adapter" / "adapter.safetensors", tmp_path / "model" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o640, path


# --- an adapter directory loads as the merged model ------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(random_model_dir, tmp_path_factory):
    """A 2-step `dgemma train --mode lora` run on the random model, every target adapted: (run dir, base dir)."""
    from dgemma.train import TrainConfig, train

    root = tmp_path_factory.mktemp("lora_run")
    with (root / "data.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"{i}:", "completion": "def f(x): return x + 1", "raw": True}) + "\n")
    train(TrainConfig(data=(str(root / "data.jsonl"),), out=str(root / "run"), init="lora", model=str(random_model_dir),
                      steps=2, batch_size=2, lr=3e-3, lora_rank=2, lora_targets=ALL, progress=False))
    return root / "run", random_model_dir


def decoder_logits(engine, seed=0):
    """Decoder logits of one canvas after a prompt, self-conditioned: every adapted module takes part."""
    module, g = engine.module, torch.Generator().manual_seed(seed)
    V, L = module.config.vocab_size, module.config.canvas_length
    ids, canvas = torch.randint(0, V, (1, 12), generator=g), torch.randint(0, V, (1, L), generator=g)
    cache = KVCache(module.config, 1)
    with torch.no_grad():
        module.encode(ids, cache)
        soft = module.soft_embedding(torch.randn(1, L, V, generator=g).to(module.embed_tokens.weight.dtype))
        return module.denoise(canvas, cache, soft=soft).float()


def test_an_adapter_directory_loads_as_the_model_the_run_merged(lora_run):
    """dgemma.load(RUN/adapter) (and a LoRA checkpoint) = dgemma.load(RUN/model): the same weights bit for bit in the
    dtype the run merged in, the same tokens for the same seed, the same tokenizer and generation settings; in bf16
    the same logits within bf16 rounding. (It was an error telling the user to merge the adapter by hand.)"""
    import dgemma

    run, base = lora_run
    merged = dgemma.load(run / "model", quiet=True)
    plain = dgemma.load(base, quiet=True).module.state_dict()
    want = merged.module.state_dict()
    assert any(not torch.equal(want[k], plain[k]) for k in want), "the run changed nothing: the test could not fail"
    for adapter in (run / "adapter", run / "checkpoints" / "step-000002"):
        engine = dgemma.load(adapter, quiet=True)
        got = engine.module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), adapter
        assert engine.generation_config == merged.generation_config and engine.tokenizer is not None
        ours = engine.complete("def f(x):", max_tokens=40, seed=3, max_denoising_steps=8)
        theirs = merged.complete("def f(x):", max_tokens=40, seed=3, max_denoising_steps=8)
        assert ours.completion_ids == theirs.completion_ids and ours.steps_per_canvas == theirs.steps_per_canvas
    assert json.loads((run / "adapter" / "generation_config.json").read_text()) == \
        json.loads((run / "model" / "generation_config.json").read_text())
    bf16 = dgemma.load(run / "adapter", dtype="bfloat16", quiet=True)
    assert {p.dtype for p in bf16.module.parameters()} == {torch.bfloat16}
    want_logits = decoder_logits(dgemma.load(run / "model", dtype=torch.bfloat16, quiet=True))
    assert torch.equal(decoder_logits(bf16), want_logits)
    assert (decoder_logits(merged) - want_logits).abs().max() > 0, "bf16 and fp32 logits should differ"


def adapter_copy(lora_run, tmp_path, base_model, name="adapter") -> Path:
    """The run's adapter copied to tmp_path/name with "base_model" set to `base_model` (None: removed)."""
    copy_dir = tmp_path / name
    shutil.copytree(lora_run[0] / "adapter", copy_dir)
    meta = json.loads((copy_dir / "adapter_config.json").read_text())
    meta["base_model"] = base_model
    (copy_dir / "adapter_config.json").write_text(json.dumps(meta))
    return copy_dir


def test_an_adapter_whose_files_disagree_names_them(lora_run, tmp_path):
    """adapter_config.json edited to another rank than adapter.safetensors holds: the error names the file and
    says the two must come from one run (it told the user to call apply_lora, which a CLI user never does)."""
    import dgemma

    run, base = lora_run
    copy_dir = adapter_copy(lora_run, tmp_path, str(base))
    meta = json.loads((copy_dir / "adapter_config.json").read_text())
    meta["rank"] *= 2
    (copy_dir / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        dgemma.load(copy_dir, quiet=True)
    message = str(info.value)
    assert str(copy_dir / "adapter.safetensors") in message and "same dgemma train run" in message, message
    assert "apply_lora" not in message and f"rank {meta['rank']}" in message


def load_message(path) -> str:
    import dgemma
    from dgemma import ConfigError
    from dgemma.model import CheckpointError

    with pytest.raises((ConfigError, CheckpointError)) as info:
        dgemma.load(path, quiet=True)
    return str(info.value)


def test_an_adapters_base_model_moved_missing_relative_or_wrong_is_a_clear_error(lora_run, tmp_path):
    import dgemma
    from dgemma.quant.convert import quantize_checkpoint

    run, base = lora_run
    want = dgemma.load(run / "model", quiet=True).module.state_dict()
    fix = r'set "base_model" in .*adapter_config.json to the directory of the model the adapter was trained on'
    # moved: the recorded absolute path is gone
    gone = adapter_copy(lora_run, tmp_path, str(tmp_path / "moved-away"), "gone")
    assert load_message(gone) == load_message(gone)  # the same error every time
    message = load_message(gone)
    assert f"{gone} is a LoRA adapter on the base model {tmp_path / 'moved-away'}, which does not exist" in message
    import re
    assert re.search(fix, message), message
    # a relative base is taken from the adapter directory (not from wherever the command runs)
    shutil.copytree(base, tmp_path / "base")
    relative = adapter_copy(lora_run, tmp_path, "../base", "relative")
    got = dgemma.load(relative, quiet=True).module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    lost = adapter_copy(lora_run, tmp_path, "base", "lost")
    assert f"base (relative to the adapter directory: {lost / 'base'}), which does not exist" in load_message(lost)
    # not recorded (save_adapter without base_model)
    assert "does not record its base model (base_model: None)" in load_message(adapter_copy(lora_run, tmp_path, None,
                                                                                              "unrecorded"))
    # another model: the recorded shape does not fit
    save_checkpoint(tiny_model(), tmp_path / "other")
    message = load_message(adapter_copy(lora_run, tmp_path, str(tmp_path / "other"), "other-base"))
    assert "trained on a model with {'vocab_size': 640, 'hidden_size': 64" in message and "that is another model" in \
        message
    # a directory that is not a model
    (tmp_path / "empty").mkdir()
    message = load_message(adapter_copy(lora_run, tmp_path, str(tmp_path / "empty"), "no-model"))
    assert "which is not a model directory (no config.json)" in message and re.search(fix, message)
    # a quantized base: the adapter merges into full-precision weights
    quantize_checkpoint(base, tmp_path / "int8", "int8", log=None)
    message = load_message(adapter_copy(lora_run, tmp_path, str(tmp_path / "int8"), "on-int8"))
    assert f"on {tmp_path / 'int8'}, a quantized checkpoint" in message and "full-precision model" in message
    # two adapters naming each other
    first = adapter_copy(lora_run, tmp_path, str(tmp_path / "second"), "first")
    adapter_copy(lora_run, tmp_path, str(first), "second")
    assert "name each other as base models in a loop" in load_message(first)
    # PEFT writes adapter_config.json too
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert "not a dgemma LoRA adapter (format None" in load_message(peft)


def test_cli_commands_take_an_adapter_directory(lora_run, tmp_path, capsys):
    """generate/plan/quantize/inspect --model RUN/adapter: what they do with RUN/model (inspect: says it is one)."""
    from safetensors.torch import load_file

    from dgemma.cli import main

    run, base = lora_run
    texts = []
    for model in (run / "adapter", run / "model"):
        assert main(["generate", "--model", str(model), "def f(x):", "--max-tokens", "30", "--seed", "1",
                     "--steps", "6", "--json"]) == 0
        done = json.loads(capsys.readouterr().out)
        texts.append((done["text"], done["usage"], done["stats"]["steps_per_canvas"]))
        assert main(["quantize", str(model), str(tmp_path / model.name), "--scheme", "int8"]) == 0
        assert main(["plan", "--model", str(model), "--json"]) == 0
        texts.append({k: v for k, v in json.loads(capsys.readouterr().out.splitlines()[-1]).items() if k != "source"})
    assert texts[0] == texts[2] and texts[1] == texts[3] and texts[0][0].strip()
    ours, theirs = load_file(tmp_path / "adapter" / "model.safetensors"), load_file(tmp_path / "model" /
                                                                                   "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "adapter" / "tokenizer.json").is_file() and not (tmp_path / "adapter.merged").exists()

    assert main(["inspect", str(run / "adapter")]) == 0
    out = capsys.readouterr().out
    assert f"LoRA adapter: {run / 'adapter'}" in out and f"base model        {base}" in out
    assert "rank              2 (alpha 16" in out and "targets           attention, mlp, self_conditioning, experts" \
        in out
    assert main(["inspect", str(run / "adapter"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(base), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    adapter = report.pop("adapter")
    assert adapter["base_model"] == str(base) and adapter["rank"] == 2 and adapter["targets"] == list(ALL)
    assert adapter["parameters"] == sum(t.numel() for t in load_file(run / "adapter" / "adapter.safetensors").values())
    assert {**report, "config": None} == {**plain, "config": None}

    gone = adapter_copy(lora_run, tmp_path, str(tmp_path / "moved-away"), "gone")
    for argv in (["generate", "--model", str(gone), "Hi"], ["inspect", str(gone)]):
        assert main(argv) == 2
        assert f"{gone} is a LoRA adapter on the base model {tmp_path / 'moved-away'}" in capsys.readouterr().err


def test_quantizing_an_adapter_never_deletes_a_directory_beside_dst(lora_run, tmp_path, capsys):
    """The adapter's merged model is written to DST.merged while it converts; a DST.merged that was already there (the
    user's) was deleted without a word. Now: refused, kept, nothing written."""
    from dgemma.cli import main

    run, _ = lora_run
    mine = tmp_path / "q.merged"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["quantize", str(run / "adapter"), str(tmp_path / "q"), "--scheme", "int8"]) == 2
    assert f"{mine} already exists" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "q").exists()


def test_a_lora_run_on_an_adapter_trains_on_its_merged_model(lora_run, tmp_path):
    """dgemma train --model RUN/adapter: the base is the merged model, the tokenizer the base's; the new adapter
    records the first as its base and loads through both."""
    import dgemma
    from dgemma.train import TrainConfig, train

    run, _ = lora_run
    train(TrainConfig(data=(str(run.parent / "data.jsonl"),), out=str(tmp_path / "again"), init="lora",
                      model=str(run / "adapter"), steps=1, batch_size=2, lr=3e-2, lora_rank=2, progress=False))
    want = dgemma.load(tmp_path / "again" / "model", quiet=True).module.state_dict()
    got = dgemma.load(tmp_path / "again" / "adapter", quiet=True).module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "again" / "model" / "tokenizer.json").is_file()


def test_the_old_import_path_is_the_same_code():
    from dgemma.model import lora
    from dgemma.train import lora as old

    assert old.load_adapter is lora.load_adapter and old.merge_lora is lora.merge_lora
