"""Triton kernels, one file per fused op, each beside its plain-torch reference twin.

Importing this package does not import Triton; the launchers import it on first use.

    group_norm_silu, group_norm_silu_reference     kernels/group_norm.py
    group_norm_fwd, group_norm_bwd                 kernels/group_norm.py (the two kernels alone, no autograd)
    triton_step, fused_step, step_tables, step_twin, noise_key      kernels/step.py (loaded lazily)
"""
import importlib

from .group_norm import group_norm_bwd, group_norm_fwd, group_norm_silu, group_norm_silu_reference

_LAZY = {name: ".step" for name in ("triton_step", "fused_step", "step_tables", "step_twin", "noise_key",
                                    "StepTables")}

__all__ = ["group_norm_silu", "group_norm_silu_reference", "group_norm_fwd", "group_norm_bwd", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
