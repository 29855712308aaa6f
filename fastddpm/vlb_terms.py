"""The variational bound term by term, and the rate-distortion curve it implies.

`fastddpm eval bpd --per-timestep` and `fastddpm eval rate-distortion` (DDPM sec. 4.3, Table 4,
Fig. 5; IDDPM Fig. 2). Both take the per-timestep means that `fastddpm.bpd.evaluate_bpd`
computes (vb, xstart_mse: lists over t = 0..T-1) and its prior term.

Naming (DDPM eq. 5, with our 0-based timesteps): the term at t = 0 is L_0 = -log p(x_0 | x_1), the
decoder; the term at t >= 1 is L_t = KL(q(. | x_t, x_0) || p(. | x_t)), the reverse step taken from
the model's timestep t; the prior KL(q(x_T | x_0) || N(0, I)) is L_T, recorded at t = T. Their sum
is the bits/dim `eval bpd` prints.

Rate and distortion (DDPM Algorithm 3, progressive lossy coding): a receiver that holds the
state at timestep t has been sent L_T and the terms of the steps above t, so

    rate(t)       = L_T + sum_{s > t} L_s                        bits/dim
    distortion(t) = sqrt(mean ||x_0 - x0_hat(x_t, t)||^2 / D) * 127.5   RMSE on the 0..255 scale

(x0_hat the model's prediction of x_0 from x_t, clipped to [-1, 1]; 127.5 maps [-1, 1] to 0..255).
The rate is non-increasing in t (every term is a KL or the -log of a probability mass, so >= 0);
for a good denoiser the distortion is non-decreasing in t. Sending L_0 as well makes the code
lossless: rate = bits/dim, distortion 0 (the "lossless" entry).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FastDDPMError
from .files import atomic_write_bytes, check_output_file, refuse_overwriting_inputs
from .noise import check_seed
from .run_folder import output_file_lock

PRIOR_TERM = "L_T (prior)"
RMSE_SCALE = 127.5  # [-1, 1] -> 0..255
DIGITS_LEVELS = 17  # scikit-learn's digits take the values 0..16


def vlb_term_records(vb: list[float], prior_bpd: float, mse: list[float] | None = None,
                     xstart_mse: list[float] | None = None) -> list[dict]:
    """Records {"t", "term", "vb"} for L_0 .. L_{T-1} (t = 0..T-1) and L_T (t = T), in bits/dim.

    vb [T]: the mean per-timestep terms (`evaluate_bpd`'s per_timestep["vb"]); prior_bpd: L_T.
    mse / xstart_mse [T], when given, add the eps and x0 prediction errors at each t.
    """
    records = []
    for t, value in enumerate(vb):
        rec = {"t": t, "term": f"L_{t}", "vb": float(value)}
        if mse is not None:
            rec["mse"] = float(mse[t])
        if xstart_mse is not None:
            rec["xstart_mse"] = float(xstart_mse[t])
        records.append(rec)
    records.append({"t": len(vb), "term": PRIOR_TERM, "vb": float(prior_bpd)})
    return records


def rate_distortion_records(vb: list[float], prior_bpd: float, xstart_mse: list[float],
                            level_accuracy: list[float] | None = None,
                            exact_fraction: list[float] | None = None) -> list[dict]:
    """Records {"t", "rate", "distortion"} for t = 0..T-1 (see the module docstring for the formulas).

    vb, xstart_mse [T]: mean per-timestep VLB terms (bits/dim) and x0 squared errors ([-1, 1] scale).
    level_accuracy, exact_fraction [T], when given (`evaluate_bpd` with levels), add the share of
    pixels and of images that the x0 prediction from x_t, rounded to the data's grey levels, recovers.
    """
    if len(vb) != len(xstart_mse):
        raise ValueError(f"vb has {len(vb)} terms but xstart_mse {len(xstart_mse)}")
    records, rate = [], float(prior_bpd)
    for t in range(len(vb) - 1, -1, -1):  # from t = T-1 down: the rate grows as terms are sent
        rec = {"t": t, "rate": rate, "distortion": RMSE_SCALE * math.sqrt(max(float(xstart_mse[t]), 0.0))}
        if level_accuracy is not None:
            rec["level_accuracy"] = float(level_accuracy[t])
        if exact_fraction is not None:
            rec["exact_fraction"] = float(exact_fraction[t])
        records.append(rec)
        rate += float(vb[t])
    return records[::-1]


def rate_distortion(model, diffusion, x0, clip_denoised: bool = True, levels: int | None = None) -> dict:
    """The rate-distortion records of a model on images x0 [B, C, H, W] in [-1, 1] (one calc_bpd_loop).

    Returns {"records": [...] (t = 0..T-1), "lossless": {"rate", "distortion"}, "bpd"}; with `levels`
    the records carry level_accuracy and exact_fraction. Seed torch's generator first for a
    repeatable estimate.
    """
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip_denoised, levels=levels)
    vb = out["vb"].double().mean(dim=0).tolist()
    prior = float(out["prior_bpd"].double().mean())
    xmse = out["xstart_mse"].double().mean(dim=0).tolist()
    bpd = float(out["total_bpd"].double().mean())
    extra = {}
    if levels is not None:
        acc = out["level_accuracy"].double()
        extra = {"level_accuracy": acc.mean(dim=0).tolist(), "exact_fraction": (acc == 1.0).double().mean(dim=0).tolist()}
    return {"records": rate_distortion_records(vb, prior, xmse, **extra), "lossless": {"rate": bpd, "distortion": 0.0},
            "bpd": bpd}


def exact_recovery(records: list[dict], bpd: float, share: float = 1.0) -> dict | None:
    """Where the code stops describing visible content: the largest t from which the rounded x0
    prediction recovers at least `share` of the images exactly (records need exact_fraction).

    Returns {"t", "exact_fraction", "level_accuracy", "rate", "bits_after_share"}, bits_after_share
    being the part of the lossless code sent after that point, (bpd - rate(t)) / bpd: the bits
    that describe detail below one grey level. None when no t reaches `share`.
    """
    ok = [r for r in records if r.get("exact_fraction", -1.0) >= share]
    if not ok:
        return None
    r = max(ok, key=lambda rec: rec["t"])
    return {"t": r["t"], "exact_fraction": r["exact_fraction"], "level_accuracy": r.get("level_accuracy"),
            "rate": r["rate"], "bits_after_share": (bpd - r["rate"]) / bpd}


def mean_image_distortion(reference, images) -> float:
    """RMSE (0..255) of sending nothing but the mean image: every image in `images` predicted by the
    pixelwise mean of `reference` (both uint8 or float arrays on 0..255, [N, ...]). The rate-0
    baseline of a rate-distortion curve: a reverse process whose x0 prediction is worse than this
    is worse than knowing only the data's mean."""
    import numpy as np

    mean = np.asarray(reference, dtype=np.float64).mean(axis=0)
    return float(np.sqrt(((np.asarray(images, dtype=np.float64) - mean) ** 2).mean()))


def decoder_floor_bpd(diffusion, x0) -> dict:
    """The decoder term L_0 = -log p(x_0 | x_1) (DDPM eq. 13) of a *perfect* mean, mu = x0, with the
    variance the process uses at t = 0 when it is fixed: what L_0 costs even if the model knows x0.

    x0 [B, C, H, W] in [-1, 1]. With sigma^2 = betatilde_1 (the fixed variance at t = 0, 5.45e-5
    for the linear schedule) sigma = 0.0074 on [-1, 1] is about twice the half-width of a bin
    (1 / 255), so even a decoder centred on the true pixel puts only part of its mass in the
    right bin. Returns {"bpd": mean over images, "per_image": [B], "variance"}.
    """
    import torch

    from .diffusion import discretized_gaussian_log_likelihood, mean_flat

    var = float(diffusion.schedule.fixedlarge_variance[0])  # beta_t's table, betatilde_1 at t = 0
    log_var = torch.full_like(x0, math.log(var))
    per_image = -mean_flat(discretized_gaussian_log_likelihood(x0, x0, 0.5 * log_var)) / math.log(2.0)
    return {"bpd": float(per_image.double().mean()), "per_image": per_image.double().tolist(), "variance": var}


def vlb_estimator_noise(vb: list[float], vb_sq: list[float], uniform_prob: float = 0.001) -> dict:
    """How noisy a one-sample estimate of L_vlb = sum_t E[L_t] is (IDDPM sec. 3.3, eq. 18).

    vb, vb_sq [T]: the mean terms E[L_t] and their second moments E[L_t^2] over images and x_t draws
    (`evaluate_bpd`'s per_timestep "vb" and "vb_sq"). Training estimates L_vlb from one image, one
    t ~ p and one x_t as Y = L_t / p(t), so E[Y] = L_vlb and, over all three draws,

        Var[Y] = sum_t E[L_t^2] / p(t) - L_vlb^2.

    For uniform t, p = 1/T: Var = T sum_t E[L_t^2] - L_vlb^2. For IDDPM's importance sampling,
    p(t) ~ sqrt(E[L_t^2]) (eq. 18) mixed with `uniform_prob` of the uniform distribution as the
    trainer does (fastddpm.train.LossSecondMomentSampler): with no mix, Var = (sum_t sqrt(E[L_t^2]))^2
    - L_vlb^2, which is zero only when no L_t varies within its t. Returns the relative standard
    deviations sqrt(Var) / L_vlb: {"uniform", "importance", "importance_t_only" (the same p(t), the
    terms' own noise within a t left out: only the choice of t), "variance_ratio" (uniform variance
    over importance variance), "L_vlb"}.
    """
    if len(vb) != len(vb_sq):
        raise ValueError(f"vb has {len(vb)} terms but vb_sq {len(vb_sq)}")
    T = len(vb)
    total = math.fsum(float(m) for m in vb)
    if total <= 0:
        raise ValueError("the terms must have a positive sum")
    for m, m2 in zip(vb, vb_sq):
        if m2 < 0 or m * m > m2 * (1 + 1e-9) + 1e-300:
            raise ValueError("each second moment E[L_t^2] must be at least the squared mean E[L_t]^2")

    def variance(p, second):
        return math.fsum(m2 / q for m2, q in zip(second, p) if m2 > 0) - total * total  # a t with L_t = 0 adds 0

    root = [math.sqrt(max(float(m2), 0.0)) for m2 in vb_sq]
    norm = math.fsum(root)
    importance = [(1.0 - uniform_prob) * r / norm + uniform_prob / T for r in root]
    var_u = variance([1.0 / T] * T, vb_sq)
    var_i = variance(importance, vb_sq)
    var_i_t = variance(importance, [float(m) ** 2 for m in vb])
    return {"uniform": math.sqrt(max(var_u, 0.0)) / total, "importance": math.sqrt(max(var_i, 0.0)) / total,
            "importance_t_only": math.sqrt(max(var_i_t, 0.0)) / total,
            "variance_ratio": var_u / var_i if var_i > 0 else math.inf, "L_vlb": total, "T": T,
            "uniform_prob": uniform_prob}


# ------------------------------------------------------------------------------- the commands
@dataclass
class TermsRequest:
    """`fastddpm eval bpd --per-timestep` / `fastddpm eval rate-distortion`: eval bpd's settings plus a plot."""

    checkpoint: str
    data: str
    batch: int = 256
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    plot: str | None = None
    progress: bool = True
    levels: int | None = None  # rate-distortion: the data's grey levels (None: 17 for digits, else 256)


def data_levels(data: str) -> int:
    """The grey levels of a data set for exact recovery: 17 for the built-in digits, 256 otherwise."""
    return DIGITS_LEVELS if data == "digits" else 256


def _checked_bpd(request: TermsRequest, default_out: str, levels: int | None = None) -> tuple[dict, str]:
    """Check the outputs (and matplotlib, if plotting) first, then run evaluate_bpd without writing."""
    from .bpd import BpdRequest, evaluate_bpd

    out = request.out if request.out is not None else default_out
    check_output_file(out, "--out")
    if request.plot is not None:
        check_output_file(request.plot, "--plot")
        if Path(request.plot).resolve() == Path(out).resolve():
            raise FastDDPMError("--plot and --out name the same file")
        from .plots import require_matplotlib

        require_matplotlib()
    check_seed(request.seed, "--seed")
    result = evaluate_bpd(BpdRequest(checkpoint=request.checkpoint, data=request.data, batch=request.batch,
                                     limit=request.limit, seed=request.seed, device=request.device, out=None,
                                     progress=request.progress, levels=levels))
    return result, out


def _locked(request: TermsRequest, default_out: str, body):
    """body(request) with its output file checked first and locked while it runs (as eval bpd)."""
    from .bpd import evaluation_inputs

    out = request.out if request.out is not None else default_out
    check_output_file(out, "--out")
    refuse_overwriting_inputs([(out, "--out"), (request.plot, "--plot")],
                              evaluation_inputs(request.checkpoint, request.data))
    with output_file_lock(out, "--out"):
        return body(request)


def _write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def evaluate_vlb_terms(request: TermsRequest) -> dict:
    """`eval bpd --per-timestep`: eval bpd's result plus "terms" = vlb_term_records(...), written to
    request.out (default bpd.json), and a log-scale plot of the terms when request.plot is set."""
    return _locked(request, "bpd.json", _vlb_terms)


def _vlb_terms(request: TermsRequest) -> dict:
    result, out = _checked_bpd(request, "bpd.json")
    pt = result["per_timestep"]
    result["terms"] = vlb_term_records(pt["vb"], result["prior_bpd"], pt["mse"], pt["xstart_mse"])
    result["vlb_estimator_noise"] = vlb_estimator_noise(pt["vb"], pt["vb_sq"])
    result["terms_request"] = asdict(request)
    _write_json(out, result)
    print(f"wrote {out} ({len(result['terms'])} terms L_0 .. L_{result['T']})")
    if request.plot is not None:
        from .plots import plot_vlb_terms

        plot_vlb_terms(result["terms"], request.plot,
                       title=f"VLB terms, {Path(str(request.checkpoint)).name} ({result['images']} images)")
        print(f"wrote {request.plot}")
    return result


def _mean_image_distortion(request: TermsRequest, n: int) -> float:
    """mean_image_distortion of the first n test images against the mean of the data's training split."""
    from .checkpoint import load_checkpoint
    from .data import load_dataset_for

    model, _, _ = load_checkpoint(request.checkpoint, device="cpu")
    train = load_dataset_for(request.data, model.config, "train")
    test = load_dataset_for(request.data, model.config, "test")
    total, count = None, 0
    for lo in range(0, len(train), 1024):  # the mean image, in batches (CIFAR-10: 50,000 images)
        x = train.batch(range(lo, min(lo + 1024, len(train))), device="cpu").double()
        total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
        count += x.shape[0]
    mean = (total / count + 1.0) * RMSE_SCALE
    images = (test.batch(range(n), device="cpu").double() + 1.0) * RMSE_SCALE
    return mean_image_distortion(mean[None].numpy(), images.numpy())


def evaluate_rate_distortion(request: TermsRequest) -> dict:
    """`eval rate-distortion`: {"records": [{"t", "rate", "distortion"}] for t = 0..T-1, "lossless",
    "bpd", ...} written to request.out (default rate_distortion.json), plus DDPM Fig. 5 when plotting."""
    return _locked(request, "rate_distortion.json", _rate_distortion)


def _rate_distortion(request: TermsRequest) -> dict:
    levels = request.levels if request.levels is not None else data_levels(request.data)
    if levels < 2:
        raise FastDDPMError(f"--levels must be at least 2, got {levels}")
    result, out = _checked_bpd(request, "rate_distortion.json", levels)
    pt = result["per_timestep"]
    records = rate_distortion_records(pt["vb"], result["prior_bpd"], pt["xstart_mse"], pt["level_accuracy"],
                                      pt["exact_fraction"])
    rd = {"records": records, "levels": levels,
          "exact_recovery": {"all_images": exact_recovery(records, result["bpd"], 1.0),
                             "99%_of_images": exact_recovery(records, result["bpd"], 0.99)},
          "mean_image_distortion": _mean_image_distortion(request, result["images"]),
          "lossless": {"rate": result["bpd"], "distortion": 0.0}, "bpd": result["bpd"],
          "bpd_stderr": result["bpd_stderr"], "prior_bpd": result["prior_bpd"], "images": result["images"],
          "data": result["data"], "checkpoint": result["checkpoint"], "T": result["T"],
          "seconds": result["seconds"], "request": asdict(request)}
    _write_json(out, rd)
    exact = rd["exact_recovery"]["all_images"]
    print(f"wrote {out} ({len(rd['records'])} records); sending only the mean image: RMSE "
          f"{rd['mean_image_distortion']:.1f}; " + (
              f"every image recovered exactly (at {levels} levels) from t = {exact['t']}, after "
              f"{1 - exact['bits_after_share']:.0%} of the bits" if exact else
              f"no t recovers every image exactly at {levels} levels"))
    if request.plot is not None:
        from .plots import plot_rate_distortion

        plot_rate_distortion(rd["records"], request.plot, lossless=rd["bpd"],
                             mean_image=rd["mean_image_distortion"],
                             title=f"Rate-distortion, {Path(str(request.checkpoint)).name} ({rd['images']} images)")
        print(f"wrote {request.plot}")
    return rd
