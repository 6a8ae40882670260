"""`dgemma quantize`: sharded checkpoints convert shard by shard, the result is complete and loadable, the scheme is
in the metadata, and peak memory stays near one shard (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma.cli import main
from dgemma.model.checkpoint import list_tensors
from dgemma.quant.modules import METADATA_KEY
from dgemma.quant.schemes import QuantError

ROOT = Path(__file__).resolve().parent.parent


def test_sharded_checkpoint_converts_shard_by_shard(reference_checkpoint, tmp_path, capsys):
    ref, src = reference_checkpoint({"text_config": {"intermediate_size": 128}}, sharded=True)
    src_shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(src_shards) > 2
    dst = tmp_path / "q4"
    assert main(["quantize", str(src), str(dst), "--scheme", "int4", "--group-size", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output_bytes"] < 0.45 * summary["source_bytes"]
    assert sorted(p.name for p in dst.glob("*.safetensors")) == src_shards  # same shards, same names
    infos, _ = list_tensors(dst)  # the index and every shard header agree
    key = "model.decoder.layers.0.experts.gate_up_proj"
    assert infos[key].dtype == torch.uint8 and {key + "_scale", key + "_zero"} <= infos.keys()
    assert infos["model.decoder.embed_tokens.weight"].dtype == torch.float32  # kept in the stored dtype
    for shard in dst.glob("*.safetensors"):  # the scheme is in every shard's metadata, not in a file name
        with safe_open(shard, "pt") as f:  # and the files are valid for the safetensors library
            meta = json.loads(f.metadata()[METADATA_KEY])
            assert meta == {"scheme": "int4", "group_size": 32, "scale_dtype": "float32", "format": 1}
            for k in f.keys():
                assert f.get_tensor(k).shape == infos[k].shape
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    assert main(["plan", "--model", str(dst), "--context", "64", "--json"]) == 0  # plan reads the scheme back
    assert json.loads(capsys.readouterr().out)["quant"] == "int4"
    # inspect names the scheme (it listed U8 storage alone); a full-precision checkpoint has none
    assert main(["inspect", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == {"scheme": "int4", "group_size": 32,
                                                                    "scale_dtype": "float32"}
    assert main(["inspect", str(dst)]) == 0
    assert "quantized         int4, group 32, scales in float32" in capsys.readouterr().out
    assert main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] is None


def test_cli_fp8_checkpoint_layout(reference_checkpoint, tmp_path, capsys):
    """`dgemma quantize --scheme fp8` stores e4m3 data with fp32 row scales (the load-and-compare to
    quantize_module is tests/test_quant.py's, for every scheme)."""
    import dgemma
    _, src = reference_checkpoint({"text_config": {"intermediate_size": 128}})
    dst = tmp_path / "f8"
    assert main(["quantize", str(src), str(dst), "--scheme", "fp8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scheme"] == "fp8" and summary["group_size"] is None and summary["tensors_quantized"] > 0
    infos, _ = list_tensors(dst)
    key = "model.decoder.layers.0.experts.down_proj"
    assert infos[key].dtype == torch.float8_e4m3fn and infos[key + "_scale"].dtype == torch.float32
    assert infos[key + "_scale"].shape == infos[key].shape[:-1] and key + "_zero" not in infos
    with safe_open(dst / "model.safetensors", "pt") as f:  # valid for the safetensors library, fp8 included
        assert json.loads(f.metadata()[METADATA_KEY]) == {"scheme": "fp8", "group_size": None,
                                                          "scale_dtype": "float32", "format": 1}
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    assert dgemma.load(dst).module.layers[0].experts.down_proj.dtype == torch.float8_e4m3fn


def test_conversion_refuses_bad_requests(reference_checkpoint, tmp_path):
    from dgemma.quant.convert import quantize_checkpoint
    _, src = reference_checkpoint()
    with pytest.raises(QuantError, match="int4 group size 64") as e:  # the tiny config's MLP width is 96
        quantize_checkpoint(src, tmp_path / "a", "int4", 64, log=None)
    assert "take --group-size 16, 32" in str(e.value)  # what does fit ("32 or 64 for DiffusionGemma" alone misled)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    quantize_checkpoint(src, tmp_path / "b", "int8", log=None)
    with pytest.raises(QuantError, match="already exists"):
        quantize_checkpoint(src, tmp_path / "b", "int8", log=None)
    with pytest.raises(QuantError, match="already quantized"):
        quantize_checkpoint(tmp_path / "b", tmp_path / "c", "int4", 32, log=None)
    assert main(["quantize", str(src), str(tmp_path / "d"), "--scheme", "int8", "--group-size", "32"]) == 2
    (tmp_path / "file").write_text("x")  # a parent that is a file: as unwritable as it gets, even for root
    with pytest.raises(QuantError, match="cannot create the output directory"):  # was a bare [Errno 20]
        quantize_checkpoint(src, tmp_path / "file" / "out", "int8", log=None)


MEASURE = textwrap.dedent("""
    import ctypes, json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from dgemma.quant import convert
    convert.SLICE_BYTES = 2 << 20
    def rss(field):
        return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(field + ":"))
    src, dst, warm = sys.argv[1], sys.argv[2], sys.argv[3]
    convert.quantize_checkpoint(warm, dst + ".warm", "int4", 32, log=None)  # lazy imports and first-op set-up
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    convert.quantize_checkpoint(src, dst, "int4", 32, log=None)
    print(json.dumps({"peak": rss("VmHWM") - base}))
""")


def write_sharded(directory: Path, num_layers: int, D: int, E: int, I: int) -> list[int]:
    """A DiffusionGemma-shaped checkpoint with one shard per layer (random values; only the shapes matter here)."""
    from tests.conftest import make_config
    raw = make_config({"text_config": {"hidden_size": D, "moe_intermediate_size": I, "num_experts": E,
                                       "num_hidden_layers": num_layers, "layer_types": None, "intermediate_size": 64}})
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from dgemma.model.loading import checkpoint_key
    with torch.device("meta"):
        module = DiffusionGemma(ModelConfig.from_dict(raw))
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(raw))
    shards, weight_map = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, t in module.state_dict().items():
        layer = name.split(".")[1] if name.startswith("layers.") else "0"
        file = f"model-{int(layer) + 1:05d}-of-{num_layers:05d}.safetensors"
        shards.setdefault(file, {})[checkpoint_key(name)] = torch.randn(t.shape, generator=g) * 0.02
        weight_map[checkpoint_key(name)] = file
    sizes = []
    for file, tensors in shards.items():
        save_file(tensors, directory / file)
        sizes.append((directory / file).stat().st_size)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sizes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_conversion_peak_memory_stays_below_one_shard(tmp_path):
    sizes = write_sharded(tmp_path / "src", num_layers=3, D=256, E=16, I=256)  # ~13 MiB per shard, ~40 MiB total
    write_sharded(tmp_path / "warm", num_layers=1, D=64, E=2, I=32)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS = live memory
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "src"), str(tmp_path / "q"),
                          str(tmp_path / "warm")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    print(f"int4 conversion: peak {peak / 2**20:.1f} MiB; largest shard {max(sizes) / 2**20:.1f} MiB, "
          f"checkpoint {sum(sizes) / 2**20:.1f} MiB")
    assert peak < max(sizes), (peak, sizes)  # streaming: under one shard, far under the whole checkpoint
