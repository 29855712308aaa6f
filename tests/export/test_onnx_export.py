"""ONNX export: valid graphs (onnx.checker), the chosen GroupNorm form, the metadata, and parity.

Parity compares ONNX Runtime (CPU provider) with the reference U-Net run in float64, on fresh
random inputs at batch 1, 7 and 64 (the dynamic batch): relative error below 1e-5 for fp32
graphs (measured about 4e-7) and below 5e-3 for fp16 graphs (about ten times fp16's unit
roundoff 4.9e-4; measured about 6e-4). On the CPU provider ONNX Runtime runs fp16 nodes that
lack an fp16 kernel through inserted casts, so the fp16 test checks the graph and its
rounding of weights and activations to fp16, not CUDA's fp16 kernels.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

# Skipped, not a collection error, where onnx or onnxruntime is missing (so `pytest -m gpu tests`
# still runs on a GPU host without them); onnx_export imports onnx, so it comes after.
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastddpm.diffusion import GaussianDiffusion  # noqa: E402
from fastddpm.errors import FastDDPMError  # noqa: E402
from fastddpm.export import ort_sample  # noqa: E402
from fastddpm.export.onnx_export import build_onnx, export_onnx  # noqa: E402
from fastddpm.noise import noise  # noqa: E402
from fastddpm.sampling import reference_step  # noqa: E402
from helpers import rel_err  # noqa: E402
from onnx_helpers import ORT_THREADS  # noqa: E402

TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "gn21": 1e-5}


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("name", ["fp32", "fp16", "gn21", "step", "step_learned"])
def test_every_export_passes_the_checker_and_has_a_dynamic_batch(exports, name):
    model = onnx.load(str(exports[name]))
    onnx.checker.check_model(model, full_check=True)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name != "coef":
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert all(n.domain != "fastddpm" for n in model.graph.node)  # every placeholder lowered


def test_group_norm_forms(exports):
    default, gn21 = onnx.load(str(exports["fp32"])), onnx.load(str(exports["gn21"]))
    # default: InstanceNormalization at opset 17; 2 per ResBlock, 1 per attention block, 1 at the output
    assert "InstanceNormalization" in ops(default) and "GroupNormalization" not in ops(default)
    assert [o.version for o in default.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert "GroupNormalization" in ops(gn21) and "InstanceNormalization" not in ops(gn21)
    assert [o.version for o in gn21.opset_import if o.domain in ("", "ai.onnx")] == [21]
    count = sum(n.op_type == "GroupNormalization" for n in gn21.graph.node)
    assert count == sum(n.op_type == "InstanceNormalization" for n in default.graph.node) == 21


def test_metadata_makes_one_file_enough(exports, tiny):
    model, diffusion = tiny
    props = {p.key: p.value for p in onnx.load(str(exports["fp16"])).metadata_props}
    meta = json.loads(props[ort_sample.META_KEY])
    assert meta["format"] == "fastddpm-onnx" and meta["version"] == "2"
    assert meta["graph"] == "eps" and meta["dtype"] == "fp16" and meta["group_norm"] == "instancenorm"
    assert meta["unet"] == model.config.to_dict()
    assert meta["diffusion"] == diffusion.config()
    # the float64 betas survive JSON bit for bit
    assert np.array_equal(np.array(meta["betas"], dtype=np.float64), diffusion.schedule.betas.numpy())
    assert meta["gflop_per_image_forward"] > 0


@pytest.fixture(scope="module")
def reference_io(tiny):
    """reference_io(batch) -> (x, t, float64 reference output): fresh random inputs, one reference per batch."""
    model, diffusion = tiny
    model64, cache = copy.deepcopy(model).double(), {}

    def get(batch: int):
        if batch not in cache:
            gen = torch.Generator().manual_seed(100 + batch)
            x = -0.3 + 1.2 * torch.randn(batch, 3, 16, 16, generator=gen)
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen)
            with torch.no_grad():
                cache[batch] = (x, t, model64(x.double(), t))
        return cache[batch]
    return get


@pytest.fixture(scope="module")
def sessions(exports):
    """name -> an ONNX Runtime CPU session of that export, opened once."""
    cache = {}

    def get(name: str) -> ort.InferenceSession:
        if name not in cache:
            cache[name] = session(exports[name])
        return cache[name]
    return get


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("name", ["fp32", "fp16", "gn21"])
def test_eps_parity_with_the_reference(sessions, reference_io, name, batch):
    x, t, ref = reference_io(batch)
    out = sessions(name).run(None, {"x": x.numpy(), "t": t.numpy()})[0]
    assert out.dtype == np.float32 and out.shape == (batch, 3, 16, 16)
    assert rel_err(torch.from_numpy(out), ref) < TOLERANCE[name]


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("dpm++2m", 0.0),
                                         ("dpm++2m-sde", 0.0)])
@pytest.mark.parametrize("name", ["step", "step_learned"])
def test_step_graph_matches_the_reference_step(sessions, tiny, tiny_learned, name, sampler, eta):
    """One step of the (format 2) step graph, prev_x0 a random previous x0 prediction, against reference_step."""
    model, full = tiny if name == "step" else tiny_learned
    process = full.respace("10")
    ours = ort_sample.Process(process.schedule.betas.numpy(), process.timesteps.numpy(), process.mean_type,
                              process.var_type)
    gen = torch.Generator().manual_seed(7)
    for k in (process.num_steps - 1, 4, 0):  # first step, a middle one, the last (no noise)
        x = torch.randn(5, 3, 16, 16, generator=gen)
        prev_x0 = torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1
        t_model = int(process.timesteps[k])
        t = torch.full((5,), t_model, dtype=torch.int64)
        with torch.no_grad():
            out = model(x, t)
        want_x, want_x0 = reference_step(process, x, k, out, seed=11, sampler=sampler, eta=eta, prev_x0=prev_x0)
        z = noise(11, t_model, x.shape).numpy()
        got_x, got_x0 = sessions(name).run(None, {"x": x.numpy(), "t": t.numpy(), "z": z, "prev_x0": prev_x0.numpy(),
                                                  "coef": ours.coefficients(k, sampler, eta)})
        assert rel_err(torch.from_numpy(got_x), want_x) < 1e-5, k
        assert rel_err(torch.from_numpy(got_x0), want_x0) < 1e-5, k


def test_export_leaves_the_model_and_the_global_rng_alone(tiny):
    model, diffusion = tiny
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    build_onnx(model, diffusion, dtype="fp16")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bad_export_requests(tiny, tmp_path):
    model, diffusion = tiny
    with pytest.raises(FastDDPMError, match="respaced"):
        build_onnx(model, diffusion.respace("10"))
    with pytest.raises(FastDDPMError, match="'bf16'"):
        build_onnx(model, diffusion, dtype="bf16")
    with pytest.raises(FastDDPMError, match="GroupNorm form"):
        build_onnx(model, diffusion, group_norm="groupnorm18")
    with pytest.raises(FastDDPMError, match="UNet"):
        build_onnx(torch.nn.Conv2d(3, 3, 1), GaussianDiffusion(diffusion.schedule.betas))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FastDDPMError, match="exists and is not a folder"):
        export_onnx(model, diffusion, blocker / "m.onnx")
