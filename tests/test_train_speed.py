"""The training step's cheaper paths against their references: FusedRMSNorm vs rms_norm (values, gradients, a
float64 gradcheck of the analytic backward), the MoE under bf16 autocast (one grouped GEMM vs the per-expert loop,
gradients included), the dense dispatch that torch.compile uses vs the per-token loop, and `--compile` vs eager
over three optimizer steps (slow)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from conftest import make_config, randomise
from test_moe import random_experts as moe_random_experts

from dgemma.config import ModelConfig
from dgemma.model import DiffusionGemma, moe
from dgemma.model import layers
from dgemma.model.layers import FusedRMSNorm, RMSNorm, norm, rms_norm


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_fused_rms_norm_equals_the_reference(dtype, weighted):
    """Same forward bits as rms_norm; gradients equal to autograd through rms_norm up to rounding."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(dtype)
    w = torch.rand(64, generator=g) + 0.5
    upstream = torch.randn(3, 5, 64, generator=g).to(dtype)
    x1, w1 = leaves(x, w)
    x2, w2 = leaves(x, w)
    ours = FusedRMSNorm.apply(x1, w1 if weighted else None, 1e-6)
    ref = rms_norm(x2, w2 if weighted else None, 1e-6)
    assert ours.dtype == ref.dtype == dtype and torch.equal(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the input gradient is rounded to bf16 at the end
    assert x1.grad.dtype == dtype
    assert (x1.grad.float() - x2.grad.float()).abs().max() <= tol * x2.grad.float().abs().max()
    if weighted:
        assert (w1.grad - w2.grad).abs().max() <= 1e-5 * w2.grad.abs().max()


def test_fused_rms_norm_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: FusedRMSNorm.apply(a, b, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda a: FusedRMSNorm.apply(a, None, 1e-6), (x,))


def test_norm_takes_the_fused_path_only_when_autograd_records():
    layer = RMSNorm(16, 1e-6)
    x = torch.randn(4, 16, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ != "FusedRMSNormBackward"  # "auto" on CPU: rms_norm's own chain
    try:
        layers.set_fused_norm("on")
        assert type(layer(x).grad_fn).__name__ == "FusedRMSNormBackward"
        with torch.no_grad():
            assert torch.equal(layer(x), rms_norm(x, layer.weight, 1e-6))  # inference: the reference itself
        frozen = RMSNorm(16, 1e-6).requires_grad_(False)
        assert frozen(x.detach()).grad_fn is None and norm(x.detach(), None, 1e-6).grad_fn is None
        layers.set_fused_norm("off")
        assert type(layer(x).grad_fn).__name__ != "FusedRMSNormBackward"
        with pytest.raises(ValueError, match="fused norm mode"):
            layers.set_fused_norm("yes")
    finally:
        layers.set_fused_norm("auto")


def random_experts(E=4, D=32, I=16, seed=0, dtype=torch.float32):
    return moe_random_experts(E, D, I, seed).requires_grad_(True).to(dtype)


def routing(N=24, E=4, K=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # expert 3 only ever in slot 1: uneven groups
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])
    return (torch.rand(N, K, generator=g, dtype=dtype) + 0.1), ids


def run_experts(experts, x, weights, ids, forward=None):
    """Output and the gradients of x and both expert tensors for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    experts.zero_grad()
    out = (forward or experts)(x, weights, ids)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


def test_autocast_training_takes_the_grouped_gemm_and_matches_the_loop(monkeypatch):
    """Under bf16 autocast the fp32 master experts are cast for torch._grouped_mm where it takes bf16 only (CUDA's
    rule, applied here on CPU), so training keeps the one-call dispatch; outputs and gradients agree with the
    per-expert loop to bf16 rounding."""
    experts = random_experts()
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(2))
    weights, ids = routing()
    calls = []
    real, rule = torch._grouped_mm, moe.grouped_dispatch
    monkeypatch.setattr(moe, "grouped_dispatch", lambda x, *w: x.dtype == torch.bfloat16 and rule(x, *w))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = run_experts(experts, x, weights, ids)
    assert calls == [torch.bfloat16, torch.bfloat16]  # both projections, in bf16
    try:
        moe.set_grouped_dispatch("off")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loop = run_experts(experts, x, weights, ids)
    finally:
        moe.set_grouped_dispatch("auto")
    assert len(calls) == 2
    assert grouped[0].dtype == loop[0].dtype == torch.float32
    for a, b in zip(grouped, loop):
        assert a.dtype == b.dtype and (a - b).abs().max() <= 2e-2 * b.abs().max()
    assert experts.gate_up_proj.grad.dtype == torch.float32  # the master weights get fp32 gradients


def test_dense_dispatch_equals_the_per_token_loop():
    """forward_dense (every expert on every token, [N,E] routing matrix) vs forward_reference, float64, values and
    gradients; under bf16 autocast it returns the input's dtype."""
    experts = random_experts(dtype=torch.float64)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, ids = routing(dtype=torch.float64)
    dense = run_experts(experts, x, weights, ids, experts.forward_dense)
    ref = run_experts(experts, x, weights, ids, experts.forward_reference)
    for a, b in zip(dense, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    experts.dense = True  # what the trainer sets: forward itself now takes the dense path
    assert torch.equal(experts(x, weights, ids), dense[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = experts.float().forward_dense(x.float(), weights.float(), ids)
    assert low.dtype == torch.float32 and (low - ref[0]).abs().max() <= 2e-2 * ref[0].abs().max()


def test_trainer_picks_the_dense_dispatch_only_where_it_pays():
    from dgemma.train import TrainConfig
    from dgemma.train.train import choose_moe_dispatch

    model = DiffusionGemma(ModelConfig.from_dict(make_config()))  # E=4, K=2
    cfg = TrainConfig(data=("a.jsonl",), out="o", init="full", model="m")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not choose_moe_dispatch(model, cfg, cpu) and not model.layers[0].experts.dense  # eager CPU: unchanged
    assert choose_moe_dispatch(model, cfg, cuda) and all(layer.experts.dense for layer in model.layers)
    assert not choose_moe_dispatch(model, dataclasses.replace(cfg, dtype="bfloat16"), cuda)  # grouped GEMM there
    assert choose_moe_dispatch(model, dataclasses.replace(cfg, compile=True), cpu)
    many = DiffusionGemma(ModelConfig.from_dict(make_config({"text_config": {"num_experts": 16, "top_k_experts": 2}})))
    assert not choose_moe_dispatch(many, dataclasses.replace(cfg, compile=True), cpu)  # 8x the FLOPs: no
    assert not moe.dense_worthwhile(16, 2) and moe.dense_worthwhile(8, 2)


def test_compile_flag_and_compiled_layers_keep_the_checkpoint_keys():
    from dgemma.train import TrainConfig
    from dgemma.train.commands import add_train_parser, config_from_args
    from dgemma.train.train import compile_layers

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    base = ["train", "--data", "a.jsonl", "--model", "m", "--out", "o"]
    assert config_from_args(parser.parse_args(base + ["--compile"])).compile == "default"
    assert config_from_args(parser.parse_args(base + ["--compile", "reduce-overhead"])).compile == "reduce-overhead"
    assert config_from_args(parser.parse_args(base)).compile == ""
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--compile", "fastest"])
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(data=("a",), out="o", init="full", model="m", compile="fastest")
    assert TrainConfig(data=("a",), out="o", init="full", model="m", compile=True).compile == "default"
    model = DiffusionGemma(ModelConfig.from_dict(make_config()))
    keys = list(model.state_dict())
    compile_layers(model)  # lazy: nothing compiles until a layer runs
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """Three optimizer steps with --compile give eager's losses (fp32; the dense MoE dispatch and fused kernels
    only reorder additions). About a minute on one CPU thread: several layer graphs compile."""
    from dgemma.model.saving import save_checkpoint
    from dgemma.text import save_tokenizer_files, train_tokenizer
    from dgemma.train import TrainConfig, train

    texts = ["the quick brown fox jumps over the lazy dog", "one two three four five six seven eight nine ten"]
    save_tokenizer_files(train_tokenizer(texts * 10, vocab_size=500), tmp_path / "tok")
    model = DiffusionGemma(ModelConfig.from_dict(make_config()))
    randomise(model, 0)
    save_checkpoint(model, tmp_path / "model")
    with (tmp_path / "data.jsonl").open("w") as f:
        for i, t in enumerate(texts * 2):
            f.write(json.dumps({"prompt": f"{i}:", "completion": t, "raw": True}) + "\n")

    def losses(compile: bool):
        out = tmp_path / f"run-{compile}"
        train(TrainConfig(data=(str(tmp_path / "data.jsonl"),), out=str(out), init="full", model=str(tmp_path / "model"),
                          tokenizer=str(tmp_path / "tok"), steps=3, batch_size=4, lr=1e-3, progress=False,
                          compile=compile))
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    try:
        layers.set_fused_norm("on")  # as on a GPU: the fused norm inside the compiled graphs
        eager, compiled = losses(False), losses(True)
    finally:
        layers.set_fused_norm("auto")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-3 * abs(a), (eager, compiled)
