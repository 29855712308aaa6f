"""A Fréchet distance for the built-in 8x8 digits ("digits FID"): one number for sample quality.

FID (Heusel et al. 2017) compares two image sets by the Gaussians fitted to their features:

    FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)

Inception features mean nothing on 8x8 grey digits, so the features here are those of a small
classifier trained on the real digits: the 64 ReLU units of the hidden layer of a scikit-learn
MLPClassifier (64 pixels scaled to [0, 1] -> 64 hidden units -> 10 classes; seed 0), trained on
one half ("fit half", 714 images) of the training split (the 80% the diffusion models train on;
fastddpm.data.load_digits). The reference set is the held-out test split (370 images). The
other half of the training split (713 images), which the classifier never saw, is real data
to compare with: features of the images a classifier was fitted on are atypical (it is sure of
them), so those must not stand in for real data. Everything is seeded: the same images give the
same number.

A Fréchet distance estimated from n images is biased upwards by O(1/n), so numbers are only
comparable at the same n. `noise_floor` gives the scale of "as good as real data": the distance
between two disjoint halves of the held-out digits, and between n real training digits of the
half the classifier did not see and the held-out set (what a model that draws exactly the
training distribution scores at the same n).
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import DataError

HIDDEN = 64  # hidden units of the feature network: 64 pixels in, as wide as the input
SEED = 0
VERSION = 2  # changes whenever the features change (results cached under another version are stale)


@functools.lru_cache(maxsize=1)
def feature_network():
    """The MLPClassifier (64 -> 64 ReLU -> 10) trained on the real training digits; cached per process."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from .data import load_digits

    data, labels = load_digits("train", with_labels=True)
    fit = _fit_half(len(labels))
    clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", alpha=1e-3, max_iter=400,
                        random_state=SEED)
    with warnings.catch_warnings():  # 400 epochs reach ~100% training accuracy; the optimiser's
        warnings.simplefilter("ignore", ConvergenceWarning)  # tolerance test is beside the point
        clf.fit(_pixels(data.images[fit]), labels[fit])
    return clf


def _fit_half(n: int) -> np.ndarray:
    """Boolean mask [n] of the training digits the feature network is fitted on (a seeded half)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(SEED).permutation(n)[: (n + 1) // 2]] = True
    return mask


def unseen_training_digits() -> np.ndarray:
    """uint8 [713, 8, 8, 1]: the training digits the feature network was not fitted on."""
    from .data import load_digits

    images = load_digits("train").images
    return images[~_fit_half(len(images))]


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def digits_features(images: np.ndarray) -> np.ndarray:
    """uint8 digits [N, 8, 8, 1] (or [N, 8, 8]) -> float64 features [N, 64]: the hidden ReLU layer."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1:3] != (8, 8) or (
            images.ndim == 4 and images.shape[3] != 1):
        raise DataError(f"digits FID takes uint8 images [N, 8, 8, 1], got {images.dtype} {list(images.shape)}")
    clf = feature_network()
    return np.maximum(_pixels(images) @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def classifier_accuracy() -> float:
    """The feature network's accuracy on the held-out digits (shows the features are meaningful)."""
    from .data import load_digits

    real, labels = load_digits("test", with_labels=True)
    return float((feature_network().predict(_pixels(real.images)) == labels).mean())


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D], in float64.

    tr((S_a^1/2 S_b S_a^1/2)^1/2) equals tr((S_a S_b)^1/2) and is computed from the eigenvalues of
    the symmetric matrix S_a^1/2 S_b S_a^1/2, which avoids scipy.linalg.sqrtm's complex parts.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(f"Fréchet distance needs two feature sets [N >= 2, D] of equal D, got "
                        f"{list(a.shape)} and {list(b.shape)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = _psd_sqrt(s_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s_b @ root), 0.0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)
    return max(fd, 0.0)  # rounding can leave -1e-13 for identical sets


@functools.lru_cache(maxsize=1)
def _reference_features() -> np.ndarray:
    from .data import load_digits

    return digits_features(load_digits("test").images)


def digits_fid(images: np.ndarray) -> float:
    """Digits FID of uint8 samples [N, 8, 8, 1] against the held-out real digits (370 images)."""
    return frechet_distance(digits_features(images), _reference_features())


REPEATS = 8


def noise_floor(n: int, seed: int = SEED) -> dict:
    """What real data scores, to read a digits FID against (deterministic for a seed).

    halves  FD between two disjoint random halves of the held-out digits (185 vs 185 images);
    train   FD between n real training digits the feature network never saw (drawn without
            replacement; at most 713) and the held-out set, the comparison a model's n samples get;
            train_mean and train_std over REPEATS such draws show how much a digits FID at this n
            moves by chance alone.
    """
    rng = np.random.default_rng(seed)
    test = _reference_features()
    order = rng.permutation(len(test))
    half = len(test) // 2
    train = unseen_training_digits()
    size = min(n, len(train))
    draws = [digits_fid(train[rng.choice(len(train), size=size, replace=False)]) for _ in range(REPEATS)]
    return {"halves": frechet_distance(test[order[:half]], test[order[half:2 * half]]), "halves_n": half,
            "train": draws[0], "train_n": size, "train_mean": float(np.mean(draws)),
            "train_std": float(np.std(draws, ddof=1)), "train_repeats": REPEATS}


def load_grey_digits(paths) -> np.ndarray:
    """uint8 [N, 8, 8, 1] from .npz files, image folders or `fastddpm sample` output folders (pooled)."""
    from pathlib import Path

    from .evaluate import ImageSet

    # a `fastddpm sample` folder also holds grid.png: read its samples.npz, not the picture of them
    paths = [Path(p) / "samples.npz" if (Path(p) / "samples.npz").is_file() else p for p in paths]
    images = np.concatenate(list(ImageSet(paths).batches(1024)))  # [N, H, W, 3], grey repeated
    if images.shape[1:3] != (8, 8):
        raise DataError(f"digits FID takes 8x8 images; {', '.join(map(str, paths))} holds "
                        f"{images.shape[2]}x{images.shape[1]}")
    if not (images == images[..., :1]).all():
        raise DataError("digits FID takes grey images; these have colour")
    return images[..., :1]


def evaluate_digits_fid(paths, json_out: str | None = None, versus=None, pool: bool = False) -> dict:
    """`fastddpm eval digits-fid`: the digits FID of each sample set at `paths` (one draw each, e.g.
    one noise seed per file), their mean +- SD beside the noise floor at the same n, and with
    `versus` (as many sets of another setting, matched by position: the same seeds) the paired
    difference paths[i] - versus[i] with its standard error (fastddpm.stats). pool=True scores
    all of `paths` as one set instead. Written to json_out when given (checked before any work:
    not a sample file, and locked while the evaluation runs)."""
    from .evaluate import image_source_files
    from .files import check_output_file, refuse_overwriting_inputs
    from .run_folder import output_file_lock

    versus = list(versus or [])
    if versus and pool:
        raise DataError("--versus pairs sample sets one by one; it cannot be used with --pool")
    if versus and len(versus) != len(paths):
        raise DataError(f"--versus needs as many sample sets as SAMPLES, matched by position (the same noise "
                        f"seeds): got {len(paths)} and {len(versus)}")
    if json_out is None:
        return _digits_fid(paths, None, versus, pool)
    check_output_file(json_out, "--json")
    refuse_overwriting_inputs([(json_out, "--json")],
                              [(f, "SAMPLES") for f in image_source_files(list(paths) + versus)])
    with output_file_lock(json_out, "--json"):
        return _digits_fid(paths, json_out, versus, pool)


def _scores(paths) -> tuple[list[float], int]:
    """The digits FID of each sample set, and their common number of images."""
    scores, sizes = [], []
    for p in paths:
        images = load_grey_digits([p])
        if len(images) < 2:
            raise DataError(f"digits FID needs at least 2 images, got {len(images)} in {str(p)!r}")
        scores.append(digits_fid(images))
        sizes.append(len(images))
    if len(set(sizes)) > 1:
        raise DataError(f"the sample sets hold different numbers of images ({', '.join(map(str, sizes))}): a "
                        "Frechet distance is biased by 1/n, so digits FIDs compare only at equal n")
    return scores, sizes[0]


def _digits_fid(paths, json_out, versus=(), pool=False) -> dict:
    import json

    from .files import atomic_write_bytes
    from .stats import fmt, mean_sd, paired_difference

    if pool:
        images = load_grey_digits(paths)
        if len(images) < 2:
            raise DataError(f"digits FID needs at least 2 images, got {len(images)}")
        scores, n = [digits_fid(images)], len(images)
    else:
        scores, n = _scores(paths)
    result = {"digits_fid": mean_sd(scores)["mean"], "per_set": scores, "summary": mean_sd(scores), "n": int(n),
              "noise_floor": noise_floor(n),
              "features": f"MLP hidden layer ({HIDDEN} ReLU units), feature version {VERSION}",
              "reference": "digits test split (370 images)", "samples": [str(p) for p in paths], "pooled": pool}
    f = result["noise_floor"]
    floor = f"real digits at this n: {f['train_mean']:.3f} +- {f['train_std']:.3f}"
    if len(scores) == 1:
        print(f"digits FID {scores[0]:.3f} over {n} images; {floor}")
    else:
        print(f"digits FID {fmt(result['summary'], 3)} over {len(scores)} sample sets of {n} images; {floor}")
    if versus:
        other, n_other = _scores(versus)
        if n_other != n:
            raise DataError(f"SAMPLES hold {n} images per set but --versus {n_other}: digits FIDs compare only "
                            "at equal n")
        result.update(versus=[str(p) for p in versus], versus_per_set=other, versus_summary=mean_sd(other),
                      paired_difference=paired_difference(scores, other))
        print(f"versus: {fmt(result['versus_summary'], 3)}; paired difference SAMPLES - versus "
              f"{fmt(result['paired_difference'], 3)}")
    if json_out is not None:
        atomic_write_bytes(json_out, (json.dumps(result, indent=1) + "\n").encode())
        print(f"wrote {json_out}")
    return result
