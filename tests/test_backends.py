"""The backend registry, and the `compile` backend against the reference."""
import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.backends import BACKENDS, Backend, get_backend, group_norm_impl, triton_available
from fastddpm.errors import BackendUnavailableError, FastDDPMError
from fastddpm.unet import GroupNormAct
from helpers import randomized_unet, rel_err


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


@pytest.mark.slow
def test_compile_backend_reproduces_the_reference_trajectory():
    """fp32, the whole loop: within 1e-4 relative (Inductor may reorder float sums)."""
    model = randomized_unet("tiny", seed=2)
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("3")
    ref_steps, out_steps = [], []
    ref = sample(model, d, (2, 3, 16, 16), seed=1, callback=ref_steps.append)
    out = sample(model, d, (2, 3, 16, 16), seed=1, backend="compile", callback=out_steps.append)
    for a, b in zip(out_steps, ref_steps):
        assert rel_err(a["x"], b["x"]) < 1e-4
    assert rel_err(out, ref) < 1e-4
