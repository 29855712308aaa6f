"""The trainer behind `fastddpm train`: DDPM Algorithm 1 with AMP, EMA, exact resume and DDP.

One training step (Ho et al. 2020, Algorithm 1; Nichol & Dhariwal 2021, sec. 3):
    x0 ~ data (random left-right flip), t ~ uniform{0..T-1} or importance-sampled p(t),
    eps = noise(seed', step, sample index), loss = mean_b w_b L(x0_b, t_b, eps_b),
    w = 1 / (T p(t)) (1 for uniform t), Adam step on the clipped gradient, EMA update
    (rate min(ema, (1 + step) / (10 + step))).

Everything random in a step is a function of (seed, step, global sample index): the batch order
and flips come from `SeededLoader` (seeded by (seed, epoch)), the timesteps from a generator
seeded by (seed, step), the Gaussian from the counter-based `fastddpm.noise`. So a resumed run
repeats an uninterrupted one exactly, and 2 ranks at batch B see the same (x0, t, eps) as one
rank at batch 2B; dropout draws from torch's global generator, whose state is saved too.

Checkpoint (fastddpm.checkpoint.save_checkpoint): the model tensors are the EMA weights, so
`load_checkpoint(DIR/last.safetensors)` gives the model to sample with; training state lives in
"train.*" tensors (raw weights, Adam moments, RNG states, importance-sampler history) and in the
JSON meta (step, data position, GradScaler state, skipped steps, the config); writing, reading
and checking that state is fastddpm.train_state. Rank 0 writes DIR/ckpt-STEP.safetensors
atomically, keeps the newest `keep` of them, and points DIR/last.safetensors at the newest one
(a hard link, or a copy, renamed into place).

The run folder: rank 0 holds its lock (fastddpm.run_folder) for the whole run, so a second
`fastddpm train` (or `sample`) on it exits 2 at once; temporary files a killed run left there
are removed when the lock is taken. A full disk while saving is an OutOfSpaceError (exit 2)
that leaves last.safetensors at the previous good checkpoint. A fresh run that fails before
writing anything removes the folder it created.

Mixed precision: the model runs under autocast (bf16 or fp16) with float32 master weights; its
output is cast to float32 and the loss is reduced in float32. fp16 uses a GradScaler. A step
whose loss or gradient norm is not finite is skipped (no optimizer or EMA update) and counted;
`max_bad_steps` such steps in a row stop training with a TrainingDiverged error (exit 2), so a
NaN never reaches the weights, hence never a checkpoint.
"""
from __future__ import annotations

import copy
import math
import signal
import time
from pathlib import Path

import torch

from . import train_state
from .checkpoint import load_checkpoint, save_checkpoint
from .data import ImageSet, SeededLoader, _mix, data_input_files, load_dataset, parse_data_spec
from .diffusion import GaussianDiffusion
from .distributed import Distributed
from .errors import (FastDDPMError, Interrupted, OutOfSpaceError, OutputError, TrainingDiverged,  # noqa: F401
                     UnsafeOutputError)  # TrainingDiverged: public here as before (it lives in errors)
from .files import refuse_overwriting_inputs
from .memory import check_schedule_fits, check_training_fits
from .noise import noise
from .run_folder import LOCK_NAME, RunFolder, lock_on_main
from .safe_open import describe
from .schedule import make_betas
from .train_config import LOSSES, TIMESTEP_SAMPLERS, TrainConfig, resume_config  # noqa: F401  (public here)
from .train_log import LOG_NAME, Window, append_log, trim_log
from .train_state import LAST, checkpoint_paths, read_training_state  # noqa: F401  (public here as before)
from .unet import PRESETS, UNet

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------ timestep samplers
class UniformSampler:
    """t ~ uniform{0..T-1}, weight 1 (DDPM Algorithm 1, line 3)."""

    def __init__(self, T: int):
        self.T = T

    def draw(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [n] int64, weights [n] float32) from generator g."""
        return torch.randint(0, self.T, (n,), generator=g), torch.ones(n)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling of t by the loss's second moment (IDDPM sec. 3.3, eq. 18):

        p(t) ~ sqrt(E[L_t^2]),  L_vlb = E_{t ~ p}[L_t / p(t)],

    with E[L_t^2] over the last `history` losses seen at t; uniform until every t has that many,
    and mixed with `uniform_prob` of the uniform distribution (as improved-diffusion).
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(T)
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(T, history, dtype=torch.float64)
        self.count = torch.zeros(T, dtype=torch.int64)

    def probabilities(self) -> torch.Tensor:
        """p(t), float64 [T]."""
        if (self.count < self.history.shape[1]).any():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = torch.sqrt((self.history ** 2).mean(dim=1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.T

    def draw(self, g, n):
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=g)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t, losses):
        H = self.history.shape[1]
        for ti, li in zip(t.tolist(), losses.double().tolist()):
            c = int(self.count[ti])
            if c < H:
                self.history[ti, c] = li
            else:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li
            self.count[ti] = c + 1

    def state_tensors(self):
        return {"train.sampler.history": self.history, "train.sampler.count": self.count}

    def load_state_tensors(self, tensors):
        if "train.sampler.history" in tensors:
            self.history.copy_(tensors["train.sampler.history"])
            self.count.copy_(tensors["train.sampler.count"])


# ------------------------------------------------------------------------------ building
def build_diffusion(cfg: TrainConfig) -> GaussianDiffusion:
    """eps prediction; fixed large variance for the simple loss, learned range for kl / hybrid (IDDPM)."""
    var_type = "fixedlarge" if cfg.loss == "simple" else "learned_range"
    return GaussianDiffusion(make_betas(cfg.schedule, cfg.diffusion_steps), mean_type="eps", var_type=var_type,
                             loss_type=cfg.loss)


def load_training_data(cfg: TrainConfig, split: str = "train") -> ImageSet:
    """The data set; image folders are resized to the preset's resolution, other data keep theirs."""
    kind, _ = parse_data_spec(cfg.data)
    return load_dataset(cfg.data, image_size=PRESETS[cfg.model].image_size if kind == "images" else None,
                        split=split)


def build_model(cfg: TrainConfig, data: ImageSet) -> UNet:
    """The preset U-Net adapted to the data's resolution and channels; learned sigma for kl / hybrid."""
    return UNet.from_preset(cfg.model, learn_sigma=cfg.loss != "simple", image_size=data.image_size,
                            in_channels=data.channels)


# ------------------------------------------------------------------------------ the trainer
class Trainer:
    """Holds the model, its EMA, the optimizer, the data and the step counter. `run()` trains."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = Distributed(cfg.device)
        self.device = self.dist.device
        self.folder = RunFolder(cfg.out, "--out")  # refuses an impossible --out before anything else
        self.out = self.folder.path
        self.last = self.out / LAST
        self._lock = None
        self.resume_notes, self._resume_conflicts = [], None
        self._refuse_overwriting_inputs()
        self._hold_folder()
        try:
            if cfg.resume:
                self._continue_saved_config()
                self._refuse_overwriting_inputs()  # --data may have come from the checkpoint
            self._check_written_names()
            self._build()
        except BaseException:
            self._release_folder(failed=True)
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.data = load_training_data(cfg)
        check_schedule_fits(cfg.diffusion_steps)
        self.diffusion = build_diffusion(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.amp_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        flip = self.data.flip_default if cfg.flip is None else cfg.flip
        self.loader = SeededLoader(self.data, cfg.batch, seed=cfg.seed, flip=flip, rank=self.dist.rank,
                                   world_size=self.dist.world_size, device=self.device)
        check_training_fits(self.model.config, cfg.batch, self.device, half_precision=cfg.precision != "fp32")
        T = self.diffusion.num_timesteps
        self.sampler = UniformSampler(T) if cfg.timestep_sampler == "uniform" else LossSecondMomentSampler(T)
        self.noise_seed = _mix(cfg.seed, 0x401E) & 0xFFFFFFFF
        self.step, self.skipped_total = 0, 0
        self.seconds_before = 0.0  # training time of earlier runs (resume)
        if cfg.resume:
            self._load(self.last)
            if self._resume_conflicts is not None:  # checked after the checkpoint itself (model, schedule)
                raise self._resume_conflicts

        net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None)
        self.net = net
        self.loss_fn = torch.compile(self._losses) if cfg.compile else self._losses
        self._stop_signal, self._saved_at = None, None

    # ------------------------------------------------------------------ the run folder
    def _hold_folder(self, check: bool = True) -> None:
        """Take the run folder's lock (rank 0; creating the folder, removing our stale temporaries),
        then (check) make sure --resume finds a run there and a fresh run does not overwrite one."""
        lock = lock_on_main(self.folder, self.dist)
        lock.__enter__()
        self._lock = lock
        if not check:
            return
        try:
            if self.cfg.resume:
                if not self.last.is_file():
                    raise FastDDPMError(f"nothing to resume: {str(self.last)!r} does not exist (drop --resume to "
                                        "start a new run)")
            elif self.last.exists():
                raise FastDDPMError(f"{str(self.out)!r} already holds a run ({LAST}); pass --resume to continue "
                                    "it, or choose another --out")
        except BaseException:
            self._release_folder(failed=True)
            raise

    def _release_folder(self, failed: bool) -> None:
        """Drop the lock; after a failure, a folder this run created and left empty is removed."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(FastDDPMError if failed else None, None, None)

    def _continue_saved_config(self) -> None:
        """--resume: settings not given take the saved run's values; a given one that contradicts the
        run is refused (after the checkpoint's own checks), a legitimate change is noted
        (fastddpm.train_config)."""
        saved = train_state.saved_train_config(self.last)
        missing = [] if saved is not None or self.cfg.given is None else \
            [f"--{n}" for n in ("data", "model") if n not in self.cfg.given]
        if missing:
            raise FastDDPMError(f"{str(self.last)!r} does not record its training configuration; give "
                                f"{' and '.join(missing)} (and the other settings the run was started with)")
        plan = resume_config(self.cfg, saved, str(self.last))
        self.cfg, self.resume_notes = plan.config, plan.notes
        self._resume_conflicts = plan.conflict_error(str(self.last))

    def _refuse_overwriting_inputs(self) -> None:
        """The data files must not be among the files this run writes (fastddpm.files)."""
        names = [self.out / LAST, self.out / LOG_NAME, self.out / LOCK_NAME]
        if self.out.is_dir():
            names += [p for p in self.out.iterdir() if train_state.CKPT_RE.match(p.name)]
            if (self.out / "samples").is_dir() and not (self.out / "samples").is_symlink():
                names += list((self.out / "samples").iterdir())
        refuse_overwriting_inputs([(p, "--out") for p in names],
                                  [(p, "--data") for p in data_input_files(self.cfg.data)])

    def _check_written_names(self) -> None:
        """Refuse, before any work, a run folder whose samples/ (where grids go) is a link or a file:
        every name a run writes is inside its folder, never elsewhere. (log.jsonl, the lock file
        and the checkpoints are opened or replaced without following links.)"""
        if not self.dist.is_main or not self.cfg.sample_every:
            return
        grids = self.out / "samples"
        try:
            found = describe(grids.lstat())
        except FileNotFoundError:
            return
        except OSError as e:
            raise OutputError(f"cannot use {str(grids)!r} ({e.strerror or e})") from None
        if found != "a folder":
            raise UnsafeOutputError(f"refusing to write sample grids into {str(grids)!r}: it is {found}, not a "
                                    "folder of this run; remove it or choose another --out")

    def _load(self, path: Path) -> None:
        """Restore everything a step depends on from a trainer checkpoint (exact resume; checked first)."""
        train_state.restore(self, path)

    def save(self) -> Path:
        """Write DIR/ckpt-STEP.safetensors (EMA weights + training state), point last at it, prune."""
        meta = {"step": self.step, "data_position": self.loader.state_dict(), "global_batch": self.loader.global_batch,
                "world_size": self.dist.world_size, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "skipped_steps": self.skipped_total, "images_seen": self.step * self.loader.global_batch,
                "train_seconds": self.seconds_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
                "data": self.cfg.data, "train_config": self.cfg.to_dict(), "torch": torch.__version__}
        return train_state.save(self, meta)

    # ------------------------------------------------------------------ one step
    def _net(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.net(x, t)
        return out.float()  # the loss is computed and reduced in float32

    def _losses(self, x0, t, eps, weights):
        """(objective, per-sample terms) for one batch; objective = mean_b(w_b loss_b), float32."""
        terms = self.diffusion.training_losses(self._net, x0, t, eps)
        return (terms["loss"] * weights).mean(), terms

    def _draw(self) -> tuple[torch.Tensor, ...]:
        """This rank's (x0, t, eps, weights) for the current step, and the global t."""
        cfg, B, r = self.cfg, self.cfg.batch, self.dist.rank
        x0, _ = self.loader.next()
        g = torch.Generator().manual_seed(_mix(cfg.seed, self.step, 0x7135))
        t_all, w_all = self.sampler.draw(g, self.loader.global_batch)
        t = t_all[r * B:(r + 1) * B].to(self.device)
        w = w_all[r * B:(r + 1) * B].to(self.device)
        eps = noise(self.noise_seed, self.step, x0.shape, sample_offset=r * B, device=self.device)
        return x0, t, eps, w, t_all

    def lr_at(self, step: int) -> float:
        """Linear warm-up: lr * min(1, (step + 1) / warmup)."""
        return self.cfg.lr * (min(1.0, (step + 1) / self.cfg.warmup) if self.cfg.warmup else 1.0)

    def ema_rate_at(self, step: int) -> float:
        """EMA rate with warm-up: min(ema, (1 + step) / (10 + step)), as TF's ExponentialMovingAverage
        with num_updates. Without it a 0.9999 EMA still holds 37% of the initial weights after 10k
        steps; with it the average starts short and reaches the set rate by step ~10 / (1 - ema)."""
        return min(self.cfg.ema, (1.0 + step) / (10.0 + step))

    def train_step(self) -> dict:
        """One step of Algorithm 1; returns this step's stats (summed over ranks where noted)."""
        x0, t, eps, w, t_all = self._draw()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        objective, terms = self.loss_fn(x0, t, eps, w)
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # One all-reduce and one host sync per step: objective (non-finite anywhere -> everywhere),
        # sums of loss, mse, vb, per-quarter loss sums and counts, and the stop flag.
        loss = terms["loss"].detach()
        quarter = torch.clamp(t * 4 // self.diffusion.num_timesteps, max=3)
        q_sum = torch.zeros(4, device=self.device).index_add_(0, quarter, loss)
        q_cnt = torch.zeros(4, device=self.device).index_add_(0, quarter, torch.ones_like(loss))
        stop = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        stats = torch.cat([objective.detach().reshape(1), loss.sum().reshape(1), terms["mse"].detach().sum().reshape(1),
                           terms["vb"].detach().sum().reshape(1), q_sum, q_cnt, stop])
        stats = self.dist.all_reduce_sum(stats)
        host = torch.cat([stats, grad_norm.detach().float().reshape(1).to(stats.device)]).tolist()
        finite = math.isfinite(host[0]) and math.isfinite(host[-1])
        if finite:
            self.scaler.step(self.optimizer)
            torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.params],
                                 1.0 - self.ema_rate_at(self.step))
            if isinstance(self.sampler, LossSecondMomentSampler):
                self.sampler.update(t_all, self.dist.all_gather(loss.float()).cpu())
        self.scaler.update()
        self.step += 1
        n = self.loader.global_batch
        # host[0] sums each rank's mean_b(w_b loss_b): the importance-weighted objective that is optimised
        return {"finite": finite, "loss": host[1] / n, "loss_weighted": host[0] / self.dist.world_size,
                "mse": host[2] / n, "vb": host[3] / n,
                "q_sum": host[4:8], "q_cnt": host[8:12], "stop": host[12] > 0, "grad_norm": host[-1], "lr": lr}

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self):
        """SIGINT / SIGTERM ask the run to stop: at the end of the current training step (or at the
        next step of a sample grid being drawn, which is abandoned) a checkpoint of that consistent
        state is written and the run raises Interrupted (exit 130 / 143 on the command line). A
        second signal stops at once, without a checkpoint."""
        if not (hasattr(signal, "SIGTERM") and _in_main_thread()):
            return {}

        def ask(signum, frame):
            if self._stop_signal is not None:
                raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} again at step {self.step}: "
                                          f"stopped without a checkpoint; {_last_saved(self.last, self._saved_at)}")
            self._stop_signal = signum
        return {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}

    def _interrupted(self) -> Interrupted:
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal"
        return Interrupted(self._stop_signal or signal.SIGINT,
                           f"interrupted by {name} at step {self.step}; {_last_saved(self.last, self._saved_at)}; "
                           "continue with --resume")

    def run(self) -> dict:
        """Train up to cfg.steps; returns a summary dict. Rank 0 writes checkpoints, log and grids.

        The run folder's lock, taken when the Trainer was made, is released when run() returns or
        fails (a second run() takes it again)."""
        if self._lock is None:
            self._hold_folder(check=False)
        try:
            summary = self._run()
        except BaseException:
            self._release_folder(failed=True)
            raise
        self._release_folder(failed=False)
        return summary

    def _run(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if self.step >= cfg.steps:
            if main:
                print(f"{str(self.last)!r} is already at step {self.step} >= --steps {cfg.steps}; nothing to do")
            return {"step": self.step, "skipped_steps": self.skipped_total}
        log_path = self.out / LOG_NAME
        if main:
            trim_log(log_path, self.step)
            for note in self.resume_notes:
                print(f"fastddpm: note: {note}", flush=True)
            if self.resume_notes:
                append_log(log_path, {"step": self.step, "event": "resume", "changed": self.resume_notes})
            print(f"training {cfg.model} ({sum(p.numel() for p in self.params):,} parameters, "
                  f"{self.model.config.image_size}x{self.model.config.image_size}x{self.model.config.in_channels}) "
                  f"on {self.data.name} ({len(self.data)} images), global batch {self.loader.global_batch} "
                  f"on {self.dist.world_size} x {self.device.type}, {cfg.precision}, steps {self.step} -> {cfg.steps}",
                  flush=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), unit="step",
                   dynamic_ncols=True)
        self._stop_signal, self._saved_at = None, (self.step if self.cfg.resume else None)
        previous = self._install_signal_handlers()
        window = Window()
        in_a_row = 0
        self._t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                s = self.train_step()
                window.add(s, self.loader.global_batch)
                if s["finite"]:
                    in_a_row = 0
                else:
                    in_a_row += 1
                    self.skipped_total += 1
                    window.skipped += 1
                    if in_a_row >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"training stopped at step {self.step}: {in_a_row} steps in a row had a non-finite loss or "
                            f"gradient ({_last_saved(self.last, self._saved_at)}); lower --lr, or train in fp32 or "
                            "bf16 instead of fp16")
                bar.update(1)
                if main and (self.step % 10 == 0 or self.step == cfg.steps):
                    bar.set_postfix(loss=f"{window.last_loss:.4f}", img_s=f"{window.rate():.0f}", refresh=False)
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps or s["stop"]):
                    append_log(log_path, window.record(self.step, self.skipped_total))
                    window = Window()
                if main and cfg.sample_every and self.step % cfg.sample_every == 0 and not s["stop"]:
                    self._sample_grid_unless_stopped()
                if s["stop"] or self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    if main:
                        self._save_or_explain(self._saved_at)
                    self._saved_at = self.step
                if s["stop"]:
                    raise self._interrupted()
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        seconds = time.perf_counter() - self._t0
        if main:
            print(f"step {self.step}: wrote {str(self.last)!r} ({self.skipped_total} non-finite steps skipped "
                  f"in all; {seconds:.1f} s this run)")
        return {"step": self.step, "skipped_steps": self.skipped_total, "seconds": seconds}

    def _sample_grid_unless_stopped(self) -> None:
        """write_sample_grid(), abandoned at the next sampling step once a signal asked the run to stop
        (then the next training step carries the stop to every rank, saves and ends the run)."""
        def check(_):
            if self._stop_signal is not None:
                raise _GridAbandoned

        try:
            self.write_sample_grid(callback=check)
        except _GridAbandoned:
            pass

    def _save_or_explain(self, saved_at: int | None) -> None:
        """save(), and on a full disk say which checkpoint is still the last good one."""
        try:
            self.save()
        except OutOfSpaceError as e:
            raise OutOfSpaceError(f"{e}; {_last_saved(self.last, saved_at)}") from None

    @torch.no_grad()
    def write_sample_grid(self, n: int = 64, callback=None) -> Path:
        """A PNG grid of n EMA samples (respaced to cfg.sample_steps) in DIR/samples/step-STEP.png;
        `callback` is the sampler's per-step callback (fastddpm.sampling.sample)."""
        from .images import save_grid, to_uint8
        from .sampling import sample

        c = self.ema.config
        T = self.diffusion.num_timesteps
        process = self.diffusion if self.cfg.sample_steps >= T else self.diffusion.respace(str(self.cfg.sample_steps))
        x = sample(self.ema, process, (n, c.in_channels, c.image_size, c.image_size), seed=self.cfg.seed,
                   callback=callback)
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        save_grid(path, to_uint8(x))
        return path

    def close(self) -> None:
        """Release the run folder (if still held) and the process group."""
        self._release_folder(failed=False)
        self.dist.close()


class _GridAbandoned(Exception):
    """Raised from the sampler's callback to abandon a sample grid when the run is asked to stop."""


def _last_saved(last: Path, step: int | None) -> str:
    return "no checkpoint was written" if step is None else f"the last checkpoint, {str(last)!r}, is at step {step}"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def export_ema(src, dst) -> None:
    """Write the EMA model of trainer checkpoint `src` to `dst` without the training state.

    About a quarter of the size (no raw weights, no Adam moments); the meta (step, the training
    config) is kept. This is how the bundled digits checkpoint was made from DIR/last.safetensors.
    """
    model, diffusion, meta = load_checkpoint(src)
    save_checkpoint(dst, model, diffusion, **meta)


def train(cfg: TrainConfig) -> dict:
    """Run `fastddpm train`: build or resume, train to cfg.steps, write checkpoints. Returns a summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
