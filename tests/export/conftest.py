"""Shared fixtures of the ONNX tests: one randomised tiny U-Net and its exports, built once per session.

Exporting the tiny preset takes one to two seconds, so each variant is exported once and
shared: fp32 and fp16 eps graphs with the default GroupNorm form (InstanceNormalization),
an fp32 eps graph with GroupNormalization-21, and fp32 step graphs (eps and learned_range);
and (`calibrated`) a calibrated tiny model at image_size 8 exported by `fastddpm export` as an
eps graph and a step graph, for the samplers and variances of issue 18.
"""
from __future__ import annotations

import pytest

import numpy as np

from fastddpm import GaussianDiffusion, make_betas, save_checkpoint
from helpers import randomized_unet
from onnx_helpers import one_torch_thread

T = 100  # a short process keeps the metadata small; respacing is exercised anyway


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test here runs torch on one thread (see onnx_helpers.one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny():
    """(model, diffusion): the tiny preset with every parameter random, linear betas over T = 100."""
    return randomized_unet("tiny", seed=3), GaussianDiffusion(make_betas("linear", T))


@pytest.fixture(scope="session")
def tiny_learned():
    """(model, diffusion) with learned_range variances (IDDPM), so the model returns 2C channels."""
    return (randomized_unet("tiny", seed=4, learn_sigma=True),
            GaussianDiffusion(make_betas("cosine", T), var_type="learned_range", loss_type="hybrid"))


@pytest.fixture(scope="session")
def exports(tiny, tiny_learned, tmp_path_factory):
    """name -> path of each exported variant (written with export_onnx, as `fastddpm export` does).

    Skips the test that asks for it where onnx (to export) or onnxruntime (to run what is
    exported: every user of this fixture does) is missing.
    """
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fastddpm.export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    variants = {
        "fp32": (tiny, dict()),
        "fp16": (tiny, dict(dtype="fp16")),
        "gn21": (tiny, dict(group_norm="groupnorm21")),
        "step": (tiny, dict(step_graph=True)),
        "step_learned": (tiny_learned, dict(step_graph=True)),
    }
    paths = {}
    with one_torch_thread():
        for name, ((model, diffusion), kwargs) in variants.items():
            paths[name] = folder / f"{name}.onnx"
            export_onnx(model, diffusion, paths[name], **kwargs)
    return paths


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """dict(model, diffusion, checkpoint, eps, step): the tiny preset at image_size 8 with random weights, linear
    betas over T = 100 and a random Analytic-DPM table Gamma in [0.3, 1] (as `fastddpm calibrate` stores it),
    saved as a checkpoint and exported from it with `fastddpm export` (eps graph) and `--step-graph`."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fastddpm.cli import main

    gamma = np.random.default_rng(8).uniform(0.3, 1.0, T)
    model = randomized_unet("tiny", seed=5, image_size=8)
    diffusion = GaussianDiffusion(make_betas("linear", T)).with_gamma(gamma)
    folder = tmp_path_factory.mktemp("calibrated")
    found = {"model": model, "diffusion": diffusion, "checkpoint": folder / "tiny8.safetensors",
             "eps": folder / "eps.onnx", "step": folder / "step.onnx"}
    with one_torch_thread():
        save_checkpoint(found["checkpoint"], model, diffusion)
        for name, extra in (("eps", []), ("step", ["--step-graph"])):
            assert main(["export", "--checkpoint", str(found["checkpoint"]), "--out", str(found[name]), *extra]) == 0
    return found
