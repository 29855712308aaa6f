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


def rate_distortion_records(vb: list[float], prior_bpd: float, xstart_mse: list[float]) -> list[dict]:
    """Records {"t", "rate", "distortion"} for t = 0..T-1 (see the module docstring for the formulas).

    vb, xstart_mse [T]: mean per-timestep VLB terms (bits/dim) and x0 squared errors ([-1, 1] scale).
    """
    if len(vb) != len(xstart_mse):
        raise ValueError(f"vb has {len(vb)} terms but xstart_mse {len(xstart_mse)}")
    records, rate = [], float(prior_bpd)
    for t in range(len(vb) - 1, -1, -1):  # from t = T-1 down: the rate grows as terms are sent
        records.append({"t": t, "rate": rate, "distortion": RMSE_SCALE * math.sqrt(max(float(xstart_mse[t]), 0.0))})
        rate += float(vb[t])
    return records[::-1]


def rate_distortion(model, diffusion, x0, clip_denoised: bool = True) -> dict:
    """The rate-distortion records of a model on images x0 [B, C, H, W] in [-1, 1] (one calc_bpd_loop).

    Returns {"records": [...] (t = 0..T-1), "lossless": {"rate", "distortion"}, "bpd"}. Seed
    torch's generator first for a repeatable estimate.
    """
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip_denoised)
    vb = out["vb"].double().mean(dim=0).tolist()
    prior = float(out["prior_bpd"].double().mean())
    xmse = out["xstart_mse"].double().mean(dim=0).tolist()
    bpd = float(out["total_bpd"].double().mean())
    return {"records": rate_distortion_records(vb, prior, xmse), "lossless": {"rate": bpd, "distortion": 0.0},
            "bpd": bpd}


def vlb_estimator_noise(vb: list[float], uniform_prob: float = 0.001) -> dict:
    """How noisy a one-sample estimate of L_vlb = sum_t L_t is, from the choice of t alone (IDDPM sec. 3.3).

    vb [T]: mean terms L_t (bits/dim). Training estimates L_vlb by L_t / p(t) with t ~ p. Over the
    draw of t (the terms' own noise within a t aside), its relative standard deviation is
        sqrt(sum_t L_t^2 / p(t) - L_vlb^2) / L_vlb,
    for uniform p(t) = 1/T and for IDDPM's importance sampling p(t) ~ sqrt(E[L_t^2]), taken as
    p(t) ~ L_t mixed with `uniform_prob` of the uniform distribution (fastddpm.train's sampler).
    Returns {"uniform": ..., "importance": ..., "L_vlb": ...}.
    """
    T = len(vb)
    total = float(sum(vb))
    if total <= 0:
        raise ValueError("the terms must have a positive sum")

    def rel_std(p):
        var = sum(m * m / q for m, q in zip(vb, p) if m != 0) - total * total  # a t never drawn adds 0 if L_t = 0
        return math.sqrt(max(var, 0.0)) / total

    importance = [(1.0 - uniform_prob) * max(m, 0.0) / total + uniform_prob / T for m in vb]
    return {"uniform": rel_std([1.0 / T] * T), "importance": rel_std(importance), "L_vlb": total}


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


def _checked_bpd(request: TermsRequest, default_out: str) -> tuple[dict, str]:
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
                                     progress=request.progress))
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
    result["terms_request"] = asdict(request)
    _write_json(out, result)
    print(f"wrote {out} ({len(result['terms'])} terms L_0 .. L_{result['T']})")
    if request.plot is not None:
        from .plots import plot_vlb_terms

        plot_vlb_terms(result["terms"], request.plot,
                       title=f"VLB terms, {Path(str(request.checkpoint)).name} ({result['images']} images)")
        print(f"wrote {request.plot}")
    return result


def evaluate_rate_distortion(request: TermsRequest) -> dict:
    """`eval rate-distortion`: {"records": [{"t", "rate", "distortion"}] for t = 0..T-1, "lossless",
    "bpd", ...} written to request.out (default rate_distortion.json), plus DDPM Fig. 5 when plotting."""
    return _locked(request, "rate_distortion.json", _rate_distortion)


def _rate_distortion(request: TermsRequest) -> dict:
    result, out = _checked_bpd(request, "rate_distortion.json")
    pt = result["per_timestep"]
    rd = {"records": rate_distortion_records(pt["vb"], result["prior_bpd"], pt["xstart_mse"]),
          "lossless": {"rate": result["bpd"], "distortion": 0.0}, "bpd": result["bpd"],
          "bpd_stderr": result["bpd_stderr"], "prior_bpd": result["prior_bpd"], "images": result["images"],
          "data": result["data"], "checkpoint": result["checkpoint"], "T": result["T"],
          "seconds": result["seconds"], "request": asdict(request)}
    _write_json(out, rd)
    print(f"wrote {out} ({len(rd['records'])} records)")
    if request.plot is not None:
        from .plots import plot_rate_distortion

        plot_rate_distortion(rd["records"], request.plot,
                             title=f"Rate-distortion, {Path(str(request.checkpoint)).name} ({rd['images']} images)")
        print(f"wrote {request.plot}")
    return rd
