"""The backend registry, and the `compile` backend against the reference."""
import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.backends import BACKENDS, Backend, get_backend, group_norm_impl, triton_available
from fastddpm.errors import BackendUnavailableError, FastDDPMError
from fastddpm.unet import GroupNormAct
from helpers import GaussianEpsModule, randomized_unet, rel_err


def test_registry_names_the_contract_backends():
    assert set(BACKENDS) == {"reference", "triton", "graph", "compile", "onnx"}
    with pytest.raises(FastDDPMError, match="'reference', 'triton', 'graph', 'compile', 'onnx'"):
        get_backend("cuda")


def test_backend_records_validate_themselves():
    with pytest.raises(ValueError):
        Backend("", "", lambda d: None)


def test_triton_refuses_a_cpu_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        triton_available(torch.device("cpu"))


def test_graph_backend_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        get_backend("graph").check(torch.device("cpu"))


def test_group_norm_seam_is_restored_after_use():
    model = randomized_unet("tiny")
    sentinel = lambda *a, **k: None  # noqa: E731
    with group_norm_impl(model, sentinel):
        assert all(m.impl is sentinel for m in model.modules() if isinstance(m, GroupNormAct))
    assert not any(m.impl is sentinel for m in model.modules() if isinstance(m, GroupNormAct))


def test_compile_backend_swaps_in_the_custom_op():
    from fastddpm.kernels.group_norm_op import group_norm_silu_op

    assert get_backend("compile").group_norm_silu is group_norm_silu_op


def test_compile_cache_follows_the_weights_fingerprint():
    """compile_model keeps its wrapper while the weights are the same tensors, and makes a new one
    after an in-place dtype change or load_state_dict(assign=True). (No compilation happens:
    torch.compile compiles on the first call.)"""
    from fastddpm.compiled import compile_model

    model = randomized_unet("tiny", seed=1, image_size=8)
    first = compile_model(model)
    assert compile_model(model) is first
    model.load_state_dict(randomized_unet("tiny", seed=2, image_size=8).state_dict(), assign=True)
    second = compile_model(model)
    assert second is not first and compile_model(model) is second
    model.to(torch.bfloat16)
    assert compile_model(model) is not second


@pytest.mark.slow
def test_compile_backend_reproduces_the_reference_trajectory():
    """One Inductor compile of the tiny U-Net at 8x8, batch 2, with the custom GroupNorm+SiLU op:
    one forward within 1e-5 relative of the eager reference (and the op ran once per GroupNorm),
    then the fp32 loop within 1e-4 (Inductor may reorder float sums), ancestral and dpm++2m (the
    multistep solver through the same compiled model: the backend keeps reference_step)."""
    from fastddpm.compiled import compile_model
    from fastddpm.kernels.group_norm_op import group_norm_silu_op

    model = randomized_unet("tiny", seed=2, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("3")
    x = torch.randn(2, 3, 8, 8)
    t = d.tables(torch.device("cpu"), torch.float32)["timesteps"][1].expand(2)  # as denoise_loop passes it
    with torch.no_grad():
        ref_out = model(x, t)
        compiled = compile_model(model)
        with group_norm_impl(model, group_norm_silu_op):
            compiled(x, t)  # compiles
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = compiled(x, t)
    assert rel_err(out, ref_out) < 1e-5
    op_calls = sum(e.count for e in prof.key_averages() if e.key == "fastddpm::group_norm_silu")
    assert op_calls == sum(isinstance(m, GroupNormAct) for m in model.modules())

    ref_steps, out_steps = [], []
    ref = sample(model, d, (2, 3, 8, 8), seed=1, callback=ref_steps.append)
    out = sample(model, d, (2, 3, 8, 8), seed=1, backend="compile", callback=out_steps.append)
    assert len(out_steps) == len(ref_steps) == 3
    for a, b in zip(out_steps, ref_steps):
        assert rel_err(a["x"], b["x"]) < 1e-4
    assert rel_err(out, ref) < 1e-4

    ref_steps, out_steps = [], []
    ref = sample(model, d, (2, 3, 8, 8), seed=1, sampler="dpm++2m", callback=ref_steps.append)
    out = sample(model, d, (2, 3, 8, 8), seed=1, sampler="dpm++2m", backend="compile", callback=out_steps.append)
    assert len(out_steps) == len(ref_steps) == 3
    for a, b in zip(out_steps, ref_steps):
        assert rel_err(a["x"], b["x"]) < 1e-4 and rel_err(a["pred_x0"], b["pred_x0"]) < 1e-4
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("sampler, eta", [("ancestral", 0.0), ("ddim", 0.5), ("dpm++2m", 0.0), ("dpm++2m-sde", 0.0)])
def test_triton_backend_runs_every_sampler_from_a_given_x_T(sampler, eta):
    """sample(..., x_T=...) on the triton backend: every sampler starts from the given noise (not the
    seeded one) and follows the reference from it, fp32 within 1e-5 relative (an exact eps-model
    of Gaussian data over 4 respaced steps; the kernel and torch differ by rounding only)."""
    pytest.importorskip("triton")
    from fastddpm.sampling import SAMPLERS

    assert sampler in SAMPLERS
    full = GaussianDiffusion(make_betas("linear", 100))
    d = full.respace("4")
    model = GaussianEpsModule(full, (0.1, -0.2, 0.3), (0.5, 0.4, 0.3))
    x_T = 1.3 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = dict(seed=9, sampler=sampler, eta=eta)
    ref_steps, out_steps, seeded_steps = [], [], []
    ref = sample(model, d, (2, 3, 8, 8), x_T=x_T, callback=ref_steps.append, **kw)
    out = sample(model, d, (2, 3, 8, 8), x_T=x_T, backend="triton", callback=out_steps.append, **kw)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(out_steps, ref_steps):
        assert rel_err(a["x"], b["x"]) < 1e-5
    sample(model, d, (2, 3, 8, 8), backend="triton", callback=seeded_steps.append, **kw)
    assert rel_err(seeded_steps[0]["x"], ref_steps[0]["x"]) > 1e-2  # x_T, not the seeded start, was used


def _batch_sizes_setup():
    """A clean Dynamo cache (entries that earlier tests' models left on the U-Net's forward must not
    count here), the tiny U-Net at 8x8 and a one-step process at t = 999 (trailing spacing), where
    the unclipped result is the model's x0 prediction, so the model's output decides it."""
    torch._dynamo.reset()
    model = randomized_unet("tiny", seed=3, image_size=8)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("trailing1")
    assert d.timesteps.tolist() == [999]
    return model, d


@pytest.mark.slow
def test_compile_backend_samples_many_batch_sizes_in_one_process():
    """12 batch sizes in one process through sample(..., backend="compile"), 1 step each, each within
    1e-5 of the reference. With static shapes the 9th batch size hit Dynamo's recompile limit (8), an
    error under fullgraph=True; with the batch dynamic (compiled.py) there are 2 compiles: batch 1 and
    one for the others. (Not every size shares one: on a CPU the convolution's shape function
    branches at batch 16, so batch 16 and up compile once more, still a bounded number.)"""
    from torch._dynamo.utils import counters

    model, d = _batch_sizes_setup()
    before = counters["stats"]["unique_graphs"]
    for batch in range(1, 13):
        kw = dict(seed=batch, clip_denoised=False)
        ref = sample(model, d, (batch, 3, 8, 8), **kw)
        out = sample(model, d, (batch, 3, 8, 8), backend="compile", **kw)
        assert rel_err(out, ref) < 1e-5, batch
    assert counters["stats"]["unique_graphs"] - before <= 2
