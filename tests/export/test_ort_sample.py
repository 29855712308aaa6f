"""export/ort_sample.py, the torch-free sampler: its noise, schedule, update and loop against the reference.

The numpy twins are compared with fastddpm's torch code piece by piece (Philox words and
uniforms bit for bit; Box-Muller normals to float32 rounding, since numpy's and torch's float32
log and cos may differ in the last bit), then whole sampling trajectories step by step.
"""
from __future__ import annotations

import ast
import importlib
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.export import ort_sample
from fastddpm.generate import respaced_for
from fastddpm.noise import XT_STEP, noise
from fastddpm.sampling import reference_step
from helpers import rel_err
from onnx_helpers import ORT_THREADS

# the module (fastddpm.noise the attribute is the function of the same name)
noise_module = importlib.import_module("fastddpm.noise")


# ------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("seed,step,offset", [(0, XT_STEP, 0), (123456789012, 999, 5), (2**32 - 1, 0, 2**32 - 9)])
def test_philox_words_and_uniforms_are_bit_exact(seed, step, offset):
    e = np.arange(3000, dtype=np.uint32)[None, :]
    i = np.arange(offset, offset + 7, dtype=np.uint64).astype(np.uint32)[:, None]
    ours = ort_sample.philox4x32(e, i, np.uint32(0), np.uint32(0), seed & 0xFFFFFFFF, step & 0xFFFFFFFF)
    theirs = noise_module.philox4x32(torch.from_numpy(e.astype(np.int64)), torch.from_numpy(i.astype(np.int64)),
                                     torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64), seed, step)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.astype(np.int64), b.numpy())
    for a, b in zip(ours[:2], theirs[:2]):
        assert np.array_equal(ort_sample._uniform(a), noise_module._uniform(b).numpy())


@pytest.mark.parametrize("seed,step,shape,offset", [
    (0, XT_STEP, (7, 3, 16, 16), 0),          # x_T of a tiny batch
    (2**32 - 1, 999, (9, 3, 32, 32), 5),   # the largest seed (all 32 key bits set) and an offset
    (5, 17, (3, 1, 200, 120), 0),             # samples larger than one block of rows
])
def test_normals_match_the_torch_stream(seed, step, shape, offset):
    ours = ort_sample.noise(seed, step, shape, offset)
    theirs = noise(seed, step, shape, offset).numpy()
    assert ours.dtype == np.float32 and ours.shape == shape
    # float32 log / cos of numpy and torch differ by a few ulp at most: |z| < 6, so 1e-6 absolute
    assert np.abs(ours - theirs).max() < 1e-6


def test_noise_depends_only_on_the_sample_index():
    whole = ort_sample.noise(3, 40, (6, 2, 5, 5))
    assert np.array_equal(whole[2:], ort_sample.noise(3, 40, (4, 2, 5, 5), sample_offset=2))
    with ThreadPoolExecutor(2) as pool:  # drawn in parallel blocks: the same numbers
        parallel = ort_sample.noise(3, 40, (300, 2, 15, 15), pool=pool)
    assert np.array_equal(parallel, ort_sample.noise(3, 40, (300, 2, 15, 15)))


# ------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("T,steps,sampler", [(1000, None, "ancestral"), (1000, 50, "ancestral"), (1000, 50, "ddim"),
                                             (1000, 7, "ddim"), (100, 100, "ddim"), (100, 1, "ancestral"),
                                             (37, 10, "ancestral"), (37, 3, "ddim")])
def test_respacing_and_tables_match_the_reference(T, steps, sampler):
    full = GaussianDiffusion(make_betas("cosine", T), var_type="fixedsmall")
    process = respaced_for(full, steps, sampler)
    ours = ort_sample.Process.from_full(full.schedule.betas.numpy(), steps, sampler, "eps", "fixedsmall")
    assert ours.timesteps.tolist() == process.timesteps.tolist()
    s = process.schedule
    for name, want in [("alphas_cumprod", s.alphas_cumprod), ("alphas_cumprod_prev", s.alphas_cumprod_prev),
                       ("sqrt_recip_alphas_cumprod", s.sqrt_recip_alphas_cumprod),
                       ("sqrt_recipm1_alphas_cumprod", s.sqrt_recipm1_alphas_cumprod),
                       ("posterior_mean_coef1", s.posterior_mean_coef1),
                       ("posterior_mean_coef2", s.posterior_mean_coef2),
                       ("posterior_log_variance_clipped", s.posterior_log_variance_clipped),
                       ("log_fixedlarge_variance", torch.log(s.fixedlarge_variance))]:
        np.testing.assert_allclose(getattr(ours, name), want.numpy(), rtol=1e-13, atol=0, err_msg=name)


def test_bad_step_counts():
    betas = make_betas("linear", 100).numpy()
    with pytest.raises(ort_sample.SampleError, match="between 1 and the model's T = 100"):
        ort_sample.Process.from_full(betas, 101, "ancestral", "eps", "fixedlarge")


# ------------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("mean_type,var_type,sampler,eta,clip", [
    (m, v, s, e, c) for (m, v), (s, e), c in itertools.product(
        [("eps", "fixedlarge"), ("eps", "fixedsmall"), ("x0", "fixedlarge"), ("xprev", "fixedsmall"),
         ("eps", "learned"), ("eps", "learned_range")],
        [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)], [True, False])
])
def test_numpy_update_matches_reference_step(mean_type, var_type, sampler, eta, clip):
    full = GaussianDiffusion(make_betas("linear", 50), mean_type=mean_type, var_type=var_type)
    process = full.respace("12")
    ours = ort_sample.Process(process.schedule.betas.numpy(), process.timesteps.numpy(), mean_type, var_type)
    gen = torch.Generator().manual_seed(3)
    channels = 4 if var_type.startswith("learned") else 2
    for k in (11, 5, 0):
        x = 1.5 * torch.randn(3, 2, 4, 5, generator=gen)
        out = torch.randn(3, channels, 4, 5, generator=gen)
        if var_type == "learned":
            out[:, 2:] = -3.0 + 0.5 * out[:, 2:]  # log variances of plausible size
        want_x, want_x0 = reference_step(process, x, k, out, seed=9, sampler=sampler, eta=eta, clip_denoised=clip)
        z = noise(9, int(process.timesteps[k]), x.shape).numpy()
        got_x, got_x0 = ort_sample.update(ours, x.numpy(), out.numpy(), ours.coefficients(k, sampler, eta), z, clip)
        assert got_x.dtype == np.float32
        assert rel_err(torch.from_numpy(got_x), want_x) < 1e-6, k
        assert rel_err(torch.from_numpy(got_x0), want_x0) < 1e-6, k


@pytest.mark.parametrize("mean_type,trained,variance,sampler,eta", [
    (m, tv, v, s, e) for m, tv in [("eps", "fixedlarge"), ("x0", "fixedsmall"), ("xprev", "fixedlarge"),
                                   ("eps", "learned_range")]
    for v, s, e in [(None, "dpm++2m", 0.0), (None, "dpm++2m-sde", 0.0), ("analytic", "ancestral", 0.0),
                    ("analytic", "ddim", 0.5), ("fixedsmall", "ancestral", 0.0)]
])
def test_numpy_update_of_the_new_samplers_and_variances(mean_type, trained, variance, sampler, eta):
    """dpm++2m (-sde) with the previous x0 prediction, Analytic-DPM's variance, and a learned-variance model
    sampled with a fixed or analytic variance (its variance channels ignored), one step at a time."""
    gamma = np.random.default_rng(2).uniform(0.2, 1.0, 50)
    full = GaussianDiffusion(make_betas("cosine", 50), mean_type=mean_type, var_type=trained, gamma=gamma)
    process = respaced_for(full.with_variance(variance) if variance else full, 12, sampler, "trailing")
    ours = ort_sample.Process(process.schedule.betas.numpy(), process.timesteps.numpy(), mean_type, process.var_type,
                              learn_sigma=process.learn_sigma, gamma=gamma)
    gen = torch.Generator().manual_seed(5)
    channels = 4 if process.learn_sigma else 2
    for k in (11, 10, 5, 0):
        x = 1.5 * torch.randn(3, 2, 4, 5, generator=gen)
        out = torch.randn(3, channels, 4, 5, generator=gen)
        prev = None if k == 11 else torch.rand(3, 2, 4, 5, generator=gen) * 2 - 1
        want_x, want_x0 = reference_step(process, x, k, out, seed=9, sampler=sampler, eta=eta, prev_x0=prev)
        z = noise(9, int(process.timesteps[k]), x.shape).numpy()
        got_x, got_x0 = ort_sample.update(ours, x.numpy(), out.numpy(), ours.coefficients(k, sampler, eta), z, True,
                                          None if prev is None else prev.numpy())
        assert rel_err(torch.from_numpy(got_x), want_x) < 1e-6, k
        assert rel_err(torch.from_numpy(got_x0), want_x0) < 1e-6, k


def test_ort_sample_imports_only_the_standard_library_numpy_and_onnxruntime():
    """Every import in the file, at any depth (Pillow is optional): it must run alone on a host without torch."""
    tree = ast.parse(Path(ort_sample.__file__).read_text())
    nodes = list(ast.walk(tree))
    roots = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.level == 0}
    foreign = roots - set(sys.stdlib_module_names) - {"numpy", "onnxruntime", "PIL"}
    assert not foreign and {"numpy", "onnxruntime"} <= roots, foreign
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in nodes)  # no relative imports


# ------------------------------------------------------------------------------------------ trajectories
def reference_trajectory(model, process, shape, seed, sampler, eta):
    states = []
    sample(model, process, shape, seed=seed, sampler=sampler, eta=eta,
           callback=lambda info: states.append(info["x"].clone()))
    return states


@pytest.mark.parametrize("name,sampler,eta", [("fp32", "ancestral", 0.0), ("fp32", "ddim", 0.6),
                                              ("step", "ancestral", 0.0)])
def test_trajectory_equals_the_reference(exports, tiny, name, sampler, eta):
    """Every intermediate x of a short run within 1e-5 relative (measured about 1e-6: z's last bits)."""
    model, full = tiny
    process = respaced_for(full, 8, sampler)
    onnx_model = ort_sample.OnnxModel(exports[name], provider="cpu", threads=ORT_THREADS)
    ours = ort_sample.Process.from_full(onnx_model.betas, 8, sampler, "eps", "fixedlarge")
    shape = (4, 3, 16, 16)
    states = []
    final = ort_sample.sample_loop(onnx_model, ours, shape, seed=21, sampler=sampler, eta=eta,
                                   callback=lambda info: states.append(info["x"].copy()))
    want = reference_trajectory(model, process, shape, 21, sampler, eta)
    assert len(states) == len(want) == 8
    for i, (got, ref) in enumerate(zip(states, want)):
        assert rel_err(torch.from_numpy(got), ref) < 1e-5, f"step {i}"
    assert rel_err(torch.from_numpy(final), want[-1].clamp(-1, 1)) < 1e-5


def test_io_binding_loop_equals_the_host_loop(exports):
    """The device loop (I/O binding, state in OrtValues swapped per step) run on the CPU provider.

    On a GPU the same code binds CUDA OrtValues; here it proves the binding, the buffer swap and
    the fetches (every step with a callback, else only the last) give the host loop's numbers.
    """
    step = ort_sample.OnnxModel(exports["step"], provider="cpu", threads=ORT_THREADS)
    for sampler, eta in (("ancestral", 0.0), ("ddim", 0.5)):
        process = ort_sample.Process.from_full(step.betas, 5, sampler, "eps", "fixedlarge")
        host = ort_sample.sample_loop(step, process, (3, 3, 16, 16), seed=5, sampler=sampler, eta=eta)
        bound = ort_sample.sample_loop(step, process, (3, 3, 16, 16), seed=5, sampler=sampler, eta=eta,
                                       device_loop=True)
        np.testing.assert_array_equal(bound, host)
        states = []
        ort_sample.sample_loop(step, process, (3, 3, 16, 16), seed=5, sampler=sampler, eta=eta, device_loop=True,
                               callback=lambda info: states.append((info["x"].copy(), info["pred_x0"].copy())))
        assert len(states) == 5 and np.array_equal(np.clip(states[-1][0], -1, 1), host)
        assert all(np.abs(x0).max() <= 1.0 for _, x0 in states)  # pred_x0 is clipped, and really fetched
    eps = ort_sample.OnnxModel(exports["fp32"], provider="cpu", threads=ORT_THREADS)
    with pytest.raises(ort_sample.SampleError, match="whole-step graph"):
        ort_sample.sample_loop(eps, process, (1, 3, 16, 16), device_loop=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["step", "fp32"])
def test_cuda_provider_matches_the_cpu_provider(exports, name):
    """On a GPU host with onnxruntime-gpu: the CUDA run (device loop for the step graph, I/O binding)
    against the CPU provider. 1e-2: ORT's CUDA convolutions may use TF32 (its use_tf32 default)."""
    onnxruntime = pytest.importorskip("onnxruntime")

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (the CUDA execution provider)")
    cuda = ort_sample.OnnxModel(exports[name], provider="cuda")
    cpu = ort_sample.OnnxModel(exports[name], provider="cpu", threads=ORT_THREADS)
    process = ort_sample.Process.from_full(cpu.betas, 6, "ancestral", "eps", "fixedlarge")
    got = ort_sample.sample_loop(cuda, process, (16, 3, 16, 16), seed=3)
    want = ort_sample.sample_loop(cpu, process, (16, 3, 16, 16), seed=3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(want)) < 1e-2


def test_sample_offset_shards_exactly(exports):
    onnx_model = ort_sample.OnnxModel(exports["fp32"], provider="cpu", threads=ORT_THREADS)
    process = ort_sample.Process.from_full(onnx_model.betas, 3, "ancestral", "eps", "fixedlarge")
    whole = ort_sample.sample_loop(onnx_model, process, (5, 3, 16, 16), seed=2)
    tail = ort_sample.sample_loop(onnx_model, process, (2, 3, 16, 16), seed=2, sample_offset=3)
    np.testing.assert_allclose(tail, whole[3:], rtol=0, atol=1e-5)  # batch-size independence up to ORT's kernels


def test_loop_refuses_mismatched_requests(exports):
    step = ort_sample.OnnxModel(exports["step"], provider="cpu", threads=ORT_THREADS)
    process = ort_sample.Process.from_full(step.betas, 3, "ancestral", "eps", "fixedlarge")
    with pytest.raises(ort_sample.SampleError, match="clip_denoised=True"):
        ort_sample.sample_loop(step, process, (1, 3, 16, 16), clip_denoised=False)
    with pytest.raises(ort_sample.SampleError, match=r"shape \[B, 3, 16, 16\]"):
        ort_sample.sample_loop(step, process, (1, 3, 8, 8))
    other = ort_sample.Process(process.betas, process.timesteps, "x0", "fixedlarge")
    with pytest.raises(ort_sample.SampleError, match="process it was exported with"):
        ort_sample.sample_loop(step, other, (1, 3, 16, 16))
    with pytest.raises(ort_sample.SampleError, match="eta"):
        ort_sample.sample_loop(step, process, (1, 3, 16, 16), sampler="ddim", eta=1.5)
