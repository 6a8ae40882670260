"""Shared fixtures: random transformers-5.23 reference models saved as checkpoints, plus a parity-report table.

transformers is the test ORACLE only (DESIGN.md §5): we build `DiffusionGemmaForBlockDiffusion` from a small
config, give every weight a random value at a scale where mistakes show (the reference initialises norm
weights, `router.scale`, `per_expert_scale` and `layer_scalar` to 1, which would hide scale/offset bugs), save it
with `save_pretrained` and load it with `dgemma.load`. Nothing here runs dgemma to produce expected values.
"""

from __future__ import annotations

import os

# Intel MKL's AVX-512 sgemm (torch's CPU BLAS) can round the same dot product differently depending on the
# matrix's shape: seen on an AMD EPYC (Zen 4), torch 2.13, where our grouped/chunked products then differed from
# the reference's in the last bits (up to 1e-4 after a few layers) and sampled tokens diverged. MKL's conditional
# numerical reproducibility switch pins one code path whose results do not depend on the shape, which is what the
# parity and token-identity tests assume. Set before torch loads MKL; a value from the environment wins.
os.environ.setdefault("MKL_CBWR", "AVX2")

import copy
import json
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# spec/tiny_config.json (spec §11), inlined so the suite runs from a bare checkout.
TINY_CONFIG: dict = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "model_type": "diffusion_gemma",
    "canvas_length": 16,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "boi_token_id": 509,
    "eoi_token_id": 510,
    "image_token_id": 511,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "bos_token_id": 2,
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "top_k_experts": 2,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "sliding_window": 8,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
        "final_logit_softcapping": 30.0,
        "use_bidirectional_attention": "vision",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "initializer_range": 0.02,
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
        "rms_norm_eps": 1e-06,
        "hidden_activation": "gelu_pytorch_tanh",
        "standardize": False,
        "use_clipped_linears": False,
    },
}

S, F = "sliding_attention", "full_attention"


@contextmanager
def running(app):
    """Serve an ASGI `app` with uvicorn in a background thread on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_config(overrides: dict | None = None) -> dict:
    """TINY_CONFIG with overrides applied. Keys under "text_config" merge into the text config; a value of
    None deletes the key (e.g. {"text_config": {"layer_types": None}} to get the default pattern)."""
    raw = copy.deepcopy(TINY_CONFIG)
    for key, value in (overrides or {}).items():
        if key == "text_config":
            for k, v in value.items():
                if v is None:
                    raw["text_config"].pop(k, None)
                else:
                    raw["text_config"][k] = copy.deepcopy(v)
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = copy.deepcopy(value)
    return raw


def randomise(ref: torch.nn.Module, seed: int, low: float = 0.25, span: float = 1.5) -> None:
    """Give every text weight a value at a scale where a wrong norm, scale or scalar changes the output.

    Matrices ~ N(0, 1/fan_in) (so each projection keeps O(1) activations and routing is decisive rather than
    near-uniform), the embedding ~ N(0, 0.3^2) (logits of a few units, below the soft-cap), every norm weight,
    `router.scale` and `per_expert_scale` ~ U(0.25, 1.75), and the encoder and decoder `layer_scalar` buffers
    to DIFFERENT values in U(low, low+span) (default U(0.25, 1.75)), so a pass that uses the wrong set is
    caught. Works on the reference and on our own module (same name endings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # tied parameters are listed once, so twins stay equal
            if ".vision_tower." in name or ".embed_vision." in name:
                continue
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) * span + low)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in ref.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) * span + low)


def _build_reference(raw: dict, seed: int):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig.from_dict(copy.deepcopy(raw))
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    randomise(ref, seed)
    return ref


def pytest_configure(config):
    # The tensors here are tiny: intra-op threads only add spin-wait overhead (index_add_ on a [40,64] tensor is
    # ~10x slower with 2 OpenMP threads than with 1, and far worse on a loaded 2-core machine).
    torch.set_num_threads(1)


_CACHE: dict = {}


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """Factory: (overrides=None, *, sharded=False, spelling="saved") -> (ref_model, checkpoint_dir).

    `spelling="saved"` keeps the config.json `save_pretrained` writes (`per_layer_config`); `"global"`
    overwrites it with the input config (the released checkpoint's `global_head_dim` /
    `num_global_key_value_heads` keys). Cached per (config, sharded, spelling) for the session: treat the
    directory as read-only (copy it before corrupting anything) and do not modify the reference model."""

    def factory(overrides: dict | None = None, *, sharded: bool = False, spelling: str = "saved"):
        assert spelling in ("saved", "global")
        raw = make_config(overrides)
        key = (json.dumps(raw, sort_keys=True), sharded, spelling)
        if key not in _CACHE:
            seed = zlib.crc32(key[0].encode())
            ref = _build_reference(raw, seed)
            path = tmp_path_factory.mktemp("ckpt")
            if sharded:
                ref.save_pretrained(path, max_shard_size="40KB")
                assert (path / "model.safetensors.index.json").exists(), "expected a sharded save"
            else:
                ref.save_pretrained(path)
                assert (path / "model.safetensors").exists()
            if spelling == "global":
                (path / "config.json").write_text(json.dumps(raw, indent=2))
            _CACHE[key] = (ref, Path(path))
        return _CACHE[key]

    return factory


# --- parity report: worst |ours - reference| per config, printed at the end of the run ------------------
WORST: dict[str, float] = {}


@pytest.fixture(scope="session")
def parity_report():
    """Record the largest difference seen per config: report(config_id, what, diff)."""

    def record(config_id: str, diff: float) -> None:
        WORST[config_id] = max(WORST.get(config_id, 0.0), diff)

    return record


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.write_sep("-", "parity vs transformers 5.23.0: worst max|ours - reference| per config "
                                        "(fp32 unless marked)")
        for config_id, diff in sorted(WORST.items()):
            terminalreporter.write_line(f"PARITY {config_id}: worst max|diff| = {diff:.3e}")


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A tiny random-weight model with a real (placeholder) tokenizer, built once per session (canvas 64)."""
    from dgemma.bundled import build_random_model
    return build_random_model(Path(tmp_path_factory.mktemp("random")) / "random")


@pytest.fixture(scope="session")
def random_engine(random_model_dir):
    import dgemma
    return dgemma.load(random_model_dir, quiet=True)
