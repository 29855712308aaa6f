"""The configuration of a training run, and how a resumed run continues the saved one.

`TrainConfig` holds every `fastddpm train` setting and checks them. A trainer checkpoint stores
the config it was trained with (meta["train_config"]); `--resume` continues that configuration:

  - a setting not given (on the command line: a flag left out; `TrainConfig.given` names the
    ones that were given) takes the saved value, so `--resume` alone continues the run exactly;
  - a given setting that changes what a step computes (FIXED_ON_RESUME: the model, batch, seed,
    learning rate, warm-up, EMA, loss, schedule, ...) and contradicts the saved value is refused
    with one line naming both values: such a run would no longer be the one it continues;
  - a given setting that may change on a resume (CHANGEABLE_ON_RESUME: --steps, the checkpoint,
    log and sample-grid intervals, --data when the files moved, ...) is taken, and the change is
    printed and recorded in the run's log.jsonl.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .data import parse_data_spec
from .errors import CheckpointError, FastDDPMError, check_choice
from .noise import SEED_MAX, check_seed
from .schedule import SCHEDULES
from .unet import PRESETS

PRECISION_NAMES = ("fp32", "bf16", "fp16")
LOSSES = ("simple", "kl", "hybrid")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
# Adam's step at step 1 is lr / (1 - beta1) = 10 lr, and torch passes it to a float32 kernel: --lr 1e300
# overflowed there (a traceback). Below this bound a huge lr only diverges, which max_bad_steps stops.
MAX_LR = 1e37
FIXED_ON_RESUME = ("model", "batch", "precision", "seed", "lr", "warmup", "grad_clip", "ema", "loss",
                   "timestep_sampler", "schedule", "diffusion_steps", "flip")
CHANGEABLE_ON_RESUME = ("data", "steps", "compile", "save_every", "keep", "log_every", "sample_every", "sample_steps",
                        "max_bad_steps")
# where and how this process runs, not what the run is: always today's values
_NOT_COMPARED = ("out", "resume", "progress", "device", "given")


@dataclass
class TrainConfig:
    """Everything `fastddpm train` takes (see `fastddpm train --help`)."""

    data: str  # digits | cifar10:DIR | images:DIR | npz:FILE
    out: str  # output folder: last.safetensors, ckpt-STEP.safetensors, log.jsonl, samples/
    model: str = "tiny"  # U-Net preset; image size and channels follow the data
    steps: int = 10_000  # total optimizer steps to reach (a resumed run continues up to it)
    batch: int = 128  # per process; the global batch is batch * world size
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, float32 master weights)
    compile: bool = False  # torch.compile the forward + loss
    save_every: int = 5_000
    seed: int = 0
    resume: bool = False
    lr: float = 2e-4
    warmup: int = 5_000  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema: float = 0.9999  # EMA rate of the weights that are saved and sampled (with warm-up, see ema_rate_at)
    loss: str = "simple"  # simple (eps MSE, fixed variance) | kl | hybrid (learned variance)
    timestep_sampler: str = "uniform"  # or loss-second-moment (IDDPM importance sampling)
    schedule: str = "linear"
    diffusion_steps: int = 1000  # T
    keep: int = 3  # how many ckpt-STEP files to keep
    log_every: int = 100
    sample_every: int = 0  # write an EMA sample grid every K steps (0: never)
    sample_steps: int | None = None  # respaced steps for those grids, <= T (None: min(100, T))
    max_bad_steps: int = 50  # non-finite steps in a row before training stops
    flip: bool | None = None  # random left-right flip; None: the data set's default
    device: str = "auto"
    progress: bool = True
    # The names of the settings the user gave (the command line's flags); None: all of them. On a
    # resume the others take the saved run's values (module docstring). Not saved.
    given: frozenset | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISION_NAMES)
        check_choice("loss", self.loss, LOSSES)
        check_choice("timestep sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.model not in PRESETS:
            raise FastDDPMError(f"unknown model preset {self.model!r}; choose one of {', '.join(map(repr, PRESETS))}")
        parse_data_spec(self.data)
        if self.sample_steps is None:
            self.sample_steps = min(100, int(self.diffusion_steps))
        check_seed(self.seed, "--seed")
        for name in ("steps", "batch", "save_every", "diffusion_steps", "log_every", "sample_steps", "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise FastDDPMError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup", "keep", "sample_every"):
            if int(getattr(self, name)) < 0:
                raise FastDDPMError(f"{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FastDDPMError(f"the learning rate must be positive, got {self.lr}")
        if self.lr > MAX_LR:
            raise FastDDPMError(f"the learning rate must be at most {MAX_LR:g} (Adam computes its step in float32; "
                                f"DDPM uses 2e-4), got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise FastDDPMError(f"the EMA rate must be in [0, 1), got {self.ema}")
        if not self.grad_clip >= 0:
            raise FastDDPMError(f"grad-clip must be 0 (off) or positive, got {self.grad_clip}")
        if self.diffusion_steps > SEED_MAX - 1:  # the noise's step key is 32 bits; SEED_MAX marks x_T
            raise FastDDPMError(f"--diffusion-steps must be below {SEED_MAX}, got {self.diffusion_steps}")
        if self.sample_steps > self.diffusion_steps:
            raise FastDDPMError(f"--sample-steps must be between 1 and T = --diffusion-steps = {self.diffusion_steps}, "
                                f"got {self.sample_steps}")

    def to_dict(self) -> dict:
        """The settings as saved in a checkpoint's meta["train_config"] (without `given`)."""
        d = asdict(self)
        d.pop("given", None)
        return d


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(name: str, value) -> str:
    if name == "flip":
        return {None: "auto", True: "on", False: "off"}.get(value, repr(value))
    return str(value)


def _same_kind(value, current) -> bool:
    """Whether a saved JSON value can stand for a setting whose current value is `current`."""
    if current is None or isinstance(current, bool) or value is None:
        return value is None or isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is type(current)


@dataclass
class ResumePlan:
    """What `resume_config` decided: the config to train with, notes on what legitimately changed
    (printed and logged), and the contradictions (refused once the checkpoint itself is checked)."""

    config: TrainConfig
    notes: list
    conflicts: list

    def conflict_error(self, source: str) -> FastDDPMError | None:
        """One FastDDPMError naming every contradicted setting, or None."""
        if not self.conflicts:
            return None
        return FastDDPMError(f"{source!r} was trained with {'; '.join(self.conflicts)}: a resume continues that run, "
                             "so leave these flags out (or start a new run in another --out)")


def resume_config(cfg: TrainConfig, saved, source: str) -> ResumePlan:
    """Merge `cfg` (the settings given now) with `saved` (meta["train_config"] of checkpoint `source`,
    or None for a checkpoint that did not record it) following the module docstring."""
    if not isinstance(saved, dict):
        note = (f"{source!r} does not record its training configuration; the settings given now (and the "
                "defaults for the others) are used")
        return ResumePlan(cfg, [note], [])
    given = set(f.name for f in fields(TrainConfig)) if cfg.given is None else set(cfg.given)
    values, notes, conflicts = {}, [], []
    for f in fields(TrainConfig):
        name = f.name
        if name in _NOT_COMPARED or name not in saved:
            continue  # (a setting newer than the checkpoint keeps its value now)
        mine, theirs = getattr(cfg, name), saved[name]
        if not _same_kind(theirs, mine):
            raise CheckpointError(f"{source!r} holds a bad training configuration ({name} = {theirs!r})")
        if name not in given:
            values[name] = theirs
        elif mine != theirs:
            if name in FIXED_ON_RESUME:
                conflicts.append(f"{_flag(name)} {_shown(name, theirs)}, not {_shown(name, mine)}")
            else:
                notes.append(f"{_flag(name)} is now {_shown(name, mine)} (the run was started with "
                             f"{_shown(name, theirs)})")
    try:
        merged = replace(cfg, **values)
    except FastDDPMError as e:
        raise CheckpointError(f"{source!r} holds a bad training configuration ({e})") from None
    return ResumePlan(merged, notes, conflicts)
