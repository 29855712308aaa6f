"""GPU readiness, checked on a CPU: what `bench/gpu_check.sh` and `pytest -m gpu tests` rely on.

- the GPU tests collect where onnx and onnxruntime are missing (they are skipped, not errors);
- every test runs with TF32 off and the settings are restored after it (tests/conftest.py);
- gpu_check.sh walks all its steps in a dry run (GPU_CHECK_DRY=1) and writes its summary;
- the step profile sorts kernel names into families.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    """A module by file path (not `import conftest`: pytest rebinds that name to each folder's conftest)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conftest = _load(REPO / "tests" / "conftest.py", "_tests_conftest")  # its TF32 helpers


def test_gpu_tests_collect_without_onnx(tmp_path):
    """`pytest -m gpu tests` where `import onnx` and `import onnxruntime` fail: no collection error."""
    plugin = tmp_path / "block_onnx.py"  # loaded with -p before any test module is imported
    plugin.write_text("import sys\nfor name in ('onnx', 'onnxruntime'):\n    sys.modules[name] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "block_onnx",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR" not in out and "error" not in out.splitlines()[-1], out[-3000:]
    assert "could not import 'onnx'" in out  # the block worked: the onnx modules were skipped
    assert "tests/test_graph.py::" in out  # and the GPU tests were collected


def test_tf32_is_off_inside_every_test():
    # torch's defaults leave cuDNN's TF32 on, so without the autouse fixture this fails
    assert conftest.fp32_settings() == (False, False, "highest")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_tf32_settings_are_restored_after_a_test():
    saved = conftest.fp32_settings()
    try:
        conftest.set_fp32_settings((True, True, "high"))
        with conftest.exact_fp32():
            assert conftest.fp32_settings() == (False, False, "highest")
        assert conftest.fp32_settings() == (True, True, "high")
    finally:
        conftest.set_fp32_settings(saved)
