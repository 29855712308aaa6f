"""Sample quality: FID, Inception Score and KID of generated images against a reference set.

    FID  (Heusel et al. 2017, eq. 6)   ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the
                                      2048-d pool features of the Inception network
    IS   (Salimans et al. 2016)       exp E_x KL(p(y|x) || p(y)) over its 1008 logits, per split
    KID  (Binkowski et al. 2018)      unbiased MMD^2 with the kernel (x.y / d + 1)^3, per subset

The Inception network is torch-fidelity's port of the TensorFlow graph the DDPM paper's FID
(3.17 on CIFAR-10) and most published FIDs were computed with ("inception-2015-12-05"),
including TensorFlow 1's bilinear resize to 299 x 299, so numbers compare with the papers.
torch-fidelity is maintained and its weights are a plain state dict, which we read with
torch.load(weights_only=True); clean-fid's default network is a TorchScript archive (code in a
file) and its "clean" resize gives different numbers than the TF FID that DDPM reports.

torch-fidelity's package __init__ imports every feature extractor, some of which need
torchvision, which must not be installed beside our torch (it pins another torch). Its
Inception module and the helpers it uses import no torchvision, so when the package import
fails for that reason we import just that module (see `_inception_class`). The statistics
below follow torch-fidelity's metric_fid/metric_isc/metric_kid exactly (same estimators, the
same seed 2020 for the IS shuffle and the KID subsets); those modules import torchvision.

The Inception weights never come from the network here: give the file
(weights-inception-2015-12-05-6726825d.pth) with `inception_weights`, or put it where
torch.hub keeps checkpoints, where torch-fidelity itself caches it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError, FastDDPMError
from .files import atomic_write, atomic_write_bytes, check_output_file, open_output, refuse_overwriting_inputs
from .paths import check_path_length
from .run_folder import output_file_lock

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries the start of its SHA-256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
METRICS = ("fid", "is", "kid")
RNG_SEED = 2020  # torch-fidelity's rng_seed: IS shuffle and KID subsets
_PLACEHOLDER = "__fastddpm_placeholder__"


@dataclass
class FIDRequest:
    """Everything `fastddpm eval fid` takes (see `fastddpm eval fid --help`)."""

    samples: str | list  # one or more of: .npz (arr_0 uint8 NHWC), image folder, `fastddpm sample` output folder
    ref: str | None = None  # the same kinds, or an .npz of precomputed statistics (mu, sigma)
    inception_weights: str | None = None
    metrics: tuple[str, ...] = METRICS
    batch: int = 64
    device: str = "auto"
    save_ref_stats: str | None = None
    json: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    progress: bool = True


# ------------------------------------------------------------------------------------------- images
class _ImageSource:
    """One image source: an .npz (arr_0, uint8 NHWC or NHW), a folder of image files (searched
    recursively, sorted by path), or a folder holding samples.npz (a `fastddpm sample` output)."""

    def __init__(self, path):
        check_path_length(path, "an image source", DataError)
        self.path = p = Path(path)
        self.array: np.ndarray | None = None
        self.files: list[Path] = []
        self.size: tuple | None = None
        if p.is_dir():
            self.files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not self.files and (p / "samples.npz").is_file():
                p = self.path = p / "samples.npz"
            elif not self.files:
                raise DataError(f"{str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no samples.npz")
        if not self.files:
            self.array = _images_from_npz(p)

    def __len__(self) -> int:
        return len(self.files) if self.files else len(self.array)

    def batches(self, batch: int):
        for start in range(0, len(self), batch):
            if self.array is not None:
                images = self.array[start:start + batch]
            else:
                images = np.stack([self._read(f) for f in self.files[start:start + batch]])
            yield np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images

    def _read(self, f: Path) -> np.ndarray:
        """uint8 [H, W, 3]; 16-bit images scaled to 8 bits, bombs and broken files refused (DataError)."""
        from .images import open_image, to_8bit

        arr = np.asarray(to_8bit(open_image(f), "RGB", f"image {str(f)!r}"))
        self.size = self.size or arr.shape
        if arr.shape != self.size:
            raise DataError(f"images in {str(self.path)!r} differ in size: {str(f)!r} is {arr.shape[1]}x{arr.shape[0]}, "
                            f"{str(self.files[0])!r} {self.size[1]}x{self.size[0]}")
        return arr


class ImageSet:
    """Images from one or more sources (each an .npz, an image folder or a sample output folder),
    read in batches of uint8 [B, H, W, 3], source after source."""

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.sources = [_ImageSource(p) for p in paths]
        self.name = ", ".join(str(s.path) for s in self.sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def batches(self, batch: int):
        """Yield uint8 [B, H, W, 3] arrays of at most `batch` images, in order."""
        for source in self.sources:
            yield from source.batches(batch)


def image_source_files(paths) -> list[Path]:
    """Every file image sources `paths` (as ImageSet takes them) may be read from: an .npz itself, a
    folder's image files and its samples.npz. For refusing an output that would overwrite one."""
    found = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(p)
        try:
            if p.is_dir():
                found += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES]
                found.append(p / "samples.npz")
                continue
        except OSError:
            pass
        found.append(p)
    return found


def _load_npz(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist" if not path.exists() else f"{str(path)!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except MemoryError:
        raise
    # np.load raises what zipfile, zlib and its header parser raise for a damaged file (OSError,
    # ValueError, BadZipFile, tokenize.TokenError, SyntaxError, ...): all mean "not a readable .npz"
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read {str(path)!r} as .npz ({type(e).__name__}: {e})") from None


def _images_from_npz(path: Path) -> np.ndarray:
    arrays = _load_npz(path)
    if "arr_0" in arrays:
        images = arrays["arr_0"]
    elif len(arrays) == 1:
        images = next(iter(arrays.values()))
    else:
        raise DataError(f"{str(path)!r} has arrays {sorted(arrays)}; expected images under 'arr_0' "
                        "(or statistics under 'mu' and 'sigma' for a reference)")
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise DataError(f"{str(path)!r} holds {images.dtype} {list(images.shape)}; expected uint8 images "
                        "[N, H, W, 3] (or [N, H, W, 1]), as `fastddpm sample` writes them")
    return images


def load_statistics(path) -> dict | None:
    """{'mu' [2048], 'sigma' [2048, 2048]} (float64) from an .npz of precomputed FID statistics
    (the TTUR / pytorch-fid layout, as `--save-ref-stats` writes), or None if `path` holds images."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() != ".npz":
        return None
    arrays = _load_npz(p)
    if not {"mu", "sigma"} <= set(arrays):
        return None
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DataError(f"{str(p)!r}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]")
    return {"mu": mu, "sigma": sigma}


def save_statistics(path, stats: dict) -> None:
    """Write {'mu', 'sigma'} as an .npz (the layout `load_statistics` and TTUR's files use), atomically."""
    def write(tmp):
        with open_output(tmp) as f:
            np.savez(f, mu=stats["mu"], sigma=stats["sigma"])
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------- inception
def inception_weights_path(path=None) -> Path:
    """The Inception weights file: `path`, else torch.hub's checkpoint folder; a FastDDPMError saying
    exactly which file is needed when there is none (nothing is downloaded)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FastDDPMError(f"Inception weights {str(p)!r} do not exist; {_WHICH_FILE}")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise FastDDPMError(f"the Inception weights are needed: pass --inception-weights PATH, or put the file at "
                        f"{str(cached)!r}; {_WHICH_FILE}")


_WHICH_FILE = (f"the file is torch-fidelity's {INCEPTION_FILE} (its SHA-256 begins with {INCEPTION_SHA256_PREFIX}), "
               f"downloadable from {INCEPTION_URL}; this command never downloads it")


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_fidelity_module(name: str):
    """torch_fidelity.<name>, importing only what it needs when the package's __init__ cannot run
    (it imports torchvision); sys.modules is left as it was for everything else."""
    try:
        return importlib.import_module(f"torch_fidelity.{name}")
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            raise FastDDPMError("`fastddpm eval fid` needs torch-fidelity: pip install --no-deps 'torch-fidelity>=0.4,<0.5' "
                                "(--no-deps: its torchvision requirement would pull another torch)") from None
        if not (e.name or "").startswith("torchvision"):
            raise
    except (ImportError, RuntimeError, AttributeError, OSError):
        pass  # a torchvision that is installed but does not load beside this torch
    spec = importlib.util.find_spec("torch_fidelity")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # the package, __init__ not run
    try:
        return importlib.import_module(f"torch_fidelity.{name}")
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@functools.lru_cache(maxsize=1)
def _inception_class():
    base = _import_fidelity_module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3

    class Inception(base):
        """torch-fidelity's InceptionV3 whose weights we load (weights_only), not its __init__."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if _PLACEHOLDER in state_dict:  # what __init__ reads: our placeholder, not the weights
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return Inception


def inception_network(weights: dict | None = None) -> torch.nn.Module:
    """torch-fidelity's TF-compatible InceptionV3: uint8 [B, 3, H, W] -> (pool [B, 2048], logits [B, 1008]).

    weights: its state dict (keys 'Conv2d_1a_3x3.conv.weight', ... 'fc.bias'); None leaves
    PyTorch's default initialisation (what tests randomise to make a weights file).
    """
    cls = _inception_class()
    placeholder = io.BytesIO()
    torch.save({_PLACEHOLDER: torch.zeros(0)}, placeholder)
    placeholder.seek(0)
    net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=placeholder)
    if weights is not None:
        own = net.state_dict()
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        shapes = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(weights)
                        if tuple(weights[k].shape) != tuple(own[k].shape))
        problems = [f"{label}: {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", shapes)) if keys]
        if problems:
            raise FastDDPMError(f"not torch-fidelity's InceptionV3 weights ({'; '.join(problems)}); {_WHICH_FILE}")
        net.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
    return net.eval()


def load_inception(path=None, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(network on `device`, info: path, sha256, whether it is the published file)."""
    from .convert import read_weights_file

    p = inception_weights_path(path)
    try:
        weights, _ = read_weights_file(p)
    except FastDDPMError as e:
        raise FastDDPMError(f"{e}; {_WHICH_FILE}") from None
    digest = sha256_of(p)
    official = digest.startswith(INCEPTION_SHA256_PREFIX)
    if not official:
        print(f"fastddpm: warning: {str(p)!r} is not the published {INCEPTION_FILE} (SHA-256 {digest[:8]}...): "
              "scores will not compare with published ones", file=sys.stderr)
    net = inception_network(weights).to(device)
    return net, {"inception_weights": str(p), "inception_sha256": digest, "published_weights": official}


@torch.no_grad()
def inception_features(net: torch.nn.Module, images: ImageSet, batch: int = 64, device="cpu",
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(pool features [N, 2048], unbiased logits [N, 1008]) as float64, for the uint8 images of `images`."""
    pools, logits = [], []
    with tqdm(total=len(images), disable=not progress, desc="inception features", unit="image",
              leave=False) as bar:
        for chunk in images.batches(batch):
            x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).to(device)
            pool, logit = net(x)
            pools.append(pool.double().cpu().numpy())
            logits.append(logit.double().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(pools), np.concatenate(logits)


# --------------------------------------------------------------------------------------- statistics
def fid_statistics(features: np.ndarray) -> dict:
    """{'mu': mean [D], 'sigma': covariance [D, D]} of features [N, D] (unbiased, N - 1)."""
    if len(features) < 2:
        raise DataError("FID needs at least 2 images in each set")
    features = np.asarray(features, dtype=np.float64)
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2 (real and
    non-negative for PSD S1, S2, up to round-off, whose imaginary parts are dropped), as
    torch-fidelity computes it; it needs no matrix square root and is stable for singular S.
    """
    if np.shape(mu1) != np.shape(mu2) or np.shape(sigma1) != np.shape(sigma2):
        raise DataError(f"feature statistics differ in size: {np.shape(mu1)} vs {np.shape(mu2)}")
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = RNG_SEED) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(mean_x KL(p(y|x) || p(y))) (Salimans et al. 2016), with
    p(y|x) = softmax(logits [N, K]) and p(y) the split's mean; images shuffled with `seed` first."""
    N = len(logits)
    if not 1 <= splits <= N:
        raise DataError(f"the Inception Score needs 1 <= splits <= the number of images ({N}), got {splits}")
    x = torch.from_numpy(np.asarray(logits, np.float64)[np.random.RandomState(seed).permutation(N)])
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part, log_part = p[i * N // splits:(i + 1) * N // splits], log_p[i * N // splits:(i + 1) * N // splits]
        kl = (part * (log_part - part.mean(dim=0, keepdim=True).log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = len(k_xx)
    return float((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                 - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = RNG_SEED) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets of `subset_size` rows of each feature set of the
    unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018, eq. 4)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if not 2 <= subset_size <= min(len(f1), len(f2)):
        raise DataError(f"KID subsets of {subset_size} need 2 <= size <= the smaller set ({min(len(f1), len(f2))})")
    rng, d = np.random.RandomState(seed), f1.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    mmds = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)]
        y = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds.append(_mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y)))
    return float(np.mean(mmds)), float(np.std(mmds))


# ------------------------------------------------------------------------------------------- the job
def _fidelity_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-fidelity")
    except PackageNotFoundError:
        return "unknown"


def evaluate_fid(request: FIDRequest) -> dict:
    """Run `fastddpm eval fid`: the requested metrics of request.samples against request.ref.

    Returns (and with request.json writes) a dict: fid, inception_score_mean/std, kid_mean/std,
    the set sizes and paths, and which Inception weights were used. KID needs reference
    images; against precomputed statistics it is skipped unless asked for alone.

    The output files (request.json, request.save_ref_stats) are checked before any work and
    locked while it runs (fastddpm.run_folder), so a second evaluation writing the same file
    is refused at once.
    """
    outputs = [(path, flag) for path, flag in ((request.json, "--json"), (request.save_ref_stats, "--save-ref-stats"))
               if path is not None]
    for path, flag in outputs:
        check_output_file(path, flag)
    if len(outputs) == 2 and Path(request.json).resolve() == Path(request.save_ref_stats).resolve():
        raise FastDDPMError("--json and --save-ref-stats name the same file")
    inputs = [(f, "SAMPLES") for f in image_source_files(request.samples)]
    if request.ref is not None:
        inputs += [(f, "--ref") for f in image_source_files(request.ref)]
    refuse_overwriting_inputs(outputs, inputs + [(request.inception_weights, "--inception-weights")])
    with contextlib.ExitStack() as held:
        for path, flag in outputs:
            held.enter_context(output_file_lock(path, flag))
        return _evaluate_fid(request)


def _evaluate_fid(request: FIDRequest) -> dict:
    from .generate import resolve_device

    metrics = tuple(dict.fromkeys(request.metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise FastDDPMError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    for name in ("batch", "kid_subsets", "kid_subset_size", "is_splits"):
        if getattr(request, name) < 1:
            raise FastDDPMError(f"--{name.replace('_', '-')} must be positive, got {getattr(request, name)}")
    needs_ref = "fid" in metrics or "kid" in metrics or request.save_ref_stats
    if needs_ref and request.ref is None:
        raise FastDDPMError("FID and KID compare with a reference set: pass --ref (images, .npz, or statistics .npz)")
    inception_weights_path(request.inception_weights)  # fail before reading any images
    samples = ImageSet(request.samples)
    ref_stats = load_statistics(request.ref) if needs_ref else None
    ref_images = ImageSet(request.ref) if needs_ref and ref_stats is None else None
    if ref_stats is not None and "kid" in metrics and "fid" not in metrics and "is" not in metrics:
        raise FastDDPMError(f"KID needs reference images; {request.ref!r} holds only FID statistics")
    if ref_stats is not None and request.save_ref_stats:
        raise FastDDPMError(f"{request.ref!r} already is a statistics file; --save-ref-stats needs reference images")
    device = resolve_device(request.device)
    net, info = load_inception(request.inception_weights, device)

    pool, logits = inception_features(net, samples, request.batch, device, request.progress)
    result = {"num_samples": len(samples), "samples": samples.name}
    if needs_ref:
        result["ref"] = str(request.ref)
    if ref_images is not None:
        ref_pool, _ = inception_features(net, ref_images, request.batch, device, request.progress)
        result["num_reference"] = len(ref_images)
        ref_stats = fid_statistics(ref_pool)
        if request.save_ref_stats:
            save_statistics(request.save_ref_stats, ref_stats)
            result["saved_ref_stats"] = request.save_ref_stats
    if "fid" in metrics:
        stats = fid_statistics(pool)
        result["fid"] = frechet_distance(stats["mu"], stats["sigma"], ref_stats["mu"], ref_stats["sigma"])
    if "is" in metrics:
        splits = min(request.is_splits, len(samples))
        result["inception_score_mean"], result["inception_score_std"] = inception_score(logits, splits)
        result["is_splits"] = splits
    if "kid" in metrics and ref_images is not None:
        size = min(request.kid_subset_size, len(pool), len(ref_pool))
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(pool, ref_pool, request.kid_subsets, size)
        result["kid_subsets"], result["kid_subset_size"] = request.kid_subsets, size
    elif "kid" in metrics:
        result["kid_skipped"] = "the reference is FID statistics; KID needs reference images"
    result.update(info, feature_extractor=f"torch-fidelity {_fidelity_version()} InceptionV3 (TF inception-2015-12-05)",
                  request=asdict(request))
    if request.json is not None:
        atomic_write_bytes(request.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


def format_result(result: dict) -> str:
    """The lines `fastddpm eval fid` prints."""
    lines = []
    ref = result.get("ref")
    if "fid" in result:
        lines.append(f"FID  {result['fid']:.4f}   ({result['num_samples']} samples vs {ref})")
    if "inception_score_mean" in result:
        lines.append(f"IS   {result['inception_score_mean']:.4f} +- {result['inception_score_std']:.4f}"
                     f"   ({result['is_splits']} splits)")
    if "kid_mean" in result:
        lines.append(f"KID  {result['kid_mean']:.6f} +- {result['kid_std']:.6f}   ({result['kid_subsets']} subsets of "
                     f"{result['kid_subset_size']})")
    if "kid_skipped" in result:
        lines.append(f"KID  skipped: {result['kid_skipped']}")
    if "saved_ref_stats" in result:
        lines.append(f"wrote reference statistics {result['saved_ref_stats']}")
    if result.get("request", {}).get("json"):
        lines.append(f"wrote {result['request']['json']}")
    return "\n".join(lines)
