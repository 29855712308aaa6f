"""The `graph` backend's step without the CUDA graph, on CPU: what GraphSampler captures (the
model call, eager or compiled with the custom GroupNorm+SiLU op, then the fused step and k -= 1
on static buffers, the noise key written in place) walked step by step against the reference.

The capture and replay themselves need CUDA (tests/test_graph.py); this checks the captured
code's logic where CI can run it (Triton under its interpreter, the op as the torch twin).
"""
import pytest
import torch

import fastddpm.graph as graph
from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.noise import XT_STEP, noise
from fastddpm.unet import group_norm_impl
from helpers import randomized_unet, rel_err

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
