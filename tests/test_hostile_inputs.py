"""Property tests (hypothesis): whatever a hostile file or flag holds, the CLI answers with one line on
stderr and exit status 2 (no traceback, no file left behind), and the library raises a typed error.

Generated: checkpoint configs (any JSON value in any field of the unet / diffusion / meta sections,
or in place of a whole section), safetensors headers (random dtypes, shapes, offsets, lengths),
.npz files (random bytes, truncations, flipped bytes, arrays of random dtype and shape) and flag
values (out-of-range numbers, junk text) for `fastddpm sample`, `train`, `convert` and `eval bpd`.

The CLI runs in-process (`fastddpm.cli.main(argv)` returns the exit status) and every example gets
a fresh folder. Examples are derandomized (the same every run: no flakiness) and few enough that
the module takes well under a minute. A generated input that happens to be valid may succeed (exit
0); anything else must be exit 2 with one line.
"""
from __future__ import annotations

import copy
import io
import json
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # a test dependency ([test]); where it is missing the module skips, not errors

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fastddpm import GaussianDiffusion, load_checkpoint, make_betas, save_checkpoint  # noqa: E402
from fastddpm.checkpoint import read_checkpoint  # noqa: E402
from fastddpm.cli import main  # noqa: E402
from fastddpm.data import load_dataset  # noqa: E402
from fastddpm.errors import CheckpointError, DataError  # noqa: E402
from fastddpm.unet import UNet, UNetConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# A few thousand parameters, 8x8 images: a valid example samples in milliseconds.
SMALL = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0, num_groups=4)
SAMPLE = ["--steps=1", "--batch=1", "--device=cpu", "--no-progress"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(tensors, config) of a valid small checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "ok.safetensors"
    save_checkpoint(path, UNet(SMALL), GaussianDiffusion(make_betas("linear", 30)), step=1)
    return read_checkpoint(path)


def files_under(folder: Path) -> set:
    return {p for p in folder.rglob("*") if p.is_file()}


def assert_refused_cleanly(argv, capsys, folder: Path, inputs=(), may_succeed=False):
    """main(argv) exits 2 with one line on stderr and leaves no file in `folder` but `inputs`
    (or, with may_succeed, exits 0 because the generated input was valid after all)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 0 and may_succeed:
        return
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("fastddpm: error: ") and "Traceback" not in err, err
    left = files_under(folder) - {Path(p) for p in inputs}
    assert not left, f"left behind: {sorted(map(str, left))}"


# --------------------------------------------------------------------------------- checkpoint configs
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)
# the values that break parsers most often, then any JSON value at all
_HOSTILE = st.sampled_from([None, True, False, 0, -1, -2**40, 2**40, 7, 1.5, float("nan"), float("inf"), "", "8",
                            "16", "-1", "abc", [], {}, [0], [1, "a"], [2**40], {"a": 1}]).map(copy.deepcopy)
hostile_values = st.one_of(_HOSTILE, _HOSTILE, json_values)
unet_keys = st.sampled_from([f for f in SMALL.to_dict()] + ["heads", ""])
diffusion_keys = st.sampled_from(["mean_type", "var_type", "loss_type", "num_timesteps", "schedule"])


@st.composite
def hostile_configs(draw, config):
    config = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["unet"] * 12 + ["diffusion"] * 5 + ["meta", "section", "root"]))
        if where in ("unet", "diffusion") and not isinstance(config[where], dict):
            continue  # the section was replaced by a non-object earlier
        if where == "unet":
            config["unet"][draw(unet_keys)] = draw(hostile_values)
        elif where == "diffusion":
            config["diffusion"][draw(diffusion_keys)] = draw(hostile_values)
        elif where == "meta":
            config["meta"] = draw(hostile_values)
        elif where == "section":
            config[draw(st.sampled_from(["unet", "diffusion"]))] = draw(hostile_values)
        else:
            return draw(hostile_values)  # the whole config is some other JSON value
    return config


@settings(SETTINGS, max_examples=80)
@given(data=st.data())
def test_hostile_checkpoint_configs(parts, capsys, data):
    tensors, config = parts
    bad = data.draw(hostile_configs(config))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "bad.safetensors"
        save_file(tensors, str(path), metadata={"format": "fastddpm", "version": "1", "config": json.dumps(bad)})
        try:
            load_checkpoint(path)
            valid = True
        except CheckpointError as e:
            valid = False
            assert "bad.safetensors" in str(e) and "\n" not in str(e)
        assert_refused_cleanly(["sample", "--checkpoint", path, *SAMPLE, "--out", folder / "out"], capsys, folder,
                               [path], may_succeed=valid)


@SETTINGS
@given(betas=st.one_of(
    st.lists(st.floats(), min_size=1, max_size=40).map(lambda b: torch.tensor(b, dtype=torch.float64)),
    st.floats().map(lambda b: torch.tensor(b, dtype=torch.float64)),  # 0-d
    st.integers(1, 40).map(lambda n: torch.ones(n, dtype=torch.float64)),  # all ones
    st.lists(st.integers(-3, 3), min_size=1, max_size=5).map(torch.tensor),  # integers
    st.integers(1, 3).map(lambda n: torch.zeros(n, 2, dtype=torch.float64)),  # 2-D
))
def test_hostile_betas(parts, capsys, betas):
    tensors, config = parts
    config = {**config, "diffusion": {k: v for k, v in config["diffusion"].items() if k != "num_timesteps"}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "bad.safetensors"
        save_file({**tensors, "diffusion.betas": betas}, str(path),
                  metadata={"format": "fastddpm", "version": "1", "config": json.dumps(config)})
        valid = betas.ndim == 1 and betas.is_floating_point() and bool(((betas > 0) & (betas < 1)).all())
        if not valid:
            with pytest.raises(CheckpointError):
                load_checkpoint(path)
        assert_refused_cleanly(["sample", "--checkpoint", path, *SAMPLE, "--out", folder / "out"], capsys, folder,
                               [path], may_succeed=valid)


# --------------------------------------------------------------------------------- safetensors headers
dtypes = st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I8", "BOOL", "U8", "F8_E4M3", "X9", ""]) | st.text(
    max_size=4)
sizes = st.integers(-2, 2**64 + 1) | st.integers(0, 64)


@st.composite
def hostile_safetensors(draw):
    kind = draw(st.sampled_from(["header", "length", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    entry = {"dtype": draw(dtypes), "shape": draw(st.lists(sizes, max_size=4)),
             "data_offsets": draw(st.lists(sizes, min_size=0, max_size=3))}
    header = {"__metadata__": {"format": "fastddpm", "version": "1",
                               "config": draw(st.sampled_from(['{"unet": {}, "diffusion": {}}', "{", "[]"]))},
              draw(st.sampled_from(["conv_in.weight", "diffusion.betas", ""])): entry}
    raw = json.dumps(header).encode()
    data = draw(st.binary(max_size=64))
    length = len(raw) if kind == "header" else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + data


@SETTINGS
@given(blob=hostile_safetensors())
def test_hostile_safetensors_headers(capsys, blob):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "bad.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        assert_refused_cleanly(["sample", "--checkpoint", path, *SAMPLE, "--out", folder / "out"], capsys, folder,
                               [path])


# --------------------------------------------------------------------------------- npz files
def _npz(arrays: dict, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


# 5x5 images: a readable file still fails, at the model (tiny needs an even size), so no example trains
VALID_NPZ = _npz({"arr_0": np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)}, compressed=True)
array_dtypes = st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.float16, np.uint16])


@st.composite
def hostile_npz(draw):
    kind = draw(st.sampled_from(["bytes", "truncated", "flipped", "array", "npy"]))
    if kind == "bytes":
        return draw(st.sampled_from([b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY", b""])) + draw(st.binary(max_size=80))
    if kind == "truncated":
        return VALID_NPZ[:draw(st.integers(0, len(VALID_NPZ) - 1))]
    if kind == "flipped":
        data = bytearray(VALID_NPZ)
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=5)))
    array = np.zeros(shape, dtype=draw(array_dtypes))
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()
    if len(shape) == 4 and array.dtype == np.uint8 and shape[1] == shape[2] and shape[1] % 2 == 0 and shape[0]:
        array = np.zeros((shape[0], 5, 5, 3), np.uint8)  # a valid image set: make it the odd-sized one
    return _npz({draw(st.sampled_from(["arr_0", "images", "x"])): array}, draw(st.booleans()))


@SETTINGS
@given(blob=hostile_npz())
def test_hostile_npz_files(capsys, blob):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "bad.npz"
        path.write_bytes(blob)
        try:
            load_dataset(f"npz:{path}")
        except DataError:
            pass  # the only error type allowed; a readable file is refused later, by the model
        assert_refused_cleanly(["train", f"--data=npz:{path}", "--model=tiny", f"--out={folder / 'run'}",
                                "--steps=1", "--batch=1", "--device=cpu", "--no-progress"], capsys, folder, [path])


def test_npz_zip_with_a_foreign_member_name(tmp_path, capsys):
    """A zip whose only member is not an .npy: no array to read."""
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("readme.txt", "hello")
    assert_refused_cleanly(["train", f"--data=npz:{tmp_path / 'x.npz'}", "--model=tiny", f"--out={tmp_path / 'r'}",
                            "--steps=1", "--device=cpu"], capsys, tmp_path, [tmp_path / "x.npz"])


# --------------------------------------------------------------------------------- flag values
junk = st.text(max_size=6)
not_int = junk.filter(lambda s: not s.strip().lstrip("+-").isdigit())
non_positive = st.integers(-10**20, 0).map(str)
bad_positive = non_positive | not_int
bad_eta = (st.floats().filter(lambda e: not 0 <= e <= 1) .map(repr)) | not_int.filter(
    lambda s: not _is_unit_float(s))


def _is_unit_float(text: str) -> bool:
    try:
        return 0 <= float(text) <= 1
    except ValueError:
        return False


@st.composite
def hostile_flags(draw, folder: Path):
    """(argv, inputs) with exactly one hostile flag value; every other flag is valid and small."""
    missing = folder / "missing"
    command = draw(st.sampled_from(["sample", "train", "convert", "bpd"]))
    if command == "sample":
        flag, value = draw(st.sampled_from([
            ("--steps", bad_positive | st.integers(1001, 10**7).map(str)),  # T of the default process is 1000
            ("--batch", bad_positive),
            ("--eta", bad_eta),
            ("--sampler", junk.filter(lambda s: s not in ("ancestral", "ddim"))),
            ("--dtype", junk.filter(lambda s: s not in ("fp32", "bf16", "fp16"))),
            ("--backend", junk.filter(lambda s: s not in ("reference", "triton", "graph", "compile", "onnx"))),
            ("--device", junk.filter(lambda s: s not in ("auto", "cpu", "cuda"))),
            ("--model", junk.filter(lambda s: s not in ("cifar10", "tiny"))),
            ("--checkpoint", st.just(str(missing))),
        ]).flatmap(lambda fv: st.tuples(st.just(fv[0]), fv[1] if not isinstance(fv[1], str) else st.just(fv[1]))))
        base = {"--model": "tiny", "--steps": "1", "--batch": "1", "--device": "cpu"}
        if flag == "--checkpoint":
            base.pop("--model")
        base[flag] = value
        return ["sample", *(f"{k}={v}" for k, v in base.items()), "--no-progress", f"--out={folder / 'out'}"]
    if command == "train":
        flag, value = draw(st.sampled_from([
            ("--data", junk.filter(lambda s: s != "digits" and ":" not in s) | st.sampled_from(
                [f"npz:{missing}", f"images:{missing}", f"cifar10:{missing}", "npz:", "foo:bar"])),
            ("--model", junk.filter(lambda s: s not in ("cifar10", "tiny"))),
            ("--steps", bad_positive),
            ("--batch", bad_positive),
            ("--diffusion-steps", bad_positive | st.integers(100_001, 10**15).map(str)),
        ]).flatmap(lambda fv: st.tuples(st.just(fv[0]), fv[1])))
        base = {"--data": "digits", "--model": "tiny", "--steps": "1", "--batch": "1", "--device": "cpu",
                "--out": str(folder / "run")}
        base[flag] = value
        return ["train", *(f"{k}={v}" for k, v in base.items()), "--no-progress"]
    if command == "convert":
        flag, value = draw(st.sampled_from([
            ("--image-size", bad_positive),
            ("--var-type", junk.filter(lambda s: s not in ("fixedlarge", "fixedsmall"))),
            ("src", st.just(str(missing))),
        ]).flatmap(lambda fv: st.tuples(st.just(fv[0]), fv[1])))
        src = value if flag == "src" else str(missing)
        extra = [] if flag == "src" else [f"{flag}={value}"]
        return ["convert", src, f"--out={folder / 'o.safetensors'}", *extra]
    flag, value = draw(st.sampled_from([
        ("--batch", bad_positive), ("--limit", bad_positive),
        ("--data", junk.filter(lambda s: s != "digits" and ":" not in s)),
        ("--checkpoint", st.just(str(missing))),
    ]).flatmap(lambda fv: st.tuples(st.just(fv[0]), fv[1])))
    base = {"--checkpoint": "digits", "--data": "digits", "--limit": "1", "--batch": "1", "--device": "cpu",
            "--out": str(folder / "bpd.json")}
    base[flag] = value
    return ["eval", "bpd", *(f"{k}={v}" for k, v in base.items()), "--no-progress"]


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_hostile_flag_values(capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = data.draw(hostile_flags(folder))
        assert_refused_cleanly(argv, capsys, folder)
