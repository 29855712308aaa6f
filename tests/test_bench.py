"""`fastddpm bench`: the JSON's structure, the diffusers twin's architecture, skipped and failed rows.

No timing is asserted here (speed lives in bench/); only that the numbers are there and agree
with each other (images/s = batch / median seconds, and so on).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastddpm import backends
from fastddpm.bench import ROWS, SCHEMA, BenchRequest, diffusers_unet_kwargs, format_table, run_bench
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
                                 "repeat": 1, "peer_warmup_steps": 2, "seed": 0}
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
