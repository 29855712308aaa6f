"""The GPU smoke subset: `pytest -m gpu_smoke tests/test_gpu_smoke.py` (bench/gpu_check.sh's tests step).

What must hold on a lent GPU before any timing is believed, sized for about 80 s of a cold
machine (two torch.compile's of the tiny U-Net, a dozen Triton kernels), the most important
first; the cases run in the order of this file (gpu_check passes -p no:randomly):

  1. the graph backend over the compiled U-Net against the reference (written without a GPU,
     these are its first check): one fp32 trajectory (1e-4 relative) and one bf16 channels-last
     run (uint8 images against fp32's; the eager capture rides along);
  2. the GroupNorm+SiLU custom op on CUDA: one shape in each layout (NCHW, channels-last) and
     dtype (fp32, bf16), then its gradients;
  3. the fused step kernel: at the cifar10 batch, and replayed in a CUDA graph.

Each case calls the test that owns the check (tests/test_graph.py, tests/test_group_norm_op.py,
tests/kernels/test_step.py) with one of its own parametrizations, so the bounds live in one place;
`pytest -m gpu tests` runs these again among the others. On a CPU every case is skipped.
"""
import sys
from pathlib import Path

import pytest
import torch

import test_graph as graph_tests
import test_group_norm_op as op_tests

sys.path.insert(0, str(Path(__file__).parent / "kernels"))  # where pytest puts it for tests/kernels/*.py
import test_step as step_tests  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_smoke,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cases(test, argnames: str) -> list:
    """The values of `test`'s own @pytest.mark.parametrize(argnames, ...), so a smoke case uses them."""
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == argnames:
            return list(mark.args[1])
    raise LookupError(f"{test.__name__} has no parametrize({argnames!r}): update tests/test_gpu_smoke.py")


# 1. graph over the compiled U-Net
def test_graph_compiled_fp32_trajectory_matches_reference():
    """test_graph.py::test_graph_fp32_trajectory_matches_reference[1-ancestral-compiled]"""
    graph_tests.test_graph_fp32_trajectory_matches_reference("ancestral", 1, "compiled")


def test_graph_compiled_bf16_channels_last_images_match_fp32():
    """test_graph.py::test_half_precision_channels_last_images_match_fp32[bfloat16]"""
    graph_tests.test_half_precision_channels_last_images_match_fp32(torch.bfloat16)


# 2. the GroupNorm op
@pytest.mark.parametrize("dtype, tol", _cases(op_tests.test_cuda_op_is_the_triton_launcher, "dtype, tol"),
                         ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_group_norm_op_on_cuda(dtype, tol, channels_last):
    """test_group_norm_op.py::test_cuda_op_is_the_triton_launcher, every case (one shape)."""
    op_tests.test_cuda_op_is_the_triton_launcher(dtype, tol, channels_last)


def test_group_norm_op_gradients_on_cuda():
    """test_group_norm_op.py::test_cuda_op_gradients_match_the_twin"""
    op_tests.test_cuda_op_gradients_match_the_twin()


# 3. the fused step
def test_fused_step_at_the_cifar10_batch():
    """kernels/test_step.py::test_cifar10_shape_gpu"""
    step_tests.test_cifar10_shape_gpu()


def test_fused_step_replayed_in_a_cuda_graph():
    """kernels/test_step.py::test_cuda_graph_replay_gpu"""
    step_tests.test_cuda_graph_replay_gpu()
