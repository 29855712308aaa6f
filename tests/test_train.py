"""fastddpm.train: exact resume (also after SIGKILL), DDP equivalence, NaN handling, precision,
EMA, warm-up, importance sampling, checkpoints and the `fastddpm train` command line.

Shapes are tiny: the `tiny` preset on 8x8 images, T = 50, batches of 4-8, a few steps.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastddpm import unet
from fastddpm.checkpoint import load_checkpoint
from fastddpm.cli import main
from fastddpm.train import LossSecondMomentSampler, TrainConfig, Trainer, TrainingDiverged, build_model, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """40 random uint8 images 8x8x3 (flip on by default for npz data)."""
    path = tmp_path_factory.mktemp("data") / "images.npz"
    rng = np.random.default_rng(7)
    np.savez(path, arr_0=rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8))
    return path


def _cfg(npz, out, **kw) -> TrainConfig:
    base = dict(data=f"npz:{npz}", out=str(out), model="tiny", steps=6, batch=4, warmup=3, ema=0.9, save_every=3,
                log_every=2, diffusion_steps=50, lr=1e-3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _argv(npz, out, **kw) -> list[str]:
    """The command-line form of _cfg (same defaults)."""
    args = dict(data=f"npz:{npz}", out=str(out), model="tiny", steps=6, batch=4, warmup=3, ema=0.9, save_every=3,
                log_every=2, diffusion_steps=50, lr=1e-3)
    args.update(kw)
    argv = ["train", "--no-progress"]
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False:
            argv += [flag, str(v)]
    return argv


def _tensors(path) -> dict:
    return load_file(str(path))


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])["meta"]


def _assert_same_state(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"
    ma, mb = _meta(a), _meta(b)
    for key in ("step", "data_position", "skipped_steps", "scaler"):
        assert ma[key] == mb[key], key


@pytest.fixture
def dropout_tiny(monkeypatch):
    """The tiny preset with dropout, so a resume must also restore torch's global RNG."""
    monkeypatch.setitem(unet.PRESETS, "tiny", replace(unet.PRESETS["tiny"], dropout=0.1))


# ------------------------------------------------------------------------------------ resume
def test_resume_is_exact(npz, tmp_path, dropout_tiny):
    train(_cfg(npz, tmp_path / "straight", steps=6))
    train(_cfg(npz, tmp_path / "split", steps=3))
    assert _meta(tmp_path / "split" / "last.safetensors")["step"] == 3
    train(_cfg(npz, tmp_path / "split", steps=6, resume=True))
    _assert_same_state(tmp_path / "straight" / "last.safetensors", tmp_path / "split" / "last.safetensors")
    # the data position went past the first epoch (40 images, 4 per step: 10 steps) only in time
    assert _meta(tmp_path / "split" / "last.safetensors")["data_position"] == {"epoch": 0, "position": 24}
    # a second resume at the target does nothing
    before = (tmp_path / "split" / "last.safetensors").read_bytes()
    train(_cfg(npz, tmp_path / "split", steps=6, resume=True))
    assert (tmp_path / "split" / "last.safetensors").read_bytes() == before


def test_resume_after_sigkill_is_exact(npz, tmp_path):
    steps = 24
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as this process (fixture one_thread)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastddpm"] + _argv(npz, killed, steps=steps, save_every=4),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "ckpt-12.safetensors").exists():  # then last.safetensors is at step >= 8
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the training subprocess made no checkpoint in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = _meta(killed / "last.safetensors")["step"]
    assert 8 <= stopped_at < steps, "the run must be killed mid-way"
    assert main(_argv(npz, killed, steps=steps, save_every=4, resume=True)) == 0
    assert main(_argv(npz, tmp_path / "straight", steps=steps, save_every=4)) == 0
    _assert_same_state(tmp_path / "straight" / "last.safetensors", killed / "last.safetensors")
    assert not list(killed.glob(".*.tmp"))


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(npz, tmp_path):
    trainer = Trainer(_cfg(npz, tmp_path / "stopped", steps=6, save_every=100))
    original = trainer.loss_fn

    def send_sigterm_during_step_2(*args):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's pre-emption would
        return original(*args)

    trainer.loss_fn = send_sigterm_during_step_2
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert _meta(tmp_path / "stopped" / "last.safetensors")["step"] == 3  # step 2 finished, then saved
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone again
    train(_cfg(npz, tmp_path / "stopped", steps=6, save_every=100, resume=True))
    train(_cfg(npz, tmp_path / "straight", steps=6, save_every=100))
    _assert_same_state(tmp_path / "straight" / "last.safetensors", tmp_path / "stopped" / "last.safetensors")


# ------------------------------------------------------------------------------------ DDP
def test_two_gloo_ranks_match_one_rank_at_twice_the_batch(npz, tmp_path):
    steps = 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastddpm"]
    run = subprocess.run(cmd + _argv(npz, tmp_path / "ddp", steps=steps, batch=4, device="cpu"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(_argv(npz, tmp_path / "one", steps=steps, batch=8)) == 0
    a, b = _tensors(tmp_path / "ddp" / "last.safetensors"), _tensors(tmp_path / "one" / "last.safetensors")
    assert _meta(tmp_path / "ddp" / "last.safetensors")["world_size"] == 2
    assert _meta(tmp_path / "ddp" / "last.safetensors")["global_batch"] == 8
    # compare what training changed (weights minus their shared initial value): a rank seeing the
    # wrong shard, noise or timesteps changes it completely
    torch.manual_seed(0)
    init = build_model(_cfg(npz, tmp_path / "x"), _data(npz)).state_dict()
    for k, v in init.items():
        for prefix in ("", "train.model."):
            da, db = a[prefix + k] - v, b[prefix + k] - v
            if db.norm() > 0:
                rel = float((da - db).norm() / db.norm())
                assert rel < 1e-4, f"{prefix}{k}: relative difference {rel:.2e}"  # measured <= 4e-5
    la = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["loss_by_quarter"] == pytest.approx(rb["loss_by_quarter"], rel=1e-5)


def _data(npz):
    from fastddpm.data import load_npz

    return load_npz(str(npz))


# ------------------------------------------------------------------------------------ non-finite
class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_non_finite_steps_are_skipped_counted_and_never_saved(npz, tmp_path):
    trainer = Trainer(_cfg(npz, tmp_path, steps=6, save_every=6, log_every=6))
    original = trainer.loss_fn
    snapshots = {}

    def poisoned(x0, t, eps, w):
        objective, terms = original(x0, t, eps, w)
        if trainer.step == 2:  # a NaN loss
            objective = objective * float("nan")
        if trainer.step == 3:  # a finite loss with an infinite gradient
            objective = _InfGrad.apply(objective)
        if trainer.step in (2, 3, 4):
            snapshots[trainer.step] = ({k: v.clone() for k, v in trainer.model.state_dict().items()},
                                       {k: v.clone() for k, v in trainer.ema.state_dict().items()})
        return objective, terms

    trainer.loss_fn = poisoned
    summary = trainer.run()
    assert summary["skipped_steps"] == 2 and summary["step"] == 6
    for k, v in snapshots[2][0].items():  # raw weights and EMA untouched by both bad steps
        assert torch.equal(v, snapshots[4][0][k])
    for k, v in snapshots[2][1].items():
        assert torch.equal(v, snapshots[4][1][k])
    tensors = _tensors(tmp_path / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert _meta(tmp_path / "last.safetensors")["skipped_steps"] == 2
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] == 2 and log[-1]["skipped_total"] == 2 and np.isfinite(log[-1]["loss"])


def test_too_many_non_finite_steps_stop_with_one_line(npz, tmp_path, capsys):
    # lr 1e30: the first step throws the weights to ~1e30, every later loss overflows
    out = tmp_path / "run"
    rc = main(_argv(npz, out, steps=20, lr=1e30, warmup=0, max_bad_steps=3, save_every=100))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fastddpm: error: training stopped at step 4: 3 steps in a row")
    assert "non-finite" in err and "no checkpoint was written" in err
    assert not (out / "last.safetensors").exists()
    # a checkpoint written between bad steps holds the last good (finite) state
    assert main(_argv(npz, tmp_path / "saved", steps=20, lr=1e30, warmup=0, max_bad_steps=3, save_every=2)) == 2
    assert "the last checkpoint" in capsys.readouterr().err
    tensors = _tensors(tmp_path / "saved" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    with pytest.raises(TrainingDiverged):
        train(_cfg(npz, tmp_path / "again", steps=20, lr=1e30, warmup=0, max_bad_steps=3))


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(npz, tmp_path, precision):
    trainer = Trainer(_cfg(npz, tmp_path, steps=3, precision=precision, warmup=0))
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.skipped_total == 0
    meta = _meta(tmp_path / "last.safetensors")
    assert (meta["scaler"].get("scale") is not None) == (precision == "fp16")
    # the loss is reduced in float32: the stats are finite, and the model did train
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    model, _, _ = load_checkpoint(tmp_path / "last.safetensors")
    assert model.conv_out.weight.abs().sum() > 0


# ------------------------------------------------------------------------------------ pieces
def test_ema_and_warmup(npz, tmp_path):
    trainer = Trainer(_cfg(npz, tmp_path, steps=2, ema=0.75, warmup=4))
    assert [trainer.lr_at(s) for s in (0, 1, 3, 10)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    # EMA warm-up: (1 + s) / (10 + s) until it reaches the set rate
    assert [trainer.ema_rate_at(s) for s in (0, 1, 20, 30, 10**6)] == pytest.approx([0.1, 2 / 11, 0.7, 0.75, 0.75])
    trainer.cfg.steps = 1
    trainer.run()  # step 0: rate 0.1
    trainer.ema.load_state_dict(trainer.model.state_dict())
    trainer.step = 30  # rate 0.75 from here
    trainer.cfg.steps = 31
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in trainer.ema.state_dict().items():  # EMA = 0.75 old + 0.25 new
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * after[k], rtol=1e-6, atol=1e-7), k
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_loss_second_moment_sampler():
    T = 5
    s = LossSecondMomentSampler(T, history=2, uniform_prob=0.01)
    assert torch.allclose(s.probabilities(), torch.full((T,), 0.2, dtype=torch.float64))
    losses = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 0.5, 0.5, 8.0, 8.0], dtype=torch.float64)
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]), losses)
    rms = torch.tensor([1.0, 2.0, (12.5) ** 0.5, 0.5, 8.0], dtype=torch.float64)
    expected = rms / rms.sum() * 0.99 + 0.01 / T
    assert torch.allclose(s.probabilities(), expected)
    g = torch.Generator().manual_seed(0)
    t, w = s.draw(g, 20000)
    assert torch.allclose(w, (1.0 / (T * expected[t])).float())
    freq = torch.bincount(t, minlength=T).double() / 20000
    assert torch.allclose(freq, expected, atol=4 * (0.25 / 20000) ** 0.5)  # 4 standard errors
    s.update(torch.tensor([4]), torch.tensor([0.0]))  # the history keeps the last 2 losses per t
    assert s.history[4].tolist() == [8.0, 0.0]


def test_importance_sampled_kl_training_resumes_exactly(npz, tmp_path):
    # T = 4 (cosine) so that every t has its 10 losses after 5 steps of 8: the importance branch runs
    kw = dict(loss="kl", timestep_sampler="loss-second-moment", diffusion_steps=4, schedule="cosine", batch=8,
              steps=10, save_every=5)
    trainer = Trainer(_cfg(npz, tmp_path / "straight", **kw))
    trainer.run()
    assert int(trainer.sampler.count.min()) >= 10
    assert trainer.model.config.learn_sigma and trainer.diffusion.var_type == "learned_range"
    train(_cfg(npz, tmp_path / "split", **dict(kw, steps=5)))
    train(_cfg(npz, tmp_path / "split", **dict(kw, resume=True)))
    _assert_same_state(tmp_path / "straight" / "last.safetensors", tmp_path / "split" / "last.safetensors")
    assert "train.sampler.history" in _tensors(tmp_path / "split" / "last.safetensors")


@pytest.mark.parametrize("sampler", ["uniform", "loss-second-moment"])
def test_log_records_the_weighted_objective_beside_the_plain_loss(npz, tmp_path, sampler):
    # IDDPM Fig. 6 plots the importance-weighted L_vlb estimate mean_b(w_b L_b), the objective that
    # is optimised; the plain mean_b L_b is a different quantity under importance sampling
    cfg = _cfg(npz, tmp_path, loss="kl", timestep_sampler=sampler, diffusion_steps=4, schedule="cosine",
               batch=8, steps=8, log_every=1)
    trainer = Trainer(cfg)
    seen = []
    inner = trainer.loss_fn

    def spy(x0, t, eps, w):
        objective, terms = inner(x0, t, eps, w)
        seen.append((terms["loss"].detach().double(), w.double()))
        return objective, terms
    trainer.loss_fn = spy
    stats = [trainer.train_step() for _ in range(8)]
    for s, (loss, w) in zip(stats, seen):
        assert s["loss"] == pytest.approx(float(loss.mean()), rel=1e-5)
        assert s["loss_weighted"] == pytest.approx(float((loss * w).mean()), rel=1e-5)
    if sampler == "uniform":
        assert all(s["loss_weighted"] == pytest.approx(s["loss"], rel=1e-5) for s in stats)
    else:  # every t has its 10 losses after 5 steps of 8: from then on the weights are not all 1
        assert any(abs(s["loss_weighted"] - s["loss"]) > 1e-3 * abs(s["loss"]) for s in stats[5:])
    train(_cfg(npz, tmp_path / "logged", **dict(loss="kl", timestep_sampler=sampler, diffusion_steps=4,
                                                  schedule="cosine", batch=8, steps=3, log_every=1)))
    log = [json.loads(x) for x in (tmp_path / "logged" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss_weighted"]) for r in log)


def test_checkpoints_logs_and_sample_grids(npz, tmp_path):
    trainer = Trainer(_cfg(npz, tmp_path, steps=5, save_every=1, keep=2, log_every=2, sample_every=4,
                           sample_steps=5))
    trainer.run()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-4.safetensors", "ckpt-5.safetensors"]
    assert (tmp_path / "last.safetensors").read_bytes() == (tmp_path / "ckpt-5.safetensors").read_bytes()
    model, diffusion, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 5 and diffusion.num_timesteps == 50
    for k, v in model.state_dict().items():  # the model a user loads is the EMA
        assert torch.equal(v, trainer.ema.state_dict()[k])
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 5]
    for key in ("loss", "mse", "vb", "loss_by_quarter", "grad_norm", "lr", "images_per_s", "skipped"):
        assert key in log[0], key
    assert len(log[0]["loss_by_quarter"]) == 4
    assert (tmp_path / "samples" / "step-0000004.png").is_file()


# ------------------------------------------------------------------------------------ bad input
def _one_line_error(capsys, *pieces):
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: ") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, (piece, err)


def test_bad_input_exits_2_and_leaves_checkpoints_untouched(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(npz, out, steps=3)) == 0
    capsys.readouterr()
    last = out / "last.safetensors"
    before = (last.read_bytes(), last.stat().st_mtime_ns, sorted(p.name for p in out.iterdir()))

    assert main(_argv(npz, out, steps=6)) == 2  # an existing run without --resume
    _one_line_error(capsys, "already holds a run", "--resume")
    assert main(_argv(npz, out, steps=6, resume=True, model="cifar10")) == 2  # another model shape
    _one_line_error(capsys, "different model", "model_channels")
    assert main(_argv(npz, out, steps=6, resume=True, loss="hybrid")) == 2  # learned sigma: other shape
    _one_line_error(capsys, "different model", "learn_sigma")
    assert main(_argv(npz, out, steps=6, resume=True, diffusion_steps=100)) == 2
    _one_line_error(capsys, "diffusion settings")
    assert main(_argv(npz, out, steps=6, resume=True, batch=41)) == 2  # batch larger than the data
    _one_line_error(capsys, "larger than the 40 images")
    assert (last.read_bytes(), last.stat().st_mtime_ns, sorted(p.name for p in out.iterdir())) == before

    assert main(_argv(npz, tmp_path / "fresh", resume=True)) == 2
    _one_line_error(capsys, "nothing to resume")
    (tmp_path / "empty").mkdir()
    assert main(_argv(npz, tmp_path / "e", data=f"images:{tmp_path / 'empty'}")) == 2
    _one_line_error(capsys, "holds no PNG or JPEG")
    assert main(_argv(npz, tmp_path / "m", data=f"npz:{tmp_path / 'missing.npz'}")) == 2
    _one_line_error(capsys, "does not exist")
    assert main(_argv(npz, tmp_path / "p", precision="fp8")) == 2
    _one_line_error(capsys, "--precision")
    assert main(_argv(npz, tmp_path / "q", model="huge")) == 2
    _one_line_error(capsys, "unknown model preset 'huge'")
    assert main(_argv(npz, tmp_path / "r", ema=1.5)) == 2
    _one_line_error(capsys, "EMA rate")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile on CPU takes minutes here)")
def test_compiled_step_matches_eager_on_gpu(npz, tmp_path):
    eager = Trainer(_cfg(npz, tmp_path / "eager", steps=2, device="cuda"))
    compiled = Trainer(_cfg(npz, tmp_path / "compiled", steps=2, device="cuda", compile=True))
    eager.run()
    compiled.run()
    for (k, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        assert float((a - b).norm() / a.norm().clamp_min(1e-12)) < 1e-4, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_training_precisions(npz, tmp_path, precision):
    trainer = Trainer(_cfg(npz, tmp_path, steps=4, device="cuda", precision=precision))
    trainer.run()
    assert trainer.skipped_total == 0
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------ kill mid-save
_PAUSE_BEFORE_RENAME = """
import os, sys, time
from fastddpm import files
real = files._rename
def paused(tmp, path):
    if os.path.basename(str(path)) == sys.argv[1]:  # the temporary file is complete and flushed: stop here
        open(sys.argv[2], "w").close()
        time.sleep(600)
    real(tmp, path)
files._rename = paused
from fastddpm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_during_a_save_then_resume_leaves_no_temporary_file(npz, tmp_path):
    """A kill between writing a checkpoint's temporary file and renaming it: the next run that takes
    the folder removes the temporary, resumes from the previous checkpoint, and ends exact."""
    out, marker = tmp_path / "killed", tmp_path / "paused"
    argv = _argv(npz, out, steps=6, save_every=3)
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_BEFORE_RENAME, "ckpt-6.safetensors", str(marker), *argv],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the training subprocess never reached the save"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    temporaries = [p.name for p in out.iterdir() if p.name.startswith(".fastddpm-tmp.")]
    assert len(temporaries) == 1 and "ckpt-6" in temporaries[0]  # what the kill left: a whole checkpoint
    assert _meta(out / "last.safetensors")["step"] == 3
    assert main(_argv(npz, out, steps=6, save_every=3, resume=True)) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary, no lock file
    assert main(_argv(npz, tmp_path / "straight", steps=6, save_every=3)) == 0
    _assert_same_state(tmp_path / "straight" / "last.safetensors", out / "last.safetensors")


# ------------------------------------------------------------------------------------ tampered resume
def _rewrite(path, tensors=None, meta=None, drop=()):
    """Rewrite trainer checkpoint `path` with some tensors replaced / dropped and meta entries changed."""
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    ts = {k: v for k, v in _tensors(path).items() if k not in drop}
    ts.update(tensors or {})
    config = json.loads(metadata["config"])
    for k, v in (meta or {}).items():
        if v is None:
            config["meta"].pop(k, None)
        else:
            config["meta"][k] = v
    metadata["config"] = json.dumps(config)
    path.unlink()
    save_file(ts, str(path), metadata=metadata)


def test_tampered_checkpoints_are_refused_before_the_first_step(npz, tmp_path, capsys):
    good = tmp_path / "good"
    assert main(_argv(npz, good, steps=3)) == 0
    t = _tensors(good / "last.safetensors")
    exp_avg = next(k for k in t if k.endswith(".exp_avg"))
    exp_avg_sq = exp_avg + "_sq"
    cases = {
        "bad RNG state": (dict(tensors={"train.rng.cpu": torch.zeros(10, dtype=torch.uint8)}), "train.rng.cpu"),
        "RNG state of another dtype": (dict(tensors={"train.rng.cpu": t["train.rng.cpu"].float()}), "train.rng.cpu"),
        "missing data position": (dict(meta={"data_position": None}), "no training state"),
        "data position not a dict": (dict(meta={"data_position": [0, 12]}), "data position"),
        "data position not numbers": (dict(meta={"data_position": {"epoch": "x", "position": 12}}), "'epoch'"),
        "step not a number": (dict(meta={"step": "three"}), "'step'"),
        "negative step": (dict(meta={"step": -4}), "'step'"),
        "optimizer moment of another shape": (dict(tensors={exp_avg: torch.zeros(3)}), "exp_avg of parameter"),
        "optimizer moment of another dtype": (dict(tensors={exp_avg: t[exp_avg].double()}), "float64"),
        "negative second moment": (dict(tensors={exp_avg_sq: -torch.ones_like(t[exp_avg_sq])}), "negative"),
        "optimizer moment missing": (dict(drop=(exp_avg_sq,)), "incomplete optimizer state"),
        "foreign optimizer tensor": (dict(tensors={"train.optimizer.9999.exp_avg": torch.zeros(1)}),
                                     "unexpected optimizer tensor"),
        "non-finite raw weight": (dict(tensors={"train.model.conv_in.weight": t["train.model.conv_in.weight"] *
                                                float("nan")}), "non-finite"),
        "bad scaler state": (dict(meta={"scaler": "big"}), "GradScaler"),
    }
    for label, (change, piece) in cases.items():
        out = tmp_path / label.replace(" ", "-")
        out.mkdir()
        (out / "last.safetensors").write_bytes((good / "last.safetensors").read_bytes())
        _rewrite(out / "last.safetensors", **change)
        before = sorted(p.name for p in out.iterdir())
        code = main(_argv(npz, out, steps=6, resume=True))
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        assert err.startswith("fastddpm: error: ") and err.count("\n") == 1 and piece in err, (label, piece, err)
        assert sorted(p.name for p in out.iterdir()) == before, label  # no step ran: no log, no checkpoint


def test_work_that_cannot_fit_in_memory_is_refused_naming_the_flag(npz, tmp_path, monkeypatch, capsys):
    """Checked against the free memory before allocating (here: a machine with 4 MiB free; a batch of 40
    8x8 images keeps at least 7 MiB of activations for the backward pass of the tiny U-Net)."""
    from fastddpm import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 2**20)
    assert main(_argv(npz, tmp_path / "a", diffusion_steps=10**7)) == 2
    _one_line_error(capsys, "out of memory", "lower --diffusion-steps")
    assert main(_argv(npz, tmp_path / "b", batch=40)) == 2
    _one_line_error(capsys, "out of memory", "batch of 40", "lower --batch")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    monkeypatch.undo()

    from fastddpm import train as train_module

    def no_memory(*args, **kwargs):  # what torch raises for one allocation too large for the host
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 32000000000 bytes. Error code 12")
    monkeypatch.setattr(train_module, "make_betas", no_memory)
    assert main(_argv(npz, tmp_path / "c")) == 2
    _one_line_error(capsys, "out of memory", "lower --batch or --diffusion-steps")
