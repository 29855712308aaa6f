"""The DDPM U-Net: parameter counts, shapes, the time embedding, per-sample independence, the seam."""
import math

import pytest
import torch

from fastddpm.errors import FastDDPMError
from fastddpm.unet import PRESETS, GroupNormAct, UNet, UNetConfig, count_parameters, timestep_embedding
from helpers import randomized_unet, rel_err


def _on_meta(preset, **kw):
    with torch.device("meta"):
        return UNet.from_preset(preset, **kw)


def test_cifar10_has_the_public_ddpm_parameter_count():
    # google/ddpm-cifar10-32 has 35,746,307 parameters.
    assert count_parameters(_on_meta("cifar10")) == 35_746_307


def test_learn_sigma_doubles_the_output_channels():
    m = _on_meta("cifar10", learn_sigma=True)
    assert m.config.out_channels == 6
    # Only conv_out grows: 128 * 3 * 3 * 3 more weights and 3 more biases.
    assert count_parameters(m) == 35_746_307 + 128 * 9 * 3 + 3


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_tiny_forward_shapes(learn_sigma):
    m = randomized_unet("tiny", learn_sigma=learn_sigma)
    x = torch.randn(3, 3, 16, 16)
    out = m(x, torch.tensor([0, 499, 999]))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 1e-3


def test_presets_can_be_adapted_to_the_data():
    m = UNet.from_preset("tiny", image_size=8, in_channels=1)
    assert m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)


def test_untrained_model_outputs_zero_as_in_ddpm():
    # DDPM initialises the final conv of every block and of the model at zero.
    m = UNet.from_preset("tiny")
    assert m(torch.randn(1, 3, 16, 16), torch.tensor([10])).abs().max() == 0


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 8)
    half = 4
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            w = math.exp(-math.log(10000) * j / (half - 1))
            assert emb[i, j].item() == pytest.approx(math.sin(ti * w), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.cos(ti * w), abs=1e-5)


def test_samples_in_a_batch_do_not_interact():
    m = randomized_unet("tiny")
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 300, 600, 900])
    full = m(x, t)
    for i in range(4):
        assert rel_err(m(x[i:i + 1], t[i:i + 1]), full[i:i + 1]) < 1e-5


def test_output_depends_on_time():
    m = randomized_unet("tiny")
    x = torch.randn(1, 3, 16, 16)
    assert rel_err(m(x, torch.tensor([10])), m(x, torch.tensor([900]))) > 1e-2


def test_group_norm_seam_is_used():
    m = randomized_unet("tiny")
    calls = []
    norms = [mod for mod in m.modules() if isinstance(mod, GroupNormAct)]

    def spy(x, num_groups, weight, bias, emb=None, silu=True, eps=1e-5):
        calls.append((num_groups, emb is not None, silu))
        return torch.zeros_like(x)

    for mod in norms:
        mod.impl = spy
    m(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert len(calls) == len(norms)
    assert any(e for _, e, _ in calls) and any(not s for _, _, s in calls)  # emb adds, attention norms


def test_config_round_trip_and_validation():
    c = PRESETS["cifar10"]
    assert UNetConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["channel_mult"] == [1, 2, 2, 2]
    with pytest.raises(FastDDPMError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({**c.to_dict(), "heads": 4})
    with pytest.raises(FastDDPMError, match="divisible"):
        UNetConfig(image_size=30)
    with pytest.raises(FastDDPMError, match="groups"):
        UNetConfig(model_channels=20)
    with pytest.raises(FastDDPMError, match="'cifar10', 'tiny'"):
        UNet.from_preset("imagenet")
