"""The `graph` backend's step without the CUDA graph, on CPU: what GraphSampler captures (the
model call, eager or compiled with the custom GroupNorm+SiLU op, then the fused step and k -= 1
on static buffers, the noise key written in place) walked step by step against the reference.

The capture and replay themselves need CUDA (tests/test_graph.py); this checks the captured
code's logic where CI can run it (Triton under its interpreter, the op as the torch twin). With
`eager_replay` the whole `graph.run` path (reset, the replay loop in chunks of steps_per_graph,
the callback, the cached sampler) runs with each "graph" replaying its steps eagerly.
"""
import pytest
import torch

import fastddpm.graph as graph
from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.noise import XT_STEP, noise
from fastddpm.unet import group_norm_impl
from fastddpm.analytic import gamma_closed_form_gaussian
from helpers import GaussianEpsModule, randomized_unet, rel_err

pytest.importorskip("triton")


@pytest.fixture
def no_cuda_check(monkeypatch):
    """GraphSampler refuses a CPU model (it captures CUDA graphs); its step alone runs anywhere."""
    monkeypatch.setattr(graph, "graph_available", lambda device: None)


@pytest.mark.slow
@pytest.mark.parametrize("graph_capture", ["eager", "compiled"])
def test_graph_step_walks_the_reference_trajectory(no_cuda_check, graph_capture):
    model = randomized_unet("tiny", seed=5, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("3")
    shape, seed, offset = (2, 3, 8, 8), 11, 3
    ref_steps = []
    ref = sample(model, d, shape, seed=seed, sample_offset=offset, callback=ref_steps.append)

    gs = graph.GraphSampler(model, d, shape, graph_capture=graph_capture, keep_pred_x0=True)
    gs.x.copy_(noise(seed, XT_STEP, shape, offset))
    gs.key[0].fill_(seed)
    gs.key[1].fill_(offset)
    gs.k.fill_(d.num_steps - 1)
    with torch.no_grad(), group_norm_impl(model, gs.group_norm):
        for b in ref_steps:
            gs._step()
            assert rel_err(gs.x, b["x"]) < 1e-5
            assert rel_err(gs.pred_x0, b["pred_x0"]) < 1e-5
    assert int(gs.k) == -1
    assert rel_err(gs.x.clamp(-1, 1), ref) < 1e-5


@pytest.mark.slow
def test_compiled_capture_serves_many_batch_sizes(no_cuda_check):
    """graph_capture="compiled" for 12 batch sizes in one process, one sampler per shape as
    graph._sampler_for builds them (one at a time): every sampler calls the same compiled model
    (compile_for_graph's cache, a dynamic batch), its captured step function (`_step`, without the
    capture) gives the reference's step within 1e-5, and there is 1 compile, not one per shape (the
    9th would have hit Dynamo's recompile limit). A one-step process at t = 999, unclipped: the result
    is the model's x0 prediction. A clean Dynamo cache, as in tests/test_backends.py."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = randomized_unet("tiny", seed=3, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("trailing1")
    before = counters["stats"]["unique_graphs"]
    forwards = set()
    for batch in range(2, 14):  # batch 1 (a compile of its own) is tests/test_backends.py's
        shape = (batch, 3, 8, 8)
        ref_steps = []
        sample(model, d, shape, seed=batch, clip_denoised=False, callback=ref_steps.append)
        gs = graph.GraphSampler(model, d, shape, graph_capture="compiled", clip_denoised=False, keep_pred_x0=True)
        forwards.add(id(gs.forward))
        gs.reset(noise(batch, XT_STEP, shape), seed=batch)
        with torch.no_grad(), group_norm_impl(model, gs.group_norm):
            gs._step()
        assert rel_err(gs.x, ref_steps[0]["x"]) < 1e-5, batch
        assert rel_err(gs.pred_x0, ref_steps[0]["pred_x0"]) < 1e-5, batch
    assert len(forwards) == 1
    assert counters["stats"]["unique_graphs"] - before == 1


@pytest.fixture
def no_capture(monkeypatch, no_cuda_check):
    """Stand-in for the CUDA capture: marks the sampler captured and counts the captures."""
    captures = []

    def capture(self):
        captures.append(self)
        self.graphs = {self.steps_per_graph: "captured"}

    monkeypatch.setattr(graph.GraphSampler, "capture", capture)
    monkeypatch.setattr(graph, "_CACHE", {})
    return captures


def test_graph_cache_follows_the_weights_fingerprint(no_capture):
    """The captured sampler is reused while the weights are the same tensors and captured again
    after load_state_dict(assign=True) or an in-place dtype change (never stale pointers)."""
    from fastddpm.options import SampleOptions

    model = randomized_unet("tiny", seed=1, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("3")
    opts, shape = SampleOptions(graph_capture="eager"), (2, 3, 8, 8)
    graph.warmup(model, d, shape, opts)
    graph.warmup(model, d, shape, opts)
    assert len(no_capture) == 1
    graph.warmup(model, d, shape, opts.with_(graph_capture="compiled"))
    assert len(no_capture) == 2 and no_capture[-1].graph_capture == "compiled"
    model.load_state_dict(randomized_unet("tiny", seed=2, image_size=8).state_dict(), assign=True)
    graph.warmup(model, d, shape, opts)
    assert len(no_capture) == 3
    graph.warmup(model, d, shape, opts)
    assert len(no_capture) == 3
    model.to(torch.bfloat16)
    graph.warmup(model, d, shape, opts)
    assert len(no_capture) == 4 and no_capture[-1].model_dtype == torch.bfloat16


def test_graph_refuses_a_callback_over_multi_step_graphs_before_capturing(no_capture):
    from fastddpm.errors import BackendUnavailableError
    from fastddpm.options import SampleOptions

    model = randomized_unet("tiny", seed=1, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("3")
    with pytest.raises(BackendUnavailableError, match="steps_per_graph=1"):
        graph.run(model, d, (2, 3, 8, 8), SampleOptions(callback=print, steps_per_graph=2),
                  device=torch.device("cpu"))
    assert no_capture == []


class _EagerReplay:
    """Stands in for a captured CUDA graph of n steps: replay() runs them eagerly."""

    def __init__(self, sampler: graph.GraphSampler, n: int):
        self.sampler, self.n = sampler, n

    def replay(self):
        with torch.no_grad(), group_norm_impl(self.sampler.model, self.sampler.group_norm):
            for _ in range(self.n):
                self.sampler._step()


@pytest.fixture
def eager_replay(monkeypatch, no_cuda_check):
    def capture(self):
        sizes = {self.steps_per_graph, self.num_steps % self.steps_per_graph} - {0}
        self.graphs = {n: _EagerReplay(self, n) for n in sizes}

    monkeypatch.setattr(graph.GraphSampler, "capture", capture)
    monkeypatch.setattr(graph, "_CACHE", {})


@pytest.mark.parametrize("sampler, eta, var_type, steps_per_graph", [
    ("dpm++2m", 0.0, "fixedlarge", 1), ("dpm++2m-sde", 0.0, "learned_range", 2),  # v ignored by the solvers
    ("ancestral", 0.0, "analytic", 1), ("ddim", 0.5, "analytic", 3)])
def test_graph_run_follows_the_reference_for_every_sampler(eager_replay, sampler, eta, var_type, steps_per_graph):
    """graph.run for the new samplers and the analytic variance (an exact eps-model of Gaussian data,
    5 respaced steps, fp32): the result within 1e-5 relative of the reference, and per step with a
    callback. Then the cached sampler again, its buffers first poisoned with NaN (as stale memory
    may be), from a given x_T: reset() zero-fills the solvers' prev_x0 state, so nothing leaks."""
    full = GaussianDiffusion(make_betas("linear", 100))
    std = (0.5, 0.3, 0.4)
    gamma = gamma_closed_form_gaussian(full.schedule.alphas_cumprod, torch.tensor(std))
    learn_sigma = var_type == "learned_range"
    d = GaussianDiffusion(full.schedule.betas, var_type=var_type, gamma=gamma).respace("5")
    model = GaussianEpsModule(full, (0.2, -0.3, 0.5), std, learn_sigma=learn_sigma)
    shape = (2, 3, 8, 8)
    kw = dict(seed=2**31 + 5, sample_offset=3, sampler=sampler, eta=eta)
    ref_steps = []
    ref = sample(model, d, shape, **kw, callback=ref_steps.append)
    out = sample(model, d, shape, **kw, backend="graph", graph_capture="eager", steps_per_graph=steps_per_graph)
    assert rel_err(out, ref) < 1e-5

    (cached,) = graph._CACHE.values()
    assert (cached.pred_x0 is not None) == (sampler in ("dpm++2m", "dpm++2m-sde"))
    for buf in (cached.x, cached.pred_x0):
        if buf is not None:
            buf.fill_(float("nan"))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    again = sample(model, d, shape, **kw, backend="graph", graph_capture="eager", steps_per_graph=steps_per_graph,
                   x_T=x_T)
    assert graph._CACHE and next(iter(graph._CACHE.values())) is cached  # replayed, not captured again
    assert rel_err(again, sample(model, d, shape, **kw, x_T=x_T)) < 1e-5

    if steps_per_graph == 1:
        steps = []
        sample(model, d, shape, **kw, backend="graph", graph_capture="eager", callback=steps.append)
        assert [s["k"] for s in steps] == [b["k"] for b in ref_steps] == [4, 3, 2, 1, 0]
        for a, b in zip(steps, ref_steps):
            assert rel_err(a["x"], b["x"]) < 1e-5 and rel_err(a["pred_x0"], b["pred_x0"]) < 1e-5
