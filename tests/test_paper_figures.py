"""bench/paper_figures.py (DDPM Figs. 6-8) runs end to end on a tiny 8x8 checkpoint and writes PNGs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastddpm.checkpoint import save_checkpoint
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.schedule import make_betas
from fastddpm.unet import UNet

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paper_figures.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_figures(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("paper_figures", SCRIPT)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", image_size=8, in_channels=1)
    save_checkpoint(tmp_path / "m.safetensors", model, GaussianDiffusion(make_betas("cosine", 25)), step=0)
    seconds = figures.make_all(str(tmp_path / "m.safetensors"), tmp_path / "figs", seed=0)
    assert set(seconds) == {"progressive", "shared_xt", "interpolation"}
    for name in seconds:
        assert (tmp_path / "figs" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert figures._at(figures.PROGRESSIVE_T, 1000)[:3] == [999, 900, 800]
    assert figures._at(figures.INTERP_T, 25) == [0, 2, 6, 12, 19]
