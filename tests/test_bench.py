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
from fastddpm.unet import PRESETS, UNet, UNetConfig, count_parameters


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
                                 "spacing": "iddpm", "accuracy_steps": 3}
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
    # the accuracy column: eager-bf16's 3-step run was drawn although its row was not asked for
    assert report["accuracy"] == {"steps": 3, "against": "eager-bf16", "seed": 0, "flag_above": 0.1,
                                  "status": "ok", "reason": "", "timesteps": [0, 500, 999]}
    assert 1e-4 < row["rel_err_vs_eager_bf16"] < 0.05 and row["accuracy_error"] == ""  # fp32 against bf16

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


# ------------------------------------------------------------------ the accuracy column, the compile warm-up
def test_every_row_is_compared_with_eager_bf16_on_a_short_run_and_a_wrong_row_is_flagged(monkeypatch):
    """Each row's x_0 after a 3-step run from the same seed against eager-bf16's, in the same run:
    right rows near bf16 rounding, the peer's U-Net (same weights, our sampler) too, a row that
    computes something else flagged '!' in the table and the headline; a row whose accuracy run
    raises keeps its timing and says why."""
    pytest.importorskip("diffusers")
    import fastddpm.bench as bench

    calls = []

    def wrong(model, diffusion, shape, options, **kwargs):  # another function: uniform noise
        calls.append(diffusion.num_steps)
        return torch.rand(shape, generator=torch.Generator().manual_seed(len(calls))) * 2 - 1

    def fails_on_the_short_run(model, diffusion, shape, options, **kwargs):
        if diffusion.num_steps == bench.ACCURACY_STEPS:
            raise RuntimeError("cannot replay")
        return sample_reference(model, diffusion, shape, options.seed)

    def sample_reference(model, diffusion, shape, seed):
        return bench.sample(model, diffusion, shape, seed=seed)

    monkeypatch.setitem(backends.BACKENDS, "graph", backends.Backend("graph", "wrong", lambda d: None, run=wrong))
    monkeypatch.setitem(backends.BACKENDS, "onnx", backends.Backend("onnx", "flaky", lambda d: None,
                                                                    run=fails_on_the_short_run))
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=2, batch=2, repeat=1, progress=False,
                                    backends=("eager-bf16", "reference", "diffusers", "graph", "onnx")))
    rows = {r["name"]: r for r in report["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [(r["name"], r["reason"]) for r in rows.values()]
    assert rows["eager-bf16"]["rel_err_vs_eager_bf16"] == 0.0  # the same code on the same seed
    assert 1e-4 < rows["reference"]["rel_err_vs_eager_bf16"] < 0.05  # fp32 against bf16: rounding only
    assert 1e-4 < rows["diffusers"]["rel_err_vs_eager_bf16"] < 0.05  # the peer's U-Net computes our function
    assert rows["graph"]["rel_err_vs_eager_bf16"] > 0.3 and calls == [2, 3]  # timed run, then the 3-step run
    onnx = rows["onnx"]
    assert onnx["rel_err_vs_eager_bf16"] is None and onnx["accuracy_error"] == "RuntimeError: cannot replay"
    assert onnx["images_per_s"] > 0  # the timing stands

    table = format_table(report)
    cells = {line.split()[0]: line for line in table.splitlines() if line.split()[:1] and line.split()[0] in rows}
    assert cells["graph"].endswith(" !") and not cells["reference"].endswith("!")
    assert cells["onnx"].endswith("error") and "onnx: accuracy run failed: RuntimeError: cannot replay" in table
    assert "'err vs bf16': x0 of a 3-step run (timesteps [0, 500, 999], seed 0) against eager-bf16's" in table
    lines = {line.split()[0]: line for line in headline_lines(report)}
    assert lines["graph"].endswith(" !") and "err vs eager-bf16 " in lines["reference"]
    assert not lines["reference"].endswith("!") and lines["eager-bf16"].endswith("err vs eager-bf16 0.0e+00")


def test_accuracy_steps_zero_leaves_the_column_out_and_skipped_rows_draw_no_baseline(monkeypatch):
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=1, batch=1, repeat=1, progress=False,
                                    backends=("reference",), accuracy_steps=0))
    assert report["accuracy"]["status"] == "off" and report["rows"][0]["rel_err_vs_eager_bf16"] is None
    assert "'err vs bf16'" not in format_table(report)

    def unavailable(device):
        raise BackendUnavailableError("not here")

    monkeypatch.setitem(backends.BACKENDS, "graph", backends.Backend("graph", "test stand-in", unavailable))
    report = run_bench(BenchRequest(device="cpu", model="tiny", steps=1, batch=1, repeat=1, progress=False,
                                    backends=("graph",)))
    assert report["accuracy"]["status"] == "pending"  # no row ran, so eager-bf16's run was never drawn
    assert "'err vs bf16'" not in format_table(report)


def test_the_compile_row_warms_up_with_three_calls(monkeypatch):
    """Inductor's reduce-overhead CUDA graphs record on the 2nd call: the compile row's warm-up makes
    3 calls of sampling.warm_up, the other rows 1 (counted, not run: nothing compiles here)."""
    import fastddpm.bench as bench
    from fastddpm.generate import default_diffusion, respaced_for

    calls = []
    monkeypatch.setattr(bench, "warm_up", lambda model, process, shape, backend, **kw: calls.append(backend))
    base = bench.random_model("tiny", torch.device("cpu"))
    process = respaced_for(default_diffusion(), 2, "ancestral")
    for name, expected in (("compile", ["compile"] * 3), ("reference", ["reference"]),
                           ("graph-eager", ["graph"])):
        calls.clear()
        try:
            warm = bench._fastddpm_sampler(name, base, process, (1, 3, 16, 16), torch.device("cpu"), torch.float32)[0]
        except BackendUnavailableError:  # graph needs CUDA: its count is checked on a GPU only
            continue
        warm()
        assert calls == expected, name
    assert bench.WARMUP_CALLS == {"compile": 3}


def test_the_compiled_peers_accuracy_run_reuses_its_compiled_code(monkeypatch):
    """diffusers-compile's accuracy run (its U-Net with our weights in our sampler) feeds the compiled
    U-Net what its own loop does (one 0-d timestep, NCHW x): Dynamo's guards hold, so no recompile
    (on a GPU that would be a minute of Inductor); and it computes our function (fp32 here)."""
    pytest.importorskip("diffusers")
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    import fastddpm.bench as bench
    from fastddpm.generate import default_diffusion, respaced_for

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend="eager"))  # Dynamo alone
    torch._dynamo.reset()
    device, shape = torch.device("cpu"), (2, 3, 8, 8)
    config = UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), dropout=0.0, num_groups=4)  # small: Dynamo traces every module
    torch.manual_seed(0)
    base = UNet(config).eval()
    for m in base.modules():  # as bench.random_model: the zero-initialised output convs get weights
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    run, _, unet = bench._diffusers_sampler(config, shape, device, torch.float32, compiled=True)
    run(3)
    graphs = counters["stats"]["unique_graphs"]
    process = respaced_for(default_diffusion(), bench.ACCURACY_STEPS, "ancestral")
    x = bench._peer_accuracy(unet, base, process, shape, "ancestral")
    assert counters["stats"]["unique_graphs"] == graphs >= 1
    assert bench._rel_err(x, bench.sample(copy.deepcopy(base), process, shape, seed=0)) < 1e-5
    torch._dynamo.reset()
