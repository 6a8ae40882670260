"""Engine: a loaded model plus everything that lives longer than one call (what `dgemma.load` returns)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import torch

from ..config import (REFERENCE_INERT, ConfigError, GenerationConfig, ModelConfig, entropy_bound_of, eos_ids,
                      model_file, passed_settings)
from ..model import DiffusionGemma, load_module
from ..quant.modules import swap_for_checkpoint
from ..text import Tokenizer
from .cache import KVCache
from .generate import ContextError, GenerateOutput, fit_max_length, generate, step_config

_UNSET = object()


TEMPERATURE_HINT = " (the temperature here is the t_max -> t_min schedule)"  # for a caller passing temperature=


def unknown_options_message(names: list[str]) -> str:
    """Options `Engine.generate` does not take (the reference passes unknown options on to its model); the message
    lists the options it does take, from its signature."""
    hint = TEMPERATURE_HINT if "temperature" in names else ""
    taken = [p for p in inspect.signature(Engine.generate).parameters if p not in ("self", "input_ids", "options")]
    return (f"generate() does not take {', '.join(names)}{hint}: neither a DiffusionGemma sampling knob nor an "
            "option dgemma supports. The reference's generate() silently ignores sampling options it lacks "
            "(temperature, top_k, do_sample, ...); dgemma refuses them so that no setting is lost unseen. Its "
            f"options: {', '.join(taken)}")


class Engine:
    def __init__(self, module: DiffusionGemma, directory: Path | None = None,
                 generation_config: GenerationConfig | None = None, tokenizer=None):
        self.module = module
        self.config: ModelConfig = module.config
        self.directory = directory
        self.generation_config = generation_config or GenerationConfig()
        self.checkpoint_generation_config = self.generation_config  # what use_preset starts from
        self.preset = "exact"
        self.tokenizer = tokenizer
        self.compiled: dict | None = None  # set by `compile`: mode, backend, MoE dispatch

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.directory}: this model directory has no tokenizer.json, so text input/output "
                             "is unavailable; pass token ids to generate() or add the tokenizer files")
        if self.tokenizer.vocab_size > self.config.vocab_size:  # its ids past the embedding would be an IndexError
            raise ValueError(f"{self.directory}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                             f"only {self.config.vocab_size} (config.json vocab_size): they do not belong together; "
                             "put the model's own tokenizer files in the directory")
        return self.tokenizer

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse requests the model cannot position: prompt + whole canvases must fit max_position_embeddings."""
        L, context = self.config.canvas_length, self.config.max_position_embeddings
        if prompt_len > context - L:  # not even one canvas fits
            raise ContextError(f"prompt of {prompt_len} tokens leaves no room for a canvas: it exceeds this model's "
                             f"context of {context} less one {L}-token canvas (at most {context - L} prompt tokens); "
                             "shorten the prompt")
        needed = prompt_len + -(-max_new_tokens // L) * L
        if needed > self.config.max_position_embeddings:
            raise ContextError(f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens (rounded up to whole "
                             f"{L}-token canvases: {needed} positions) exceeds this model's context of "
                             f"{self.config.max_position_embeddings}; shorten the prompt or lower max_tokens")

    def prompt_ids(self, prompt: str | None = None, messages=None, *, enable_thinking: bool = False) -> list[int]:
        """Token ids for a raw prompt or chat messages (rendered with the model's chat template)."""
        tok = self.require_tokenizer()
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt (a string) or messages (a list of chat messages)")
        if messages is not None:
            return tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return tok.encode(prompt, add_bos=True)

    def stream(self, prompt: str | None = None, *, messages=None, enable_thinking: bool = False, **options):
        """Stream Draft / Text / Done events for one prompt or chat (see engine/stream.py for options).
        response_format={"type": "json_object" | "json_schema", ...} constrains the answer to valid JSON
        (engine/structured.py; the text then carries filler spaces, see compact_json)."""
        from .stream import stream_ids
        if "response_format" in options:
            from .structured import structured_options
            options = structured_options(self, options)
        return stream_ids(self, self.prompt_ids(prompt, messages, enable_thinking=enable_thinking), **options)

    def complete(self, prompt: str | None = None, *, messages=None, enable_thinking: bool = False, **options):
        """Non-streaming: run to the end and return the Done event (.output.answer, .output.thinking, stats)."""
        if "drafts" in options:
            raise TypeError("complete() returns only the finished answer; for the drafts of each step use stream()")
        *_, done = self.stream(prompt, messages=messages, enable_thinking=enable_thinking, drafts=False, **options)
        return done

    def generate_json(self, prompt: str | None = None, *, messages=None, schema: dict | None = None, **options):
        """A JSON document valid for `schema` by construction (any JSON object without one) -> JsonResult
        (.value parsed, .text compact, .done stats); see engine/structured.py."""
        from .structured import generate_json
        return generate_json(self, prompt, messages=messages, schema=schema, **options)

    def infill(self, prefix: str, suffix: str, **options):
        """The middle between prefix and suffix -> InfillResult (.middle, .text); see engine/infill.py."""
        from .infill import infill
        return infill(self, prefix, suffix, **options)

    def edit(self, text: str, start: int, end: int, **options):
        """Re-denoise text[start:end] in place (instruction=, strength=) -> EditResult (.text); see engine/edit.py."""
        from .edit import edit
        return edit(self, text, start, end, **options)

    def use_preset(self, name: str | None) -> "Engine":
        """Make a speed preset (dgemma/engine/presets.py) this engine's generation defaults: every later call,
        request and command uses it unless it passes its own knobs. "exact" (or None) restores the checkpoint's
        settings. Returns the engine."""
        from .presets import preset_knobs
        knobs = preset_knobs(name)
        self.generation_config = self.checkpoint_generation_config
        self.generation_config = self.generation_settings(**knobs)
        self.preset = name or "exact"
        return self

    def use_int8_dynamic(self, on: bool = True) -> "Engine":
        """Dynamic int8 matmuls on CPU (dgemma/quant/dynamic.py): faster and approximate; on=False puts the float
        modules back exactly. Asking for the state the engine is already in changes nothing. Returns the engine."""
        from ..quant import dynamic
        if on != dynamic.active(self.module):
            (dynamic.apply if on else dynamic.restore_float)(self.module)
        return self

    @property
    def prefill_chunk(self) -> int | None:
        """Tokens per piece of a prompt's prefill (None, the default: one pass, as the reference). A long prompt
        prefilled in pieces holds one piece's activations instead of the whole prompt's (`dgemma plan
        --prefill-chunk N` shows the difference; most of it is the experts' K routed copies of every token); the
        same math, not the same bits as one pass (model/encoder.py `encode`)."""
        return self.module.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, tokens: int | None) -> None:
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None (one pass), got {tokens!r}")
        self.module.prefill_chunk = tokens

    def compile(self, mode: str | None = "default", *, backend: str = "inductor") -> "Engine":
        """torch.compile the decoder step (dgemma/engine/compiled.py): mode "default", "reduce-overhead" (adds CUDA
        graphs) or "max-autotune-no-cudagraphs"; None makes the module eager again, exactly. The first steps of
        the first two canvases compile (seconds to minutes). Returns the engine; `compiled` describes the choice."""
        from .compiled import check_mode, compile_step, uncompile_step
        if mode is None:
            uncompile_step(self.module)
            self.compiled = None
        else:
            self.compiled = compile_step(self.module, check_mode(mode), backend=backend)
        return self

    @property
    def device(self) -> torch.device:
        return self.module.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size)

    @torch.inference_mode()
    def encode(self, tokens, cache: KVCache, valid=None, return_hidden=False):
        """Causal pass over tokens [B,T]; appends their K/V to `cache` (the only cache writer)."""
        return self.module.encode(tokens, cache, valid=valid, return_hidden=return_hidden)

    @torch.inference_mode()
    def denoise(self, tokens, cache: KVCache, sc_logits=None):
        """One denoiser forward over a canvas [B,L]; sc_logits [B,L,V] = previous step's processed logits."""
        soft = None if sc_logits is None else self.module.soft_embedding(sc_logits)
        return self.module.denoise(tokens, cache, soft=soft)


    def generation_settings(self, generation_config=None, *, call_options: tuple[str, ...] = (),
                            **knobs) -> GenerationConfig:
        """This engine's generation defaults (the checkpoint's generation_config.json, or its preset's) updated by
        `generation_config`, then by explicit knobs (None is a value: it disables). generation_config: a complete
        GenerationConfig (it replaces the defaults), or a dict of knobs or the reference's
        DiffusionGemmaGenerationConfig (their unset/None fields keep the defaults, as in the reference).
        call_options: the calling API's own options, which an unknown knob's error lists beside the knobs."""
        base = generation_config if isinstance(generation_config, GenerationConfig) else self.generation_config
        values = {k: getattr(base, k) for k in GenerationConfig.__dataclass_fields__}
        given = set()  # the settings this call sets itself
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            passed = passed_settings(generation_config)
            given.update(passed)
            values.update(passed)
        for key, value in knobs.items():
            if value is _UNSET:
                continue
            given.add(key)
            if key == "max_length":  # only generate() takes it (below); elsewhere it would be silently unused
                raise TypeError("max_length is the reference generate()'s total-length cap (prompt included); "
                                "here cap the new tokens with max_tokens (or max_new_tokens)")
            if key not in values:
                hint = TEMPERATURE_HINT if key == "temperature" else ""
                own = f"an option of this call ({', '.join(call_options)}) nor " if call_options else ""
                raise TypeError(f"unknown option {key!r}{hint}: neither {own}a generation knob "
                                f"({', '.join(sorted(set(values) - {'max_length'}))})")
            if key == "eos_token_id" and value is not None:
                value = eos_ids(value)
            values[key] = value
        if "settle_entropy" in given and values["settle_after"] is None:  # it would be silently unused
            raise ConfigError("settle_entropy is the entropy under which a position settles, and settling is off "
                              "(settle_after None): give settle_after too (or use the settle preset), or drop "
                              "settle_entropy")
        return GenerationConfig(**values)

    def generate(self, input_ids: torch.Tensor, *, attention_mask=None, generation_config=None, streamer=None,
                 max_new_tokens=_UNSET, max_length=_UNSET, max_denoising_steps=_UNSET, sampler_config=_UNSET,
                 entropy_bound=_UNSET, t_min=_UNSET, t_max=_UNSET, stability_threshold=_UNSET,
                 confidence_threshold=_UNSET, eos_token_id=_UNSET, pad_token_id=_UNSET, settle_after=_UNSET,
                 settle_entropy=_UNSET, generator: torch.Generator | None = None, accept=None,
                 sampling: str = "reference", plan=None, return_dict: bool = False, return_dict_in_generate=None,
                 **options):
        """Reference-compatible generate (spec §9.4): ids [B,T] -> ids [B, T + k*L] including the prompt.

        Settings, as in the reference: keyword knobs > `generation_config` (a GenerationConfig, a dict of knobs or
        the reference's DiffusionGemmaGenerationConfig; see `generation_settings`) > the checkpoint's
        generation_config.json > the reference's global defaults. Passing t_min/t_max None disables the
        temperature schedule, either stop threshold None disables early stopping. `max_new_tokens` is rounded UP
        to whole canvases, as in the reference (the text API trims exactly); `max_length` (prompt included)
        follows the reference's rule (engine/generate.py `fit_max_length`). `sampler_config` is the reference's
        spelling of entropy_bound (an EntropyBoundSamplerConfig). `streamer` gets the reference's calls from this
        one loop: put(prompt ids), put_draft(value=argmax canvas) after each step if it has put_draft
        (logits=ℓ̃ if its `_takes_logits` is true), put(committed canvas) after each canvas, end().
        The reference's cache/compile options (cache_implementation, cache_config, disable_compile) and
        bos_token_id change no token and are ignored; sampling knobs the sampler does not have (temperature,
        top_k, do_sample, ...), which the reference ignores silently, are a TypeError so no setting is lost unseen.
        Returns the ids, or a GenerateOutput (.sequences, .tokens_per_forward) with return_dict or
        return_dict_in_generate True. `accept` swaps the acceptance rule (an AcceptRule of dgemma.sampling, or
        its text as the CLI's --accept, e.g. 'confidence:0.9'; beside entropy_bound or sampler_config, whose
        rule it replaces, a ConfigError). With generator=None the global torch RNG is used,
        so after torch.manual_seed(s) the tokens equal the reference's on CPU in fp32; sampling="fast" samples the
        same distributions more cheaply. `plan`
        constrains the canvases (clamped positions, allowed tokens: see dgemma.engine.generate.CanvasPlan).
        settle_after / settle_entropy (dgemma's own, approximate, off by default): positions whose argmax held that
        many steps with an entropy below settle_entropy stop being computed (dgemma/engine/settle.py)."""
        unknown = sorted(set(options) - set(REFERENCE_INERT))
        if unknown:
            raise TypeError(unknown_options_message(unknown))
        if sampler_config is not _UNSET:
            if entropy_bound is not _UNSET:
                raise ValueError("give sampler_config or entropy_bound, not both (two spellings of one knob)")
            entropy_bound = entropy_bound_of(sampler_config)
        gen = self.generation_settings(
            generation_config, max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
            entropy_bound=entropy_bound, t_min=t_min, t_max=t_max,
            stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, settle_after=settle_after,
            settle_entropy=settle_entropy)
        if max_length is not _UNSET:
            gen = dataclasses.replace(gen, max_length=max_length)
        input_ids = self._check_ids(input_ids, attention_mask)
        gen = fit_max_length(gen, input_ids.shape[1])
        cfg = step_config(gen, accept, sampling, bound_given=entropy_bound is not _UNSET)
        out: GenerateOutput = generate(self.module, input_ids, gen, cfg, generator=generator,
                                       attention_mask=attention_mask, plan=plan, streamer=streamer)
        if return_dict_in_generate is not None:
            return_dict = bool(return_dict_in_generate)
        return out if return_dict else out.sequences

    def generate_autoregressive(self, input_ids, *, attention_mask=None, eos_token_id=_UNSET, **options):
        """Left-to-right decoding through the encoder's causal head (the same weights' AR baseline)."""
        from .autoregressive import generate_autoregressive
        eos = self.generation_config.eos_token_id if eos_token_id is _UNSET else eos_token_id
        return generate_autoregressive(self.module, self._check_ids(input_ids, attention_mask),
                                       attention_mask=attention_mask, eos_token_id=eos, **options)

    def _check_ids(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape [batch, prompt_length], got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one prompt token (e.g. <bos>)")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids contain ids outside [0, {self.config.vocab_size}) for this model's vocabulary")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        return input_ids.to(torch.int64).to(self.device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # load(dtype=NAME)


def ids_outside_vocabulary(config: ModelConfig, generation: GenerationConfig) -> list[str]:
    """The stop and pad ids of config.json and generation_config.json that no token can be (not in [0, vocab)),
    each as 'FILE: what is wrong and what to do'. The reference loads such files too, so they are warnings: an eos
    id outside the vocabulary can never be generated, so generation would not stop on it."""
    V, out = config.vocab_size, []
    for file, source in (("config.json", config), ("generation_config.json", generation)):
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(source, name)
            bad = [i for i in (() if value is None else eos_ids(value)) if not 0 <= i < V]
            if bad:
                out.append(f"{file}: {name} {bad[0] if len(bad) == 1 else bad} is outside the model's vocabulary "
                           f"(ids 0 to {V - 1}), so no token can be it; fix the file (the tokenizer's ids are the ones "
                           "to use)")
    return out


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device=None, quiet: bool = False,
         preset: str | None = None, int8_dynamic: bool = False, compile: str | None = None,
         prefill_chunk: int | None = None) -> Engine:
    """Load a DiffusionGemma model directory (Hugging Face layout) into an Engine; a LoRA adapter directory that
    `dgemma train --mode lora` wrote loads as its base model with the adapter merged in (in `dtype`; its own
    generation_config.json and tokenizer files if it has them, else the base's). preset: a speed preset as the
    generation defaults (`Engine.use_preset`); int8_dynamic: `Engine.use_int8_dynamic` (CPU, float32); compile:
    a torch.compile mode for the decoder step (`Engine.compile`; None: eager); prefill_chunk: tokens per piece of a
    long prompt's prefill (`Engine.prefill_chunk`; None: one pass)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or a torch.dtype)")
        dtype = DTYPES[dtype]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or its name, got {dtype!r}")
    module = load_module(path, dtype=dtype, device=device, quiet=quiet, prepare=swap_for_checkpoint)
    tokenizer_file, generation_file = (model_file(path, name) for name in ("tokenizer.json", "generation_config.json"))
    tokenizer = Tokenizer.from_dir(tokenizer_file.parent) if tokenizer_file is not None else None
    generation = GenerationConfig.from_dir(generation_file.parent if generation_file is not None else path)
    if not quiet:
        for problem in ids_outside_vocabulary(module.config, generation):
            print(f"dgemma: warning: {Path(path) / problem}", file=sys.stderr)
    engine = Engine(module, Path(path), generation, tokenizer).use_preset(preset)
    engine.prefill_chunk = prefill_chunk
    if int8_dynamic:
        engine.use_int8_dynamic()
    return engine.compile(compile) if compile else engine
