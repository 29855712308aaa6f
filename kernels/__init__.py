"""Triton kernels, one file per fused op, each beside its plain-torch reference twin.

Importing this package does not import Triton; the launchers import it on first use.
"""
from .group_norm import group_norm_silu_reference

__all__ = ["group_norm_silu_reference"]
