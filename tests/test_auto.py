"""`backend="auto"` (fastddpm/auto.py): the choice, its verification against the reference, and the
fallback chain, with fast backends made to fail on purpose (a wrong result, an exception, NaN)."""
from __future__ import annotations

import json

import pytest
import torch

import fastddpm.auto as auto
from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.backends import BACKENDS, Backend, register
from fastddpm.errors import FastDDPMWarning
from fastddpm.options import SampleOptions
from fastddpm.sampling import reference_step
from helpers import randomized_unet, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _always(device):
    return None


def _never(device):
    from fastddpm.errors import BackendUnavailableError

    raise BackendUnavailableError("backend 'fake-absent' needs a device this machine does not have")


def _wrong(diffusion, x, k, out, **kw):
    x_prev, x0 = reference_step(diffusion, x, k, out, **kw)
    return x_prev + 0.05, x0


def _raises(diffusion, x, k, out, **kw):
    raise RuntimeError("illegal memory access (injected)")


def _nan(diffusion, x, k, out, **kw):
    x_prev, x0 = reference_step(diffusion, x, k, out, **kw)
    return torch.full_like(x_prev, float("nan")), x0


FAKES = {"fake-wrong": _wrong, "fake-raise": _raises, "fake-nan": _nan, "fake-good": reference_step}


@pytest.fixture
def fakes():
    for name, step in FAKES.items():
        register(Backend(name, f"test backend {name}", _always, step=step))
    register(Backend("fake-absent", "a backend that cannot run here", _never))
    yield
    for name in (*FAKES, "fake-absent"):
        BACKENDS.pop(name, None)


@pytest.fixture
def setup():
    model = randomized_unet("tiny", seed=5, image_size=8)
    return model, GaussianDiffusion(make_betas("linear", 100)).respace("6"), (3, 3, 8, 8)


def test_failures_fall_back_in_order_to_the_reference(fakes, setup):
    model, d, shape = setup
    lines = []
    choice = auto.choose(model, d, shape, SampleOptions(seed=1), device="cpu",
                         candidates=[("fake-absent", None), ("fake-wrong", None), ("fake-raise", None), ("fake-nan", None)],
                         warn=lines.append)
    assert choice.backend == "reference" and choice.verified == []
    reasons = {f["backend"]: f["reason"] for f in choice.fallbacks}
    assert "differs from the reference by" in reasons["fake-wrong"] and "after 3 steps" in reasons["fake-wrong"]
    assert "RuntimeError: illegal memory access (injected)" == reasons["fake-raise"]
    assert reasons["fake-nan"] == "non-finite values in its samples"
    assert reasons["fake-absent"].startswith("cannot run here: backend 'fake-absent' needs")  # not verified
    # one warning line per rejected candidate that ran, naming it and what comes next
    assert len(lines) == 3 and all("\n" not in ln for ln in lines)
    assert lines[0].startswith("backend fake-wrong failed verification") and lines[0].endswith("fake-raise")
    assert lines[2].endswith("falling back to reference")


def test_a_good_candidate_is_verified_and_gives_the_reference_samples(fakes, setup):
    model, d, shape = setup
    choice = auto.choose(model, d, shape, SampleOptions(seed=2), device="cpu",
                         candidates=[("fake-good", None)], warn=pytest.fail)
    assert choice.backend == "fake-good" and choice.fallbacks == []
    (v,) = choice.verified
    assert v["backend"] == "fake-good" and v["rel_err"] == 0.0 and v["tolerance"] == 1e-4
    x = sample(model, d, shape, seed=2, **choice.sample_kwargs())
    assert rel_err(x, sample(model, d, shape, seed=2)) == 0.0


def test_auto_in_python_warns_and_matches_the_reference(fakes, setup, monkeypatch):
    model, d, shape = setup
    monkeypatch.setitem(auto.CANDIDATES, "cpu", (("fake-wrong", None), ("reference", None)))
    with pytest.warns(FastDDPMWarning, match="fake-wrong failed verification"):
        x = sample(model, d, shape, seed=3, backend="auto")
    torch.testing.assert_close(x, sample(model, d, shape, seed=3), rtol=0, atol=0)


def test_verification_costs_a_few_steps(fakes, setup):
    """The candidate runs PREFIX_STEPS steps at the real batch, the reference PREFIX_STEPS steps on
    VERIFY_SAMPLES samples: model calls counted, not time."""
    model, d, shape = setup
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    auto.choose(model, d, shape, SampleOptions(seed=1), device="cpu", candidates=[("fake-good", None)])
    assert calls == [shape[0]] * auto.PREFIX_STEPS + [auto.VERIFY_SAMPLES] * auto.PREFIX_STEPS
    # at 1000 steps, 3 + 3 calls (the reference's on 2 of the samples) are under 1% of the run
    assert 2 * auto.PREFIX_STEPS / 1000 < 0.01


def test_prefix_is_the_first_steps_walked():
    d = GaussianDiffusion(make_betas("linear", 100)).respace("10")
    p = d.prefix(3)
    assert p.timesteps.tolist() == d.timesteps.tolist()[-3:] and p.num_timesteps == 100
    torch.testing.assert_close(p.schedule.alphas_cumprod, d.schedule.alphas_cumprod[-3:], rtol=1e-12, atol=0)
    assert d.prefix(50).timesteps.tolist() == d.timesteps.tolist()


def test_cli_records_the_choice(fakes, tmp_path, monkeypatch, capsys):
    from fastddpm.cli import main

    monkeypatch.setitem(auto.CANDIDATES, "cpu", (("fake-raise", None), ("fake-good", None)))
    out = tmp_path / "o"
    assert main(["sample", "--model", "tiny", "--steps", "4", "--batch", "2", "--no-progress", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend"] == "fake-good" and stats["request"]["backend"] == "auto"
    assert stats["verified"][0]["backend"] == "fake-good" and stats["verified"][0]["rel_err"] == 0.0
    assert stats["fallbacks"] == [{"backend": "fake-raise", "reason": "RuntimeError: illegal memory access (injected)"}]
    err = capsys.readouterr().err
    assert "fastddpm: warning: backend fake-raise failed verification" in err
    # an explicit backend is not verified unless asked
    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "1", "--backend", "reference",
                 "--no-progress", "--out", str(tmp_path / "r")]) == 0
    stats = json.loads((tmp_path / "r" / "stats.json").read_text())
    assert stats["backend"] == "reference" and stats["verified"] == [] and stats["fallbacks"] == []


def test_verify_on_rejects_a_wrong_explicit_backend(fakes, tmp_path, capsys):
    """--verify on with a named backend: checked like auto's candidates, the reference if it fails."""
    import fastddpm.generate as generate

    request = generate.SampleRequest(model="tiny", steps=3, batch=2, backend="fake-wrong", verify="on",
                                     out=str(tmp_path / "o"), progress=False)
    stats = generate.run_sample(request)
    assert stats["backend"] == "reference" and stats["fallbacks"][0]["backend"] == "fake-wrong"
    assert "fake-wrong failed verification" in capsys.readouterr().err
