"""GPU readiness, checked on a CPU: what `bench/gpu_check.sh` and `pytest -m gpu tests` rely on.

- the GPU tests collect where onnx and onnxruntime are missing (they are skipped, not errors);
- every test runs with TF32 off and the settings are restored after it (tests/conftest.py);
- gpu_check.sh walks all its steps in a dry run (GPU_CHECK_DRY=1) and writes its summary;
- the step profile sorts kernel names into families.
"""
from __future__ import annotations

import importlib.util
import json
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


def test_gpu_tests_collect_without_onnx_and_hypothesis(tmp_path):
    """`pytest -m gpu tests` where `import onnx`, `import onnxruntime` and `import hypothesis` fail:
    no collection error (the modules that need them skip)."""
    plugin = tmp_path / "block_optional.py"  # loaded with -p before any test module is imported
    plugin.write_text("import sys\nfor name in ('onnx', 'onnxruntime', 'hypothesis'):\n    sys.modules[name] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "block_optional",
                           "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR" not in out and "error" not in out.splitlines()[-1], out[-3000:]
    assert "could not import 'onnx'" in out  # the block worked: the onnx modules were skipped
    assert "could not import 'hypothesis'" in out  # and so was the property-test module
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


def test_tf32_off_and_restored_where_the_new_fp32_precision_api_was_used():
    """torch 2.9+ refuses legacy TF32 reads once its fp32_precision API was set: the fixture and the
    bench's precision line then use that API. In a subprocess, as that state cannot be undone."""
    code = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("c", {str(REPO / "tests" / "conftest.py")!r})
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
from fastddpm.bench import fp32_precision
matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
matmul.fp32_precision = conv.fp32_precision = "tf32"
try:
    c.fp32_settings()
    raise SystemExit("legacy reads did not refuse: this test no longer tests the fallback")
except RuntimeError:
    pass
assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions TF32, matmuls TF32"
with c.exact_fp32():
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions fp32, matmuls fp32"
assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ------------------------------------------------------------------ gpu_check.sh
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
STEP_NAMES = ["setup", "table", "tests", "kernels", "profile", "table_rest", "unet", "sampling", "onnx", "train"]


def _gpu_check(out: Path, env_extra: dict, pythonpath: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(["bash", str(GPU_CHECK), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _steps(out: Path) -> dict[str, str]:
    """step name -> status, from summary.tsv."""
    lines = (out / "summary.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "status", "seconds", "log"]
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines[1:]}


def test_gpu_check_dry_run_walks_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "gc"
    proc = _gpu_check(out, {})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _steps(out)
    assert list(steps) == STEP_NAMES  # every step recorded, in order
    for name in ["setup", "table", "tests", "kernels", "profile"]:  # the first call's steps ran
        assert steps[name] == "ok (dry run)", (name, steps[name])
    for name in STEP_NAMES[5:]:
        assert steps[name] == "not requested"
    # setup checked the imports every step needs; the other steps echo or ran on the CPU
    setup_log = (out / "setup.log").read_text()
    assert all(f"\n{m} " in setup_log for m in ("fastddpm", "numpy", "safetensors", "tqdm"))
    assert "dry run: would run:" in (out / "tests.log").read_text() and "-m gpu tests" in (out / "tests.log").read_text()
    table = json.loads((out / "table.json").read_text())
    assert table["complete"] and [r["name"] for r in table["rows"]] == ["reference", "graph-eager", "graph-compiled"]
    profile = json.loads((out / "profile.json").read_text())
    assert profile["us_per_step"] > 0 and profile["families"]["convolutions"]["us_per_step"] > 0
    summary = (out / "summary.txt").read_text()
    assert "gpu_check steps" in summary and "profile:" in summary and "fp32 rows:" in summary
    # it ends with the headline: one line per row of the table
    tail = summary.rstrip().splitlines()[-3:]
    assert [line.split()[0] for line in tail] == ["reference", "graph-eager", "graph-compiled"]
    assert "images/s" in tail[0] and "s per 256 x 1000" in tail[0] and "skipped:" in tail[1]
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert (out / "gpu_check.tar.gz").stat().st_size > 0


@pytest.mark.parametrize("module", ["fastddpm", "tqdm"])
def test_gpu_check_setup_fails_loudly_when_a_needed_import_fails(tmp_path, module):
    shadow = tmp_path / "shadow" / module  # first on PYTHONPATH: a package whose import raises
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    out = tmp_path / "gc"
    proc = _gpu_check(out, {}, pythonpath=[shadow.parent])
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check:")]
    assert f"cannot import {module}: ImportError: blocked by the test" in line
    assert list(_steps(out)) == ["setup"] and _steps(out)["setup"].startswith("FAILED")  # nothing else ran


def test_gpu_check_takes_steps_by_name_and_number(tmp_path):
    out = tmp_path / "gc"
    proc = _gpu_check(out, {"GPU_CHECK_STEPS": "3,unet"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _steps(out)
    assert {name for name, status in steps.items() if status != "not requested"} == {"setup", "tests", "unet"}
    assert "no table (step 2 did not run)" in (out / "summary.txt").read_text()
    bad = _gpu_check(tmp_path / "bad", {"GPU_CHECK_STEPS": "tests,warp"})
    assert bad.returncode == 2 and "unknown step 'warp'" in bad.stderr and not (tmp_path / "bad" / "setup.log").exists()


# ------------------------------------------------------------------ fetch_wheels.sh: nothing the image has
FETCH_WHEELS = REPO / "bench" / "fetch_wheels.sh"


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A stand-in wheel: only the METADATA the check reads."""
    import zipfile

    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def _check_wheels(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(FETCH_WHEELS), "--check", str(folder)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))


def test_fetch_wheels_ships_only_what_the_gpu_image_lacks(tmp_path):
    """The check run on .whl/ after every download (no network here): diffusers' real requirements
    pass; a wheel of a project the image has (it would shadow it), an unpinned one, or a requirement
    that neither the image nor .whl/ meets is refused, by name."""
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "diffusers", "0.42.1", ["importlib_metadata", "filelock", "huggingface-hub<3.0,>=1.32.0", "numpy",
                                         "regex!=2019.12.17", "requests", "safetensors>=0.8.0", "Pillow",
                                         "torch>=1.4; extra == 'torch'"])
    _wheel(good, "importlib-metadata", "10.2.0", ["zipp>=3.20", 'lazy-importer>=0.1; python_version < "3.15"'])
    _wheel(good, "lazy-importer", "0.1.0", [])
    ok = _check_wheels(good)
    assert ok.returncode == 0 and "3 wheels" in ok.stdout and "none in the GPU image" in ok.stdout, ok.stderr

    _wheel(good, "numpy", "2.0.0", [])  # the image has numpy: a wheel would shadow it
    _wheel(good, "rich-extra", "1.0", [])  # pinned nowhere
    bad = _check_wheels(good)
    assert bad.returncode == 1
    assert "numpy-2.0.0-py3-none-any.whl: the GPU image has numpy; a wheel would shadow it" in bad.stderr
    assert "rich_extra-1.0-py3-none-any.whl: rich-extra is not pinned" in bad.stderr

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    _wheel(lacking, "diffusers", "0.42.1", ["importlib_metadata", "huggingface-hub>=9"])
    _wheel(lacking, "importlib-metadata", "10.2.0", ["lazy-importer>=0.1"])
    bad = _check_wheels(lacking)
    assert bad.returncode == 1
    assert "lazy-importer==0.1.0: pinned, but no wheel" in bad.stderr
    assert "requires lazy-importer>=0.1: neither the GPU image nor" in bad.stderr
    assert "requires huggingface-hub>=9: the GPU image has huggingface-hub 1.33.0" in bad.stderr


def test_wheels_are_never_committed():
    proc = subprocess.run(["git", "check-ignore", "-q", ".whl/diffusers-0.42.1-py3-none-any.whl"], cwd=REPO,
                          capture_output=True, timeout=30)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0  # .gitignore keeps .whl/ out


# ------------------------------------------------------------------ the step profile's kernel families
profile_step = _load(REPO / "bench" / "profile_step.py", "_profile_step")


@pytest.mark.parametrize("name,family", [
    # cuDNN / CUTLASS convolutions (Hopper implicit GEMM, older kernels), and ATen's on a CPU
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_kernel", "convolutions"),
    ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_64x64_64x5_nhwc_align8>",
     "convolutions"),
    ("implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>", "convolutions"),
    ("aten::mkldnn_convolution", "convolutions"),
    # GroupNorm: ours (NCHW and the channels-last whole-row kernels), ATen's two kernels, inductor's fused one
    ("_group_norm_fwd_kernel", "GroupNorm"),
    ("_gn_cl_fwd_kernel", "GroupNorm"),
    ("_gn_cl_bwd_kernel", "GroupNorm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>(long, float, ...)", "GroupNorm"),
    ("triton_red_fused_native_group_norm_silu_3", "GroupNorm"),
    ("aten::native_group_norm", "GroupNorm"),
    # attention: flash, cuDNN's SDPA (names "cudnn" too), softmax
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    # plain GEMMs: the linear layers
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matmul"),
    ("aten::addmm", "matmul"),
    # the fused step
    ("_step_kernel", "fused step"),
    # elementwise: ATen's loops, inductor's pointwise kernels (even named after a fused convolution)
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>",
     "elementwise"),
    ("triton_poi_fused_add_convolution_silu_7", "elementwise"),
    ("aten::silu", "elementwise"),
    # everything else
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...>>", "other"),
    ("aten::empty", "other"),
])
def test_profile_classifies_kernels_by_name(name, family):
    assert profile_step.classify(name) == family


def test_profile_summary_is_per_step_and_sums_to_the_total():
    kernels = [("_step_kernel", 30.0), ("sm90_xmma_fprop_implicit_gemm_x", 500.0), ("_group_norm_fwd_kernel", 120.0),
               ("_step_kernel", 30.0), ("sm90_xmma_fprop_implicit_gemm_x", 700.0), ("Memcpy HtoD", 20.0)]
    summary = profile_step.summarize(kernels, steps=2)
    fam = summary["families"]
    assert list(fam) == list(profile_step.FAMILIES)
    assert summary["us_per_step"] == pytest.approx(700.0)
    assert fam["convolutions"] == pytest.approx({"us_per_step": 600.0, "share": 1200 / 1400, "launches_per_step": 1.0})
    assert fam["fused step"]["us_per_step"] == 30.0 and fam["GroupNorm"]["launches_per_step"] == 0.5
    assert fam["attention"] == {"us_per_step": 0.0, "share": 0.0, "launches_per_step": 0.0}
    assert summary["top"][0] == {"name": "sm90_xmma_fprop_implicit_gemm_x", "family": "convolutions",
                                 "us_per_step": 600.0}
    table = profile_step.format_summary(summary, "title")
    assert table.splitlines()[0] == "title" and "85.7%" in table and table.splitlines()[-1].split()[:2] == ["total", "700.0"]
