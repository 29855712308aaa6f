"""One planned kernel launch: what a launcher would pass to `kernel[grid](...)`, as data.

The launchers (kernels/group_norm.py, kernels/step.py) build their launches as `Launch` records
and then run them; `python -m fastddpm.kernels.aot` builds the same records from tensors shaped
like a real call and hands them to the JIT's `warmup`, so the compiled variant is exactly the
one a GPU launch would pick (Triton's binder specialises the integer arguments and the
pointers' 16-byte alignment from the real argument list, as it does at launch).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Launch:
    """kernel: the family name (group_norm_fwd | group_norm_bwd | step); stage: which kernel of a
    multi-kernel op ("" when there is one); fn: the jitted kernel; grid, args, kwargs: the launch
    (kwargs holds the constexprs and compile options: num_warps, maxnreg).

    programs_per_sm: the occupancy the design expects, programs resident per SM on sm_90 (at
    least). The channels-last GroupNorm's row launches expect 2 (kernels/group_norm_cl.py says
    why); a launch whose design states no target keeps the default 1 (it must fit at all).
    `python -m fastddpm.kernels.aot` reports the occupancy ptxas's register count allows beside it."""

    kernel: str
    stage: str
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)
    programs_per_sm: int = 1

    def __call__(self) -> None:
        """Launch on the arguments' device (CUDA, or CPU under TRITON_INTERPRET=1)."""
        self.fn[self.grid](*self.args, **self.kwargs)

    def warmup(self):
        """Compile without launching (the JIT's binder and cache, no kernel runs): the CompiledKernel."""
        return self.fn.warmup(*self.args, grid=self.grid, **self.kwargs)
