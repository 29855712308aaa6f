"""Quality per model call: the few-step frontier of every sampler on the digits models (docs/SAMPLERS.md).

    python bench/sampler_frontier.py --out docs/samplers [--seeds 5] [--samples 200]
           [--calls 3,5,7,10,15,20,25,50,100] [--bpd-steps 10,25,50,100,200,1000] [--bpd-images 200]
           [--only fid,bpd,report] [--threads 1]

For the calibrated `digits` (L_simple, fixed variance) and `digits-hybrid` (hybrid loss, learned
variance) models it measures

  fid   digits FID (fastddpm.digits_fid) against model calls for every sampler setting: ancestral
        with beta_t, betatilde_t, learned (hybrid) and Analytic-DPM variances; DDIM with eta 0, and
        Analytic-DDIM with eta 0 and 1; dpm++2m and dpm++2m-sde (and dpm++2m unclipped, as
        diffusers runs it); and, driven by our U-Net from our x_T, diffusers' DPMSolverMultistep
        (2M), UniPCMultistep and DDIM schedulers (trailing spacing, their defaults otherwise).
        Each setting's spacing (iddpm, linspace, leading, trailing) is chosen by a pilot on a noise
        seed that is not reported (SELECTION_SEED) over 3-20 calls; then every point is --seeds
        noise seeds x --samples samples; seed s draws x_T = fastddpm.noise(s, XT_STEP) for every
        setting, so settings are PAIRED by seed.
  bpd   bits/dim of the K-step respaced process ("K": t = 0 and T-1 kept) on the first
        --bpd-images held-out digits for fixed, learned and analytic variances: the same images
        and the same x_t draws (torch seed 0) for every variance, so differences are paired per
        image.
  report  summary.md (tables with mean +- SD over seeds, paired differences +- SE, the real-data
        noise floor) and fid_vs_calls.png / bpd_vs_steps.png.

Results are appended to --out/fid.jsonl and --out/bpd.jsonl one record per point, and a rerun
skips the points already there, so the script can be interrupted and resumed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("digits", "digits-hybrid")
SPACINGS = ("iddpm", "linspace", "leading", "trailing")
# (label, sampler, variance, eta): our settings
OURS = (("ancestral beta", "ancestral", "fixedlarge", 0.0), ("ancestral betatilde", "ancestral", "fixedsmall", 0.0),
        ("ancestral learned", "ancestral", "learned", 0.0), ("ancestral analytic", "ancestral", "analytic", 0.0),
        ("ddim", "ddim", None, 0.0), ("ddim analytic eta0", "ddim", "analytic", 0.0),
        ("ddim analytic eta1", "ddim", "analytic", 1.0), ("dpm++2m", "dpm++2m", None, 0.0),
        ("dpm++2m-sde", "dpm++2m-sde", None, 0.0), ("dpm++2m unclipped", "dpm++2m", None, 0.0))
# Our samplers clip the x0 prediction to [-1, 1] (the checkpoints' clip_denoised); diffusers' DPM-Solver
# and UniPC do not by default. "dpm++2m unclipped" is ours configured as diffusers' 2M, to show which
# part of a difference is the clipping.
UNCLIPPED = {"dpm++2m unclipped"}
PEERS = ("diffusers DPMSolverMultistep 2M", "diffusers UniPCMultistep", "diffusers DDIM")


def _load(name: str):
    from fastddpm import load_checkpoint

    model, diffusion, meta = load_checkpoint(name)
    if diffusion.gamma is None:
        sys.exit(f"{name} carries no Analytic-DPM table; calibrate it first (fastddpm calibrate)")
    return model.eval(), diffusion, bool(meta.get("clip_denoised", True))


def _done(path: Path) -> set:
    keys = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                keys.add(json.loads(line)["key"])
    return keys


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ samples
@torch.no_grad()
def ours(model, diffusion, clip, sampler, variance, eta, spacing, calls, seed, n):
    """Our `sampler` (with `variance` and `eta`) on `spacing` in `calls` steps: n samples of noise seed `seed`."""
    from fastddpm import sample
    from fastddpm.generate import respaced_for

    d = diffusion if variance is None else diffusion.with_variance(variance)
    process = respaced_for(d, calls, sampler, spacing)
    return sample(model, process, (n, 1, 8, 8), seed=seed, sampler=sampler, eta=eta, clip_denoised=clip)


@torch.no_grad()
def peer(model, diffusion, label, calls, seed, n):
    """diffusers' scheduler (trailing spacing, its defaults otherwise) driving our U-Net from our x_T."""
    import diffusers

    from fastddpm.noise import XT_STEP, noise

    common = dict(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.schedule.betas.numpy(),
                  timestep_spacing="trailing", prediction_type="epsilon")
    if label.endswith("2M"):
        sched = diffusers.DPMSolverMultistepScheduler(**common)
    elif "UniPC" in label:
        sched = diffusers.UniPCMultistepScheduler(**common)
    else:
        sched = diffusers.DDIMScheduler(**common)
    sched.set_timesteps(calls)
    x = noise(seed, XT_STEP, (n, 1, 8, 8))
    for t in sched.timesteps:
        out = model(x, t.reshape(1).expand(n))[:, :1]  # the mean part of a learned-variance model
        x = sched.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


SELECTION_SEED = 1000  # the spacing pilot's noise seed: not one of the reported seeds (no selection bias)
FEW = (3, 5, 7, 10, 15, 20)  # the call counts a spacing is chosen on


def _sample_fid(model, diffusion, clip, label, sampler, var, eta, spacing, calls, seed, n):
    """(digits FID or None, error text or None) of one point."""
    from fastddpm.digits_fid import digits_fid
    from fastddpm.images import to_uint8

    try:
        if sampler is None:
            x = peer(model, diffusion, label, calls, seed, n)
        else:
            x = ours(model, diffusion, clip and label not in UNCLIPPED, sampler, var, eta, spacing, calls, seed, n)
        return digits_fid(to_uint8(x.float())), None
    except Exception as e:  # a spacing that cannot give `calls` steps: recorded, not fatal
        return None, f"{type(e).__name__}: {e}"


def _jobs(diffusion):
    """(label, sampler, variance, eta) of every setting this model can run, and the peers (sampler None)."""
    learned = diffusion.trained_var_type in ("learned", "learned_range")
    return [o for o in OURS if o[2] != "learned" or learned] + [(label, None, None, 0.0) for label in PEERS]


def run_fid(args, out: Path) -> None:
    """The spacing pilot (one seed apart from the reported ones, every spacing, FEW call counts),
    then every call count x --seeds seeds at each setting's chosen spacing."""
    path = out / "fid.jsonl"
    done = _done(path)
    for name in MODELS:
        model, diffusion, clip = _load(name)

        def point(label, sampler, var, eta, spacing, calls, seed, phase):
            key = f"{name}|{label}|{spacing}|{calls}|{seed}|{args.samples}"
            if key in done:
                return
            start = time.perf_counter()
            fid, error = _sample_fid(model, diffusion, clip, label, sampler, var, eta, spacing, calls, seed,
                                     args.samples)
            _append(path, {"key": key, "model": name, "setting": label, "spacing": spacing, "calls": calls,
                           "seed": seed, "n": args.samples, "fid": fid, "error": error, "phase": phase,
                           "seconds": time.perf_counter() - start})
            done.add(key)

        for label, sampler, var, eta in _jobs(diffusion):
            for spacing in (SPACINGS if sampler is not None else ("trailing",)):
                for calls in FEW:
                    point(label, sampler, var, eta, spacing, calls, SELECTION_SEED, "pilot")
            print(f"pilot {name} {label}", file=sys.stderr, flush=True)
        records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        pilot = {}
        for r in records:
            if r["model"] == name and r["seed"] == SELECTION_SEED and r["fid"] is not None:
                pilot.setdefault((r["setting"], r["spacing"]), []).append(r["fid"])
        for label, sampler, var, eta in _jobs(diffusion):
            scores = {sp: float(np.mean(v)) for (lab, sp), v in pilot.items() if lab == label and len(v) == len(FEW)}
            spacing = min(scores, key=scores.get)
            for calls in args.calls:
                for seed in range(args.seeds):
                    point(label, sampler, var, eta, spacing, calls, seed, "reported")
            print(f"fid {name} {label} ({spacing})", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ bits/dim
@torch.no_grad()
def run_bpd(args, out: Path) -> None:
    from fastddpm.bpd import process_for
    from fastddpm.data import load_digits
    from fastddpm.images import from_uint8

    path = out / "bpd.jsonl"
    done = _done(path)
    images = load_digits("test").images[: args.bpd_images]
    x0 = from_uint8(images).contiguous()
    for name in MODELS:
        model, diffusion, _ = _load(name)
        variances = ["fixedlarge", "fixedsmall", "analytic"]
        if diffusion.trained_var_type in ("learned", "learned_range"):
            variances.append("learned")
        for K in args.bpd_steps:
            for var in variances:
                key = f"{name}|{var}|{K}|{len(images)}"
                if key in done:
                    continue
                start = time.perf_counter()
                d = process_for(diffusion, K, var)
                torch.manual_seed(0)  # the same x_t draws for every variance: paired per image
                res = d.calc_bpd_loop(model, x0)
                _append(path, {"key": key, "model": name, "variance": var, "K": K, "images": len(images),
                               "per_image": res["total_bpd"].double().tolist(),
                               "L0": res["vb"][:, 0].double().mean().item(),
                               "seconds": time.perf_counter() - start})
                print(f"bpd {name} K={K} {var}: {res['total_bpd'].mean():.4f}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report
def _mean_sd(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _paired(a, b):
    """mean and standard error of the paired differences a - b."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def _fid_table(records):
    """{(model, setting, spacing, calls): [fid per reported seed, in seed order]} of the finished points."""
    table: dict = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["fid"] is not None and r["seed"] != SELECTION_SEED:
            table.setdefault((r["model"], r["setting"], r["spacing"], r["calls"]), []).append(r["fid"])
    return table


def chosen_spacing(records, model, setting):
    """The spacing the pilot chose (lowest mean digits FID over FEW at SELECTION_SEED), with the pilot's means."""
    pilot = {}
    for r in records:
        if r["model"] == model and r["setting"] == setting and r["seed"] == SELECTION_SEED and r["fid"] is not None:
            pilot.setdefault(r["spacing"], []).append(r["fid"])
    scores = {sp: float(np.mean(v)) for sp, v in pilot.items() if len(v) == len(FEW)}
    return (min(scores, key=scores.get) if scores else None), scores


def report(args, out: Path) -> None:
    from fastddpm.digits_fid import noise_floor

    records = [json.loads(line) for line in (out / "fid.jsonl").read_text().splitlines() if line.strip()]
    table = _fid_table(records)
    floor = noise_floor(args.samples)
    lines = [f"Real-data floor at n = {args.samples}: digits FID {floor['train_mean']:.2f} +- {floor['train_std']:.2f} "
             f"(SD over {floor['train_repeats']} draws of real training digits the feature network never saw).", ""]
    summary = {"floor": floor, "models": {}}
    for model in MODELS:
        settings = sorted({k[1] for k in table if k[0] == model}, key=lambda s: ([*[o[0] for o in OURS], *PEERS].index(s)))
        pilots = {s: chosen_spacing(records, model, s) for s in settings}
        best = {s: pilots[s][0] for s in settings}
        lines += [f"### {model}: digits FID against model calls (mean +- SD over {args.seeds} seeds x {args.samples} "
                  "samples; each sampler at its best spacing)", "",
                  "| setting | spacing | " + " | ".join(str(c) for c in args.calls) + " |",
                  "|---|---|" + "---|" * len(args.calls)]
        rows = {}
        for s in settings:
            if best[s] is None:
                continue
            cells = []
            for c in args.calls:
                v = table.get((model, s, best[s], c))
                cells.append(f"{_mean_sd(v)[0]:.2f} +- {_mean_sd(v)[1]:.2f}" if v else "")
                rows.setdefault(s, {})[c] = v
            lines.append(f"| {s} | {best[s]} | " + " | ".join(cells) + " |")
        lines.append("")
        # fewest calls within the floor's spread
        limit = floor["train_mean"] + floor["train_std"]
        fewest = {s: next((c for c in args.calls if rows[s].get(c) and np.mean(rows[s][c]) <= limit), None)
                  for s in rows}
        lines += [f"Fewest model calls whose mean digits FID is within the floor's spread (<= {limit:.2f}): "
                  + ", ".join(f"{s}: {c if c else '> ' + str(args.calls[-1])}" for s, c in fewest.items()), ""]
        # paired comparisons
        ours_settings = [s for s in rows if not s.startswith("diffusers")]
        lines += ["Paired differences (same seeds, same x_T), mean +- SE over seeds:", ""]
        for c in args.calls:
            if c > 20:
                continue
            best_ours = min(ours_settings, key=lambda s: np.mean(rows[s][c]) if rows[s].get(c) else np.inf)
            best_peer = min((s for s in rows if s.startswith("diffusers")),
                            key=lambda s: np.mean(rows[s][c]) if rows[s].get(c) else np.inf, default=None)
            if best_peer and rows[best_ours].get(c) and rows[best_peer].get(c):
                m, se = _paired(rows[best_ours][c], rows[best_peer][c])
                lines.append(f"- {c} calls: best fastddpm ({best_ours}, {best[best_ours]}) - best diffusers "
                             f"({best_peer}) = {m:+.3f} +- {se:.3f}")
        for c in (10, 25):
            a, b = rows.get("ancestral analytic", {}).get(c), rows.get("ancestral betatilde", {}).get(c)
            if a and b:
                m, se = _paired(a, b)
                lines.append(f"- {c} calls: ancestral analytic - ancestral betatilde = {m:+.3f} +- {se:.3f}")
        lines.append("")
        lines += ["Spacing pilot (mean digits FID over 3-20 calls, noise seed "
                  f"{SELECTION_SEED}, not a reported seed): "
                  + "; ".join(f"{s}: " + ", ".join(f"{sp} {v:.2f}" for sp, v in sorted(pilots[s][1].items()))
                              for s in settings), ""]
        summary["models"][model] = {"best_spacing": best, "pilot": {s: pilots[s][1] for s in settings},
                                    "fewest_calls_within_floor": fewest,
                                    "fid": {s: {str(c): rows[s].get(c) for c in args.calls} for s in rows}}
    bpd_path = out / "bpd.jsonl"
    if bpd_path.is_file():
        lines += _bpd_report([json.loads(x) for x in bpd_path.read_text().splitlines() if x.strip()], summary)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _figures(table, summary, floor, out, args)
    print("\n".join(lines))


def _bpd_report(records, summary) -> list:
    lines = []
    by = {(r["model"], r["variance"], r["K"]): r for r in records}
    for model in MODELS:
        Ks = sorted({k[2] for k in by if k[0] == model})
        vars_ = [v for v in ("fixedlarge", "fixedsmall", "learned", "analytic") if any((model, v, K) in by for K in Ks)]
        if not Ks:
            continue
        n = by[(model, vars_[0], Ks[0])]["images"]
        lines += [f"### {model}: bits/dim of the K-step process ({n} held-out digits, mean +- SE over images)", "",
                  "| variance | " + " | ".join(f"K = {K}" for K in Ks) + " |", "|---|" + "---|" * len(Ks)]
        for v in vars_:
            cells = []
            for K in Ks:
                r = by.get((model, v, K))
                cells.append(f"{np.mean(r['per_image']):.3f} +- {np.std(r['per_image'], ddof=1) / math.sqrt(n):.3f}"
                             if r else "")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", "Paired per-image differences (same images, same x_t draws), mean +- SE:", ""]
        for other in [v for v in vars_ if v != "analytic"]:
            cells = []
            for K in Ks:
                a, b = by.get((model, "analytic", K)), by.get((model, other, K))
                if a and b:
                    m, se = _paired(a["per_image"], b["per_image"])
                    cells.append(f"K={K}: {m:+.3f} +- {se:.3f}")
            lines.append(f"- analytic - {other}: " + "; ".join(cells))
        lines.append("")
        summary.setdefault("bpd", {})[model] = {v: {str(K): float(np.mean(by[(model, v, K)]["per_image"]))
                                                    for K in Ks if (model, v, K) in by} for v in vars_}
    return lines


def _figures(table, summary, floor, out: Path, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install -e '.[plots]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.5), sharey=True)
    names = [o[0] for o in OURS] + list(PEERS)
    colour = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}  # one colour a setting
    for ax, model in zip(np.atleast_1d(axes), MODELS):
        best = summary["models"][model]["best_spacing"]
        for s, spacing in best.items():
            if spacing is None:
                continue
            pts = [(c, *_mean_sd(table[(model, s, spacing, c)])) for c in args.calls if (model, s, spacing, c) in table]
            c, m, sd = map(np.array, zip(*pts))
            ax.errorbar(c, m, yerr=sd, label=f"{s} ({spacing})", capsize=2, color=colour[s],
                        linestyle="--" if s.startswith("diffusers") else "-", marker="o", markersize=3)
        ax.axhspan(floor["train_mean"] - floor["train_std"], floor["train_mean"] + floor["train_std"], color="grey",
                   alpha=0.25, label="real digits (mean +- SD)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel(f"digits FID ({args.samples} samples, mean +- SD over {args.seeds} seeds)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_calls.png", dpi=120)
    if "bpd" in summary:
        fig, axes = plt.subplots(1, len(summary["bpd"]), figsize=(6 * len(summary["bpd"]), 4.5))
        for ax, (model, per_var) in zip(np.atleast_1d(axes), summary["bpd"].items()):
            for v, pts in per_var.items():
                Ks = sorted(int(k) for k in pts)
                ax.plot(Ks, [pts[str(k)] for k in Ks], marker="o", label=v)
            ax.set_xscale("log")
            ax.set_yscale("log")  # betatilde's bound at K = 10 is 30x the others'
            ax.set_xlabel("K (steps of the respaced process)")
            ax.set_ylabel("bits/dim (held-out digits)")
            ax.set_title(model)
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bpd_vs_steps.png", dpi=120)


def main(argv=None) -> None:
    global MODELS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/samplers")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--calls", default="3,5,7,10,15,20,25,50,100")
    p.add_argument("--bpd-steps", default="10,25,50,100,200,1000")
    p.add_argument("--bpd-images", type=int, default=200)
    p.add_argument("--only", default="fid,bpd,report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="digits,digits-hybrid", help="which of the bundled models (default both)")
    args = p.parse_args(argv)
    MODELS = tuple(m for m in args.models.split(",") if m)
    args.calls = [int(c) for c in args.calls.split(",")]
    args.bpd_steps = [int(c) for c in args.bpd_steps.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    if "fid" in only:
        run_fid(args, out)
    if "bpd" in only:
        run_bpd(args, out)
    if "report" in only:
        report(args, out)


if __name__ == "__main__":
    main()
