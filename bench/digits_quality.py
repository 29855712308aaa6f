"""How good is the bundled digits model? A classifier trained on real digits judges its samples.

    python bench/digits_quality.py [--checkpoint digits] [--samples 1000] [--steps 100]
                                   [--sampler ancestral] [--seed 0] [--json FILE]

The judge: scikit-learn's LogisticRegression on the 64 pixels of the real digits' training
split (the same 80% the model was trained on). For the model's samples and, side by side, for
the held-out 20% of real digits it reports
    confident   the share the judge classifies with probability >= 0.9
    histogram   how many fall in each class 0..9 (argmax), as shares
    accuracy    (real digits only) the judge's accuracy, to show the judge is sound
A model that draws noise, blurs or collapses onto a few classes scores low on the first two.
tests/test_assets.py holds a floor on these figures for the bundled weights.
"""
from __future__ import annotations

import argparse
import functools
import json

import numpy as np

CONFIDENCE = 0.9


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """LogisticRegression on real digits (training split), pixels scaled to [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    from fastddpm.data import load_digits

    data, labels = load_digits("train", with_labels=True)
    clf = LogisticRegression(max_iter=5000, C=1.0)
    clf.fit(_features(data.images), labels)
    return clf


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def judge(images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Judge uint8 images [N, 8, 8, 1]: confident share, class histogram (shares), accuracy if labels."""
    clf = digits_classifier()
    proba = clf.predict_proba(_features(images))
    pred = clf.classes_[proba.argmax(axis=1)]
    result = {
        "n": int(len(images)),
        "confident": float((proba.max(axis=1) >= CONFIDENCE).mean()),
        "histogram": (np.bincount(pred, minlength=10) / len(images)).tolist(),
    }
    if labels is not None:
        result["accuracy"] = float((pred == labels).mean())
    return result


def sample_digits(checkpoint: str = "digits", n: int = 1000, steps: int | None = 100, sampler: str = "ancestral",
                  seed: int = 0, batch: int = 500) -> np.ndarray:
    """n samples of the checkpoint as uint8 [n, 8, 8, 1] (the same stream `fastddpm sample` draws)."""
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.generate import respaced_for
    from fastddpm.images import to_uint8
    from fastddpm.sampling import sample

    model, diffusion, _ = load_checkpoint(checkpoint)
    process = respaced_for(diffusion, steps, sampler)
    c = model.config
    out = []
    for lo in range(0, n, batch):
        b = min(batch, n - lo)
        x = sample(model, process, (b, c.in_channels, c.image_size, c.image_size), seed=seed, sampler=sampler,
                   sample_offset=lo)
        out.append(to_uint8(x))
    return np.concatenate(out)


def report(checkpoint="digits", n=1000, steps=100, sampler="ancestral", seed=0) -> dict:
    from fastddpm.data import load_digits

    real, labels = load_digits("test", with_labels=True)
    return {"samples": judge(sample_digits(checkpoint, n, steps, sampler, seed)),
            "real_heldout": judge(real.images, labels),
            "checkpoint": checkpoint, "steps": steps, "sampler": sampler, "seed": seed}


def format_report(r: dict) -> str:
    s, h = r["samples"], r["real_heldout"]
    lines = [f"{'':<22}{'samples':>10}{'real (held out)':>18}",
             f"{'images':<22}{s['n']:>10}{h['n']:>18}",
             f"{'confident (p >= 0.9)':<22}{s['confident']:>10.3f}{h['confident']:>18.3f}",
             f"{'judge accuracy':<22}{'':>10}{h['accuracy']:>18.3f}"]
    for k in range(10):
        lines.append(f"{'class ' + str(k):<22}{s['histogram'][k]:>10.3f}{h['histogram'][k]:>18.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = report(a.checkpoint, a.samples, a.steps, a.sampler, a.seed)
    print(f"{a.checkpoint}: {a.samples} samples, {a.sampler}, {a.steps} steps, seed {a.seed}")
    print(format_report(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
