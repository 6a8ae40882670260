"""Loading checkpoints: what save_pretrained writes loads (single file and shards, fp32 and bf16, without copies),
and every broken checkpoint fails with a message that names the file and the key (or field)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from conftest import F, S
from dgemma import CheckpointError, ConfigError
from dgemma.cli import main

KEY = "model.decoder.layers.1.mlp.up_proj.weight"


@pytest.fixture
def checkpoint(reference_checkpoint, tmp_path):
    """A private, writable copy of the tiny single-file checkpoint: (ref_model, dir, model.safetensors path)."""
    ref, path = reference_checkpoint()
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    return ref, copy, copy / "model.safetensors"


@pytest.fixture
def sharded(reference_checkpoint, tmp_path):
    ref, path = reference_checkpoint(sharded=True)
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    return ref, copy


def rewrite(file: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict, save it back (the format's own writer)."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def read_header(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(file: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def load_error(path, error=CheckpointError) -> str:
    with pytest.raises(error) as info:
        dgemma.load(path, quiet=True)
    return str(info.value)


def reference_tensor(ref, name: str) -> torch.Tensor:
    """The reference model's tensor for one of our state-dict names."""
    state = ref.state_dict()
    if name.endswith("encoder_layer_scalar"):
        return state["model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")]
    return state["model.decoder." + name]


# --- what loads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [False, True], ids=["single-file", "sharded"])
def test_loads_every_tensor_from_the_checkpoint(reference_checkpoint, shards):
    ref, path = reference_checkpoint(sharded=shards)
    if shards:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    engine = dgemma.load(path, quiet=True)
    state = engine.module.state_dict()
    assert len(state) > 0
    for name, tensor in state.items():
        assert torch.equal(tensor, reference_tensor(ref, name)), name
    # the two scalar sets are different in this checkpoint, so each must have come from its own key
    layer = engine.module.layers[0]
    assert not torch.equal(layer.layer_scalar, layer.encoder_layer_scalar)
    assert engine.module.embed_tokens.weight.dtype == torch.float32


def test_vision_notice_printed_once_to_stderr_and_quiet_silences_it(reference_checkpoint, capsys):
    _, path = reference_checkpoint()
    dgemma.load(path)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "vision" in line]
    assert len(lines) == 1, err
    assert out == ""
    dgemma.load(path, quiet=True)
    out, err = capsys.readouterr()
    assert "vision" not in err and out == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bfloat16_loads_and_runs(reference_checkpoint, dtype):
    _, path = reference_checkpoint()
    engine = dgemma.load(path, dtype=dtype, quiet=True)
    cfg = engine.config
    assert engine.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in engine.module.state_dict().values())
    cache = engine.new_cache(1)
    engine.encode(torch.randint(0, cfg.vocab_size, (1, 11)), cache)
    assert cache.keys[0].dtype == torch.bfloat16
    logits = engine.denoise(torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length)), cache)
    assert logits.dtype == torch.float32 and logits.shape == (1, cfg.canvas_length, cfg.vocab_size)
    assert torch.isfinite(logits).all() and logits.abs().max() <= cfg.final_logit_softcapping


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process has `file` memory-mapped (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(file.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_matching_dtype_is_not_copied(reference_checkpoint):
    """With the stored dtype, every parameter is a view into the file's memory map (no second copy in RAM);
    converting to bf16 necessarily copies, which shows the check can tell the two apart."""
    _, path = reference_checkpoint()
    file = path / "model.safetensors"

    def in_map(engine):
        ranges = mapped_ranges(file)
        assert ranges, "checkpoint file is not memory-mapped"
        ptrs = [t.untyped_storage().data_ptr() for t in engine.module.state_dict().values()]
        return [any(lo <= p < hi for lo, hi in ranges) for p in ptrs]

    same = dgemma.load(path, quiet=True)
    assert all(in_map(same))
    converted = dgemma.load(path, dtype=torch.bfloat16, quiet=True)
    assert not any(in_map(converted))


def test_untied_duplicate_equal_to_its_twin_loads(checkpoint):
    ref, path, file = checkpoint

    def add_twins(t):
        t["model.encoder.language_model.layers.0.mlp.up_proj.weight"] = \
            t["model.decoder.layers.0.mlp.up_proj.weight"].clone()
        t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"].clone()

    rewrite(file, add_twins)
    engine = dgemma.load(path, quiet=True)
    assert torch.equal(engine.module.layers[0].mlp.up_proj.weight, reference_tensor(ref, "layers.0.mlp.up_proj.weight"))


@pytest.mark.parametrize("key,twin", [
    ("model.encoder.language_model.layers.0.mlp.up_proj.weight", "model.decoder.layers.0.mlp.up_proj.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
])
def test_untied_duplicate_that_differs_is_an_error(checkpoint, key, twin):
    _, path, file = checkpoint

    def add_twin(t):
        t[key] = t[twin].clone()
        t[key][0, 0] += 1.0

    rewrite(file, add_twin)
    msg = load_error(path)
    assert str(file) in msg and key in msg


# --- what fails, and how it says so -----------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, "model.encoder.language_model.layers.2.layer_scalar"])
def test_missing_tensor(checkpoint, key):
    _, path, file = checkpoint
    rewrite(file, lambda t: t.pop(key))
    msg = load_error(path)
    assert key in msg and str(file) in msg


def test_unexpected_tensor(checkpoint):
    _, path, file = checkpoint
    key = "model.decoder.layers.0.mlp.extra_proj.weight"
    rewrite(file, lambda t: t.__setitem__(key, torch.zeros(4, 4)))
    msg = load_error(path)
    assert key in msg and str(file) in msg


def test_wrongly_shaped_tensor(checkpoint):
    _, path, file = checkpoint
    rewrite(file, lambda t: t.__setitem__(KEY, t[KEY][:-1].clone()))
    msg = load_error(path)
    assert KEY in msg and str(file) in msg and "shape" in msg


def test_integer_tensor_for_a_float_weight(checkpoint):
    _, path, file = checkpoint
    rewrite(file, lambda t: t.__setitem__(KEY, t[KEY].to(torch.int32)))
    msg = load_error(path)
    assert KEY in msg and str(file) in msg and "torch.int32" in msg and "floating point" in msg


def test_mixed_float_dtypes_load_in_the_dtype_that_holds_most_bytes(checkpoint, capsys):
    """A checkpoint whose float weights are stored in several dtypes runs in one (it failed in its first matmul)."""
    ref, path, file = checkpoint
    embed = "model.decoder.embed_tokens.weight"
    rewrite(file, lambda t: [t.__setitem__(k, t[k].to(torch.bfloat16)) for k in (embed, KEY)])
    mixed = dgemma.load(path)
    assert {t.dtype for t in mixed.module.state_dict().values()} == {torch.float32}
    assert "several dtypes" in capsys.readouterr().err
    stored = reference_tensor(ref, "embed_tokens.weight").bfloat16().float()
    assert torch.equal(mixed.module.embed_tokens.weight, stored)
    same = dgemma.load(path, dtype=torch.float32, quiet=True)
    prompt, canvas = (torch.randint(0, mixed.config.vocab_size, (1, n)) for n in (9, mixed.config.canvas_length))
    logits = []
    for engine in (mixed, same):
        cache = engine.new_cache(1)
        engine.encode(prompt, cache)
        logits.append(engine.denoise(canvas, cache))
    assert torch.isfinite(logits[0]).all() and torch.equal(*logits)


def test_truncated_file_names_a_cut_tensor(checkpoint):
    _, path, file = checkpoint
    header, body = read_header(file)
    size = file.stat().st_size
    cut = size - 1000
    data_start = size - len(body)
    cut_keys = [k for k, v in header.items() if k != "__metadata__" and data_start + v["data_offsets"][1] > cut]
    assert cut_keys
    with open(file, "r+b") as f:
        f.truncate(cut)
    msg = load_error(path)
    assert str(file) in msg and "truncated" in msg
    assert any(f"'{k}'" in msg for k in cut_keys), msg


@pytest.mark.parametrize("keep", [5, 200], ids=["inside-length-prefix", "inside-header"])
def test_truncated_header(checkpoint, keep):
    _, path, file = checkpoint
    with open(file, "r+b") as f:
        f.truncate(keep)
    msg = load_error(path)
    assert str(file) in msg and "truncated" in msg


def test_corrupt_header(checkpoint):
    _, path, file = checkpoint
    data = bytearray(file.read_bytes())
    data[8:24] = b"\xff\xfe garbage!!!!!!"[:16]
    file.write_bytes(bytes(data))
    msg = load_error(path)
    assert str(file) in msg and "header" in msg


def test_header_with_unsupported_dtype(checkpoint):
    _, path, file = checkpoint
    header, body = read_header(file)
    header[KEY]["dtype"] = "Q4_K"
    write_header(file, header, body)
    msg = load_error(path)
    assert str(file) in msg and KEY in msg and "Q4_K" in msg


def test_header_whose_byte_range_disagrees_with_the_shape(checkpoint):
    _, path, file = checkpoint
    header, body = read_header(file)
    header[KEY]["shape"] = [header[KEY]["shape"][0] + 1, header[KEY]["shape"][1]]
    write_header(file, header, body)
    msg = load_error(path)
    assert str(file) in msg and KEY in msg


def test_unknown_model_type(checkpoint):
    _, path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(config))
    msg = load_error(path, ConfigError)
    assert str(path / "config.json") in msg and "model_type" in msg and "gemma4" in msg


def test_missing_config_json(checkpoint):
    _, path, _ = checkpoint
    (path / "config.json").unlink()
    msg = load_error(path, ConfigError)
    assert str(path / "config.json") in msg


GLOBAL = {"per_layer_config": None, "global_head_dim": 32, "num_global_key_value_heads": 1}


@pytest.mark.parametrize("change,key_fragment", [
    ({"hidden_size": 48}, "model.decoder."),  # every tensor's shape is off; one is named
    ({"num_experts": 3}, "model.decoder.layers.0."),
    ({"intermediate_size": 80}, "model.decoder.layers.0.mlp."),
    ({"num_global_key_value_heads": 2}, "model.decoder.layers.1.self_attn.k_proj.weight"),
    ({**GLOBAL, "num_hidden_layers": 2, "layer_types": [S, F]}, "model.decoder.layers.2."),  # layers 2-3 unexpected
    ({**GLOBAL, "num_hidden_layers": 5, "layer_types": [S, F, S, F, F]}, "model.decoder.layers.4."),  # 4 missing
], ids=["hidden_size", "num_experts", "intermediate_size", "global_kv_heads", "fewer-layers", "more-layers"])
def test_config_that_does_not_fit_the_weights(checkpoint, change, key_fragment):
    _, path, file = checkpoint
    config = json.loads((path / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            config["text_config"].pop(k)
        else:
            config["text_config"][k] = v
    (path / "config.json").write_text(json.dumps(config))
    msg = load_error(path)
    assert key_fragment in msg and str(file) in msg, msg


def test_shard_index_naming_a_missing_shard(sharded):
    _, path = sharded
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][KEY] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    msg = load_error(path)
    assert str(index_file) in msg and "model-00099-of-00099.safetensors" in msg


def test_shard_index_pointing_at_the_wrong_shard(sharded):
    _, path = sharded
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    other = next(f for f in files if f != index["weight_map"][KEY])
    index["weight_map"][KEY] = other
    index_file.write_text(json.dumps(index))
    msg = load_error(path)
    assert str(index_file) in msg and KEY in msg and other in msg


def test_a_stray_copy_in_another_shard_is_ignored_as_the_index_says(sharded):
    """A tensor also stored (with other values) in a shard the index does not name for it: the index's copy loads
    (the error claimed the named shard did not contain it); stored twice and named by no index entry, it is an error."""
    ref, path = sharded
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    weight_map = index["weight_map"]
    last = max(weight_map.values())  # the stray copy goes in the shard read last, so it is what the loader saw last
    key = next(k for k, f in weight_map.items() if f != last and sum(g == f for g in weight_map.values()) > 1)
    name, other = key[len("model.decoder."):], path / last
    rewrite(other, lambda t: t.__setitem__(key, torch.zeros_like(reference_tensor(ref, name))))
    engine = dgemma.load(path, quiet=True)
    assert torch.equal(engine.module.get_parameter(name), reference_tensor(ref, name))
    del weight_map[key]
    index_file.write_text(json.dumps(index))
    msg = load_error(path)
    assert key in msg and str(other) in msg and "both" in msg


def test_missing_tensor_in_a_sharded_checkpoint(sharded):
    _, path = sharded
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = path / index["weight_map"].pop(KEY)
    index_file.write_text(json.dumps(index))
    rewrite(shard, lambda t: t.pop(KEY))
    msg = load_error(path)
    assert KEY in msg and str(index_file) in msg


def test_not_a_directory_and_no_weights(tmp_path, checkpoint):
    _, path, file = checkpoint
    msg = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg
    file.unlink()
    msg = load_error(path)
    assert str(path) in msg and "model.safetensors" in msg


def test_a_hub_name_is_told_that_dgemma_never_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the name is no local path here
    name = "google/diffusiongemma-26B-A4B-it"
    for msg in (load_error(name), str(pytest.raises(ConfigError, dgemma.ModelConfig.from_file, name).value)):
        assert msg.startswith(name) and "never downloads" in msg and f"hf download {name} --local-dir DIR" in msg
    for argv in (["generate", "--model", name, "Hi"], ["inspect", name], ["chat", "--model", name]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "never downloads" in err and "Traceback" not in err, err
    assert "Hub" not in load_error(tmp_path / "nowhere")  # a path that is plainly local is not called a Hub name


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_a_file_instead_of_the_model_directory_names_its_directory(checkpoint, file, capsys):
    _, path, _ = checkpoint
    msg = load_error(path / file)
    assert f"{path / file} is a file, not a model directory" in msg and msg.endswith(str(path))
    assert main(["generate", "--model", str(path / file), "Hi"]) == 2
    assert "is a file, not a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors",
                                  "model.safetensors.index.json"])
def test_a_model_file_that_cannot_be_read_is_a_clear_error(checkpoint, name, capsys):
    """An OSError on a model file (here a directory in its place; a file without read permission alike) names the
    file: no traceback from the CLI, a ConfigError / CheckpointError from the library."""
    _, path, _ = checkpoint
    (path / name).unlink(missing_ok=True)
    (path / name).mkdir()
    with pytest.raises((ConfigError, CheckpointError), match="cannot be read \\(Is a directory\\)") as info:
        dgemma.load(path, quiet=True)
    assert str(path / name) in str(info.value)
    for argv in (["generate", "--model", str(path), "Hi"], ["inspect", str(path)]):
        if name == "generation_config.json" and argv[0] == "inspect":
            continue  # inspect reads no generation settings
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {path / name}: cannot be read" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name,content,message", [
    ("config.json", b"\x80\x81 not text", "not a text (UTF-8) file"),
    ("generation_config.json", b"[1, 2]", "expected a JSON object of generation settings, got list"),
    ("model.safetensors.index.json", b'{"weight_map": ["a", "b"]}', "not a valid shard index"),
], ids=["binary-config", "generation-config-list", "index-weight-map-list"])
def test_a_model_json_file_of_the_wrong_kind_names_the_file(checkpoint, name, content, message):
    _, path, _ = checkpoint
    (path / name).write_bytes(content)
    with pytest.raises((ConfigError, CheckpointError)) as info:
        dgemma.load(path, quiet=True)
    assert str(info.value).startswith(f"{path / name}: ") and message in str(info.value), info.value


def test_inspect_on_a_weights_file_says_what_to_pass(checkpoint, capsys):
    _, path, file = checkpoint
    assert main(["inspect", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"{file}: not a text (UTF-8) file" in err and "pass a model directory or its config.json" in err, err


def test_unusable_device_or_dtype_is_a_clear_error(reference_checkpoint):
    """Bad device/dtype values are ValueErrors that name the value (not a torch traceback or a KeyError)."""
    _, path = reference_checkpoint()
    for device in ["bogus", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(ValueError, match=f"device '{device}' is not usable here"):
            dgemma.load(path, device=device, quiet=True)
    with pytest.raises(ValueError, match="unknown dtype 'float64'; use one of float32"):
        dgemma.load(path, dtype="float64", quiet=True)
    with pytest.raises(ValueError, match="floating-point"):
        dgemma.load(path, dtype=torch.int8, quiet=True)


def test_header_that_is_json_but_not_an_object(checkpoint):
    _, path, file = checkpoint
    _, body = read_header(file)
    write_header(file, [1, 2, 3], body)
    msg = load_error(path)
    assert str(file) in msg and "header" in msg


@pytest.mark.parametrize("field", ["data_offsets", "shape", "dtype"])
def test_header_entry_missing_a_field(checkpoint, field):
    _, path, file = checkpoint
    header, body = read_header(file)
    del header[KEY][field]
    write_header(file, header, body)
    msg = load_error(path)
    assert str(file) in msg and KEY in msg


# --- dgemma inspect ----------------------------------------------------------------------------------------


def inspect_json(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("target", ["directory", "config.json"])
def test_inspect_counts_the_parameters_the_reference_and_the_loaded_model_have(reference_checkpoint, capsys, target):
    """Parameters, not buffers: the reference's text stack (transformers as the oracle) and the loaded module agree;
    the layer_scalar buffers (one per layer for each pass) are reported apart."""
    ref, path = reference_checkpoint()
    out = inspect_json(path if target == "directory" else path / "config.json", capsys)
    reference = sum(p.numel() for p in ref.model.decoder.parameters())
    loaded = dgemma.load(path, quiet=True).module
    assert out["total_parameters"] == reference == sum(p.numel() for p in loaded.parameters())
    assert sum(out["by_component"].values()) == out["total_parameters"]
    scalars = sum(b.numel() for b in loaded.buffers())
    assert out["layer_scalar_buffers"] == scalars == 2 * loaded.config.num_hidden_layers
    assert (out["stored_bytes_by_dtype"] is None) == (target == "config.json")


@pytest.mark.parametrize("name", ["default", "sudoku"])
def test_bundled_model_cards_state_the_parameter_count_inspect_reports(name, capsys):
    directory = Path(dgemma.__file__).parent / "models" / name
    row = next(line for line in (directory / "README.md").read_text().splitlines() if line.startswith("| parameters |"))
    stated = int(row.split("|")[2].split()[0].replace(",", ""))
    assert stated == inspect_json(directory, capsys)["total_parameters"]


def test_stop_ids_outside_the_vocabulary_are_a_warning_at_load(tmp_path, capsys):
    """An eos_token_id no token can be (a generation_config.json written for another tokenizer) meant generation
    silently never stopped on it; load now warns, naming the file, the field and the vocabulary's range, and
    quiet=True (or a clean model) prints nothing."""
    import json
    import shutil

    import dgemma
    from dgemma.bundled import PACKAGED

    dgemma.load(PACKAGED)
    assert capsys.readouterr().err == ""
    model = tmp_path / "m"
    shutil.copytree(PACKAGED, model)
    path = model / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [1, 5000], "pad_token_id": 4096}))
    engine = dgemma.load(model)
    err = capsys.readouterr().err
    assert f"{path}: eos_token_id 5000 is outside the model's vocabulary (ids 0 to 4095)" in err
    assert f"{path}: pad_token_id 4096 is outside" in err and f"{model / 'config.json'}:" not in err
    assert engine.generation_config.eos_token_id == (1, 5000)  # loaded as the reference loads it
    dgemma.load(model, quiet=True)
    assert capsys.readouterr().err == ""


def test_build_random_model_takes_a_string_path(tmp_path):
    """bundled.build_random_model(str) (the helper tests and users call to make a throwaway model) crashed on
    `str.with_name`; it takes a str or a Path and returns the directory, which loads."""
    import dgemma
    from dgemma.bundled import build_random_model

    made = build_random_model(str(tmp_path / "m"))
    assert made == tmp_path / "m" and dgemma.load(made, quiet=True).config.canvas_length == 64
