"""`fastddpm` command line: sample, calibrate, train, eval (fastddpm.cli_eval), export, bench, convert.

Each sub-command parses its flags and calls the library; nothing here computes. Bad input of
any kind prints one line on stderr, `fastddpm: error: ...`, and exits 2, with no traceback:
a FastDDPMError from the library, a bad flag, a full disk (ENOSPC, EDQUOT, EFBIG: the library
publishes nothing then) and work that does not fit in memory (the line names the flag to
lower). Warnings from libraries (torch, Pillow) are held back while a command runs and shown
after it succeeds, so they never precede the error line. SIGINT and SIGTERM stop a command with
one line and exit 130 / 143 (a training run first writes a checkpoint of its last whole step).
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings

from .cli_args import Parser, add_threads, positive_int, seed_arg
from .cli_eval import add_eval
from .errors import FastDDPMError, Interrupted

# ------------------------------------------------------------------------------------------ sample
def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples; writes DIR/samples.npz, DIR/grid.png, DIR/stats.json",
                       description="Draw samples from a checkpoint (or from random weights: a throughput run).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="U-Net preset with random weights: cifar10 (default) or tiny")
    src.add_argument("--checkpoint", default=None, help="a fastddpm .safetensors checkpoint, or 'digits' (bundled)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps; fewer than the model's T respaces the process (default: T)")
    p.add_argument("--batch", type=positive_int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="noise seed, 0 .. 2^32-1; also seeds random weights (default 0)")
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim", "dpm++2m", "dpm++2m-sde"],
                   help="ancestral (DDPM), ddim, dpm++2m (DPM-Solver++(2M): fewest model calls) or dpm++2m-sde "
                        "(default ancestral)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale in [0, 1] (default 0; ddim only)")
    p.add_argument("--spacing", default="iddpm", choices=["iddpm", "linspace", "leading", "trailing"],
                   help="which timesteps --steps keeps: iddpm (evenly spaced, default) or diffusers' "
                        "timestep_spacing rule of the sampler's peer scheduler")
    p.add_argument("--variance", default=None, choices=["fixedlarge", "fixedsmall", "learned", "analytic"],
                   help="reverse variance (default: the checkpoint's): fixed beta or betatilde, the model's "
                        "learned one, or analytic (Analytic-DPM; needs `fastddpm calibrate`); ancestral, and "
                        "analytic for ddim")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model precision")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "graph", "compile", "onnx"],
                   help="auto (default): the fastest backend this machine runs that agrees with the reference on "
                        "the first steps; or one by name")
    p.add_argument("--verify", default=None, choices=["on", "off"],
                   help="check the backend against the reference on the first steps before the run (default: on "
                        "for auto, off for a backend named explicitly)")
    p.add_argument("--onnx", default=None, metavar="FILE.onnx", help="the exported model, with --backend onnx")
    p.add_argument("--x-T", dest="x_T", default=None, metavar="FILE.npz",
                   help="start from this noise (arr_0: float [batch, C, H, W]) instead of the seeded x_T")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="samples", metavar="DIR", help="output folder (default ./samples)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_sample, memory_flags="--batch")


def cmd_sample(args) -> int:
    """`fastddpm sample`: draw samples and write samples.npz, grid.png, stats.json (fastddpm.generate)."""
    from .generate import SampleRequest, run_sample

    request = SampleRequest(model=args.model, checkpoint=args.checkpoint, steps=args.steps, batch=args.batch,
                            seed=args.seed, sampler=args.sampler, eta=args.eta, spacing=args.spacing,
                            variance=args.variance, dtype=args.dtype, verify=args.verify,
                            backend=args.backend, onnx=args.onnx, x_T=args.x_T, device=args.device, out=args.out,
                            progress=not args.no_progress)
    run_sample(request)
    return 0


# ------------------------------------------------------------------------------------------ calibrate
def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="Analytic-DPM: estimate Gamma_t of a checkpoint, write a calibrated copy",
                       description="Estimate Analytic-DPM's Gamma_t = E||eps_theta(x_t, t)||^2 / d for every t by "
                                   "Monte Carlo over a data set's training images (one x_t draw per image and t: "
                                   "T x ceil(N / B) model calls) and write a copy of the checkpoint that carries "
                                   "the table, for `sample --variance analytic` and `eval bpd --variance analytic`.")
    p.add_argument("--checkpoint", required=True, help="a fastddpm .safetensors checkpoint, or a bundled name")
    p.add_argument("--data", required=True, help="digits | cifar10:DIR | images:DIR | npz:FILE (its training split)")
    p.add_argument("--out", required=True, metavar="C2.safetensors", help="the calibrated checkpoint to write")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N images (default all)")
    p.add_argument("--batch", type=positive_int, default=256, help="images per model call (default 256)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the x_t draws, 0 .. 2^32-1 (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_calibrate, memory_flags="--batch")


def cmd_calibrate(args) -> int:
    """`fastddpm calibrate`: the Analytic-DPM table of a checkpoint (fastddpm.calibrate)."""
    from .calibrate import CalibrateRequest, calibrate

    calibrate(CalibrateRequest(checkpoint=args.checkpoint, data=args.data, out=args.out, limit=args.limit,
                               batch=args.batch, seed=args.seed, device=args.device, progress=not args.no_progress))
    return 0


# ------------------------------------------------------------------------------------------ train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (Algorithm 1 of DDPM); writes DIR/last.safetensors",
                       description="Train a DDPM. Multi-GPU / multi-node: launch with torchrun "
                                   "(torchrun --nproc_per_node N -m fastddpm train ...); --batch is per process. "
                                   "--resume continues DIR/last.safetensors with the settings it was started with: "
                                   "a flag left out keeps the run's value, a flag that changes what a step computes "
                                   "(--lr, --batch, --seed, --ema, ...) is refused if it differs, and a change of "
                                   "--steps and the other intervals is taken and noted in the log.")
    # Every setting defaults to None ("not given"), so that a resume can tell a flag left out (it
    # takes the saved run's value) from one given (fastddpm.train_config); TrainConfig holds the
    # defaults the help texts state.
    p.add_argument("--data", default=None, help="digits | cifar10:DIR | images:DIR | npz:FILE (required, except "
                                                "with --resume)")
    p.add_argument("--model", default=None, help="U-Net preset: tiny or cifar10, resolution follows the data "
                                                 "(required, except with --resume)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: last.safetensors, ckpt-STEP.safetensors, "
                                                                "log.jsonl, samples/")
    p.add_argument("--steps", type=positive_int, default=None, help="total steps to reach (default 10000)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch per process (default 128)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision with float32 master weights (default fp32)")
    p.add_argument("--compile", action="store_true", default=None, help="put the training step through torch.compile")
    p.add_argument("--save-every", type=positive_int, default=None, help="checkpoint interval (default 5000)")
    p.add_argument("--seed", type=seed_arg, default=None,
                   help="seeds the weights, data order, timesteps and noise; 0 .. 2^32-1 (default 0)")
    p.add_argument("--resume", action="store_true", help="continue DIR/last.safetensors up to --steps")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps (default 5000)")
    p.add_argument("--ema", type=float, default=None, help="EMA rate of the saved weights (default 0.9999)")
    p.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip, 0 for none (default 1.0)")
    p.add_argument("--loss", default=None, choices=["simple", "kl", "hybrid"],
                   help="simple (default): eps MSE with fixed variance; kl / hybrid: learned variance (IDDPM)")
    p.add_argument("--timestep-sampler", default=None, choices=["uniform", "loss-second-moment"],
                   help="default uniform")
    p.add_argument("--schedule", default=None, choices=["linear", "cosine"], help="default linear")
    p.add_argument("--diffusion-steps", type=positive_int, default=None, help="T (default 1000)")
    p.add_argument("--keep", type=int, default=None, help="how many ckpt-STEP files to keep (default 3)")
    p.add_argument("--log-every", type=positive_int, default=None, help="JSONL log interval (default 100)")
    p.add_argument("--sample-every", type=int, default=None, metavar="K",
                   help="EMA sample grid every K steps (default 0: never)")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="sampling steps of those grids, at most T (default: 100, or T if smaller)")
    p.add_argument("--max-bad-steps", type=positive_int, default=None,
                   help="stop after this many non-finite steps in a row (default 50)")
    p.add_argument("--flip", default=None, choices=["auto", "on", "off"],
                   help="random left-right flip (default auto: on, except for digits)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_train, memory_flags="--batch or --diffusion-steps")


# the TrainConfig settings `fastddpm train` takes as flags (all but out, resume and progress)
_TRAIN_SETTINGS = ("data", "model", "steps", "batch", "precision", "compile", "save_every", "seed", "lr", "warmup",
                   "ema", "grad_clip", "loss", "timestep_sampler", "schedule", "diffusion_steps", "keep", "log_every",
                   "sample_every", "sample_steps", "max_bad_steps", "flip", "device")


def cmd_train(args) -> int:
    """`fastddpm train`: train or resume a model into --out (fastddpm.train)."""
    from .train import TrainConfig, train

    given = {name: getattr(args, name) for name in _TRAIN_SETTINGS if getattr(args, name) is not None}
    if "flip" in given:
        given["flip"] = {"auto": None, "on": True, "off": False}[given["flip"]]
    missing = [f"--{name}" for name in ("data", "model") if name not in given]
    if missing and not args.resume:
        raise FastDDPMError(f"train: the following arguments are required: {', '.join(missing)}")
    stand_in = {} if "data" in given else {"data": "digits"}  # replaced by the saved run's (train_config)
    cfg = TrainConfig(out=args.out, resume=args.resume, progress=not args.no_progress, **stand_in, **given,
                      given=frozenset(given))
    train(cfg)
    return 0


# ------------------------------------------------------------------------------------------ export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to one ONNX file (model, schedule and settings)",
                       description="Export a checkpoint to ONNX with a dynamic batch. The file alone is enough to "
                                   "sample: `fastddpm sample --backend onnx --onnx FILE.onnx`, or the torch-free "
                                   "export/ort_sample.py on a host with only numpy and onnxruntime.")
    p.add_argument("--checkpoint", required=True, help="a fastddpm .safetensors checkpoint, or 'digits' (bundled)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="compute precision inside the graph; inputs and outputs stay float32 (default fp32)")
    p.add_argument("--step-graph", action="store_true",
                   help="export the whole sampling step (eps-model + update, noise as an input), so a GPU host "
                        "keeps the state on the device between steps")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    """`fastddpm export`: one self-describing ONNX file of a checkpoint (fastddpm.export.onnx_export)."""
    from .checkpoint import checkpoint_file
    from .export.onnx_export import export_checkpoint
    from .files import check_output_file, refuse_overwriting_inputs
    from .run_folder import output_file_lock

    check_output_file(args.out, "--out")  # before the export, which takes a while
    refuse_overwriting_inputs([(args.out, "--out")], [(checkpoint_file(args.checkpoint), "--checkpoint")])
    with output_file_lock(args.out, "--out"):  # one export per file; a sweep spares its temporary
        info = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, step_graph=args.step_graph)
    print(f"wrote {args.out}: {info['graph']} graph, {info['dtype']}, opset {info['opset']}, "
          f"GroupNorm as {info['group_norm']}, T={info['diffusion']['num_timesteps']}")
    return 0


# ------------------------------------------------------------------------------------------ bench
def _add_bench(sub) -> None:
    from .bench import ROWS as BENCH_ROWS

    p = sub.add_parser("bench", help="side-by-side throughput of every backend and of diffusers",
                       description="Time sampling on every backend that can run on the device, side by side with "
                                   "diffusers (UNet2DModel + DDPMScheduler, eager and compiled; random weights), "
                                   "after measuring the device's matmul peak and copy bandwidth. Prints one table; "
                                   "--json also writes it. On a CPU try --model tiny.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default="cifar10", help="U-Net preset with random weights: cifar10 (default) or tiny")
    p.add_argument("--steps", type=positive_int, default=100, help="sampling steps per run (default 100)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per run (default 64)")
    p.add_argument("--backends", default=",".join(BENCH_ROWS), metavar="a,b,...",
                   help=f"rows to time, comma-separated (default all: {','.join(BENCH_ROWS)})")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed runs per row; the median is reported "
                                                                   "(default 3)")
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim", "dpm++2m", "dpm++2m-sde"],
                   help="the sampler every row walks (diffusers rows: its peer scheduler; default ancestral)")
    p.add_argument("--spacing", default="iddpm", choices=["iddpm", "linspace", "leading", "trailing"],
                   help="which timesteps --steps keeps (as fastddpm sample; default iddpm)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON to FILE")
    add_threads(p)
    p.set_defaults(func=cmd_bench, memory_flags="--batch")


def cmd_bench(args) -> int:
    """`fastddpm bench`: every backend and diffusers side by side on one device (fastddpm.bench)."""
    from .bench import BenchRequest, format_table, run_bench

    request = BenchRequest(device=args.device, model=args.model, steps=args.steps, batch=args.batch,
                           backends=tuple(args.backends.split(",")), repeat=args.repeat, json=args.json,
                           sampler=args.sampler, spacing=args.spacing)
    print(format_table(run_bench(request)))
    if args.json:
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------ convert
def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert diffusers / pytorch_diffusion weights to a fastddpm checkpoint (and back)",
        description="Convert the DDPM U-Net between layouts; the format of SRC is detected from its contents. "
                    "SRC a diffusers folder (a DDPMPipeline folder with model_index.json, unet/ and scheduler/; its "
                    "unet/ subfolder; or a bare UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors "
                    "or .bin, scheduler_config.json beside it) or a pytorch_diffusion model-*.ckpt: writes the "
                    "fastddpm checkpoint DST.safetensors. SRC a fastddpm checkpoint (or digits, digits-hybrid): "
                    "writes the diffusers DDPMPipeline folder DST (model_index.json, unet/config.json, "
                    "unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json), which "
                    "DDPMPipeline.from_pretrained(DST) loads. An input is never overwritten.")
    p.add_argument("src", metavar="SRC", help="diffusers folder or weights file, pytorch_diffusion .ckpt, a "
                                              "fastddpm .safetensors checkpoint, or digits / digits-hybrid")
    p.add_argument("--out", required=True, metavar="DST", help="DST.safetensors (import) or a folder (export)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="pytorch_diffusion only: training resolution (default: 32 for 4 levels, 256 for 6)")
    p.add_argument("--var-type", default=None, choices=["fixedlarge", "fixedsmall"],
                   help="override the reverse variance (default: the scheduler config's; without one, DDPM's: "
                        "fixedlarge at 32x32, fixedsmall otherwise)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    """`fastddpm convert`: diffusers / pytorch_diffusion weights to a checkpoint, or back (fastddpm.convert)."""
    from .convert import ConvertRequest, convert

    if not args.out.strip():
        raise FastDDPMError("--out is empty; give DST.safetensors or a folder")

    print(convert(ConvertRequest(src=args.src, out=args.out, image_size=args.image_size, var_type=args.var_type)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastddpm", description="Fast, tested denoising diffusion probabilistic models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_sample, _add_calibrate, _add_train, add_eval, _add_export, _add_bench, _add_convert):
        add(sub)
    return parser


def _is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (a RuntimeError), MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                            or "can't allocate memory" in text)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _error_line(message: str) -> None:
    """`fastddpm: error: message` and its newline in ONE write: ranks of a torchrun job share stderr,
    and print's separate writes of text and newline let their lines interleave."""
    sys.stderr.write(f"fastddpm: error: {message}\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    """Run one command; returns the exit status: 0 done, 2 bad input, 130 / 143 stopped by SIGINT /
    SIGTERM (one line on stderr; a training run writes a checkpoint first).

    The signal handling is installed before anything heavy is imported (this module imports only
    the standard library and fastddpm.errors, and the package imports nothing on its own), so a
    Ctrl-C while torch loads is one line too, not a traceback."""
    restore = _install_signal_handlers()
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C, or Interrupted from a handler (SIGTERM) or a run
        signum = getattr(e, "signum", None) or signal.SIGINT
        sys.stderr.write(f"fastddpm: {_one_line(getattr(e, 'message', '') or 'interrupted')}\n")
        sys.stderr.flush()
        return 128 + int(signum)
    finally:
        restore()


def _install_signal_handlers():
    """SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt) in the main thread; returns the
    function that puts the previous handlers back. A signal that was ignored (nohup, a background
    job) or that has another handler is left alone."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}")

    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, stop)

    def restore():
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return restore


def _main(argv) -> int:
    args = None
    with warnings.catch_warnings(record=True) as held:  # the filters in force stay as they are
        try:
            args = build_parser().parse_args(argv)
            if "threads" in vars(args):
                from .threads import set_threads

                set_threads(args.threads)
            status = args.func(args)
        except FastDDPMError as e:
            _error_line(_one_line(e))
            return 2
        except Exception as e:
            import errno

            from .files import is_out_of_space, output_error

            if is_out_of_space(e):  # a write that did not go through fastddpm.files
                _error_line(_one_line(output_error(e, getattr(e, 'filename', None) or '?')))
                return 2
            if isinstance(e, OSError) and e.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # a path missed by the checks
                _error_line(_one_line(f"{e.filename!r}: {e.strerror}" if e.filename else str(e)))
                return 2
            if _is_out_of_memory(e):
                flags = getattr(args, "memory_flags", None)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _error_line(f"out of memory ({_one_line(first)[:200]})" + (f"; lower {flags}" if flags else ""))
                return 2
            _show(held)  # a bug, not bad input: the traceback follows, with everything that led to it
            raise
    _show(held)
    return status


def _show(held) -> None:
    """Re-issue the warnings a command raised (after it succeeded), to whatever shows them now."""
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":
    sys.exit(main())
