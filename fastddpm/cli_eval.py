"""`fastddpm eval ...`: the evaluation sub-commands (fid, bpd, rate-distortion, curves, digits-fid).

Each parses its flags and calls the library (fastddpm.evaluate, bpd, vlb_terms, train_curves,
digits_fid); errors are FastDDPMErrors that fastddpm.cli turns into one line and exit 2.
"""
from __future__ import annotations

from .cli_args import Parser, add_threads, positive_int, seed_arg
from .errors import FastDDPMError

def add_eval(sub) -> None:
    """The `eval` sub-command and its metrics."""
    p = sub.add_parser("eval", help="evaluate samples, a checkpoint or a run: "
                                    "fid | bpd | rate-distortion | curves | digits-fid")
    metrics = p.add_subparsers(dest="metric", required=True, parser_class=Parser)
    _add_eval_fid(metrics)
    _add_eval_bpd(metrics)
    _add_eval_rate_distortion(metrics)
    _add_eval_curves(metrics)
    _add_eval_digits_fid(metrics)


def _add_eval_fid(metrics) -> None:
    p = metrics.add_parser(
        "fid", help="FID / Inception Score / KID of samples against a reference set",
        description="FID, Inception Score and KID with torch-fidelity's port of the TensorFlow Inception network "
                    "(the one published FIDs use). Image sets: an .npz of uint8 NHWC images under arr_0, a folder "
                    "of image files, or a `fastddpm sample` output folder. The reference may also be an .npz of "
                    "FID statistics (mu, sigma), e.g. written by --save-ref-stats. Nothing is downloaded: the "
                    "Inception weights (weights-inception-2015-12-05-6726825d.pth) come from "
                    "--inception-weights or torch.hub's checkpoint folder.")
    p.add_argument("samples", metavar="SAMPLES", nargs="+",
                   help="generated images: one or more .npz files, image folders or sample output folders (pooled)")
    p.add_argument("--ref", default=None, metavar="REF", help="reference images (.npz or folder) or an .npz of FID "
                                                              "statistics (needed for FID and KID)")
    p.add_argument("--inception-weights", default=None, metavar="FILE.pth",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: look in "
                        "$TORCH_HOME/hub/checkpoints)")
    p.add_argument("--metrics", default="fid,is,kid", metavar="a,b", help="any of fid,is,kid (default all)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                   help="also write the reference's FID statistics, to pass as --ref next time")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--kid-subsets", type=positive_int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000,
                   help="images per KID subset, capped at the smaller set (default 1000)")
    p.add_argument("--is-splits", type=positive_int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_eval_fid, memory_flags="--batch")


def cmd_eval_fid(args) -> int:
    """`fastddpm eval fid`: FID / Inception Score / KID of sample sets (fastddpm.evaluate)."""
    from .evaluate import FIDRequest, evaluate_fid, format_result

    request = FIDRequest(samples=args.samples, ref=args.ref, inception_weights=args.inception_weights,
                         metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), batch=args.batch,
                         device=args.device, save_ref_stats=args.save_ref_stats, json=args.json,
                         kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                         is_splits=args.is_splits, progress=not args.no_progress)
    print(format_result(evaluate_fid(request)))
    return 0


def _add_test_set_flags(p) -> None:
    """The flags of the evaluations over a data set's test split (bpd, rate-distortion)."""
    p.add_argument("--checkpoint", required=True, help="a fastddpm .safetensors checkpoint, or a bundled name")
    p.add_argument("--data", required=True, help="digits | cifar10:DIR | images:DIR | npz:FILE (its test split)")
    p.add_argument("--batch", type=positive_int, default=256, help="images per batch (default 256)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N test images")
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the x_t draws, 0 .. 2^32-1 (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_eval_bpd(metrics) -> None:
    p = metrics.add_parser("bpd", help="test-set bits/dim of a checkpoint",
                           description="Bits/dim of a checkpoint on a data set's test split through the "
                                       "variational bound, with a per-timestep breakdown in JSON.")
    _add_test_set_flags(p)
    p.add_argument("--out", default="bpd.json", metavar="FILE.json", help="result file (default bpd.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--per-timestep", action="store_true",
                   help="also write the bound's terms L_0 .. L_T as records {t, term, vb, mse, xstart_mse}")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="plot the terms against t, log scale (implies --per-timestep; needs fastddpm[plots])")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="the bound of the K-step respaced process (evenly spaced, t = 0 and T-1 kept; default: T)")
    p.add_argument("--variance", default=None, choices=["fixedlarge", "fixedsmall", "learned", "analytic"],
                   help="reverse variance of the bound (default: the checkpoint's; analytic needs `fastddpm calibrate`)")
    p.add_argument("--versus", default=None, metavar="CHECKPOINT",
                   help="also evaluate this checkpoint on the same images and x_t draws, and report the per-image "
                        "paired difference with its standard error")
    add_threads(p)
    p.set_defaults(func=cmd_eval_bpd, memory_flags="--batch")


def _terms_request(args, out):
    from .vlb_terms import TermsRequest

    return TermsRequest(checkpoint=args.checkpoint, data=args.data, batch=args.batch, limit=args.limit,
                        seed=args.seed, device=args.device, out=out, plot=args.plot, progress=not args.no_progress)


def cmd_eval_bpd(args) -> int:
    """`fastddpm eval bpd`: test-set bits/dim, the K-step bound, or the per-timestep terms (fastddpm.bpd, vlb_terms)."""
    from .bpd import BpdRequest, evaluate_bpd

    if args.per_timestep or args.plot is not None:
        from .vlb_terms import evaluate_vlb_terms

        if args.versus is not None:
            raise FastDDPMError("eval bpd: --versus compares totals; leave out --per-timestep and --plot")
        if args.steps is not None or args.variance is not None:
            raise FastDDPMError("eval bpd: --per-timestep and --plot describe the full process with the checkpoint's "
                                "variance; leave out --steps and --variance (or --per-timestep and --plot)")

        evaluate_vlb_terms(_terms_request(args, args.out))
        return 0

    evaluate_bpd(BpdRequest(checkpoint=args.checkpoint, data=args.data, batch=args.batch, limit=args.limit,
                            seed=args.seed, device=args.device, out=args.out, progress=not args.no_progress,
                            steps=args.steps, variance=args.variance, versus=args.versus))
    return 0


def _add_eval_rate_distortion(metrics) -> None:
    p = metrics.add_parser("rate-distortion", help="rate (bits/dim) and distortion (RMSE) per timestep",
                           description="DDPM's progressive lossy code (sec. 4.3, Fig. 5): for each t, the rate "
                                       "L_T + sum_{s>t} L_s in bits/dim and the RMSE (0..255) of the x0 predicted "
                                       "from x_t, over a data set's test split. Takes eval bpd's flags.")
    _add_test_set_flags(p)
    p.add_argument("--out", default="rate_distortion.json", metavar="FILE.json",
                   help="result file (default rate_distortion.json)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw DDPM Fig. 5 (needs fastddpm[plots])")
    p.add_argument("--levels", type=positive_int, default=None,
                   help="the data's grey levels, for the share of images the rounded x0 prediction recovers "
                        "exactly (default: 17 for digits, 256 otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_eval_rate_distortion, memory_flags="--batch")


def cmd_eval_rate_distortion(args) -> int:
    """`fastddpm eval rate-distortion`: DDPM's rate and distortion per timestep (fastddpm.vlb_terms)."""
    from .vlb_terms import evaluate_rate_distortion

    from dataclasses import replace

    evaluate_rate_distortion(replace(_terms_request(args, args.out), levels=args.levels))
    return 0


def _add_eval_curves(metrics) -> None:
    p = metrics.add_parser("curves", help="training curves of runs from their log.jsonl",
                           description="Loss and loss by quarter of t against step for each run (IDDPM Fig. 6), "
                                       "and how noisy each loss curve is (IDDPM sec. 3.3), from RUN/log.jsonl.")
    p.add_argument("runs", metavar="RUN", nargs="+", help="run folders (holding log.jsonl) or log.jsonl files")
    p.add_argument("--out", default="curves.json", metavar="FILE.json", help="result file (default curves.json)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also plot the curves (needs fastddpm[plots])")
    p.set_defaults(func=cmd_eval_curves)


def cmd_eval_curves(args) -> int:
    """`fastddpm eval curves`: training curves and their noise from runs' log.jsonl (fastddpm.train_curves)."""
    from .train_curves import CurvesRequest, evaluate_curves

    evaluate_curves(CurvesRequest(runs=args.runs, out=args.out, plot=args.plot))
    return 0


def _add_eval_digits_fid(metrics) -> None:
    p = metrics.add_parser("digits-fid", help="Frechet distance of 8x8 digit samples to the held-out digits",
                           description="FID for the built-in digits data: the Frechet distance between the samples "
                                       "and the 370 held-out digits in the hidden layer of a small MLP classifier "
                                       "fitted on half the training digits (fastddpm.digits_fid), printed beside "
                                       "what real digits score at the same number of images. Each SAMPLES is "
                                       "one sample set (one noise seed): several give mean +- SD, and --versus "
                                       "with as many sets of another setting (the same seeds, in the same order) "
                                       "the paired difference and its standard error.")
    p.add_argument("samples", metavar="SAMPLES", nargs="+",
                   help="8x8 grey images, one set each: .npz files, image folders or `fastddpm sample` output folders")
    p.add_argument("--versus", nargs="+", default=None, metavar="SAMPLES",
                   help="sample sets of a second setting, matched to SAMPLES by position (same noise seeds)")
    p.add_argument("--pool", action="store_true", help="score all SAMPLES together as one set")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_threads(p)
    p.set_defaults(func=cmd_eval_digits_fid, memory_flags="the number of sample images")


def cmd_eval_digits_fid(args) -> int:
    """`fastddpm eval digits-fid`: the digits Frechet distance beside the real-data floor (fastddpm.digits_fid)."""
    from .digits_fid import evaluate_digits_fid

    evaluate_digits_fid(args.samples, args.json, versus=args.versus, pool=args.pool)
    return 0
