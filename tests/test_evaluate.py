"""`fastddpm eval fid`: FID / IS / KID through torch-fidelity's Inception network.

The published Inception weights cannot be downloaded here, so the tests write a weights file
of their own in the same format (torch.save of the network's state dict) with random He-scaled
convolutions, which keep the 2048-d features O(0.1) instead of vanishing. That checks the
plumbing (image sets, weights loading, the network, the statistics, the CLI), not the numbers
of the real network. Inception runs at 299 x 299 whatever the image size, ~0.5 s per image on
two cores, so the network tests use 5 images per set.

The statistics are checked on synthetic features against closed forms: the Frechet distance
of diagonal Gaussians, scipy's matrix square root, the Inception Score of one-hot predictions
and a direct double-loop MMD^2.
"""
import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from fastddpm.cli import main
from fastddpm.evaluate import (INCEPTION_FILE, INCEPTION_SHA256_PREFIX, INCEPTION_URL, _mmd2_unbiased,
                               frechet_distance, inception_network, inception_score, kernel_inception_distance)
from fastddpm.images import save_npz


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ statistics
def random_spd(d: int, rng) -> np.ndarray:
    a = rng.randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(16), rng.randn(16) + 0.3
    s1, s2 = rng.uniform(0.1, 2.0, 16), rng.uniform(0.1, 2.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_the_matrix_square_root_formula():
    from scipy import linalg

    rng = np.random.RandomState(1)
    mu1, mu2, s1, s2 = rng.randn(24), rng.randn(24), random_spd(24, rng), random_spd(24, rng)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)


def test_inception_score_of_confident_predictions_counts_the_classes():
    # Each image is sure of one of K classes, the classes equally often: IS = exp(log K) = K.
    K, N = 7, 70
    logits = 60.0 * np.eye(K)[np.arange(N) % K]
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(K, rel=1e-9) and std == 0.0
    # Identical predictions carry no information: IS = 1.
    assert inception_score(np.tile(np.random.RandomState(2).randn(1, K), (N, 1)), splits=5)[0] == pytest.approx(1.0)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.RandomState(3)
    x, y = rng.randn(12, 5), rng.randn(12, 5) + 0.5
    k = lambda a, b: (a @ b / 5 + 1.0) ** 3  # noqa: E731
    m = len(x)
    direct = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2.0 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2)
    # A subset of the whole set is the set itself (MMD^2 does not depend on the order).
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=m)
    assert mean == pytest.approx(direct, rel=1e-10) and std < 1e-12
    kxx, kxy, kyy = (x @ x.T / 5 + 1) ** 3, (x @ y.T / 5 + 1) ** 3, (y @ y.T / 5 + 1) ** 3
    assert _mmd2_unbiased(kxx, kxy, kyy) == pytest.approx(direct, rel=1e-10)
    # Same distribution: near 0 (unbiased, so either sign), far below the shifted pair.
    same = kernel_inception_distance(x, rng.randn(12, 5), subsets=20, subset_size=8)[0]
    assert abs(same) < 0.2 * direct


# ------------------------------------------------------------------------------- the network
@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random InceptionV3 state dict in torch-fidelity's format (torch.save of the state dict)."""
    try:
        net = inception_network(None)
    except Exception as e:  # torch-fidelity not installed
        pytest.skip(f"torch-fidelity's Inception is not importable: {e}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.state_dict().items():
            if p.ndim == 4:  # He initialisation keeps ReLU activations O(1) through the 94 convs
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / p[0].numel()))
            elif name == "fc.weight":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def image_set(seed: int, n: int = 5, size: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def write_folder(folder, images):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def test_identical_sets_give_fid_zero_and_shifted_sets_do_not(tmp_path, capsys, weights_file, monkeypatch):
    images = image_set(0)
    (tmp_path / "run").mkdir()
    save_npz(tmp_path / "run" / "samples.npz", images)  # a `fastddpm sample --out run` folder
    write_folder(tmp_path / "ref", images)  # the same pixels as PNG files
    code, out, err = run_cli(["eval", "fid", tmp_path / "run", "--ref", tmp_path / "ref", "--inception-weights",
                              weights_file, "--save-ref-stats", tmp_path / "ref-stats.npz", "--json",
                              tmp_path / "same.json", "--no-progress", "--kid-subsets", "10"], capsys)
    assert code == 0, err
    same = json.loads((tmp_path / "same.json").read_text())
    trace = np.trace(np.load(tmp_path / "ref-stats.npz")["sigma"])
    assert trace > 1e-3  # the features are not degenerate
    assert abs(same["fid"]) < 1e-5 * trace
    assert same["num_samples"] == same["num_reference"] == 5 and same["kid_subset_size"] == 5
    # For identical sets the unbiased MMD^2 is 2 (mean k_ij - mean k_ii) / m, <= 0 for a PSD kernel.
    assert -1e-3 < same["kid_mean"] <= 0.0 and same["inception_score_mean"] >= 1.0
    assert "FID" in out and "IS" in out and "KID" in out
    assert not same["published_weights"] and "not the published" in err

    # Brighter images against the saved statistics; the weights found where torch.hub keeps them.
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).symlink_to(weights_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    brighter = np.clip(images.astype(int) + 40, 0, 255).astype(np.uint8)
    save_npz(tmp_path / "shifted-a.npz", brighter[:3])  # two sampling runs, pooled
    save_npz(tmp_path / "shifted-b.npz", brighter[3:])
    code, out, err = run_cli(["eval", "fid", tmp_path / "shifted-a.npz", tmp_path / "shifted-b.npz", "--ref",
                              tmp_path / "ref-stats.npz",
                              "--json", tmp_path / "shifted.json", "--no-progress"], capsys)
    assert code == 0, err
    shifted = json.loads((tmp_path / "shifted.json").read_text())
    assert shifted["fid"] > 0.1 * trace and shifted["fid"] > 1e4 * abs(same["fid"])
    assert "kid_skipped" in shifted and "KID  skipped" in out
    assert shifted["inception_weights"].endswith(INCEPTION_FILE) and shifted["num_samples"] == 5


def test_the_torchvision_free_import_leaves_no_half_package_behind(weights_file):
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert "torch_fidelity" not in sys.modules
        with pytest.raises(ImportError):
            import torch_fidelity  # noqa: F401
    else:
        pytest.skip("torchvision is importable here: torch-fidelity imports normally")


# ------------------------------------------------------------------------------------ bad input
def test_missing_weights_name_the_file_url_and_hash(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    save_npz(tmp_path / "s.npz", image_set(0, 2))
    code, _, err = run_cli(["eval", "fid", tmp_path / "s.npz", "--ref", tmp_path / "s.npz"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    for text in (INCEPTION_FILE, INCEPTION_URL, INCEPTION_SHA256_PREFIX, "--inception-weights",
                 str(tmp_path / "empty-torch-home" / "hub" / "checkpoints")):
        assert text in err
    code, _, err = run_cli(["eval", "fid", tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception-weights",
                            tmp_path / "nope.pth"], capsys)
    assert code == 2 and "nope.pth" in err and INCEPTION_URL in err


def test_wrong_weights_are_named(tmp_path, capsys, weights_file):
    sd = torch.load(weights_file, weights_only=True)
    sd.pop("Mixed_7c.branch_pool.conv.weight")
    sd["fc.bias"] = torch.zeros(10)
    torch.save(sd, tmp_path / "bad.pth")
    save_npz(tmp_path / "s.npz", image_set(0, 2))
    code, _, err = run_cli(["eval", "fid", tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception-weights",
                            tmp_path / "bad.pth"], capsys)
    assert code == 2 and "Mixed_7c.branch_pool.conv.weight" in err and "fc.bias (10,)" in err


def test_weights_are_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f, protocol=2)
    save_npz(tmp_path / "s.npz", image_set(0, 2))
    code, _, err = run_cli(["eval", "fid", tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception-weights",
                            tmp_path / "evil.pth"], capsys)
    assert code == 2 and "weights_only" in err and not marker.exists()


@pytest.mark.parametrize("case", ["float-npz", "missing-ref", "no-ref", "mixed-sizes", "empty-folder", "bad-metric"])
def test_bad_image_sets_exit_2(tmp_path, capsys, weights_file, case):
    save_npz(tmp_path / "ok.npz", image_set(0, 2))
    samples, ref, extra = tmp_path / "ok.npz", tmp_path / "ok.npz", []
    if case == "float-npz":
        np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
        samples, expected = tmp_path / "f.npz", "uint8"
    elif case == "missing-ref":
        ref, expected = tmp_path / "nope.npz", "does not exist"
    elif case == "no-ref":
        ref, expected = None, "--ref"
    elif case == "mixed-sizes":
        write_folder(tmp_path / "mixed", list(image_set(1, 1, 8)))
        from PIL import Image
        Image.fromarray(image_set(2, 1, 16)[0]).save(tmp_path / "mixed" / "zz.png")
        samples, expected = tmp_path / "mixed", "differ in size"  # found before any Inception forward
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        ref, expected = tmp_path / "empty", "holds no images"
    else:
        extra, expected = ["--metrics", "fid,psnr"], "psnr"
    args = ["eval", "fid", samples, "--inception-weights", weights_file, "--no-progress", *extra]
    if ref is not None:
        args += ["--ref", ref]
    code, _, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]  # besides the unpublished-weights warning
    assert code == 2 and len(errors) == 1 and expected in errors[0], err


def test_output_files_are_checked_before_any_image_is_read(tmp_path, capsys):
    (tmp_path / "a-folder").mkdir()
    missing = str(tmp_path / "no-such-samples.npz")  # would be the error if the outputs were checked late
    for flags, piece in [(["--json", str(tmp_path / "a-folder")], "--json"), (["--json", ""], "--json is empty"),
                         (["--ref", missing, "--save-ref-stats", "/proc/ref.npz"], "system folder"),
                         (["--ref", missing, "--json", str(tmp_path / "x"), "--save-ref-stats", str(tmp_path / "x")],
                          "same file")]:
        assert main(["eval", "fid", missing, "--metrics", "is", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and piece in err, (flags, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]
