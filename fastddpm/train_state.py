"""The trainer's checkpoint files: what a checkpoint holds besides the EMA weights, writing it,
and reading it back for an exact resume, refusing a tampered or foreign one before any step.

A trainer checkpoint (fastddpm.checkpoint layout) holds, beside the EMA weights and the betas:
    train.model.NAME              the raw (non-EMA) weights, float32, shapes of the model's
    train.optimizer.I.step        Adam's step count for parameter I (0-d)
    train.optimizer.I.exp_avg     Adam's first moment, the shape of parameter I
    train.optimizer.I.exp_avg_sq  Adam's second moment, the same shape
    train.sampler.history/count   the importance sampler's loss history [T, H] / counts [T]
    train.rng.cpu / train.rng.cuda  torch's generator states (uint8)
and in the JSON meta: step, data_position {epoch, position}, global_batch, world_size, scaler,
skipped_steps, images_seen, train_seconds, data, train_config, torch.

`restore` checks every one of these against the model being resumed (types, ranges, shapes,
dtypes, finiteness) before changing anything a step depends on, and raises CheckpointError
naming the first bad entry: a file edited by hand or by another program is refused up front
instead of failing (or silently training on garbage) at the first step.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import load_state_dict_checked, read_checkpoint, save_checkpoint
from .errors import CheckpointError, FastDDPMError, TrainingDiverged
from .files import atomic_link

LAST = "last.safetensors"
CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")
_OPT_RE = re.compile(r"^train\.optimizer\.(\d+)\.(.+)$")
_ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def checkpoint_paths(out) -> list[tuple[int, Path]]:
    """The ckpt-STEP.safetensors files in `out`, oldest first."""
    found = []
    for p in Path(out).iterdir():
        m = CKPT_RE.match(p.name)
        if m and not p.is_dir():  # (a folder of that name is not one of ours: never pruned)
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_training_state(path) -> tuple[dict, dict]:
    """(every tensor, config) of a checkpoint written by the trainer: the EMA weights under the
    model's names, "diffusion.betas", the training state under "train.*"; config["meta"] holds
    the step, the data position and the rest (see the module docstring)."""
    tensors, config = read_checkpoint(path)
    meta = config.get("meta", {})
    if not isinstance(meta, dict) or "step" not in meta or "data_position" not in meta \
            or not any(k.startswith("train.model.") for k in tensors):
        raise CheckpointError(f"{str(path)!r} holds no training state (raw weights, optimizer, step) to resume from")
    return tensors, config


def saved_train_config(path) -> dict | None:
    """meta["train_config"] of the trainer checkpoint at `path`, read from its header alone; None when
    it records none (an older checkpoint). A header that cannot be read is a CheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except Exception as e:  # noqa: BLE001 (safetensors and json raise several types for a damaged header)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{str(path)!r} is not a readable trainer checkpoint ({first})") from None
    meta = config.get("meta") if isinstance(config, dict) else None
    saved = meta.get("train_config") if isinstance(meta, dict) else None
    return saved if isinstance(saved, dict) else None


def link_or_copy(src: Path, dst: Path) -> None:
    """Make dst the same file as src: a hard link renamed into place (atomic), else a copy."""
    atomic_link(src, dst)


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in `tensors` holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save(trainer, extra_meta: dict) -> Path:
    """Write trainer's DIR/ckpt-STEP.safetensors (EMA weights + training state), point
    DIR/last.safetensors at it, and remove all but the newest `keep` ckpt files. With keep = 0
    only last.safetensors is written. A full disk raises OutOfSpaceError before anything is
    renamed, so last.safetensors still holds the previous good checkpoint."""
    extra = {f"train.model.{k}": v for k, v in trainer.model.state_dict().items()}
    for idx, st in trainer.optimizer.state_dict()["state"].items():
        for key, value in st.items():
            extra[f"train.optimizer.{idx}.{key}"] = torch.as_tensor(value)
    extra.update(trainer.sampler.state_tensors())
    extra["train.rng.cpu"] = torch.get_rng_state()
    if trainer.device.type == "cuda":
        extra["train.rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    bad = non_finite(extra) + non_finite(dict(trainer.ema.state_dict()))
    if bad:  # cannot happen (non-finite steps are skipped); refuse rather than write a NaN
        raise TrainingDiverged(f"refusing to write a checkpoint with non-finite values in {', '.join(bad[:3])}")
    out, last = trainer.out, trainer.out / LAST
    if trainer.cfg.keep == 0:
        save_checkpoint(last, trainer.ema, trainer.diffusion, extra_tensors=extra, **extra_meta)
        return last
    path = out / f"ckpt-{trainer.step}.safetensors"
    save_checkpoint(path, trainer.ema, trainer.diffusion, extra_tensors=extra, **extra_meta)
    link_or_copy(path, last)
    for _, old in checkpoint_paths(out)[:-trainer.cfg.keep]:
        old.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------ resume
def _int_field(meta: dict, key: str, src: str, default=None, minimum: int = 0) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{src!r} has a bad {key!r} in its meta ({value!r}; expected an integer >= {minimum})")
    return value


def _check_meta(meta: dict, src: str) -> None:
    _int_field(meta, "step", src)
    _int_field(meta, "skipped_steps", src, default=0)
    seconds = meta.get("train_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise CheckpointError(f"{src!r} has a bad 'train_seconds' in its meta ({seconds!r})")
    pos = meta.get("data_position")
    if not isinstance(pos, dict) or set(pos) != {"epoch", "position"}:
        raise CheckpointError(f"{src!r} has a bad data position in its meta ({pos!r}; expected "
                              "{'epoch': E, 'position': P})")
    _int_field(pos, "epoch", src)
    _int_field(pos, "position", src)
    if not isinstance(meta.get("scaler", {}), dict):
        raise CheckpointError(f"{src!r} has a bad GradScaler state in its meta ({meta.get('scaler')!r})")


def _check_optimizer(state: dict, params: list, src: str) -> dict:
    """Adam's per-parameter state from the train.optimizer.* tensors, checked against `params`."""
    opt_state: dict = {}
    for k, v in state.items():
        if not k.startswith("train.optimizer."):
            continue
        m = _OPT_RE.match(k)
        if not m or m.group(2) not in _ADAM_KEYS or int(m.group(1)) >= len(params):
            raise CheckpointError(f"{src!r} holds an unexpected optimizer tensor {k!r}")
        opt_state.setdefault(int(m.group(1)), {})[m.group(2)] = v
    for idx, st in opt_state.items():
        p = params[idx]
        if set(st) != _ADAM_KEYS:
            raise CheckpointError(f"{src!r} has incomplete optimizer state for parameter {idx} "
                                  f"({', '.join(sorted(st))}; expected {', '.join(sorted(_ADAM_KEYS))})")
        if st["step"].numel() != 1 or not st["step"].is_floating_point() or not float(st["step"]) >= 0:
            raise CheckpointError(f"{src!r} has a bad optimizer step count for parameter {idx}")
        for key in ("exp_avg", "exp_avg_sq"):
            t = st[key]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{src!r}: optimizer {key} of parameter {idx} is {t.dtype} "
                                      f"{tuple(t.shape)}, the parameter is {p.dtype} {tuple(p.shape)}")
        if (st["exp_avg_sq"] < 0).any():
            raise CheckpointError(f"{src!r}: optimizer exp_avg_sq of parameter {idx} has negative entries")
    bad = non_finite({f"train.optimizer.{i}.{k}": v for i, st in opt_state.items() for k, v in st.items()})
    if bad:
        raise CheckpointError(f"{src!r} has non-finite optimizer state in {', '.join(bad[:3])}")
    return opt_state


def _check_rng(state: dict, key: str, expected: torch.Tensor, src: str) -> None:
    t = state.get(key)
    if t is not None and (t.dtype != torch.uint8 or t.shape != expected.shape):
        raise CheckpointError(f"{src!r}: {key} is {t.dtype} {tuple(t.shape)}, not a torch generator state "
                              f"({expected.dtype} {tuple(expected.shape)})")


def _check_sampler(state: dict, sampler, src: str) -> None:
    own = sampler.state_tensors()
    for key, t in state.items():
        if key.startswith("train.sampler.") and key not in own:
            raise CheckpointError(f"{src!r} holds an unexpected timestep-sampler tensor {key!r}")
    for key, mine in own.items():
        t = state.get(key)
        if t is None:
            continue
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise CheckpointError(f"{src!r}: {key} is {t.dtype} {tuple(t.shape)}, expected {mine.dtype} "
                                  f"{tuple(mine.shape)} (another --diffusion-steps?)")
        if t.is_floating_point() and not torch.isfinite(t).all() or not t.is_floating_point() and (t < 0).any():
            raise CheckpointError(f"{src!r}: {key} holds invalid values")


def restore(trainer, path: Path) -> None:
    """Restore everything a step depends on from a trainer checkpoint (exact resume): raw and EMA
    weights, Adam, GradScaler, the timestep sampler, the data position and the RNG states.
    Everything is checked first; CheckpointError names what does not fit."""
    from .unet import UNetConfig

    tensors, config = read_training_state(path)
    src = str(path)
    state = {k: v for k, v in tensors.items() if k.startswith("train.")}
    meta = config["meta"]
    try:  # through UNetConfig, so fields added since the checkpoint was written take their defaults
        saved = UNetConfig.from_dict(config["unet"]).to_dict()
    except (KeyError, TypeError, FastDDPMError) as e:
        raise CheckpointError(f"{src!r} has no usable model config ({e})") from None
    if saved != trainer.model.config.to_dict():
        raise CheckpointError(f"{src!r} was trained with a different model "
                              f"({_config_diff(saved, trainer.model.config.to_dict())}); resume with the same "
                              "--model, --data and --loss")
    if config.get("diffusion") != trainer.diffusion.config():
        raise CheckpointError(f"{src!r} was trained with diffusion settings {config.get('diffusion')}, not "
                              f"{trainer.diffusion.config()}")
    betas = tensors["diffusion.betas"]
    if betas.shape != trainer.diffusion.schedule.betas.shape or not torch.equal(betas, trainer.diffusion.schedule.betas):
        raise CheckpointError(f"{src!r} was trained with another beta schedule")
    _check_meta(meta, src)
    opt_state = _check_optimizer(state, trainer.params, src)
    _check_sampler(state, trainer.sampler, src)
    _check_rng(state, "train.rng.cpu", torch.get_rng_state(), src)
    if trainer.device.type == "cuda":
        _check_rng(state, "train.rng.cuda", torch.cuda.get_rng_state(trainer.device), src)
    raw = {k[len("train.model."):]: v for k, v in state.items() if k.startswith("train.model.")}
    bad = non_finite(raw) + non_finite({k: v for k, v in tensors.items() if not k.startswith("train.")})
    if bad:
        raise CheckpointError(f"{src!r} has non-finite weights in {', '.join(bad[:3])}")
    load_state_dict_checked(trainer.model, raw, src)
    ema = {k: v for k, v in tensors.items() if not k.startswith("train.") and k != "diffusion.betas"}
    load_state_dict_checked(trainer.ema, ema, src)

    trainer.optimizer.load_state_dict({"state": opt_state,
                                       "param_groups": trainer.optimizer.state_dict()["param_groups"]})
    if meta.get("scaler"):
        try:
            trainer.scaler.load_state_dict(meta["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{src!r} has a bad GradScaler state ({e})") from None
    trainer.sampler.load_state_tensors(state)
    try:
        trainer.loader.load_state_dict(meta["data_position"])
    except (KeyError, TypeError, ValueError, FastDDPMError) as e:
        raise CheckpointError(f"{src!r} has a data position that does not fit this data ({e})") from None
    # (a changed per-process --batch is refused by the resume's config check; this is another world size)
    if meta.get("global_batch") != trainer.loader.global_batch and meta.get("world_size") != trainer.dist.world_size \
            and trainer.dist.is_main:
        print(f"fastddpm: note: resuming with a global batch of {trainer.loader.global_batch} (was "
              f"{meta.get('global_batch')}); the data order continues, but the run is not the one an "
              "uninterrupted run would have been", file=_stderr())
    if "train.rng.cpu" in state:
        torch.set_rng_state(state["train.rng.cpu"])
    if trainer.device.type == "cuda" and "train.rng.cuda" in state:
        torch.cuda.set_rng_state(state["train.rng.cuda"], trainer.device)
    trainer.step = int(meta["step"])
    trainer.skipped_total = int(meta.get("skipped_steps", 0))
    trainer.seconds_before = float(meta.get("train_seconds", 0.0))


def _stderr():
    import sys

    return sys.stderr


def _config_diff(a, b) -> str:
    if not isinstance(a, dict):
        return "no model config"
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "checkpoint vs now: " + ", ".join(diffs)
