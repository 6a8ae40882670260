"""The layer and the whole text stack: the one set of weights both passes use.

Layer (spec §4.5), a "sandwich" layer with the dense MLP and the MoE in parallel:
    h   = x + post_attention_norm(Attn(input_norm(x)))
    d   = post_ffw_norm_1(MLP(pre_ffw_norm(h)))
    m   = post_ffw_norm_2(MoE(h))            # router reads raw h, experts read pre_ffw_norm_2(h)
    out = (h + post_ffw_norm(d + m)) * layer_scalar      # the scalar multiplies the whole stream

Each layer keeps two scalars, one per pass: the checkpoint stores `layer_scalar` for the decoder and
`model.encoder.language_model.layers.{i}.layer_scalar` for the encoder; the reference keeps both
(spec §3.3), so we do too instead of assuming they are equal.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .decoder import denoise, soft_embedding
from .encoder import encode
from .layers import GatedMLP, RMSNorm, norm, rope_frequencies, rope_tables, softcap
from .moe import Experts, Router

class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.is_sliding = cfg.is_sliding(index)
        self.self_attn = Attention(D, cfg.num_attention_heads, cfg.num_kv_heads_of(index), cfg.head_dim_of(index),
                                   has_v_proj=self.is_sliding, eps=eps)
        self.mlp = GatedMLP(D, cfg.intermediate_size)
        self.router = Router(D, cfg.num_experts, cfg.top_k_experts, eps)
        self.experts = Experts(cfg.num_experts, D, cfg.moe_intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(D, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder pass
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder pass
        self.use_reference_moe = False  # tests flip this to run the slow per-token MoE loop

    def forward(self, x, cos, sin, context, mask, is_encoder: bool, canvas=None):
        """x [B,T,D] -> (out [B,T,D], (k, v) of the new tokens [B,Hk,T,Dh]); canvas: see Attention.forward."""
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, context, mask, canvas)
        h = x + self.post_attention_layernorm(attn)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])
        weights, experts = self.router(flat)
        run = self.experts.forward_reference if self.use_reference_moe else self.experts
        moe = run(self.pre_feedforward_layernorm_2(flat), weights, experts).reshape(h.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        out = h + self.post_feedforward_layernorm(dense + moe)
        scalar = self.encoder_layer_scalar if is_encoder else self.layer_scalar
        return out * scalar, kv


class SelfConditioning(GatedMLP):
    """Gated MLP over the previous step's expected embedding, added to the canvas embedding (spec §5).

    Same gate/up/down weights as the dense MLP (width `intermediate_size`), plus a weighted pre-norm and a
    scale-free post-norm; the checkpoint keys sit directly under `self_conditioning.`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """embeds, soft [B,L,D] -> scale-free rms(embeds + MLP(pre_norm(soft))).

        soft=None (first step of a canvas) skips the MLP: with zero input and no biases it outputs exactly 0."""
        if soft is not None:
            embeds = embeds + super().forward(self.pre_norm(soft))
        return norm(embeds, None, self.eps)  # rms_norm itself at inference


class DiffusionGemma(nn.Module):
    """The shared text stack. Attribute names follow the checkpoint keys under `model.decoder.`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        # Optional callable (normed [..., D], out=None) -> soft-capped logits [..., V] fp32, written into `out` if
        # given (dgemma.quant.dynamic's int8 head); None: the tied embedding's float product and the reference's
        # soft-cap. A runtime choice, never saved.
        self.head_logits = None
        # Optional callable ℓ̃ rows [n, V] -> softmax(ℓ̃) @ E [n, D] (the int8 self-conditioning product, same
        # module); None: the float product in decoder.soft_embedding. A runtime choice, never saved.
        self.soft_product = None
        # Tokens per piece of a long prompt's prefill (encoder.encode's `piece`, `Engine.prefill_chunk`); None: one
        # pass, as the reference. A runtime choice, never saved; training's encoder pass does not read it.
        self.prefill_chunk = None
        self._rope_freqs: dict = {}  # (is_sliding, device) -> inverse frequencies (derived, never saved)
        self._embed_scales: dict = {}  # dtype -> sqrt(D) rounded to it (derived, never saved)

    # --- pieces both passes use -------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> E[tokens] * sqrt(D), the scale cast to the weight dtype first (53.0 in bf16)."""
        return self.embed_tokens(tokens) * self.embed_scale(self.embed_tokens.weight.dtype)

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(D) rounded to `dtype` (53.0 in bf16), as a Python number: multiplying by it gives the bits of a
        multiply by a `dtype` tensor, with no host-to-device copy (a CUDA sync point) on every call. Rounded once
        per dtype; engine/compiled.py makes it before compiling (reading a tensor back would break the graph)."""
        if dtype not in self._embed_scales:
            self._embed_scales[dtype] = float(torch.tensor(self.config.embed_scale, dtype=dtype, device="cpu"))
        return self._embed_scales[dtype]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B or 1, T] -> {is_sliding: (cos, sin)} for the two layer kinds."""
        cfg = self.config
        tables = {}
        for sliding in set(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
            key = (sliding, positions.device)
            if key not in self._rope_freqs:  # made once per device: no CPU-to-device copy on every step
                freqs = (rope_frequencies(cfg.head_dim, cfg.rope_theta_sliding) if sliding else
                         rope_frequencies(cfg.global_head_dim, cfg.rope_theta_full, cfg.partial_rotary_factor))
                self._rope_freqs[key] = freqs.to(positions.device)
            tables[sliding] = rope_tables(positions, self._rope_freqs[key], dtype)
        return tables

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, tied head, fp32 soft-cap (spec §4.6). hidden [B,L,D] -> logits [B,L,V] fp32."""
        return self.head(self.norm(hidden))

    def head(self, normed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tied head + fp32 soft-cap on ALREADY final-normed states (what `encode(return_hidden=True)` returns).
        `out` (fp32, contiguous, normed's leading shape + [V]; no gradient) receives the logits: the fp32 tied
        head's product goes straight into it and is soft-capped there, so no second vocabulary-sized buffer is
        made (the engine fills a batch's logits row by row this way, engine/scheduler.py)."""
        w = self.embed_tokens.weight
        if self.head_logits is not None:
            return self.head_logits(normed, out=out)
        if out is not None and w.dtype == torch.float32:
            product = torch.matmul(normed, w.t(), out=out)
        else:
            product = normed @ w.t()
            if out is not None:  # a bf16 product's fp32 copy goes straight into `out` (the values .float() gives),
                product = out.copy_(product)  # so no second fp32 [.., V] buffer: 256 MiB a canvas at V = 262,144
        inplace = not (torch.is_grad_enabled() and product.requires_grad)
        logits = softcap(product, self.config.final_logit_softcapping, inplace=inplace)
        return logits if out is None or logits is out else out.copy_(logits)

    # --- the two passes (implemented in encoder.py / decoder.py) -----------------------------------
    def encode(self, tokens, cache, valid=None, return_hidden=False):
        return encode(self, tokens, cache, valid=valid, return_hidden=return_hidden, piece=self.prefill_chunk)

    def denoise(self, tokens, cache, soft=None, positions=None, canvas_kv=None, return_hidden=False):
        return denoise(self, tokens, cache, soft=soft, positions=positions, canvas_kv=canvas_kv,
                       return_hidden=return_hidden)

    def soft_embedding(self, sc_logits, sc_mask=None, chunk=None):
        return soft_embedding(self, sc_logits, sc_mask, chunk)
