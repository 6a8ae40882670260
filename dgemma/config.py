"""Frozen configuration built once, at the edge, from a checkpoint's own JSON files.

`ModelConfig.from_dict` accepts both spellings that transformers 5.23 reads (spec §2.2 post-init rules):
the released checkpoint's `global_head_dim` / `num_global_key_value_heads` keys, and the
`per_layer_config` dict that `save_pretrained` writes instead. Field names follow the JSON keys.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

MODEL_TYPE = "diffusion_gemma"
TEXT_MODEL_TYPE = "diffusion_gemma_text"


class ConfigError(ValueError):
    """A config.json that dgemma cannot use; the message says which field and what to do."""


def unreadable(path, e: OSError) -> str:
    return f"{path}: cannot be read ({e.strerror or e}); check that it is a file this user may read"


def read_json(path: Path, *, fix: str, error: type[ValueError] = ConfigError):
    """A JSON file's value. A file this process cannot read (permissions, a directory, not UTF-8 text) or that is not
    JSON is an `error` naming the file, what is wrong and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(unreadable(path, e)) from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text (UTF-8) file, so not JSON; {fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "owner/model", as the Hugging Face Hub names models


def missing_path(path) -> str:
    """The message for a model path that does not exist; a name shaped like a Hub name (`owner/model`) is told that
    dgemma reads local directories only (it never downloads)."""
    text = str(path)
    if HUB_NAME.fullmatch(text):
        return (f"{text} does not exist here. If it is a Hugging Face Hub name: dgemma loads local directories only "
                f"and never downloads; download the model first (e.g. `hf download {text} --local-dir DIR` on a "
                "machine with internet access) and pass DIR")
    return f"{text} does not exist; pass a model directory (config.json and model.safetensors or its shards)"


@dataclass(frozen=True)
class ModelConfig:
    """The text model's shape (spec §2.2). Per-layer attention geometry via `head_dim_of` / `num_kv_heads_of`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    moe_intermediate_size: int  # per expert
    num_experts: int
    top_k_experts: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    num_global_key_value_heads: int  # full layers
    layer_types: tuple[str, ...]
    sliding_window: int
    canvas_length: int = 256
    rope_theta_sliding: float = 10000.0
    rope_theta_full: float = 1000000.0
    partial_rotary_factor: float = 0.25  # full layers ("proportional" RoPE)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
                    "top_k_experts", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "global_head_dim", "num_global_key_value_heads", "sliding_window", "canvas_length",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field `{name}` must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta_sliding", "rope_theta_full", "final_logit_softcapping"):
            value = getattr(self, name)
            if not (value is None and name == "final_logit_softcapping") and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf):
                raise ConfigError(f"config field `{name}` must be a positive number, got {value!r}")
        for name, ids in (("pad_token_id", (self.pad_token_id,)), ("bos_token_id", (self.bos_token_id,)),
                          ("eos_token_id", self.eos_token_id)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                shown = ids if name == "eos_token_id" else ids[0]
                raise ConfigError(f"config field `{name}` must be token ids (integers >= 0), got {shown!r}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError(f"`top_k_experts` ({self.top_k_experts}) exceeds `num_experts` ({self.num_experts})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is "
                              f"{self.num_hidden_layers}; give one type per layer")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad} in `layer_types`; expected '{SLIDING}' or '{FULL}'")
        for heads, name in ((self.num_key_value_heads, "num_key_value_heads"),
                            (self.num_global_key_value_heads, "num_global_key_value_heads")):
            if self.num_attention_heads % heads:
                raise ConfigError(f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                                  f"`{name}` ({heads}) for grouped-query attention")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"`hidden_activation` {self.hidden_activation!r} is not supported; DiffusionGemma "
                              "uses 'gelu_pytorch_tanh'")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"`partial_rotary_factor` must be in (0, 1], got {self.partial_rotary_factor}")
        rotated = self.global_head_dim * self.partial_rotary_factor
        if rotated != int(rotated) or int(rotated) % 2:
            raise ConfigError(f"global_head_dim * partial_rotary_factor = {rotated} must be an even integer")
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ConfigError("head dims must be even for rotary embeddings")

    # --- per-layer geometry -------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def head_dim_of(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def num_kv_heads_of(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Build from a HF `config.json` dict (top-level `diffusion_gemma` or a bare text config)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type == MODEL_TYPE:
            text = raw.get("text_config")
            if text is None:
                text = {}
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: `text_config` must be an object")
            canvas_length = raw.get("canvas_length", 256)
            tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
            eos = raw.get("eos_token_id")
            eos = text.get("eos_token_id") if eos is None else eos
        elif model_type == TEXT_MODEL_TYPE:
            text, canvas_length = raw, raw.get("canvas_length", 256)
            tie, eos = raw.get("tie_word_embeddings", True), raw.get("eos_token_id")
        else:
            raise ConfigError(f"{source}: unknown model_type {model_type!r}; dgemma runs DiffusionGemma checkpoints "
                              f"(model_type '{MODEL_TYPE}'). Point --model at a DiffusionGemma directory.")
        if tie is False:
            raise ConfigError(f"{source}: tie_word_embeddings=false (untied encoder/decoder/head) is not supported; "
                              "the released checkpoint ties them")

        def get(key, default=None, required=False):
            if key in text and text[key] is not None:
                return text[key]
            if required:
                raise ConfigError(f"{source}: text_config is missing required field `{key}`")
            return default

        def mapping(value, name) -> dict:  # a JSON object (null: empty)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: `{name}` must be a JSON object, got {value!r}")
            return value or {}

        def number(value, name) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: `{name}` must be a number, got {value!r}")
            return float(value)

        num_layers = get("num_hidden_layers", 30)
        layer_types = get("layer_types")
        if layer_types is None:  # spec §2.2 rule 2: every 6th layer is full attention
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
        if not isinstance(layer_types, list):
            raise ConfigError(f"{source}: `layer_types` must be a list of '{SLIDING}' / '{FULL}', got {layer_types!r}")
        layer_types = list(layer_types)
        if layer_types and layer_types[-1] != FULL:  # rule 2: the last layer is forced to full attention
            layer_types[-1] = FULL

        head_dim = get("head_dim", 256)
        kv_heads = get("num_key_value_heads", 4)
        global_head_dim = get("global_head_dim")
        global_kv = get("num_global_key_value_heads")
        per_layer = mapping(get("per_layer_config"), "per_layer_config")
        if per_layer:  # the spelling save_pretrained writes: {"05": {"head_dim": 512, ...}, ...}
            overrides = {int(k): mapping(v, f"per_layer_config.{k}") for k, v in per_layer.items() if str(k).isdigit()}
            for i, over in overrides.items():
                if i >= len(layer_types):
                    raise ConfigError(f"{source}: per_layer_config names layer {i} but there are {len(layer_types)}")
                if layer_types[i] != FULL:
                    raise ConfigError(f"{source}: per_layer_config overrides sliding layer {i}; only full-attention "
                                      "layers may differ in shape")
            full_over = [overrides.get(i, {}) for i, t in enumerate(layer_types) if t == FULL]
            for key, current in (("head_dim", global_head_dim), ("num_key_value_heads", global_kv)):
                values = {o.get(key) for o in full_over}
                if len(values) > 1:
                    raise ConfigError(f"{source}: full-attention layers disagree on `{key}` "
                                      f"({sorted(map(str, values))}); dgemma supports one shape per layer kind")
            # a full layer without an override keeps the global value (per_layer_config only lists changes)
            first = full_over[0] if full_over else {}
            global_head_dim = global_head_dim or first.get("head_dim") or head_dim
            global_kv = global_kv or first.get("num_key_value_heads") or kv_heads
        if global_head_dim is None:
            global_head_dim = 512  # class default (spec §2.2)
        if global_kv is None:
            global_kv = kv_heads  # spec §2.2 rule 3 gotcha: omitted -> full layers use the sliding count

        rope = mapping(get("rope_parameters"), "rope_parameters")
        sliding_rope = mapping(rope.get(SLIDING), f"rope_parameters.{SLIDING}")
        full_rope = mapping(rope.get(FULL), f"rope_parameters.{FULL}")
        if sliding_rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: sliding rope_type {sliding_rope.get('rope_type')!r} is not supported")
        if full_rope.get("rope_type", "proportional") != "proportional":
            raise ConfigError(f"{source}: full-attention rope_type {full_rope.get('rope_type')!r} is not supported")
        if get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: use_bidirectional_attention='all' (non-causal encoder) is not supported")
        eos = [1] if eos is None else [eos] if not isinstance(eos, list) else eos
        fields = dict(
            vocab_size=get("vocab_size", 262144),
            hidden_size=get("hidden_size", 2304),
            intermediate_size=get("intermediate_size", 9216),
            moe_intermediate_size=get("moe_intermediate_size", required=True),
            num_experts=get("num_experts", required=True),
            top_k_experts=get("top_k_experts", required=True),
            num_hidden_layers=num_layers,
            num_attention_heads=get("num_attention_heads", 8),
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            layer_types=tuple(layer_types),
            sliding_window=get("sliding_window", 512),
            canvas_length=canvas_length,
            rope_theta_sliding=number(sliding_rope.get("rope_theta", 10000.0), f"{SLIDING} rope_theta"),
            rope_theta_full=number(full_rope.get("rope_theta", 1000000.0), f"{FULL} rope_theta"),
            partial_rotary_factor=number(full_rope.get("partial_rotary_factor", 0.25), "partial_rotary_factor"),
            rms_norm_eps=number(get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            # an explicit null turns soft-capping off (logits used as the head computes them), as the field's
            # type says and as Gemma configs use it; a missing field is the class default 30.0 (spec §2.2)
            final_logit_softcapping=text["final_logit_softcapping"] if "final_logit_softcapping" in text else 30.0,
            max_position_embeddings=get("max_position_embeddings", 131072),
            pad_token_id=get("pad_token_id", 0),
            bos_token_id=get("bos_token_id", 2),
            eos_token_id=tuple(eos),
            tie_word_embeddings=True,
            hidden_activation=get("hidden_activation", "gelu_pytorch_tanh"),
            extra={"raw": raw},
        )
        try:
            return cls(**fields)
        except ConfigError as e:  # a value out of range: say which file it came from
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        if not Path(path).exists():
            raise ConfigError(missing_path(path))
        path = Path(path)
        if is_adapter(path):  # a LoRA adapter directory: the merged model has its base model's config
            chain = model_chain(path)
            config = cls.from_file(chain[-1])
            for adapter in chain[:-1]:
                check_adapter_shape(adapter, config)
            return config
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such file; pass a model directory containing config.json, a LoRA adapter "
                              f"directory ({ADAPTER_CONFIG_FILE}), or a config.json file")
        return cls.from_dict(read_json(path, fix="pass a model directory or its config.json"), source=str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
ADAPTER_CONFIG_FILE = "adapter_config.json"  # what marks a LoRA adapter directory (model/lora.py writes it)
ADAPTER_FORMAT = "dgemma-lora"
UNRECORDED_BASE = "a DiffusionGemma checkpoint with the shape below (not recorded by name)"  # older save_adapter
ADAPTER_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts")  # its "base_shape"


def is_adapter(directory: str | Path) -> bool:
    """A LoRA adapter directory (`dgemma train --mode lora` writes RUN/adapter and RUN/checkpoints/step-N):
    adapter_config.json and no config.json. It loads as its base model with the adapter merged in."""
    directory = Path(directory)
    return (directory / ADAPTER_CONFIG_FILE).is_file() and not (directory / "config.json").exists()


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter directory, checked to be dgemma's (PEFT writes a file of that name too)."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    meta = read_json(path, fix="it should be the adapter_config.json that `dgemma train --mode lora` writes")
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ConfigError(f"{path}: not a dgemma LoRA adapter (format {found!r}, expected {ADAPTER_FORMAT!r}; PEFT "
                          "writes a file of this name too); dgemma loads the adapters `dgemma train --mode lora` "
                          "writes, or model directories (config.json and model.safetensors)")
    missing = [k for k in ("rank", "alpha", "targets", "dropout") if k not in meta]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}; the file is damaged: write it again with "
                          "dgemma.model.lora.save_adapter, or use the run's merged model (RUN/model)")
    return meta


def adapter_base(directory: str | Path) -> Path:
    """The base model directory a LoRA adapter records ("base_model" in its adapter_config.json; `dgemma train`
    records an absolute path, a relative one is taken from the adapter directory), checked to exist."""
    directory = Path(directory)
    recorded = read_adapter_config(directory).get("base_model")
    fix = (f'set "base_model" in {directory / ADAPTER_CONFIG_FILE} to the directory of the model the adapter was '
           "trained on")
    if not isinstance(recorded, str) or not recorded.strip() or recorded == UNRECORDED_BASE:
        raise ConfigError(f"{directory} is a LoRA adapter that does not record its base model (base_model: "
                          f"{recorded!r}); {fix}")
    base = Path(recorded).expanduser()
    shown = str(base) if base.is_absolute() else f"{recorded} (relative to the adapter directory: {directory / base})"
    base = base if base.is_absolute() else directory / base
    if not base.exists():
        raise ConfigError(f"{directory} is a LoRA adapter on the base model {shown}, which does not exist (moved or "
                          f"deleted?); put the base model back there, or {fix}")
    if not base.is_dir() or not ((base / "config.json").is_file() or is_adapter(base)):
        raise ConfigError(f"{directory} is a LoRA adapter on the base model {shown}, which is not a model directory "
                          f"(no config.json); {fix}")
    return base


def model_chain(path: str | Path) -> list[Path]:
    """[path] for a model directory; for a LoRA adapter [adapter, its base, ...] down to the model directory its
    weights start from (an adapter trained on an adapter's merged model records that adapter as its base)."""
    chain = [Path(path)]
    while is_adapter(chain[-1]):
        base = adapter_base(chain[-1])
        if any(base.resolve() == seen.resolve() for seen in chain):
            raise ConfigError(f"LoRA adapters name each other as base models in a loop ({' -> '.join(map(str, chain))} "
                              f"-> {base}); set \"base_model\" in {chain[-1] / ADAPTER_CONFIG_FILE} to the directory "
                              "of the model the adapter was trained on")
        chain.append(base)
    return chain


def model_file(path: str | Path, name: str) -> Path | None:
    """The file `name` (tokenizer.json, generation_config.json, ...) that goes with a model directory: its own, or for
    a LoRA adapter its own if it has one, else its base model's; None when none has it."""
    return next((d / name for d in model_chain(path) if (d / name).is_file()), None)


def check_adapter_shape(directory: Path, config: "ModelConfig") -> None:
    """An adapter's recorded base shape against the base model it names (another model's weights would not fit)."""
    recorded = read_adapter_config(directory).get("base_shape")
    if not isinstance(recorded, dict):
        return
    actual = {k: getattr(config, k) for k in ADAPTER_SHAPE_KEYS}
    wrong = {k: v for k, v in recorded.items() if k in actual and v != actual[k]}
    if wrong:
        raise ConfigError(f"{directory} is a LoRA adapter trained on a model with {wrong}, but its base model "
                          f"{adapter_base(directory)} has {({k: actual[k] for k in wrong})}: that is another model; "
                          f'set "base_model" in {directory / ADAPTER_CONFIG_FILE} to the directory of the model the '
                          "adapter was trained on")


def check_temperatures(t_min, t_max) -> None:
    """The temperature schedule's bounds: finite numbers >= 0 or None (None disables the schedule), t_max > t_min."""
    for name, v in (("t_min", t_min), ("t_max", t_max)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
            raise ConfigError(f"{name} must be a finite number >= 0 or None, got {v!r}")
    if t_min is not None and t_max is not None and not t_max > t_min:
        raise ConfigError(f"t_max must be greater than t_min, got t_min={t_min}, t_max={t_max}")


@dataclass(frozen=True)
class GenerationConfig:
    """Generation knobs with the reference's names and defaults (spec §2.3, §9.4).

    Built from `generation_config.json`, where `null` means "unset" (transformers writes nulls for unset
    fields): unset fields take the global defaults below. `eos_token_id` / `pad_token_id` stay None unless
    the file sets them, exactly like the reference (the released checkpoint sets [1, 106, 50] and 0).
    At call time a knob passed explicitly as None disables what the reference disables."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float | None = 0.4
    t_max: float | None = 0.8
    stability_threshold: int | None = 1
    confidence_threshold: float | None = 0.005
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # the reference's total-length cap (prompt included), read by `Engine.generate` only (engine/generate.py
    # `fit_max_length`); the text API caps with max_tokens
    max_length: int | None = None
    # dgemma's own (not in the reference): settled positions (engine/settle.py, approximate; None = off, exact)
    settle_after: int | None = None  # steps a position's argmax must hold before it settles
    settle_entropy: float = 0.01  # ... with its entropy (nats) below this

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.max_denoising_steps) or self.max_denoising_steps < 1:
            raise ConfigError(f"max_denoising_steps must be an integer >= 1, got {self.max_denoising_steps!r}")
        if isinstance(self.entropy_bound, bool) or not isinstance(self.entropy_bound, (int, float)) \
                or not 0 < self.entropy_bound < float("inf"):  # the rule's own check (sampling/acceptance.py)
            raise ConfigError(f"entropy_bound must be a finite number > 0, got {self.entropy_bound!r}")
        check_temperatures(self.t_min, self.t_max)
        if self.stability_threshold is not None and (not is_int(self.stability_threshold)
                                                     or self.stability_threshold < 0):
            raise ConfigError(f"stability_threshold must be an integer >= 0 or None, got {self.stability_threshold!r}")
        if self.confidence_threshold is not None and (isinstance(self.confidence_threshold, bool) or not isinstance(
                self.confidence_threshold, (int, float)) or not self.confidence_threshold > 0):
            raise ConfigError(f"confidence_threshold must be a number > 0 or None, got {self.confidence_threshold!r}")
        if self.eos_token_id is not None and not all(is_int(i) and i >= 0 for i in self.eos_token_id):
            raise ConfigError(f"eos_token_id must be token ids, got {self.eos_token_id!r}")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise ConfigError(f"pad_token_id must be a token id or None, got {self.pad_token_id!r}")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            raise ConfigError(f"max_length must be an integer >= 1 (prompt included) or None, got {self.max_length!r}")
        if self.settle_after is not None and (not is_int(self.settle_after) or self.settle_after < 1):
            raise ConfigError(f"settle_after must be an integer >= 1 (steps a position's argmax must hold before it "
                              f"settles) or None (off), got {self.settle_after!r}")
        if isinstance(self.settle_entropy, bool) or not isinstance(self.settle_entropy, (int, float)) \
                or not self.settle_entropy > 0:
            raise ConfigError(f"settle_entropy must be a number > 0 (nats), got {self.settle_entropy!r}")

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "generation_config") -> "GenerationConfig":
        """generation_config.json's fields (null = unset: the global default); keys the reference does not read are
        ignored, as transformers ignores them."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object of generation settings, got {type(raw).__name__}")
        kwargs = set_knobs({k: v for k, v in raw.items() if k in REFERENCE_KNOBS}, source=source)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | Path) -> "GenerationConfig":
        path = Path(directory) / "generation_config.json"
        if not path.exists():
            return cls()
        return cls.from_dict(read_json(path, fix="fix or delete the file"), source=str(path))


# the fields of the reference's generation config (spec §2.3, §9.4) that change what dgemma computes ...
REFERENCE_KNOBS = ("max_new_tokens", "max_length", "max_denoising_steps", "sampler_config", "t_min", "t_max",
                   "stability_threshold", "confidence_threshold", "eos_token_id", "pad_token_id")
# ... and those that do not (the reference's cache, compilation and output-format options): accepted, ignored
REFERENCE_INERT = ("return_dict_in_generate", "cache_implementation", "cache_config", "disable_compile",
                   "bos_token_id", "transformers_version")


def entropy_bound_of(sampler, *, source: str = "sampler_config") -> float | None:
    """The entropy bound of a `sampler_config`: the reference's EntropyBoundSamplerConfig or its dict form
    ({"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": x}, as generation_config.json stores it)."""
    if isinstance(sampler, dict):
        if sampler.get("_cls_name", "EntropyBoundSamplerConfig") == "EntropyBoundSamplerConfig" \
                and set(sampler) <= {"_cls_name", "entropy_bound"}:
            return sampler.get("entropy_bound")  # None: unset
    elif type(sampler).__name__ == "EntropyBoundSamplerConfig" and hasattr(sampler, "entropy_bound"):
        return sampler.entropy_bound
    raise ConfigError(f"{source}: unsupported sampler_config {sampler!r}; dgemma reads an EntropyBoundSamplerConfig "
                      "(or {'entropy_bound': x}), or pass entropy_bound=x")


def eos_ids(value) -> tuple[int, ...]:
    """eos_token_id as the configs store it: one id or a list of them -> a tuple."""
    return (value,) if isinstance(value, int) else tuple(value)


def set_knobs(raw: dict, *, source: str = "generation_config", strict: bool = False) -> dict:
    """Generation settings by the reference's names (and GenerationConfig's own) -> GenerationConfig field values,
    leaving out the unset ones (None, as in the reference's config files and objects). strict (a caller's
    generation_config=): a key that is neither is a ConfigError naming it; the reference's inert fields and private
    `_` keys are ignored."""
    fields = GenerationConfig.__dataclass_fields__
    if raw.get("sampler_config") is not None and raw.get("entropy_bound") is not None:
        raise ConfigError(f"{source}: give sampler_config or entropy_bound, not both (two spellings of one knob)")
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in REFERENCE_INERT:
            continue
        if key not in fields and key != "sampler_config":
            if strict:
                raise ConfigError(f"{source}: unknown generation setting {key!r}; known: "
                                  f"{sorted(set(fields) | {'sampler_config'})}")
            continue
        if value is None:
            continue
        if key == "sampler_config":
            key, value = "entropy_bound", entropy_bound_of(value, source=source)
            if value is None:
                continue
        elif key == "eos_token_id":
            value = eos_ids(value)
        kwargs[key] = value
    return kwargs


def passed_settings(config) -> dict:
    """A caller's generation_config= other than a GenerationConfig -> the field values it sets: a dict of knobs
    (GenerationConfig's names or the reference's), or the reference's DiffusionGemmaGenerationConfig (its attributes).
    As in the reference, an unset (None) field keeps the default; a key dgemma does not know is a ConfigError."""
    if isinstance(config, dict):
        return set_knobs(config, source="generation_config", strict=True)
    if hasattr(config, "__dict__"):
        return set_knobs(vars(config), source=f"generation_config ({type(config).__name__})", strict=True)
    raise ConfigError(f"generation_config must be a dgemma GenerationConfig, the reference's "
                      f"DiffusionGemmaGenerationConfig or a dict of knobs, got {type(config).__name__}")
