"""Fast paths against slow references (STYLE habit 9): grouped MoE dispatch vs the per-token loop, and
`attend` (SDPA) vs `attend_reference` (explicit fp32 softmax). Each fast path is also checked against an
independent formula written here, and the router and experts against transformers 5.23.0's modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import dgemma
from dgemma.model.attention import attend, attend_reference
from dgemma.model.moe import Experts, Router


def random_experts(E, D, I, seed):
    g = torch.Generator().manual_seed(seed)
    experts = Experts(E, D, I)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
        experts.down_proj.copy_(torch.randn(E, D, I, generator=g) * I ** -0.5)
    return experts.requires_grad_(False)


def routing(N, E, K, seed, used=None):
    """Random distinct expert ids per token (drawn from `used` only, if given) and positive weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if used is None else torch.tensor(used)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(N)]) if N else \
        torch.zeros(0, K, dtype=torch.int64)
    weights = torch.rand(N, K, generator=g) + 0.1
    return weights, ids


def dense_formula(experts, x, weights, ids):
    """out[n] = sum_k w[n,k] * down[e] (gelu_tanh(gate[e] x[n]) * up[e] x[n]), every expert on every token."""
    I = experts.down_proj.shape[-1]
    gu = torch.einsum("nd,eid->nei", x, experts.gate_up_proj)  # [N,E,2I]
    act = Fn.gelu(gu[..., :I], approximate="tanh") * gu[..., I:]
    y = torch.einsum("nei,edi->ned", act, experts.down_proj)  # [N,E,D]
    chosen = torch.gather(y, 1, ids[..., None].expand(-1, -1, y.shape[-1]))  # [N,K,D]
    return (chosen * weights[..., None]).sum(1)


# (N tokens, E experts, K top-k, experts allowed to receive tokens): includes top_k == E, top-1, one token,
# no tokens at all, and experts that receive nothing
CASES = [(1, 4, 2, None), (7, 8, 1, None), (16, 4, 4, None), (33, 16, 3, [1, 5, 6, 9, 15]), (12, 6, 2, [0, 5]),
         (0, 4, 2, None), (64, 32, 8, None)]


@pytest.mark.parametrize("N,E,K,used", CASES)
def test_grouped_dispatch_equals_per_token_loop(N, E, K, used):
    D, I = 24, 10
    experts = random_experts(E, D, I, seed=N * 100 + E)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(E))
    weights, ids = routing(N, E, K, seed=K, used=used)
    if used is not None:
        assert len(set(range(E)) - set(ids.flatten().tolist())) > 0, "case meant to leave experts without tokens"
    grouped = experts(x, weights, ids)
    loop = experts.forward_reference(x, weights, ids)
    assert grouped.shape == loop.shape == (N, D) and grouped.dtype == x.dtype
    if N:
        torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-5)
        torch.testing.assert_close(grouped, dense_formula(experts, x, weights, ids), rtol=0, atol=1e-5)


def test_grouped_dispatch_matches_reference_experts_module():
    """Against transformers' DiffusionGemmaTextExperts with the same weights and routing."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    E, D, I, N, K = 8, 32, 16, 40, 3
    cfg = DiffusionGemmaTextConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, top_k_experts=K)
    ours = random_experts(E, D, I, seed=5)
    theirs = DiffusionGemmaTextExperts(cfg)
    with torch.no_grad():
        theirs.gate_up_proj.copy_(ours.gate_up_proj)
        theirs.down_proj.copy_(ours.down_proj)
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(6))
        weights, ids = routing(N, E, K, seed=7, used=[0, 2, 3, 7])
        torch.testing.assert_close(ours(x, weights, ids), theirs(x, ids, weights), rtol=0, atol=1e-5)


def test_router_matches_reference_router():
    """Scale-free norm of the raw residual, x scale x H^-1/2, fp32 softmax, top-k renormalised, x per_expert_scale."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRouter

    E, D, K, N = 6, 32, 3, 50
    g = torch.Generator().manual_seed(11)
    cfg = DiffusionGemmaTextConfig(hidden_size=D, moe_intermediate_size=8, num_experts=E, top_k_experts=K)
    theirs = DiffusionGemmaTextRouter(cfg)
    ours = Router(D, E, K, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        theirs.proj.weight.copy_(torch.randn(E, D, generator=g))
        theirs.scale.copy_(torch.rand(D, generator=g) * 1.5 + 0.25)
        theirs.per_expert_scale.copy_(torch.rand(E, generator=g) * 1.5 + 0.25)
        ours.load_state_dict(theirs.state_dict())
        h = torch.randn(N, D, generator=g) * 3
        _, ref_w, ref_ids = theirs(h)
        w, ids = ours(h)
    assert torch.equal(ids, ref_ids)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)


def test_whole_model_reference_moe_equals_default(reference_checkpoint):
    """Flipping every layer to the per-token MoE loop changes neither the cache, the hidden state, nor the logits.

    Run in float64: the two paths add the K expert outputs in different orders, and the tiny model's sharp
    attention (scale 1.0 over normed q/k) amplifies fp32 rounding noise to ~1e-4 in the logits, which would
    force a tolerance too loose to catch a real dispatch bug."""
    _, path = reference_checkpoint()
    engine = dgemma.load(path, dtype=torch.float64, quiet=True)
    cfg = engine.config
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (2, cfg.sliding_window + 3), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    sc = torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=g, dtype=torch.float64) * 4

    def run(reference: bool):
        for layer in engine.module.layers:
            layer.use_reference_moe = reference
        cache = engine.new_cache(2)
        hidden = engine.encode(prompt, cache, return_hidden=True)
        return hidden, cache, engine.denoise(canvas, cache, sc_logits=sc)

    try:
        h_fast, c_fast, l_fast = run(False)
        h_ref, c_ref, l_ref = run(True)
    finally:
        for layer in engine.module.layers:
            layer.use_reference_moe = False
    assert h_fast.dtype == torch.float64
    torch.testing.assert_close(h_fast, h_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(l_fast, l_ref, rtol=0, atol=1e-10)
    for i in range(cfg.num_hidden_layers):
        torch.testing.assert_close(c_fast.keys[i], c_ref.keys[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(c_fast.values[i], c_ref.values[i], rtol=0, atol=1e-10)


def explicit_attention(q, k, v, mask):
    """Per query head h, its KV head is h // (H / Hk); scores q.k with scale 1; masked keys get -inf."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        s = q[:, h].double() @ k[:, h // group].double().transpose(-1, -2)  # [B,T,S]
        if mask is not None:
            s = s.masked_fill(~mask[:, 0], float("-inf"))
        out[:, h] = s.softmax(-1) @ v[:, h // group].double()
    return out


@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_equals_reference(H, Hk, masked):
    B, T, S, D = 2, 5, 9, 16
    g = torch.Generator().manual_seed(H * 10 + Hk)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hk, S, D, generator=g)
    v = torch.randn(B, Hk, S, D, generator=g)
    mask = None
    if masked:  # random key mask, batch-dependent, every query keeps at least one key
        mask = torch.rand(B, 1, T, S, generator=g) > 0.4
        mask[..., -1] = True
        assert not mask.all()
    fast, slow = attend(q, k, v, mask), attend_reference(q, k, v, mask)
    assert fast.shape == (B, H, T, D)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    torch.testing.assert_close(slow.double(), explicit_attention(q, k, v, mask), rtol=0, atol=1e-5)
    if masked:  # the mask must matter, or this case proves nothing
        assert (attend(q, k, v, None) - fast).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_dispatch_equals_the_expert_loop(dtype):
    """The one-kernel grouped GEMM path (used on CUDA) against the per-expert loop, forced on CPU."""
    from dgemma.model import moe

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    g = torch.Generator().manual_seed(3)
    experts = moe.Experts(6, 32, 16).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
    x = torch.randn(40, 32, generator=g).to(dtype)
    ids = torch.randint(0, 5, (40, 3), generator=g)  # expert 5 never chosen: an empty group
    w = torch.rand(40, 3, generator=g)
    try:
        moe.set_grouped_dispatch("off")
        loop = experts(x, w, ids)
        moe.set_grouped_dispatch("on")
        assert moe.grouped_dispatch(x, experts.gate_up_proj, experts.down_proj)
        grouped = experts(x, w, ids)
    finally:
        moe.set_grouped_dispatch("auto")
    torch.testing.assert_close(grouped, loop, rtol=0, atol=0)  # CPU: the same products, bit for bit
    with pytest.raises(ValueError, match="grouped dispatch mode"):
        moe.set_grouped_dispatch("fast")



@pytest.mark.parametrize("N,E,K,used", [c for c in CASES if c[0]])
def test_grouped_dispatch_gradients_equal_plain_indexing(N, E, K, used, monkeypatch):
    """Training: the gather-based backward of the dispatch (moe._GatherRows) gives the gradients of
    plain autograd indexing (whose backward is an accumulating index_put_) for x, the routing weights and both
    expert tensors; bit for bit where each token has at most two slots."""
    from dgemma.model import moe

    D, I = 24, 10
    grads = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(moe._GatherRows, "apply", lambda x, rows, inverse, K: x[rows])
        experts = random_experts(E, D, I, seed=N * 100 + E).requires_grad_(True)
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(E), requires_grad=True)
        weights, ids = routing(N, E, K, seed=K, used=used)
        weights.requires_grad_(True)
        out = experts(x, weights, ids)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    for fast, slow in zip(*grads):
        assert fast is not None and fast.abs().max() > 0
        torch.testing.assert_close(fast, slow, rtol=0, atol=0 if K <= 2 else 1e-5)
