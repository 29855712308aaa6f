"""`python -m fastddpm.kernels.aot`: the kernels compile for sm_90 with no GPU, without spills, and
the channels-last GroupNorm moves 16-byte vectors.

The command runs in a child process (tests/conftest.py switched the interpreter on in this one;
the command clears it for itself). A representative subset (~30 variants) keeps this to 30-50 s
on a loaded two-core machine; the full command (426 variants: every cifar10 GroupNorm at batch
256, channels-last also at batch 1, and every step variant) takes 5-7 minutes there.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

SUBSET = [
    # GroupNorm: the biggest activation in each layout/dtype (one tile NCHW; whole rows channels-last)
    "fp32-nchw-C128-32x32-emb-silu",
    "fp32-nchw-C384-32x32-noemb-silu$",  # NCHW's chunked path (a group larger than one tile)
    "bf16-cl-C128-32x32-emb-silu",  # batch 256 (one launch a op) and -b1 (stats, finalize, apply)
    "bf16-cl-C384-32x32-noemb-silu$",  # 384 channels: not a power of two, 12 channels a group
    "bf16-cl-C256-4x4-noemb-id$",  # the smallest spatial size, the attention norm (no SiLU)
    # the step: each variance mode and sampler, both layouts, mixed dtypes
    "step-ancestral-table-clip-x0-cl-xfp32-outbf16",
    "step-ancestral-learned_range-clip-x0-nchw-xfp32-outfp32",
    "step-ancestral-learned-noclip-x0-cl-xbf16-outbf16",
    "step-ddim-table-noclip-nox0-cl-xfp32-outfp32",
    "step-dpm-table-clip-x0-nchw-xfp32-outfp32",  # the solvers: prev_x0 read from the pred_x0 buffer
    "step-dpm-table-noclip-x0-cl-xbf16-outbf16",
]


def run_aot(*args):
    return subprocess.run([sys.executable, "-m", "fastddpm.kernels.aot", *args], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"))  # the command must clear it itself


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    run = run_aot("--only", ",".join(SUBSET), "--json", str(out / "aot.json"), "--ptx-dir", str(out / "ptx"))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads((out / "aot.json").read_text()), out / "ptx"


def test_every_subset_variant_compiles_without_spills(compiled):
    stdout, table, ptx_dir = compiled
    rows = table["variants"]
    assert table["target"] == "sm_90"
    for pattern in SUBSET:
        assert any(re.search(pattern, r["name"]) for r in rows), pattern
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_bytes"] == 0, r
        assert r["kernel"] in ("group_norm_fwd", "group_norm_bwd", "step")
        assert (ptx_dir / f"{r['name']}.ptx").read_text().startswith("//")
        assert r["name"] in stdout  # the printed table
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"group_norm_fwd", "group_norm_bwd", "step"}


def test_nchw_fp32_group_norm_loads_16_bytes(compiled):
    """The NCHW path reads and writes 16-byte vectors (4 x fp32): its rows are contiguous spatial runs."""
    rows = [r for r in compiled[1]["variants"] if "fp32-nchw" in r["name"]]
    assert rows
    for r in rows:
        assert (r["widest_load"], r["widest_store"]) == (16, 16), r


def test_fp32_nchw_step_moves_16_byte_vectors(compiled):
    """The step's fp32 NCHW variants (ancestral with learned_range, and the solvers, which also read
    prev_x0) load and store 16-byte vectors: x_t, eps, v, prev_x0, x_{t-1} and x0 are contiguous runs."""
    rows = [r for r in compiled[1]["variants"] if r["kernel"] == "step" and r["name"].endswith("-nchw-xfp32-outfp32")]
    assert any("-dpm-" in r["name"] for r in rows)
    for r in rows:
        assert (r["widest_load"], r["widest_store"]) == (16, 16), r


def test_channels_last_group_norm_moves_16_byte_vectors(compiled):
    """The channels-last kernels read whole rows: 16-byte (8 x bf16) global loads and stores, forward
    and backward, every stage; the rows' alignment is proven from C (a multiple of 8) and the
    specialised unit channel stride."""
    rows = [r for r in compiled[1]["variants"] if "-cl-" in r["name"] and r["kernel"] != "step"]
    assert {r["kernel"] for r in rows} == {"group_norm_fwd", "group_norm_bwd"}
    assert any(r["name"].endswith("-b1-stats") for r in rows) and any(r["name"].endswith("-b1-apply") for r in rows)
    for r in rows:
        if r["name"].endswith("-finalize"):  # per-group statistics from the partials: no rows of x
            continue
        if r["name"].endswith("-stats"):  # reads rows; writes only C float32 partial sums
            assert r["widest_load"] == 16, r
            continue
        assert (r["widest_load"], r["widest_store"]) == (16, 16), r


@pytest.mark.parametrize("args, message", [
    (["--target", "gfx90a"], "aot: --target 'gfx90a' is not a CUDA target"),
    (["--only", "bf16-cl-C128("], "aot: --only 'bf16-cl-C128(' is not a regular expression"),
    (["--ptx-dir", "FILE"], "is not a folder"),
], ids=["target", "regex", "ptx-dir"])
def test_bad_arguments_are_one_line(args, message, tmp_path, capsys):
    """Checked before anything compiles (or the command re-runs itself without the interpreter)."""
    from fastddpm.kernels.aot import main

    (tmp_path / "FILE").write_text("")
    assert main([str(tmp_path / a) if a == "FILE" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_widest_access_parser():
    from fastddpm.kernels.aot import parse_ptxas_log, widest_global_access

    ptx = ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n ld.global.L1::evict_last.b16 %rs1, [%rd2];\n"
           "st.global.v2.b16 [%rd3], {%rs1, %rs2};\n @%p1 st.global.b32 [%rd4], %r5;\n"
           "ld.global.nc.v2.f32 {%f1, %f2}, [%rd5];\n ld.shared.v4.b32 {%r1, %r2, %r3, %r4}, [%r9];")
    assert widest_global_access(ptx) == (16, 4)
    assert widest_global_access("st.global.b16 [%rd3], %rs1;") == (0, 2)
    log = ("ptxas info    : Function properties for k\n    0 bytes stack frame, 8 bytes spill stores, "
           "4 bytes spill loads\nptxas info    : Used 80 registers, used 0 barriers")
    assert parse_ptxas_log(log) == (80, 12)
