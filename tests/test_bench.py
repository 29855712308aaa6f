"""`fastddpm bench`: the JSON's structure, the diffusers twin's architecture, skipped and failed rows,
the fp32 precision line, the headline lines, and the ceilings' clock.

No timing is asserted here (speed lives in bench/); only that the numbers are there and agree
with each other (images/s = batch / median seconds, and so on).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastddpm import backends
from fastddpm.bench import (ROWS, SCHEMA, BenchRequest, diffusers_unet_kwargs, format_table, fp32_precision,
                            headline_lines, run_bench)
from fastddpm.cli import main
from fastddpm.errors import BackendUnavailableError
from fastddpm.unet import PRESETS, UNet, count_parameters


def test_bench_cli_writes_the_table_as_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--model", "tiny", "--steps", "2", "--batch", "2", "--repeat", "1",
                 "--backends", "reference", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["schema"] == SCHEMA and report["complete"] is True
    assert report["request"] == {"device": "cpu", "model": "tiny", "steps": 2, "batch": 2, "backends": ["reference"],
                                 "repeat": 1, "peer_warmup_steps": 2, "seed": 0, "sampler": "ancestral",
                                 "spacing": "iddpm"}
    for key in ("device", "device_name", "torch", "python", "date", "commit", "cudnn_allow_tf32", "load_average"):
        assert key in report["machine"]
    assert report["machine"]["device"] == "cpu"
    assert report["model"]["preset"] == "tiny"
    assert report["model"]["parameters"] == count_parameters(UNet.from_preset("tiny"))
    assert report["model"]["gflop_per_image_forward"] > 0
    assert report["ceilings"]["peak"]["dtype"] == "float32" and report["ceilings"]["peak"]["tflops"] > 0
    assert report["ceilings"]["copy"]["gbps"] > 0

    (row,) = report["rows"]
    assert (row["name"], row["engine"], row["dtype"], row["layout"], row["status"]) == \
        ("reference", "fastddpm", "fp32", "NCHW", "ok")
    assert len(row["seconds"]) == 1 and row["median_s"] == row["seconds"][0] > 0 and row["spread"] == 0.0
    assert row["warmup_s"] > 0
    assert math.isclose(row["images_per_s"], 2 / row["median_s"])
    assert math.isclose(row["ms_per_step"], 1000 * row["median_s"] / 2)
    gflop = report["model"]["gflop_per_image_forward"]
    assert math.isclose(row["tflops"], gflop * 2 * 2 / row["median_s"] / 1000)
    assert math.isclose(row["peak_fraction"], row["tflops"] / report["ceilings"]["peak"]["tflops"])
    assert row["speedup_vs_reference"] == 1.0 and row["rel_err_vs_reference"] == 0.0
    assert row["speedup_vs_diffusers"] is None  # no diffusers row was asked for

    table_line = next(line for line in printed.splitlines() if line.startswith("reference "))
    assert "fp32" in table_line and "NCHW" in table_line
    assert f"wrote {out}" in printed


def test_unavailable_and_broken_backends_become_rows_not_crashes(monkeypatch):
    def unavailable(device):
        raise BackendUnavailableError("backend 'graph' needs a CUDA device")

    def broken_run(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(backends.BACKENDS, "graph", backends.Backend("graph", "test stand-in", unavailable))
    monkeypatch.setitem(backends.BACKENDS, "onnx",
                        backends.Backend("onnx", "test stand-in", lambda device: None, run=broken_run))
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=2, batch=2, repeat=1,
                                    backends=("graph", "onnx"), progress=False))
    graph, onnx = report["rows"]
    assert (graph["status"], graph["reason"]) == ("skipped", "backend 'graph' needs a CUDA device")
    assert (onnx["status"], onnx["reason"]) == ("failed", "RuntimeError: boom")
    assert graph["images_per_s"] is None and onnx["seconds"] == []
    table = format_table(report)
    assert "graph: skipped: backend 'graph' needs a CUDA device" in table
    assert "onnx: failed: RuntimeError: boom" in table


def test_unknown_bench_backend_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--device", "cpu", "--model", "tiny", "--backends", "reference,warp-drive"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'warp-drive'" in err and all(name in err for name in ROWS)


def test_diffusers_twin_is_google_ddpm_cifar10_32():
    """The peer's architecture: google/ddpm-cifar10-32's config.json, and as many parameters as ours."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    kwargs = diffusers_unet_kwargs(PRESETS["cifar10"])
    expected = {  # google/ddpm-cifar10-32 config.json
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-6, "sample_size": 32, "in_channels": 3,
        "out_channels": 3, "freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0,
        "attention_head_dim": None, "act_fn": "silu", "time_embedding_type": "positional",
    }
    assert {k: kwargs[k] for k in expected} == expected
    assert diffusers_unet_kwargs(PRESETS["tiny"])["norm_eps"] == PRESETS["tiny"].norm_eps
    counts = {}
    for preset in ("cifar10", "tiny"):
        with torch.device("meta"):
            ours = count_parameters(UNet(PRESETS[preset]))
            counts[preset] = count_parameters(UNet2DModel(**diffusers_unet_kwargs(PRESETS[preset])))
        assert counts[preset] == ours
    assert counts == {"cifar10": 35_746_307, "tiny": 702_499}


# ------------------------------------------------------------------ every row's failure is a row
def _stand_in(name: str, run) -> backends.Backend:
    """A backend that always passes its check and runs `run(shape)` as its whole sampling loop."""
    return backends.Backend(name, "test stand-in", lambda device: None,
                            run=lambda model, diffusion, shape, options, **kwargs: run(shape))


def test_every_row_failure_is_a_failed_row_and_the_table_goes_on(monkeypatch):
    """Samples on another device or in another dtype are compared on the CPU in float64; a row whose
    samples cannot be compared, or that raises, is a `failed` row and the rows after it still run."""
    gen = torch.Generator().manual_seed(5)

    def boom(shape):
        raise RuntimeError("boom")

    # onnx: samples on another device (meta: nothing can be read back, so the comparison raises);
    # graph: samples in bfloat16 (compared after a cast); triton: raises while sampling
    monkeypatch.setitem(backends.BACKENDS, "onnx", _stand_in("onnx", lambda shape: torch.empty(shape, device="meta")))
    monkeypatch.setitem(backends.BACKENDS, "graph", _stand_in(
        "graph", lambda shape: torch.randn(shape, generator=gen).to(torch.bfloat16)))
    monkeypatch.setitem(backends.BACKENDS, "triton", _stand_in("triton", boom))
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=2, batch=2, repeat=1,
                                    backends=("reference", "onnx", "graph", "triton"), progress=False))
    assert report["complete"] is True
    reference, onnx, graph, triton = report["rows"]
    assert (reference["status"], reference["rel_err_vs_reference"]) == ("ok", 0.0)
    assert onnx["status"] == "failed" and onnx["reason"].startswith("NotImplementedError")
    assert onnx["seconds"] == [] and onnx["warmup_s"] is None and onnx["images_per_s"] is None
    assert graph["status"] == "ok" and graph["images_per_s"] > 0
    # random samples against the reference's: finite and of order one
    assert 0.1 < graph["rel_err_vs_reference"] < 10
    assert (triton["status"], triton["reason"]) == ("failed", "RuntimeError: boom")
    table = format_table(report)
    assert "onnx: failed: NotImplementedError" in table and "triton: failed: RuntimeError: boom" in table
    assert next(line for line in table.splitlines() if line.startswith("graph ")).split()[3] != "failed"


def test_a_failing_reference_row_is_recorded_and_the_others_still_run(monkeypatch):
    def broken(shape):
        raise ValueError("reference broke")

    monkeypatch.setitem(backends.BACKENDS, "reference", _stand_in("reference", broken))
    monkeypatch.setitem(backends.BACKENDS, "graph", _stand_in("graph", lambda shape: torch.rand(shape) * 2 - 1))
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=2, batch=2, repeat=1,
                                    backends=("reference", "graph"), progress=False))
    reference, graph = report["rows"]
    assert (reference["status"], reference["reason"]) == ("failed", "ValueError: reference broke")
    assert graph["status"] == "ok" and graph["images_per_s"] > 0
    assert graph["rel_err_vs_reference"] is None and graph["speedup_vs_reference"] is None


def test_the_table_says_which_precision_fp32_rows_used():
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=1, batch=1, repeat=1,
                                    backends=("reference",), progress=False))
    assert report["fp32_precision"]["summary"] == "fp32 (no TF32 on cpu)"
    assert "fp32 rows: fp32 (no TF32 on cpu) (cudnn.allow_tf32=False" in format_table(report)
    # on CUDA the words follow the flags (tests run with TF32 off: tests/conftest.py)
    assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions fp32, matmuls fp32"
    torch.backends.cudnn.allow_tf32 = True  # restored after the test by the autouse fixture
    assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions TF32, matmuls fp32"
    torch.set_float32_matmul_precision("high")
    assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions TF32, matmuls TF32"


def _report(batch: int, steps: int, rows: list[dict]) -> dict:
    return {"request": {"batch": batch, "steps": steps},
            "ceilings": {"peak": {"tflops": 800.0, "dtype": "bfloat16", "n": 8192}}, "rows": rows}


def _ok(name: str, images_per_s: float, median_s: float, peak_fraction: float) -> dict:
    return dict(name=name, status="ok", reason="", images_per_s=images_per_s, median_s=median_s,
                peak_fraction=peak_fraction)


def test_headline_lines_give_rate_run_time_peak_share_and_ratio_to_compiled_diffusers():
    rows = [_ok("graph-compiled", 40.0, 6.4, 0.25), _ok("diffusers-compile", 10.0, 25.6, 0.0625),
            dict(name="graph-eager", status="failed", reason="RuntimeError: capture")]
    lines = headline_lines(_report(256, 1000, rows))
    assert len(lines) == 3
    graph, peer, failed = (line.split() for line in lines)
    assert graph[:4] == ["graph-compiled", "40", "images/s", "6.4"]
    assert "25% of the measured bfloat16 peak  4.00x diffusers-compile" in lines[0]
    assert "s per 256 x 1000 run" in lines[0] and "scaled" not in lines[0]
    assert peer[3] == "25.6" and "1.00x diffusers-compile" in lines[1]
    assert failed == ["graph-eager", "failed:", "RuntimeError:", "capture"]
    # a smaller bench is scaled linearly to 256 images x 1000 steps, and says so
    (line,) = headline_lines(_report(64, 100, [_ok("eager-bf16", 20.0, 3.2, 0.1)]))
    assert line.split()[3] == "128" and "(scaled from 64 x 100)" in line and "no diffusers-compile row" in line


# ------------------------------------------------------------------ ceilings: the clock
class _FakeEvent:
    """torch.cuda.Event's stand-in: record() reads a fake GPU clock (ms) that the timed fn advances."""

    clock_ms = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self, stream=None):
        self.at = _FakeEvent.clock_ms

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_ceilings_time_cuda_by_events_and_cpu_by_the_host_clock(monkeypatch):
    import time

    from fastddpm import ceilings

    durations = iter([1.0, 1.0, 7.0, 5.0, 9.0])  # ms of GPU time: 2 warm-up calls, then 3 timed

    def fn():
        _FakeEvent.clock_ms += next(durations)

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    # the host clock sees ~0 s here: only the events' 5 ms can give this
    assert ceilings.fastest_seconds(fn, torch.device("cuda"), repeat=3) == pytest.approx(0.005)
    assert ceilings.clock_name(torch.device("cuda")) == "cuda-events"
    assert ceilings.clock_name(torch.device("cpu")) == "host"
    assert ceilings.fastest_seconds(lambda: time.sleep(0.02), torch.device("cpu"), repeat=2, warmup=0) >= 0.02


def test_bench_rows_walk_the_requested_sampler(monkeypatch):
    """--sampler dpm++2m --spacing trailing: every fastddpm row's warm-up and timed runs call sample/warm_up
    with that sampler on the trailing process, and the report says so."""
    import fastddpm.bench as bench

    seen = []

    def spy(fn):
        def wrapped(model, process, shape, **kw):
            seen.append((fn.__name__, kw.get("sampler"), process.timesteps.tolist()))
            return fn(model, process, shape, **kw)
        return wrapped

    monkeypatch.setattr(bench, "sample", spy(bench.sample))
    monkeypatch.setattr(bench, "warm_up", spy(bench.warm_up))
    report = bench.run_bench(bench.BenchRequest(device="cpu", model="tiny", steps=3, batch=2, backends=("reference",),
                                                repeat=1, progress=False, sampler="dpm++2m", spacing="trailing"))
    assert report["request"]["sampler"] == "dpm++2m" and report["request"]["spacing"] == "trailing"
    assert report["rows"][0]["status"] == "ok" and report["request"]["steps"] == 3
    assert {name for name, *_ in seen} == {"sample", "warm_up"}
    assert all(sampler == "dpm++2m" and ts == [332, 666, 999] for _, sampler, ts in seen), seen
