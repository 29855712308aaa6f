"""`python -m fastddpm.kernels.aot`: the kernels compile for sm_90 with no GPU, without spills, at
the occupancy their launch plan expects, and the channels-last GroupNorm moves 16-byte vectors.

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
    "bf16-cl-C128-32x32-emb-silu",  # batch 256 (one launch a op) and -b1 (stats, finalize, apply);
    # the largest forward (16 warps): 74 registers, 1 program a SM, before its Welford update was rewritten
    "bf16-cl-C256-16x16-emb-silu$",  # the backward with emb: 155 registers unbounded (Triton 3.6), 1 program a SM
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


def test_every_subset_variant_reaches_its_design_occupancy(compiled):
    """Programs resident per SM (from ptxas's registers, the shared memory and the warp limit) are at
    least what the launch plan expects; the channels-last GroupNorm's row launches expect 2
    (kernels/group_norm_cl.py), its finalize launch 1."""
    stdout, table, _ = compiled
    rows = table["variants"]
    for r in rows:
        assert r["programs_per_sm"] >= r["design_programs_per_sm"] >= 1, r
        if "-cl-" in r["name"] and r["kernel"] != "step":
            assert r["design_programs_per_sm"] == (1 if r["name"].endswith("-finalize") else 2), r
    assert "0 below the design's occupancy" in stdout


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


@pytest.mark.parametrize("registers, warps, shared, expected", [
    (74, 16, 8192, (1, "registers")),  # the forward before the fix: 2560 a warp, 6 warps a sub-partition
    (64, 16, 8192, (2, "registers")),  # 2048 a warp: 8 warps a sub-partition, 32 an SM
    (72, 16, 0, (1, "registers")),  # 2304 a warp (the 256 unit): 7 a sub-partition, 28 warps
    (155, 8, 8192, (1, "registers")),  # the C = 256 backward with emb, unbounded, Triton 3.6
    (128, 8, 8192, (2, "registers")),
    (32, 4, 0, (16, "registers+warps")),  # 1 KB reserved a block: 228 by shared memory; 32 by blocks
    (16, 1, 0, (32, "blocks")),
    (32, 4, 100_000, (2, "shared")),  # (100000 + 1024) rounded to 128 = 101120 B a block, 233472 an SM
    (32, 4, 227 * 1024 + 1, (0, "shared")),  # more than one block may use
    (256, 1, 0, (0, "registers")),  # more than a thread may use
], ids=["fwd-74", "fwd-64", "reg-unit", "bwd-155", "bwd-128", "4-warps", "blocks", "shared", "shared-max", "regs-max"])
def test_occupancy_formula_for_sm90(registers, warps, shared, expected):
    from fastddpm.kernels.aot import SM_LIMITS, occupancy

    assert occupancy(registers, warps, shared, SM_LIMITS[90]) == expected


def test_channels_last_plan_states_its_occupancy():
    """Every channels-last GroupNorm launch carries the occupancy the design expects, and the
    register cap that keeps it (maxnreg = 65536 / (2 programs x 32 x warps)), without compiling."""
    import torch

    from fastddpm.kernels import group_norm as gn

    for batch, C, H, warps in ((256, 128, 32, 16), (256, 256, 4, 8), (1, 128, 32, 4)):
        x = torch.empty(batch, C, H, H).contiguous(memory_format=torch.channels_last)
        w, b, emb = torch.empty(C), torch.empty(C), torch.empty(batch, C)
        y, x_read, mean, rstd, fwd = gn.forward_launches(x, 32, w, b, emb, True, 1e-6)
        *_, bwd = gn.backward_launches(torch.empty_like(y), x_read, 32, w, b, emb, True, mean, rstd)
        assert [launch.stage for launch in fwd] == (["stats", "finalize", "apply"] if batch == 1 else [""])
        for launch in fwd + bwd:
            expect = 1 if launch.stage == "finalize" else 2
            assert launch.programs_per_sm == expect, launch.stage
            n = launch.kwargs["num_warps"]
            assert launch.kwargs.get("maxnreg", 255) == min(255, 65536 // (expect * 32 * n) // 8 * 8)
        assert fwd[0].kwargs["num_warps"] == warps
