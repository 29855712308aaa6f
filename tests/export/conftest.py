"""Shared fixtures of the ONNX tests: one randomised tiny U-Net and its exports, built once per session.

Exporting the tiny preset takes one to two seconds, so each variant is exported once and
shared: fp32 and fp16 eps graphs with the default GroupNorm form (InstanceNormalization),
an fp32 eps graph with GroupNormalization-21, and fp32 step graphs (eps and learned_range).
"""
from __future__ import annotations

import pytest

from fastddpm import GaussianDiffusion, make_betas
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
