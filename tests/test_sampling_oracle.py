"""dgemma.sampling vs the transformers 5.23.0 reference (test oracle only; nothing is copied from it).

The loop test drives HF's own `DiffusionGemmaGenerationMixin._denoising_step` (with a stand-in `self` and decoder) in
generate()'s order, so any difference in op order, RNG calls, freezing or stop bookkeeping shows up as a token mismatch.
"""

from types import SimpleNamespace

import pytest
import torch

hf = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
from transformers.generation import EosTokenCriteria, LogitsProcessorList, StoppingCriteriaList  # noqa: E402

from dgemma import sampling as S  # noqa: E402

V, L, N = 37, 8, 8
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="needs CUDA")])]


def varied_logits(*shape, seed=0):
    """Random logits with a per-position scale, so entropies range from ~0 to ~log V and acceptance varies."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=g) * (torch.rand(*shape, 1, generator=g) * 12 + 0.3)


def test_temperature_matches_every_step():
    proc = hf.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=N)
    scores = varied_logits(2, L)
    for n in range(N, 0, -1):
        ref = proc(None, scores, cur_step=torch.tensor(n, dtype=torch.int32))
        ours = scores / S.linear_temperature(torch.tensor([n, n]), N, 0.4, 0.8)[:, None, None]
        assert torch.equal(ours, ref), n


@pytest.mark.parametrize("device", DEVICES)
def test_init_canvas_and_acceptance_mask(device):
    torch.manual_seed(3)
    sampler = hf.EntropyBoundSampler(hf.EntropyBoundSamplerConfig(entropy_bound=0.3), L, V, N)
    ref_canvas = sampler.initialize_canvas(4, device)
    torch.manual_seed(3)
    assert torch.equal(S.init_canvas(4, L, V, None, device), ref_canvas)
    logits = varied_logits(4, L)
    logits[1] = logits[1, :1]  # all-equal entropies (ties: the reference's sort order decides which are kept)
    logits[2] = torch.nn.functional.one_hot(torch.arange(L) % V, V) * 1e4  # zero-entropy row
    logits[3, :4] = logits[3, 4:]  # pairs of tied entropies
    logits = logits.to(device)  # tie order is whatever torch.sort(stable=False) gives on this device: same call
    entropy = S.token_entropy(logits)
    assert torch.equal(entropy, torch.distributions.Categorical(logits=logits).entropy())
    for bound in (0.05, 0.3, 2.0, 7.0):
        sampler.entropy_bound = bound
        sampler.accept_canvas(ref_canvas, ref_canvas, logits, 1)
        assert torch.equal(S.entropy_bound_accept(entropy, bound), sampler.accepted_token_mask), bound


@pytest.mark.parametrize("s", [0, 1, 2])
def test_stop_decisions_match(s):
    ref = hf.StableAndConfidentStoppingCriteria(stability_threshold=s, confidence_threshold=0.05)
    rule = S.all_of(S.token_stable(s), S.mean_entropy_below(0.05))
    history = torch.full((rule.num_history, 3, L), -1)
    g = torch.Generator().manual_seed(1)
    for k in range(7):
        argmax = torch.randint(0, 3, (3, L), generator=g) * (torch.arange(3) > 0)[:, None]  # row 0 always stable
        margin = torch.tensor([6.0, 9.0, 12.0]) + k  # mean entropies cross 0.05 as k grows
        logits = torch.randn(3, L, V, generator=g) + margin[:, None, None] * torch.nn.functional.one_hot(argmax, V)
        ours = rule(argmax, S.token_entropy(logits), history)
        history = torch.cat([history[1:], argmax[None]])
        assert torch.equal(ours, ref(argmax, logits)), k


def test_truncate_matches_finalize_canvas():
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        tokens = torch.randint(0, 8, (4, L), generator=g)
        prev = torch.tensor([False, True, False, False])
        gen_cfg = SimpleNamespace(pad_token_id=0, eos_token_id=[1, 6])
        crit = StoppingCriteriaList([EosTokenCriteria([1, 6])])
        ref, ref_fin = hf.DiffusionGemmaGenerationMixin._finalize_canvas(
            tokens.clone(), prev, gen_cfg, crit, L, torch.tensor([1, 6]))
        ours, fin = S.truncate_at_stop_ids(tokens, [1, 6], 0, was_finished=prev)
        assert torch.equal(ours, ref) and torch.equal(fin, ref_fin)


def fake_decoder(tokens, sc, call, late=None):
    """Deterministic stand-in for the model: logits depend on the canvas and self-conditioning, so any divergence in
    either propagates. Row 0 is peaked (stops early), row 1 from call 3, row 2 from call `late` (None: never)."""
    logits = varied_logits(3, L, seed=100 + call).to(tokens.device) + 1.5 * torch.nn.functional.one_hot(tokens, V)
    target = torch.nn.functional.one_hot(torch.arange(L, device=tokens.device) * 5 % V, V) * 40.0
    logits[0] += target
    if call >= 3:
        logits[1] += target
    if late is not None and call >= late:
        logits[2] += target
    return logits if sc is None else logits + 0.1 * sc


def hf_loop(seed, t, bound, s, c, late, device):
    """generate()'s inner loop (section 1.b-1.c) around HF's own _denoising_step, global RNG."""
    torch.manual_seed(seed)
    sampler = hf.EntropyBoundSampler(hf.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, N)
    temperature = [hf.LinearTemperatureScheduleLogitsProcessor(t[0], t[1], N)] if t[0] is not None else []
    procs = LogitsProcessorList(temperature)
    crit = hf.StableAndConfidentStoppingCriteria(s, c) if c is not None else None
    fake_self = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(vocab_size=V)),
                                model=SimpleNamespace(decoder=SimpleNamespace(embed_tokens=SimpleNamespace(
                                    weight=torch.empty(0)))))
    canvas = sampler.initialize_canvas(3, device)
    argmax, sc, finished, out, calls = canvas, None, torch.zeros(3, dtype=torch.bool, device=device), [canvas], [0]

    def decoder_forward(decoder_input_ids, self_conditioning_logits, **_):
        calls[0] += 1
        return SimpleNamespace(logits=fake_decoder(decoder_input_ids, self_conditioning_logits, calls[0] - 1, late))

    for cur_step in reversed(range(1, N + 1)):
        canvas, argmax, sc, finished = hf.DiffusionGemmaGenerationMixin._denoising_step(
            fake_self, decoder_forward=decoder_forward, current_canvas=canvas, argmax_canvas=argmax, input_ids=None,
            decoder_position_ids=None, self_conditioning_logits=sc, mask_mapping=None, past_key_values=None,
            finished_denoising=finished, cur_step=cur_step, sampler=sampler, logits_processor=procs,
            diffusion_stopping_criteria=crit)
        out.append((canvas.clone(), argmax.clone(), finished.clone(), sc.clone()))
        if torch.all(finished):
            break
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("t,bound,s,c,late", [((0.4, 0.8), 0.1, 1, 0.005, None), ((0.0, 1.0), 0.6, 2, 0.01, None),
                                              ((None, None), 0.3, 0, 0.005, None), ((0.4, 0.8), 0.1, 1, None, None),
                                              ((0.4, 0.8), 0.1, 1, 0.005, 4)])  # last: all rows stop before N
def test_multi_step_loop_matches_hf(explicit, t, bound, s, c, late, device):
    ref = hf_loop(11, t, bound, s, c, late, device)
    cfg = S.StepConfig.from_generation_config(N, t[0], t[1], bound, s, c)
    g = torch.Generator(device).manual_seed(11) if explicit else None
    if not explicit:
        torch.manual_seed(11)
    state = S.init_state(S.init_canvas(3, L, V, g, device), cfg)
    ours = [state.tokens]
    while not state.done.all():  # the engine's loop: all rows stopped or out of steps
        state = S.step(fake_decoder(state.tokens, state.sc_logits, len(ours) - 1, late), state, cfg, g)
        ours.append((state.tokens, state.argmax, state.stopped, state.sc_logits))
        live = ~state.stopped  # rows that ran this step: their entropies must be the reference's bits
        if live.any():
            ref_h = torch.distributions.Categorical(logits=state.sc_logits[live]).entropy()
            assert torch.equal(state.entropy[live], ref_h)
    assert len(ours) == len(ref) and torch.equal(ours[0], ref[0])
    for k, (a, b) in enumerate(zip(ours[1:], ref[1:])):
        for name, x, y in zip(("tokens", "argmax", "stopped", "sc_logits"), a, b):
            assert torch.equal(x, y), (k, name)
    assert len(ours) == (N + 1 if late is None else 7)  # the early exit is exercised by the `late` case
    if c is not None and s < 2:  # the fixture makes row 0 stop first, then row 1, row 2 only if `late`
        assert ours[2][2].tolist()[0] and ours[-1][2].tolist()[2] == (late is not None)
