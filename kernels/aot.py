"""Compile every Triton kernel variant the cifar10 preset and the samplers launch, for a GPU, without one.

    python -m fastddpm.kernels.aot [--target sm_90] [--ptx-dir DIR] [--json FILE] [--only REGEX,REGEX,...]

For each variant it builds the launch exactly as the launcher does (`group_norm.forward_launches`,
`backward_launches`, `step.step_launches`) on CPU tensors shaped like the real call (batch 256,
and batch 1 for the channels-last GroupNorm, whose plan splits a sample over programs then;
CPU allocations are 64-byte aligned, as a CUDA allocation is at least 256-byte aligned, so the
binder sees the same 16-byte pointer alignment), and hands it to the JIT's `warmup`: Triton's
binder specialises the integer arguments (== 1, divisible by 16) and the pointers' alignment as
at launch, then compiles to PTX and a cubin with the bundled ptxas. A stand-in driver answers
the JIT's questions (target, device 0, stream 0); nothing needs CUDA, and nothing launches.

Per variant it reports registers, spill bytes (stores + loads), shared memory, warps, the
widest global load and store in the PTX, in bytes (ld.global.v4.b32 = 16, ld.global.b16 = 2),
and the occupancy: programs (thread blocks) resident per SM, beside the occupancy the launch
plan says the design expects (`Launch.programs_per_sm`) and what limits it. Registers and
spills come from ptxas's own `-v` log of that compile (Triton's TRITON_DUMP_PTXAS_LOG), so the
cache is a fresh temporary folder each run. Variants that the binder maps to the same compiled
kernel are compiled once and reported under each name.

Occupancy (`programs_per_sm`), as CUDA's occupancy calculator (cuda_occupancy.h) computes it for
a program of W warps using R registers a thread and M bytes of shared memory, on sm_90
(H100, H200; other targets in SM_LIMITS, per the CUDA programming guide's table):
    registers  a warp gets ceil(32 R / 256) x 256 of them (allocation unit: 256 registers a
               warp), from one of the SM's 4 sub-partitions of 65536 / 4 = 16384 registers:
               warps = 4 x floor(16384 / that), programs = floor(warps / W)
    shared     each resident program takes M plus 1 KB the driver reserves per block, rounded up
               to 128 bytes, out of 228 KB an SM (a program asking more than 227 KB never launches)
    warps      floor(64 / W) (2048 threads an SM)
    blocks     32 an SM
and the occupancy is the least of the four (0: it cannot launch). A launch plan that expects 2
programs a SM and gets 1 is counted in the summary line; tests/kernels/test_aot.py fails on it.

Exit status: 0 all compiled (whatever the occupancy); 2 with one line on stderr if a compile
fails or the input is bad.
Triton's interpreter must be off: when TRITON_INTERPRET is set (tests/conftest.py sets it), the
command runs itself again in a child process with it cleared.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

BATCH = 256
GROUPS = 32
# (C, H, emb, silu) of every GroupNorm in the cifar10 preset (from a hooked forward, 32x32 input):
# ResBlock norm1 (no emb, SiLU), norm2 (emb, SiLU), attention norms (no emb, identity), norm_out.
CIFAR10_GN = [
    (128, 32, True, True), (128, 32, False, True), (128, 16, False, True),
    (256, 32, False, True), (256, 16, True, True), (256, 16, False, True), (256, 16, False, False),
    (256, 8, True, True), (256, 8, False, True), (256, 4, True, True), (256, 4, False, True),
    (256, 4, False, False), (384, 32, False, True), (384, 16, False, True),
    (512, 16, False, True), (512, 8, False, True), (512, 4, False, True),
]
# (name, dtype, channels_last): the reference's layout and the fast backends' two.
GN_LAYOUTS = [("fp32-nchw", "float32", False), ("bf16-cl", "bfloat16", True), ("fp16-cl", "float16", True)]
# Step variants: (form, var_mode), each with/without clipping and pred_x0, both layouts, and the
# (state, model output) dtypes a sampler uses: fp32 state with an fp32 or bf16 model, bf16 throughout.
# "ancestral" is the form cx x + c0 x0 (also the solvers' first step, and any analytic variance),
# "ddim" c0 x0 + ce eps, "dpm" cx x + c0 x0 + cp prev_x0 (dpm++2m and dpm++2m-sde: one kernel, only
# the tables differ; prev_x0 read from the pred_x0 buffer itself, as the graph backend launches it).
STEP_MODES = [("ancestral", "table"), ("ancestral", "learned"), ("ancestral", "learned_range"), ("ddim", "table"),
              ("dpm", "table")]
STEP_DTYPES = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]
STEP_SHAPE = (BATCH, 3, 32, 32)
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Row:
    """One compiled variant: the table row and the JSON record."""

    kernel: str  # group_norm_fwd | group_norm_bwd | step
    variant: str
    registers: int
    spill_bytes: int  # spill stores + spill loads, from ptxas -v
    shared_bytes: int
    num_warps: int
    widest_load: int  # bytes, widest ld.global in the PTX
    widest_store: int  # bytes, widest st.global in the PTX
    programs_per_sm: int | None  # resident programs per SM (module docstring); None: target not in SM_LIMITS
    design_programs_per_sm: int  # what the launch plan expects (Launch.programs_per_sm)
    occupancy_limit: str  # what bounds programs_per_sm: registers, shared, warps or blocks ("+" joins ties)

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.variant}"


class AotError(Exception):
    """A variant failed to compile, or bad arguments; main() prints it as one line and exits 2."""


# ------------------------------------------------------------------------------------- PTX facts
_MEM_OP = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def widest_global_access(ptx: str) -> tuple[int, int]:
    """(widest ld.global, widest st.global) in bytes: vector count x element bits / 8 per instruction."""
    widest = {"ld": 0, "st": 0}
    for op, suffix in _MEM_OP.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        widest[op] = max(widest[op], vec * bits // 8)
    return widest["ld"], widest["st"]


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ptxas -v log of one kernel."""
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise AotError("no ptxas -v report in the compile log (TRITON_DUMP_PTXAS_LOG had no effect)")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


# ------------------------------------------------------------------------------------- occupancy
@dataclass(frozen=True)
class SmLimits:
    """What one SM of a target holds at once (CUDA programming guide, compute capability table)."""

    shared_bytes: int  # shared memory an SM (at the largest carve-out)
    shared_per_block: int  # the most one block may use
    warps: int  # resident warps
    blocks: int  # resident blocks
    registers: int = 65536  # 32-bit registers
    register_unit: int = 256  # a warp's registers are allocated in units of this many
    sub_partitions: int = 4  # the register file is split between 4 schedulers; a warp lives in one
    max_registers: int = 255  # a thread
    shared_reserved: int = 1024  # the driver's per-block reservation (sm_80 and later)
    shared_unit: int = 128  # shared memory allocation unit


KB = 1024
SM_LIMITS = {
    80: SmLimits(shared_bytes=164 * KB, shared_per_block=163 * KB, warps=64, blocks=32),  # A100
    86: SmLimits(shared_bytes=100 * KB, shared_per_block=99 * KB, warps=48, blocks=16),
    89: SmLimits(shared_bytes=100 * KB, shared_per_block=99 * KB, warps=48, blocks=24),  # L4, L40
    90: SmLimits(shared_bytes=228 * KB, shared_per_block=227 * KB, warps=64, blocks=32),  # H100, H200
}


def occupancy(registers: int, num_warps: int, shared_bytes: int, limits: SmLimits) -> tuple[int, str]:
    """(programs resident per SM, what limits it) for a program of num_warps warps using
    `registers` a thread and shared_bytes of shared memory (module docstring for the formula)."""
    def up(v, unit):
        return -(-v // unit) * unit

    per_warp = up(registers * 32, limits.register_unit)
    if registers > limits.max_registers or per_warp * up(num_warps, limits.sub_partitions) > limits.registers:
        by_regs = 0  # more than a block may hold (the hardware check assumes every sub-partition holds its share)
    else:
        by_regs = limits.sub_partitions * (limits.registers // limits.sub_partitions // max(per_warp, 1)) // num_warps
    block_shared = up(shared_bytes + limits.shared_reserved, limits.shared_unit)
    by_shared = limits.shared_bytes // block_shared if shared_bytes <= limits.shared_per_block else 0
    bounds = {"registers": by_regs, "shared": by_shared, "warps": limits.warps // num_warps, "blocks": limits.blocks}
    least = min(bounds.values())
    return least, "+".join(k for k, v in bounds.items() if v == least)


# ------------------------------------------------------------------------------------- variants
def _gn_variants(torch, gn):
    """(name, launches) for every GroupNorm forward and backward variant of the cifar10 preset:
    at batch 256, and for channels-last also at batch 1 (name ending -b1), where the rows of a
    sample are split over programs (the stats, finalize and apply launches)."""
    for layout, dtype_name, channels_last in GN_LAYOUTS:
        dtype = getattr(torch, dtype_name)
        for (C, H, has_emb, silu), batch in [(shape, b) for b in (BATCH, 1) if b == BATCH or channels_last
                                             for shape in CIFAR10_GN]:
            x = torch.empty(batch, C, H, H, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.empty(C, dtype=dtype), torch.empty(C, dtype=dtype)
            emb = torch.empty(batch, C, dtype=dtype) if has_emb else None
            name = (f"{layout}-C{C}-{H}x{H}-{'emb' if has_emb else 'noemb'}-{'silu' if silu else 'id'}"
                    + ("" if batch == BATCH else f"-b{batch}"))
            y, x_read, mean, rstd, fwd = gn.forward_launches(x, GROUPS, w, b, emb, silu, 1e-6)
            yield name, fwd
            *_, bwd = gn.backward_launches(torch.empty_like(y), x_read, GROUPS, w, b, emb, silu, mean, rstd)
            yield name, bwd


def _step_variants(torch, st):
    """(name, launches) for every fused-step variant at the cifar10 sampling shape."""
    K = 1000
    for form, var_mode in STEP_MODES:
        tables = st.StepTables(coefs=torch.empty(K, st.NUM_COEFS), timesteps=torch.empty(K, dtype=torch.int64),
                               steps=torch.arange(K), x_term=form != "ddim", eps_term=form == "ddim",
                               prev_term=form == "dpm", var_mode=var_mode)
        out_channels = 2 * STEP_SHAPE[1] if var_mode != "table" else STEP_SHAPE[1]
        for x_dtype, out_dtype in STEP_DTYPES:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.empty(STEP_SHAPE, dtype=getattr(torch, x_dtype)).contiguous(memory_format=fmt)
                out = torch.empty((STEP_SHAPE[0], out_channels, *STEP_SHAPE[2:]),
                                  dtype=getattr(torch, out_dtype)).contiguous(memory_format=fmt)
                for clip in (True, False):
                    for with_x0 in (True, False):
                        name = (f"{form}-{var_mode}-{'clip' if clip else 'noclip'}-{'x0' if with_x0 else 'nox0'}-"
                                f"{'cl' if channels_last else 'nchw'}-x{_SHORT[x_dtype]}-out{_SHORT[out_dtype]}")
                        x0 = torch.empty_like(x) if with_x0 else None
                        prev = (x0 if with_x0 else torch.empty_like(x)) if form == "dpm" else None
                        _, launches = st.step_launches(tables, x, out, tables.steps[0], torch.zeros(2, dtype=torch.int64),
                                                       clip_denoised=clip, pred_x0=x0, prev_x0=prev)
                        yield name, launches


# ------------------------------------------------------------------------------------- compile
class _AotDriver:
    """The answers JITFunction.run needs from a driver when it only compiles (warmup): no CUDA."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


def compile_all(capability: int = 90, only: tuple[str, ...] = ()) -> tuple[list[Row], dict[str, str]]:
    """Compile every variant (or those whose name one of the regular expressions `only` matches)
    for sm_<capability>: (rows, {name: ptx})."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from . import group_norm as gn
    from . import step as st

    if triton.knobs.runtime.interpret:
        raise AotError("Triton's interpreter is on in this process; run `python -m fastddpm.kernels.aot`")
    driver.set_active(_AotDriver(GPUTarget("cuda", capability, 32)))
    triton.knobs.nvidia.dump_ptxas_log = True
    rows, ptx, stats = [], {}, {}
    variants = [*((("group_norm", n), l) for n, l in _gn_variants(torch, gn)),
                *((("step", n), l) for n, l in _step_variants(torch, st))]
    for (_, name), launches in variants:
        for launch in launches:
            full = f"{launch.kernel}-{name}" + (f"-{launch.stage}" if launch.stage else "")
            if only and not any(re.search(pattern, full) for pattern in only):
                continue
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):  # ptxas's -v report (and, on failure, its reproducer)
                    compiled = launch.warmup()
            except Exception as exc:  # noqa: BLE001 -- any compiler failure is reported as one line
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise AotError(f"compiling {full} for sm_{capability} failed: {type(exc).__name__}: {first}") from exc
            if compiled.hash not in stats:
                stats[compiled.hash] = parse_ptxas_log(log.getvalue())
            regs, spills = stats[compiled.hash]
            loads, stores = widest_global_access(compiled.asm["ptx"])
            shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
            programs, limit = (occupancy(regs, warps, shared, SM_LIMITS[capability]) if capability in SM_LIMITS
                               else (None, "-"))
            row = Row(launch.kernel, full[len(launch.kernel) + 1:], regs, spills, shared, warps, loads, stores,
                      programs, launch.programs_per_sm, limit)
            rows.append(row)
            ptx[row.name] = compiled.asm["ptx"]
    return rows, ptx


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    head = ("kernel-variant", "regs", "spill B", "smem B", "warps", "ld B", "st B", "prog/SM", "design", "limit")
    body = [(r.name, r.registers, r.spill_bytes, r.shared_bytes, r.num_warps, r.widest_load, r.widest_store,
             "-" if r.programs_per_sm is None else r.programs_per_sm, r.design_programs_per_sm, r.occupancy_limit)
            for r in rows]
    width = max([len(head[0])] + [len(b[0]) for b in body])
    lines = [f"{head[0]:<{width}} " + " ".join(f"{h:>7}" for h in head[1:-1]) + f" {head[-1]}"]
    lines += [f"{b[0]:<{width}} " + " ".join(f"{v:>7}" for v in b[1:-1]) + f" {b[-1]}" for b in body]
    return "\n".join(lines)


def below_design(rows: list[Row]) -> list[Row]:
    """The rows whose occupancy is under what their launch plan expects."""
    return [r for r in rows if r.programs_per_sm is not None and r.programs_per_sm < r.design_programs_per_sm]


def _write_atomic(path: str, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aot-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _parse_target(target: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", target)
    if m is None or int(m.group(1)) < 75:
        raise AotError(f"--target {target!r} is not a CUDA target Triton compiles for; use e.g. sm_80 or sm_90")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring). Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastddpm.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sm_90", help="CUDA architecture to compile for (default sm_90)")
    parser.add_argument("--ptx-dir", help="write each variant's PTX as DIR/<kernel>-<variant>.ptx")
    parser.add_argument("--json", help="write the table as a JSON list of records to FILE")
    parser.add_argument("--only", default="", help="compile only the variants whose name <kernel>-<variant> "
                        "one of these comma-separated regular expressions matches (re.search)")
    args = parser.parse_args(argv)
    try:
        capability = _parse_target(args.target)
        for pattern in filter(None, args.only.split(",")):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AotError(f"--only {pattern!r} is not a regular expression: {exc}") from exc
        if args.ptx_dir and os.path.exists(args.ptx_dir) and not os.path.isdir(args.ptx_dir):
            raise AotError(f"--ptx-dir {args.ptx_dir} exists and is not a folder")
    except AotError as exc:
        print(f"aot: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces the compiler; run again in a child without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's default (Triton 3.9 warns if unset)
        cmd = [sys.executable, "-m", "fastddpm.kernels.aot", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        try:
            import triton  # noqa: F401
            from triton.backends.compiler import GPUTarget  # noqa: F401
        except ImportError as exc:
            raise AotError(f"Triton with its CUDA backend is needed: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix="fastddpm-aot-") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every distinct kernel runs ptxas, whose log we read
            rows, ptx = compile_all(capability, tuple(t for t in args.only.split(",") if t))
        if not rows:
            raise AotError(f"no variant name matches --only {args.only!r}")
    except AotError as exc:
        print(f"aot: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    low = below_design(rows)
    if capability not in SM_LIMITS:
        occupancy_note = f"occupancy not modelled for sm_{capability}"
    else:
        occupancy_note = f"{len(low)} below the design's occupancy" + (
            f" ({', '.join(r.name for r in low[:3])}{', ...' if len(low) > 3 else ''})" if low else "")
    print(f"{len(rows)} variants compiled for sm_{capability}, {sum(r.spill_bytes > 0 for r in rows)} with spills, "
          f"{occupancy_note}")
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
        for name, text in ptx.items():
            _write_atomic(os.path.join(args.ptx_dir, f"{name}.ptx"), text)
    if args.json:
        import triton
        record = {"target": f"sm_{capability}", "triton": triton.__version__,
                  "variants": [dict(asdict(r), name=r.name) for r in rows]}
        _write_atomic(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
