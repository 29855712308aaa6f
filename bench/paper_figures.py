"""DDPM's sampling figures, redrawn with a digits checkpoint (PNG files for people).

    python bench/paper_figures.py [--checkpoint digits] [--out docs/replication] [--seed 0]

progressive.png   progressive generation (DDPM sec. 4.4, Fig. 6): each row is one sample; the
                  columns are the model's prediction of x_0 from x_t as the reverse process goes
                  from t = T-1 to t = 0 (fastddpm.sampling.sample with callback=).
shared_xt.png     samples that share x_t (DDPM Fig. 7): a held-out digit x_0 is noised to x_t with
                  one fixed eps, for several t; each row shows x_0, x_t, and six draws from
                  p(x_0 | x_t) (the reverse process from step t with six different noise streams).
                  At small t the draws keep the digit; at large t only coarse traits survive.
interpolation.png interpolation in the latent at step t (DDPM sec. 4.3, Fig. 8/9): two held-out
                  digits are noised with the same eps, the latents mixed with lambda = 0 .. 1, and
                  decoded by the reverse process (fastddpm.sampling.interpolate). Rows: t. t = 0 is
                  close to pixel-space blending; larger t gives plausible digits in between.

All noise is seeded; the full T = 1000 steps are used throughout (a few thousand forwards of
the tiny U-Net on batches of at most 12: about a minute on one CPU core).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

# the timesteps shown, as fractions of T (at T = 1000: t = 999, 900, ..., 25, 0 and so on)
PROGRESSIVE_T = (0.999, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.025, 0.0)
SHARED_T = (0.1, 0.25, 0.5, 0.75, 0.9)
INTERP_T = (0.0, 0.1, 0.25, 0.5, 0.75)
LAMBDAS = np.linspace(0.0, 1.0, 9)


def _at(fractions, T: int) -> list[int]:
    """Timesteps round(f * T) for fractions f, within 0..T-1 (duplicates dropped, order kept)."""
    return list(dict.fromkeys(min(T - 1, round(f * T)) for f in fractions))


def _uint8(x: torch.Tensor) -> np.ndarray:
    from fastddpm.images import to_uint8

    return to_uint8(x)[..., 0]  # [B, H, W]


def progressive(model, diffusion, path, n: int = 8, seed: int = 0) -> None:
    """DDPM Fig. 6: predicted x_0 over t for n samples (rows), t in PROGRESSIVE_T * T (columns)."""
    from fastddpm.plots import plot_image_rows
    from fastddpm.sampling import sample

    seen, shown = {}, _at(PROGRESSIVE_T, diffusion.num_timesteps)

    def keep(state):
        if state["t"] in shown:
            seen[state["t"]] = _uint8(state["pred_x0"])

    sample(model, diffusion, (n, 1, 8, 8), seed=seed, callback=keep)
    rows = [np.stack([seen[t][i] for t in shown]) for i in range(n)]
    plot_image_rows(rows, path, [f"sample {i}" for i in range(n)], [str(t) for t in shown],
                    title="Progressive generation: predicted x_0 at t (DDPM Fig. 6)")


def shared_xt(model, diffusion, x0: torch.Tensor, path, draws: int = 6, seed: int = 0) -> None:
    """DDPM Fig. 7: x_0, x_t and `draws` samples of p(x_0 | x_t) for each t in SHARED_T * T (rows)."""
    from fastddpm.noise import XT_STEP, noise
    from fastddpm.plots import plot_image_rows
    from fastddpm.sampling import denoise_loop

    eps = noise(seed + 1, XT_STEP, (1,) + tuple(x0.shape))
    rows, shown = [], _at(SHARED_T, diffusion.num_timesteps)
    for t in shown:
        xt = diffusion.q_sample(x0[None], torch.tensor([t]), eps)
        with torch.no_grad():
            out = denoise_loop(model, diffusion, xt.expand(draws, -1, -1, -1).contiguous(), t, seed=seed)
        rows.append(np.concatenate([_uint8(x0[None]), _uint8(xt), _uint8(out.clamp(-1, 1))]))
    plot_image_rows(rows, path, [f"t = {t}" for t in shown], ["x_0", "x_t"] + [f"draw {i}" for i in range(draws)],
                    title="Samples sharing x_t (DDPM Fig. 7)")


def interpolation(model, diffusion, a: torch.Tensor, b: torch.Tensor, path, seed: int = 0) -> None:
    """DDPM Fig. 8: source a, decoded mixes for LAMBDAS, source b; one row per t in INTERP_T * T."""
    from fastddpm.plots import plot_image_rows
    from fastddpm.sampling import interpolate

    rows, shown = [], _at(INTERP_T, diffusion.num_timesteps)
    for t in shown:
        mixed = interpolate(model, diffusion, a, b, t, LAMBDAS.tolist(), seed=seed)
        rows.append(np.concatenate([_uint8(a[None]), _uint8(mixed), _uint8(b[None])]))
    plot_image_rows(rows, path, [f"t = {t}" for t in shown],
                    ["x_0"] + [f"{lam:.2f}" for lam in LAMBDAS] + ["x'_0"],
                    title="Interpolation through x_t, lambda = 0 .. 1 (DDPM Fig. 8)")


def make_all(checkpoint: str, out, seed: int = 0) -> dict:
    """Write progressive.png, shared_xt.png and interpolation.png into folder `out`; returns seconds each."""
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.data import load_digits
    from fastddpm.images import from_uint8

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, diffusion, _ = load_checkpoint(checkpoint)
    test = from_uint8(load_digits("test").images)  # [370, 1, 8, 8] in [-1, 1]
    seconds = {}
    for name, job in (("progressive", lambda p: progressive(model, diffusion, p, seed=seed)),
                      ("shared_xt", lambda p: shared_xt(model, diffusion, test[0], p, seed=seed)),
                      ("interpolation", lambda p: interpolation(model, diffusion, test[1], test[2], p, seed=seed))):
        start = time.perf_counter()
        job(out / f"{name}.png")
        seconds[name] = time.perf_counter() - start
        print(f"wrote {out / name}.png ({seconds[name]:.0f} s)", flush=True)
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="digits", help="a digits checkpoint (8x8x1), or a bundled name")
    p.add_argument("--out", default="docs/replication", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from fastddpm.plots import require_matplotlib

    require_matplotlib()
    make_all(a.checkpoint, a.out, a.seed)


if __name__ == "__main__":
    main()
