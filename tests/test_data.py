"""fastddpm.data: the four data sources, the restricted unpickler, the seeded loader, bad input."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fastddpm.data import (CIFAR_RECORD, ImageSet, SeededLoader, load_cifar10, load_dataset, load_digits,
                           load_image_folder, load_npz, parse_data_spec, restricted_load)
from fastddpm.errors import DataError

rng = np.random.default_rng(1234)


def _images(n, size=8, channels=3):
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


# ------------------------------------------------------------------------------------ digits
def test_digits_split_is_fixed_disjoint_and_balanced():
    train, y_train = load_digits("train", with_labels=True)
    test, y_test = load_digits("test", with_labels=True)
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0  # 16 -> 255, 0 -> 0
    # ~20% held out, every class present in both halves
    assert 300 < len(test) < 420
    assert set(np.unique(y_test)) == set(range(10)) and set(np.unique(y_train)) == set(range(10))
    # no image row is in both splits (compare as bytes; a few digits are identical by chance, so
    # check the split masks instead: recomputing gives the same split)
    again = load_digits("test")
    assert np.array_equal(again.images, test.images)
    assert not train.flip_default  # a mirrored digit is not a digit


def test_batch_scales_to_unit_interval_and_flips():
    data = ImageSet(_images(5, size=4, channels=3), "random")
    x = data.batch([0, 3, 4])
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.float32
    ref = torch.from_numpy(data.images[[0, 3, 4]]).permute(0, 3, 1, 2).double() / 127.5 - 1.0
    assert torch.allclose(x.double(), ref, atol=1e-6)
    flipped = data.batch([0, 3, 4], flip=[True, False, True])
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])
    assert torch.equal(flipped[2], x[2].flip(2))
    assert not torch.equal(flipped[0], x[0])  # random data is not symmetric


# ------------------------------------------------------------------------------------ loader
def test_loader_is_seeded_resumable_and_shardable():
    data = ImageSet(_images(23, size=4, channels=1), "random")
    a = SeededLoader(data, batch=6, seed=5, flip=True)
    first = [a.next()[1] for _ in range(4)]
    # an epoch holds floor(23 / 6) = 3 batches, each sample at most once
    epoch0 = np.concatenate(first[:3])
    assert len(np.unique(epoch0)) == 18
    assert a.epoch == 1
    # the same seed gives the same order; another seed another one
    b = SeededLoader(data, batch=6, seed=5, flip=True)
    assert all(np.array_equal(i, b.next()[1]) for i in first)
    c = SeededLoader(data, batch=6, seed=6, flip=True)
    assert not np.array_equal(first[0], c.next()[1])
    # resuming from a state continues exactly, images included
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    r = SeededLoader(data, batch=6, seed=5, flip=True)
    r.load_state_dict(state)
    for x, idx in expected:
        x2, idx2 = r.next()
        assert np.array_equal(idx, idx2) and torch.equal(x, x2)
    # 2 ranks at batch 3 together see the rows of 1 rank at batch 6, flips included
    r0 = SeededLoader(data, batch=3, seed=5, flip=True, rank=0, world_size=2)
    r1 = SeededLoader(data, batch=3, seed=5, flip=True, rank=1, world_size=2)
    one = SeededLoader(data, batch=6, seed=5, flip=True)
    for _ in range(7):
        (x0, i0), (x1, i1), (x, i) = r0.next(), r1.next(), one.next()
        assert np.array_equal(np.concatenate([i0, i1]), i) and torch.equal(torch.cat([x0, x1]), x)


def test_batch_larger_than_data_is_refused():
    data = ImageSet(_images(10, size=4), "ten images")
    with pytest.raises(DataError, match="larger than the 10 images"):
        SeededLoader(data, batch=11)
    with pytest.raises(DataError, match="2 ranks x 6"):
        SeededLoader(data, batch=6, world_size=2)


# ------------------------------------------------------------------------------------ CIFAR-10
def _cifar_arrays(n):
    """n images [N, 32, 32, 3] and labels, as the two official forms store them."""
    images = _images(n, size=32)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
    return images, labels, planes


def _write_cifar(folder, form, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels, planes = _cifar_arrays(n)
        truth[name] = images
        if form == "bin":
            records = np.concatenate([labels[:, None], planes], axis=1)
            assert records.shape[1] == CIFAR_RECORD
            records.tofile(folder / f"{name}.bin")
        else:
            batch = {b"batch_label": b"training batch", b"labels": labels.tolist(), b"data": planes,
                     b"filenames": [b"x.png"] * n}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return truth


@pytest.mark.parametrize("form", ["bin", "py"])
def test_cifar10_both_forms(tmp_path, form):
    sub = "cifar-10-batches-bin" if form == "bin" else "cifar-10-batches-py"
    truth = _write_cifar(tmp_path / sub, form)
    train = load_cifar10(str(tmp_path), "train")  # the parent folder works too
    test = load_dataset(f"cifar10:{tmp_path / sub}", split="test")
    assert train.images.shape == (15, 32, 32, 3)
    assert np.array_equal(train.images, np.concatenate([truth[f"data_batch_{i}"] for i in range(1, 6)]))
    assert np.array_equal(test.images, truth["test_batch"])


class _Evil:
    """Unpickling this runs os.system: what a poisoned CIFAR batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    folder = tmp_path / "cifar"
    _write_cifar(folder, "py")
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"global (posix|os)\.system, which is refused"):
        load_cifar10(str(folder), "train")
    assert not marker.exists()
    # other dangerous globals and protocols are refused too
    for payload in (pickle.dumps({b"data": _Evil(marker)}, protocol=4),
                    b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch " + str(marker).encode() + b"\")'\ntR."):
        (folder / "data_batch_3").write_bytes(payload)
        with pytest.raises(DataError, match="refused"):
            load_cifar10(str(folder), "train")
    assert not marker.exists()
    # the payload is live: the standard unpickler runs it (a harmless `touch` in tmp_path)
    pickle.loads(pickle.dumps(evil, protocol=2))
    assert marker.exists()
    # a plain numpy array still goes through
    (folder / "blob").write_bytes(pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=2))
    assert np.array_equal(restricted_load(folder / "blob")[b"data"], np.arange(6))


def test_cifar10_bad_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no CIFAR-10 train batches"):
        load_cifar10(str(tmp_path))
    _write_cifar(tmp_path / "b", "bin")
    (tmp_path / "b" / "data_batch_2.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a CIFAR-10 binary batch"):
        load_cifar10(str(tmp_path / "b"))
    _write_cifar(tmp_path / "p", "py")
    (tmp_path / "p" / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch"):
        load_cifar10(str(tmp_path / "p"))


# ------------------------------------------------------------------------------ image folders
def test_image_folder_resizes_and_centre_crops(tmp_path):
    from PIL import Image

    # 24 x 8 images: left third red, middle green, right blue -> the 8x8 centre crop is green
    a = np.zeros((8, 24, 3), dtype=np.uint8)
    a[:, :8, 0], a[:, 8:16, 1], a[:, 16:, 2] = 255, 255, 255
    sub = tmp_path / "nested"
    sub.mkdir()
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(sub / "b.PNG")
    Image.fromarray(a).save(tmp_path / "c.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(str(tmp_path), 8)
    assert data.images.shape == (3, 8, 8, 3)
    g = data.images[[0, 2]].astype(int)  # sorted paths: a.png, c.jpg, nested/b.PNG
    assert (g[..., 1] == 255).all() and (g[..., 0] == 0).all() and (g[..., 2] == 0).all()
    jpeg = data.images[1].astype(int)  # lossy, and its chroma bleeds at the edges: the middle is green
    assert (jpeg[:, 2:6, 1] > 200).all() and (jpeg[:, 2:6, 0] < 60).all()
    # resized down: a 16 x 48 picture becomes 4 x 12 and is cropped to its 4 x 4 centre
    small = load_image_folder(str(tmp_path), 4)
    assert small.images.shape == (3, 4, 4, 3) and (small.images[[0, 2], :, :, 1] > 200).all()


def test_greyscale_folder_has_one_channel(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(_images(1, 12, 1)[0, ..., 0], mode="L").save(tmp_path / f"{i}.png")
    data = load_dataset(f"images:{tmp_path}", image_size=8)
    assert data.images.shape == (3, 8, 8, 1)


def test_image_folder_bad_input(tmp_path):
    from PIL import Image

    with pytest.raises(DataError, match="holds no PNG or JPEG"):
        load_image_folder(str(tmp_path), 8)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(str(tmp_path / "missing"), 8)
    Image.fromarray(_images(1, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(_images(1, 9)[0]).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="mixed sizes.*8x8.*9x9"):
        load_image_folder(str(tmp_path), 8)
    (tmp_path / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read image .*b.png"):
        load_image_folder(str(tmp_path), 8)


# ------------------------------------------------------------------------------------ npz
def test_npz(tmp_path):
    images = _images(7, size=8, channels=3)
    np.savez(tmp_path / "ok.npz", arr_0=images)
    assert np.array_equal(load_npz(str(tmp_path / "ok.npz")).images, images)
    np.savez(tmp_path / "other_key.npz", images=images)  # the only key is taken
    assert len(load_dataset(f"npz:{tmp_path / 'other_key.npz'}", image_size=8)) == 7
    with pytest.raises(DataError, match="holds 8x8 images but the model takes 16x16"):
        load_dataset(f"npz:{tmp_path / 'ok.npz'}", image_size=16)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(DataError, match="expected uint8 images"):
        load_npz(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "two.npz", a=images, b=images)
    with pytest.raises(DataError, match="no arr_0"):
        load_npz(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "empty.npz", arr_0=images[:0])
    with pytest.raises(DataError, match="holds no images"):
        load_npz(str(tmp_path / "empty.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="does not exist"):
        load_npz(str(tmp_path / "missing.npz"))


def test_data_spec():
    assert parse_data_spec("digits") == ("digits", None)
    assert parse_data_spec("cifar10:/a/b") == ("cifar10", "/a/b")
    assert parse_data_spec("npz:x:y.npz") == ("npz", "x:y.npz")
    for bad in ("mnist", "images:", "cifar10", "folder:/x"):
        with pytest.raises(DataError, match="unknown data set"):
            parse_data_spec(bad)


# ----------------------------------------------------------------------------- hostile files
def _npz_bytes(tmp_path, compressed=True, **arrays) -> bytes:
    path = tmp_path / "src.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    data = path.read_bytes()
    path.unlink()
    return data


def test_truncated_npz_is_a_data_error(tmp_path):
    data = _npz_bytes(tmp_path, arr_0=_images(20))
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        with pytest.raises(DataError, match="not a readable .npz"):
            load_npz(str(tmp_path / "cut.npz"))


def test_npz_with_a_bad_crc_is_a_data_error(tmp_path):
    images = _images(4)
    data = bytearray(_npz_bytes(tmp_path, compressed=False, arr_0=images))
    at = data.index(images.tobytes()[:64]) + 100  # a byte inside the stored (uncompressed) image data
    data[at] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="BadZipFile: Bad CRC-32"):
        load_npz(str(tmp_path / "crc.npz"))
    # a flipped bit in compressed data: a zlib error or a CRC mismatch, never a traceback
    data = bytearray(_npz_bytes(tmp_path, arr_0=images))
    data[len(data) // 2] ^= 0x55
    (tmp_path / "deflate.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(str(tmp_path / "deflate.npz"))


def test_npy_given_as_npz_is_named(tmp_path):
    np.save(tmp_path / "images.npy", _images(3))
    with pytest.raises(DataError, match=r"is a \.npy file, not an \.npz archive"):
        load_npz(str(tmp_path / "images.npy"))
    with pytest.raises(DataError, match=r"is a \.npy file"):
        load_dataset(f"npz:{tmp_path / 'images.npy'}")


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 0, 0, 3), np.uint8), "zero-size images"),
    (np.zeros((2, 8, 8, 3), np.float32), "expected uint8 images.*float32"),
    (np.zeros((2, 8, 8), np.uint8), r"expected uint8 images.*\[2, 8, 8\]"),
    (np.zeros((2, 8, 8, 5), np.uint8), "C = 1 or 3"),
    (np.array([None, 1], dtype=object), "expected uint8 images.*object"),
    (np.zeros((2, 8, 6, 1), np.uint8), "only square images"),
])
def test_npz_with_wrong_images_is_named(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", arr_0=array)
    with pytest.raises(DataError, match=message):
        load_npz(str(tmp_path / "x.npz"))


def test_npz_header_that_lies_about_its_size_allocates_nothing(tmp_path):
    import io
    import zipfile

    from numpy.lib import format as npy

    member = io.BytesIO()
    # 3 TB of images promised, 10 bytes delivered
    npy.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 1024, 1024, 3)})
    member.write(b"\x00" * 10)
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as z:
        z.writestr("arr_0.npy", member.getvalue())
    with pytest.raises(DataError, match=r"declares \[1000000, 1024, 1024, 3\].*holds 10 bytes"):
        load_npz(str(tmp_path / "liar.npz"))


def test_png_decompression_bombs_are_refused(tmp_path, monkeypatch):
    from PIL import Image

    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused here.
    # A small limit stands in for the 89-megapixel default, so the files stay tiny.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side, name in ((40, "warns"), (50, "raises")):  # 1600 px: the warning band; 2500 px: the error
        folder = tmp_path / name
        folder.mkdir()
        Image.new("L", (side, side)).save(folder / "bomb.png")
        with pytest.raises(DataError, match="bomb.png' is a decompression bomb"):
            load_image_folder(str(folder), 8)


@pytest.mark.parametrize("payload, message", [
    # the admitted callables fed bad arguments: an unknown codec, a compressing codec
    (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x08\x00\x00\x00no-codec\x86R.", "only latin1"),
    (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.", "only latin1"),
    (b"\x80\x02cnumpy\ndtype\nX\x08\x00\x00\x00nonsense\x85R.", "TypeError"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nX\x03\x00\x00\x00abc\x85R.", "TypeError"),
    (b"\x80\x02cnumpy\nndarray\nJ\xff\xff\xff\xff\x85R.", "ValueError"),  # a negative dimension
    (b"\x80\x02}q\x00h\x05.", "KeyError|UnpicklingError"),  # a memo key that was never stored
])
def test_restricted_unpickler_turns_every_error_into_a_data_error(tmp_path, payload, message):
    (tmp_path / "batch").write_bytes(payload)
    with pytest.raises(DataError, match=message):
        restricted_load(tmp_path / "batch")


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(DataError, match="is not a file"):
        load_npz(str(tmp_path / "pipe.npz"))
