"""dgemma's encode/denoise against transformers 5.23.0's DiffusionGemmaForBlockDiffusion (the oracle), in fp32.

For several small geometries (hidden size, head counts, KV heads on both layer kinds, head dims, experts, top-k,
window, layer pattern, canvas length, both config spellings) we compare, on the same random checkpoint:
the encoder's final hidden state, every layer's cached K/V, and the decoder logits without and with a
self-conditioning signal, for prompts shorter and longer than the sliding window, after one and two committed
canvases, and for a left-padded batch driven the way the reference's `generate` drives it (2-D attention mask
over everything cached so far, positions counting pad slots, decoder mask = that mask padded with the canvas).
The worst difference per config is printed at the end of the run (`PARITY ...` lines).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import dgemma
from conftest import F, S

TOL = 1e-4

# id -> (overrides of the tiny config, config.json spelling, sharded save)
CONFIGS = {
    # spec §11 tiny config in the released checkpoint's spelling (global_head_dim / num_global_key_value_heads)
    "tiny-global": ({}, "global", False),
    # top_k == num_experts, window 4, [S,S,F], canvas 8, odd head counts, per_layer_config spelling, shards
    "h48-w4-SSF-topkE": ({"canvas_length": 8, "text_config": {
        "vocab_size": 300, "hidden_size": 48, "intermediate_size": 40, "moe_intermediate_size": 24,
        "num_experts": 5, "top_k_experts": 5, "num_hidden_layers": 3, "num_attention_heads": 6,
        "num_key_value_heads": 3, "head_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 2,
        "layer_types": [S, S, F], "sliding_window": 4}}, "saved", True),
    # top-1 routing over 8 experts, MQA on both kinds, full-first [F,S,S,F], window 16, canvas 24, other thetas
    "h32-w16-FSSF-top1": ({"canvas_length": 24, "text_config": {
        "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
        "num_experts": 8, "top_k_experts": 1, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
        "layer_types": [F, S, S, F], "sliding_window": 16,
        "rope_parameters": {S: {"rope_type": "default", "rope_theta": 500.0},
                            F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                "rope_theta": 20000.0}}}}, "saved", False),
    # 6 layers with layer_types omitted: the default pattern (every 6th layer full)
    "h64-default6-w8": ({"canvas_length": 16, "text_config": {
        "num_hidden_layers": 6, "layer_types": None, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 2, "num_experts": 6,
        "top_k_experts": 3}}, "global", False),
    # no GQA on sliding layers, num_global_key_value_heads omitted (full layers then use num_key_value_heads),
    # full head SMALLER than the sliding one, half-rotary full layers, odd window 5, canvas 12
    "h40-w5-noglobalkv-p0.5": ({"canvas_length": 12, "text_config": {
        "vocab_size": 320, "hidden_size": 40, "intermediate_size": 56, "moe_intermediate_size": 20,
        "num_experts": 3, "top_k_experts": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 12, "global_head_dim": 8, "num_global_key_value_heads": None,
        "layer_types": [S, F], "sliding_window": 5,
        "rope_parameters": {S: {"rope_type": "default", "rope_theta": 10000.0},
                            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                "rope_theta": 1000000.0}}}}, "saved", False),
    # a last layer given as sliding is forced to full attention by both implementations
    "tiny-last-forced-SFSS": ({"canvas_length": 8, "text_config": {
        "layer_types": [S, F, S, S], "sliding_window": 6}}, "global", False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, reference_checkpoint):
    """(config id, reference model, our Engine) on the same random checkpoint."""
    overrides, spelling, sharded = CONFIGS[request.param]
    ref, path = reference_checkpoint(overrides, sharded=sharded, spelling=spelling)
    engine = dgemma.load(path, dtype=torch.float32, quiet=True)
    return request.param, ref, engine


def new_ref_cache(ref):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=ref.config.get_text_config())


class Checker:
    """Compares tensors, asserts the tolerance, and keeps the worst difference for the run's summary."""

    def __init__(self, config_id, report):
        self.config_id, self.report, self.worst, self.where = config_id, report, 0.0, ""

    def __call__(self, what, ours, theirs, rows=None):
        """rows: optional bool mask over the leading dims selecting the slots to compare."""
        assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}"
        ours, theirs = ours.float(), theirs.float()
        if rows is not None:
            ours, theirs = ours[rows], theirs[rows]
        assert ours.numel() > 0, f"{what}: nothing to compare"
        assert torch.isfinite(ours).all(), f"{what}: non-finite values"
        diff = (ours - theirs).abs().max().item()
        self.report(self.config_id, diff)
        if diff > self.worst:
            self.worst, self.where = diff, what
        assert diff <= TOL, f"{what}: max |ours - reference| = {diff:.3e} > {TOL}"

    def done(self, label):
        where = f"at {self.where}" if self.worst else "bit-exact everywhere"
        print(f"\n[{self.config_id}] {label}: worst max|diff| {self.worst:.3e} ({where})")


def check_cache(check, step, cfg, cache, pkv, num_context, rows_valid=None):
    """Every layer's K/V equals the reference's; sliding layers hold exactly min(context, window - 1) entries."""
    assert cache.length == num_context
    for i in range(cfg.num_hidden_layers):
        k_ref, v_ref = pkv.layers[i].keys, pkv.layers[i].values
        keep = min(num_context, cfg.sliding_window - 1) if cfg.is_sliding(i) else num_context
        assert cache.keys[i].shape[2] == keep, f"layer {i}: {cache.keys[i].shape[2]} cached entries, expected {keep}"
        assert cache.values[i].shape[2] == keep
        slots = None
        if rows_valid is not None:  # compare valid slots only: [B,S] over the layer's last S positions
            slots = rows_valid[:, num_context - keep:]
        # [B,Hk,S,D] -> [B,S,Hk,D] so a [B,S] mask selects slots
        check(f"{step}: layer {i} keys", cache.keys[i].transpose(1, 2), k_ref.transpose(1, 2), slots)
        check(f"{step}: layer {i} values", cache.values[i].transpose(1, 2), v_ref.transpose(1, 2), slots)


def snapshot(cache):
    return [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)], cache.length


def assert_unchanged(cache, snap, what):
    tensors, length = snap
    assert cache.length == length, f"{what} changed cache.length"
    for i, ((k, v), k_now, v_now) in enumerate(zip(tensors, cache.keys, cache.values)):
        assert torch.equal(k, k_now) and torch.equal(v, v_now), f"{what} wrote layer {i} of the cache"


def prompt_lengths(window):
    """Prompt of one token, one just under the window, and two longer than it."""
    return [1, window - 1, window + 3, 2 * window + 5]


@pytest.mark.parametrize("which", range(4), ids=["len1", "under-window", "over-window", "over-2windows"])
def test_single_sequence_prefill_denoise_commit(pair, parity_report, which):
    config_id, ref, engine = pair
    cfg = engine.config
    V, L = cfg.vocab_size, cfg.canvas_length
    T = prompt_lengths(cfg.sliding_window)[which]
    check = Checker(config_id, parity_report)
    g = torch.Generator().manual_seed(1000 + T)
    prompt = torch.randint(0, V, (1, T), generator=g)
    canvases = [torch.randint(0, V, (1, L), generator=g) for _ in range(3)]
    sc = [torch.randn(1, L, V, generator=g) * 4 for _ in range(3)]

    pkv, cache = new_ref_cache(ref), engine.new_cache(1)
    context = 0
    for n in range(3):  # n = 0: prefill the prompt; n = 1, 2: commit the previous canvas
        tokens = prompt if n == 0 else canvases[n - 1]
        step = "prompt" if n == 0 else f"commit {n}"
        positions = torch.arange(context, context + tokens.shape[1])[None]
        canvas_positions = torch.arange(context + tokens.shape[1], context + tokens.shape[1] + L)[None]
        with torch.no_grad():
            out = ref(input_ids=tokens, past_key_values=pkv, decoder_input_ids=canvases[n],
                      position_ids=positions, decoder_position_ids=canvas_positions)
            out_sc = ref(past_key_values=pkv, decoder_input_ids=canvases[n], self_conditioning_logits=sc[n],
                         decoder_position_ids=canvas_positions)
        hidden = engine.encode(tokens, cache, return_hidden=True)
        context += tokens.shape[1]
        check(f"{step}: encoder hidden", hidden, out.encoder_last_hidden_state)
        check_cache(check, step, cfg, cache, pkv, context)

        before = snapshot(cache)
        logits = engine.denoise(canvases[n], cache)
        assert logits.dtype == torch.float32 and logits.shape == (1, L, V)
        check(f"{step}: decoder logits", logits, out.logits)
        logits_sc = engine.denoise(canvases[n], cache, sc_logits=sc[n])
        check(f"{step}: decoder logits with self-conditioning", logits_sc, out_sc.logits)
        assert_unchanged(cache, before, "denoise")
        # the signal must actually matter, or the self-conditioning comparison proves nothing
        assert (out_sc.logits - out.logits).abs().max() > 1e-2
    check.done(f"prompt {T} + 2 commits")


def test_left_padded_batch(pair, parity_report):
    """Rows padded on the left by 0, 1 and window+1 slots (the last drops a whole window of pads)."""
    config_id, ref, engine = pair
    cfg = engine.config
    V, L, W = cfg.vocab_size, cfg.canvas_length, cfg.sliding_window
    check = Checker(config_id, parity_report)
    pads = [0, 1, W + 1]
    T = W + 4 + max(pads)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, V, (3, T), generator=g)
    valid = torch.ones(3, T, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    prompt[~valid] = cfg.pad_token_id
    canvases = [torch.randint(0, V, (3, L), generator=g) for _ in range(3)]
    sc = torch.randn(3, L, V, generator=g) * 4

    pkv, cache = new_ref_cache(ref), engine.new_cache(3)
    attention_mask = valid  # what generate passes: 2-D mask over everything encoded so far
    context = 0
    for n in range(3):
        tokens = prompt if n == 0 else canvases[n - 1]
        step = "padded prompt" if n == 0 else f"padded commit {n}"
        if n > 0:
            attention_mask = Fn.pad(attention_mask, (0, L), value=True)
        decoder_mask = Fn.pad(attention_mask, (0, L), value=True)
        positions = torch.arange(context, context + tokens.shape[1])[None]
        canvas_positions = torch.arange(context + tokens.shape[1], context + tokens.shape[1] + L)[None]
        with torch.no_grad():
            out = ref(input_ids=tokens, attention_mask=attention_mask, past_key_values=pkv,
                      position_ids=positions, decoder_input_ids=canvases[n], decoder_attention_mask=decoder_mask,
                      decoder_position_ids=canvas_positions)
            out_sc = ref(past_key_values=pkv, decoder_input_ids=canvases[n], self_conditioning_logits=sc,
                         decoder_attention_mask=decoder_mask, decoder_position_ids=canvas_positions)
        hidden = engine.encode(tokens, cache, valid=valid if n == 0 else None, return_hidden=True)
        context += tokens.shape[1]
        new_valid = attention_mask[:, -tokens.shape[1]:]
        check(f"{step}: encoder hidden (valid slots)", hidden, out.encoder_last_hidden_state, new_valid)
        check_cache(check, step, cfg, cache, pkv, context, rows_valid=attention_mask)
        before = snapshot(cache)
        check(f"{step}: decoder logits", engine.denoise(canvases[n], cache), out.logits)
        check(f"{step}: decoder logits with self-conditioning",
              engine.denoise(canvases[n], cache, sc_logits=sc), out_sc.logits)
        assert_unchanged(cache, before, "denoise")
    check.done(f"left-padded batch, pads {pads}, prompt {T} + 2 commits")


def test_encode_without_hidden_writes_the_same_cache(pair):
    """return_hidden=False skips the last layer's tail; the cache must not change because of it."""
    _, ref, engine = pair
    cfg = engine.config
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (2, cfg.sliding_window + 2), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    with_hidden, without = engine.new_cache(2), engine.new_cache(2)
    assert engine.encode(prompt, with_hidden, return_hidden=True) is not None
    assert engine.encode(prompt, without, return_hidden=False) is None
    engine.encode(canvas, with_hidden, return_hidden=True)
    engine.encode(canvas, without)
    assert with_hidden.length == without.length
    for i in range(cfg.num_hidden_layers):
        assert torch.equal(with_hidden.keys[i], without.keys[i]), f"layer {i} keys"
        assert torch.equal(with_hidden.values[i], without.values[i]), f"layer {i} values"
    assert torch.equal(engine.denoise(canvas, with_hidden), engine.denoise(canvas, without))


def test_layer_geometry_matches_reference(pair):
    """The parsed config gives every layer the reference's kind, head dim and KV-head count."""
    _, ref, engine = pair
    cfg = engine.config
    text = ref.config.get_text_config()
    assert list(cfg.layer_types) == list(text.layer_types)
    for i, layer in enumerate(ref.model.decoder.layers):
        attn = layer.self_attn
        assert cfg.num_kv_heads_of(i) * cfg.head_dim_of(i) == attn.k_proj.out_features, f"layer {i}"
        assert cfg.num_attention_heads * cfg.head_dim_of(i) == attn.q_proj.out_features, f"layer {i}"
        assert cfg.head_dim_of(i) == attn.head_dim, f"layer {i}"


# bf16: the fp32 sums of expert outputs run in a different order than the reference's, so a rare 1-ulp flip is
# expected and then amplified by the sharp attention (scale 1.0); observed worst after the fix 0.078 max / 0.008
# mean on logits of mean magnitude ~2. Rounding each expert's contribution to bf16 before summing (the bug this
# caught) gave 0.47-8.6 max / 0.036-0.65 mean on every config with top-k > 1.
BF16_MAX, BF16_MEAN = 0.25, 0.02
# h40 is left out: its expert width (20) gives bf16 strides the reference's grouped_mm kernel rejects
BF16_CONFIGS = [c for c in CONFIGS if c != "h40-w5-noglobalkv-p0.5"]


@pytest.mark.parametrize("config_id", BF16_CONFIGS)
def test_bfloat16_matches_reference_loaded_in_bfloat16(config_id, reference_checkpoint, parity_report):
    """dgemma.load(dtype=bf16) against the reference's own bf16 load (`from_pretrained(dtype=bf16)`, which keeps
    its rotary frequencies in fp32 and uses its default experts path)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    overrides, spelling, sharded = CONFIGS[config_id]
    _, path = reference_checkpoint(overrides, sharded=sharded, spelling=spelling)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = dgemma.load(path, dtype=torch.bfloat16, quiet=True)
    assert engine.dtype == torch.bfloat16
    cfg = engine.config
    V, L = cfg.vocab_size, cfg.canvas_length
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(0, V, (2, 2 * cfg.sliding_window + 1), generator=g)
    canvases = [torch.randint(0, V, (2, L), generator=g) for _ in range(2)]
    sc = (torch.randn(2, L, V, generator=g) * 4).to(torch.bfloat16)
    pkv, cache = new_ref_cache(ref), engine.new_cache(2)
    worst = 0.0
    for n, tokens in enumerate([prompt, canvases[0]]):
        with torch.no_grad():
            out = ref(input_ids=tokens, past_key_values=pkv, decoder_input_ids=canvases[n])
            out_sc = ref(past_key_values=pkv, decoder_input_ids=canvases[n], self_conditioning_logits=sc)
        hidden = engine.encode(tokens, cache, return_hidden=True)
        assert hidden.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.bfloat16
        pairs = [("encoder hidden", hidden, out.encoder_last_hidden_state),
                 ("logits", engine.denoise(canvases[n], cache), out.logits),
                 ("logits with self-conditioning", engine.denoise(canvases[n], cache, sc_logits=sc), out_sc.logits)]
        pairs += [(f"layer {i} keys", cache.keys[i], pkv.layers[i].keys) for i in range(cfg.num_hidden_layers)]
        for what, ours, theirs in pairs:
            assert ours.shape == theirs.shape, what
            diff = (ours.float() - theirs.float()).abs()
            worst = max(worst, diff.max().item())
            assert diff.max() <= BF16_MAX and diff.mean() <= BF16_MEAN, \
                f"step {n}, {what}: bf16 |ours - reference| max {diff.max():.3e}, mean {diff.mean():.3e}"
    parity_report(f"{config_id} [bf16]", worst)
    print(f"\n[{config_id}] bf16 vs reference bf16: worst max|diff| {worst:.3e}")
