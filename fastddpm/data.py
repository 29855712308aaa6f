"""Training and evaluation data: uint8 images in memory and a seeded, resumable batch loader.

A data set is named by one string (the `--data` flag):
    digits         scikit-learn's handwritten digits (1,797 real 8x8 images, 17 grey levels,
                   shipped with scikit-learn, so available offline); a fixed 80/20 split
    cifar10:DIR    a CIFAR-10 folder in either official form: the binary batches
                   (data_batch_{1..5}.bin, test_batch.bin) or the python batches (data_batch_{1..5},
                   test_batch). The python batches are pickles: they are read only through
                   `RestrictedUnpickler`, which admits numpy's array-reconstruction globals and
                   refuses every other (as torch.load(weights_only=True) does)
    images:DIR     every PNG/JPEG under DIR, resized (shorter side) and centre-cropped to the
                   model's resolution; all images must have the same size
    npz:FILE       uint8 images [N, H, W, C] (C = 1 or 3) under key arr_0 (or the only key)

Images stay uint8 NHWC in memory (`ImageSet.images`); `ImageSet.batch` turns chosen rows into
float32 [B, C, H, W] in [-1, 1] (x / 127.5 - 1), optionally flipped left-right.

`SeededLoader` draws the batches: epoch e visits the samples in the order of a permutation
seeded by (seed, e), each sample with a flip bit drawn with it; a global batch takes the next
G = batch * world_size positions (an epoch's remainder smaller than G is dropped) and rank r
takes rows r*B .. r*B+B-1 of it. Its whole state is (epoch, position), so a resumed run
continues with exactly the batches it would have seen, and 2 ranks at batch B see the same
samples as 1 rank at batch 2B.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .memory import check_data_fits
from .paths import check_path_length

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """uint8 images [N, H, W, C] in memory, with where they came from."""

    images: np.ndarray
    name: str
    flip_default: bool = True  # whether a random left-right flip suits this data (not for digits)

    def __post_init__(self):
        a = self.images
        if a.ndim != 4 or a.dtype != np.uint8 or a.shape[-1] not in (1, 3):
            raise DataError(f"{self.name}: expected uint8 images [N, H, W, C] with C = 1 or 3, "
                            f"got {a.dtype} {list(a.shape)}")
        if a.shape[0] == 0:
            raise DataError(f"{self.name} holds no images")
        if a.shape[1] == 0 or a.shape[2] == 0:
            raise DataError(f"{self.name} holds zero-size images ({a.shape[1]}x{a.shape[2]})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def batch(self, indices, flip=None, device="cpu") -> torch.Tensor:
        """Rows `indices` as float32 [B, C, H, W] in [-1, 1]; rows where `flip` [B] is True are mirrored."""
        idx = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(self.images[idx]).to(device)  # uint8 crosses to the device, 4x fewer bytes
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if flip is not None:
            flip = torch.as_tensor(flip, dtype=torch.bool, device=x.device).reshape(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x.contiguous()


# ----------------------------------------------------------------------------------- the loader
def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (SHA-256, so nearby inputs give unrelated seeds)."""
    digest = hashlib.sha256(",".join(str(int(n)) for n in numbers).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededLoader:
    """Batches of an ImageSet in a seeded order that depends only on (seed, epoch, position).

    batch is the per-rank batch B; the global batch is G = B * world_size. `next()` returns
    (x [B, C, H, W] in [-1, 1], indices [B] into the data set) for this rank.
    """

    def __init__(self, data: ImageSet, batch: int, seed: int = 0, flip: bool = True, rank: int = 0,
                 world_size: int = 1, device="cpu"):
        self.data, self.batch, self.seed, self.flip = data, int(batch), int(seed), bool(flip)
        self.rank, self.world_size, self.device = int(rank), int(world_size), device
        self.global_batch = self.batch * self.world_size
        if self.global_batch > len(data):
            per_rank = f" ({self.world_size} ranks x {self.batch})" if self.world_size > 1 else ""
            raise DataError(f"the batch of {self.global_batch}{per_rank} is larger than the {len(data)} images "
                            f"of {data.name}; use a smaller --batch")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order, self._flips = None, None, None

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0xDA7A))
            self._order = torch.randperm(len(self.data), generator=g).numpy()
            self._flips = (torch.rand(len(self.data), generator=g) < 0.5).numpy()
            self._order_epoch = self.epoch
        return self._order, self._flips

    def next(self) -> tuple[torch.Tensor, np.ndarray]:
        if self.position + self.global_batch > len(self.data):
            self.epoch, self.position = self.epoch + 1, 0
        order, flips = self._epoch_order()
        start = self.position + self.rank * self.batch
        rows = slice(start, start + self.batch)
        self.position += self.global_batch
        indices = order[rows]
        x = self.data.batch(indices, flips[rows] if self.flip else None, device=self.device)
        return x, indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------------- loading
def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """'digits' | 'cifar10:DIR' | 'images:DIR' | 'npz:FILE' -> (kind, path or None)."""
    if spec == "digits":
        return "digits", None
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in ("cifar10", "images", "npz") or not path:
        raise DataError(f"unknown data set {spec!r}; use digits, cifar10:DIR, images:DIR or npz:FILE")
    check_path_length(path, "--data", DataError)
    return kind, path


def data_input_files(spec: str) -> list[Path]:
    """The files the data set `spec` is read from: the .npz file, the images under an image folder,
    the batches of a CIFAR-10 folder; none for digits or a spec that names nothing readable. (What
    an output must not overwrite: fastddpm.files.refuse_overwriting_inputs.)"""
    try:
        kind, path = parse_data_spec(spec)
    except DataError:
        return []
    if kind == "digits":
        return []
    p = Path(path)
    try:
        if kind == "npz":
            return [p]
        if kind == "images":
            return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
        folders = (p, p / "cifar-10-batches-bin", p / "cifar-10-batches-py")
        return [f / n for f in folders for base in CIFAR_TRAIN + CIFAR_TEST for n in (base, base + ".bin")
                if (f / n).exists()]
    except OSError:
        return []


def load_dataset(spec: str, image_size: int | None = None, split: str = "train") -> ImageSet:
    """The data set named by `spec` as an ImageSet.

    image_size: the resolution to resize image folders to (needed for images:DIR); for the
    other kinds, if given, the data's own resolution must equal it.
    split: "train" or "test" (digits: the fixed 80/20 split; cifar10: data_batch_* or
    test_batch; image folders and .npz files have no split and give all their images).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    kind, path = parse_data_spec(spec)
    if kind == "images":
        if image_size is None:
            raise DataError("an image folder needs the model's resolution to resize to")
        return load_image_folder(path, image_size)
    data = {"digits": lambda: load_digits(split), "cifar10": lambda: load_cifar10(path, split),
            "npz": lambda: load_npz(path)}[kind]()
    if image_size is not None and data.image_size != image_size:
        raise DataError(f"{data.name} holds {data.image_size}x{data.image_size} images but the model takes "
                        f"{image_size}x{image_size}")
    return data


def load_dataset_for(spec: str, config, split: str) -> ImageSet:
    """`load_dataset(spec, config.image_size, split)`, refused (DataError) when its channels are not
    the ones the model with U-Net config `config` takes."""
    data = load_dataset(spec, image_size=config.image_size, split=split)
    if data.channels != config.in_channels:
        raise DataError(f"{data.name} has {data.channels} channel(s) but the checkpoint's model takes "
                        f"{config.in_channels}")
    return data


def digits_split(n: int) -> np.ndarray:
    """True for the rows of scikit-learn's digits that form the held-out 20% ("test").

    Chosen by a hash of the row index, so the split is fixed forever and independent of the
    classes (the data set cycles through 0..9, so index arithmetic would correlate with them).
    """
    return np.array([hashlib.sha256(f"digits-{i}".encode()).digest()[0] % 5 == 0 for i in range(n)])


def load_digits(split: str = "train", with_labels: bool = False):
    """scikit-learn's 8x8 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255); optionally also labels [N]."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    keep = digits_split(len(images)) == (split == "test")
    data = ImageSet(images[keep], f"digits ({split} split)", flip_default=False)
    return (data, d.target[keep].astype(np.int64)) if with_labels else data


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {str(p)!r} does not exist")
    if not p.is_dir():
        raise DataError(f"{what} {str(p)!r} is not a folder")
    return p


# --------------------------------------------------------------------------------- CIFAR-10
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_RECORD = 1 + 3 * 32 * 32  # binary form: one label byte, then R, G, B planes of 32x32


def _numpy_globals() -> dict:
    """The globals a pickled numpy array needs, under the module names old and new numpy write."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               # Python 3 pickles of bytes at protocol 2 go through _codecs.encode(text, "latin1")
               ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as a pickle calls it for bytes (protocol 2): latin-1 only. Any other codec
    name in a file (a codec that compresses, an unknown name) is refused, not looked up."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"the pickle asks for _codecs.encode with {encoding!r}; only latin1 is admitted")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that admits only numpy's array-reconstruction globals; any other global
    (os.system, builtins.eval, ...) raises DataError before it is looked up."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self.source!r} is not a CIFAR-10 batch: it asks for the Python global "
                            f"{module}.{name}, which is refused (only numpy arrays are read from pickles)") from None


def restricted_load(path: Path):
    """Unpickle `path` with RestrictedUnpickler; broken or foreign files raise DataError."""
    try:
        data = path.read_bytes()
        return RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except DataError:
        raise
    # The admitted callables (numpy's _reconstruct, dtype, ndarray.__setstate__) can be fed any arguments
    # by a hostile file, and each raises its own type (TypeError, LookupError, MemoryError, ...): every
    # one of them means "not a CIFAR-10 batch", so all of them become a DataError.
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{str(path)!r} is not a readable CIFAR-10 python batch "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _cifar_python_batch(path: Path) -> np.ndarray:
    batch = restricted_load(path)
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{str(path)!r} is not a CIFAR-10 python batch (no uint8 'data' array [N, 3072])")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_binary_batch(path: Path) -> np.ndarray:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataError(f"{str(path)!r} is not a CIFAR-10 binary batch ({raw.size} bytes is not a whole number "
                        f"of {CIFAR_RECORD}-byte records)")
    return raw.reshape(-1, CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load_cifar10(path: str, split: str = "train") -> ImageSet:
    """CIFAR-10's train (50,000) or test (10,000) images as uint8 [N, 32, 32, 3].

    `path` is the folder holding the batches, or its parent (cifar-10-batches-bin/-py inside).
    The binary form is preferred when both are present.
    """
    root = _require_dir(path, "CIFAR-10 folder")
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        binary = [folder / f"{n}.bin" for n in names]
        python = [folder / n for n in names]
        if all(p.is_file() for p in binary):
            arrays = [_cifar_binary_batch(p) for p in binary]
            break
        if all(p.is_file() for p in python):
            arrays = [_cifar_python_batch(p) for p in python]
            break
    else:
        raise DataError(f"{str(root)!r} holds no CIFAR-10 {split} batches (expected {names[0]}.bin ... or the "
                        f"python batches {names[0]} ...)")
    return ImageSet(np.ascontiguousarray(np.concatenate(arrays)), f"CIFAR-10 {split} set in {str(root)!r}")


# ------------------------------------------------------------------------------ image folders
def load_image_folder(path: str, image_size: int) -> ImageSet:
    """Every PNG/JPEG under `path` (recursively), resized so the shorter side is `image_size`
    (bicubic) and centre-cropped to image_size x image_size; uint8 [N, S, S, C].

    C is 1 when every image is greyscale, else 3. All images must share one size: a folder of
    mixed sizes is refused (it is usually a mistake, and cropping would frame them differently).
    16-bit greyscale images are scaled to 8 bits (value / 257, rounded); decompression bombs and
    unreadable files are refused (fastddpm.images.open_image).
    """
    from .images import GREY_MODES, open_image, to_8bit

    root = _require_dir(path, "image folder")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise DataError(f"cannot list image folder {str(root)!r} ({e.strerror or e})") from None
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no PNG or JPEG images")
    opened, first_size = [], None
    for f in files:
        img = open_image(f)
        if first_size is None:
            first_size = (img.size, f)
        elif img.size != first_size[0]:
            (w0, h0), f0 = first_size
            raise DataError(f"images of mixed sizes in {str(root)!r}: {f0.name} is {w0}x{h0} but {f.name} is "
                            f"{img.size[0]}x{img.size[1]}; make them one size first")
        opened.append((img, f))
    grey = all(im.mode in GREY_MODES for im, _ in opened)
    out = np.stack([_resize_crop(to_8bit(im, "L" if grey else "RGB", f"image {str(f)!r}"), image_size)
                    for im, f in opened])
    if grey:
        out = out[..., None]
    return ImageSet(out, f"image folder {str(root)!r}")


def _resize_crop(img, size: int) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


# --------------------------------------------------------------------------------------- npz
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
_CHUNK = 1 << 24  # read a member in 16 MiB pieces, straight into the array


def load_npz(path: str) -> ImageSet:
    """uint8 images [N, H, W, C] (H == W, C = 1 or 3) from key arr_0 (or the file's only key).

    Read member by member with zipfile, not np.load: the array header (dtype, shape) is
    checked against the member's size before any memory is allocated, a .npy file or other
    non-zip file is named as such, and a truncated or corrupt archive (bad zip, bad CRC, bad
    deflate stream) is a DataError. Nothing is unpickled.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {str(p)!r} does not exist" if not p.exists() else f"{str(p)!r} is not a file")
    source = repr(str(p))
    try:
        with open(p, "rb") as f:
            head = f.read(6)
        if head == NPY_MAGIC:
            raise DataError(f"{source} is a .npy file, not an .npz archive; write one with "
                            "np.savez(FILE, arr_0=images)")
        if head[:4] not in ZIP_MAGIC:
            raise DataError(f"{source} is not a readable .npz file (not a zip archive)")
        images = _read_npz_images(p, source)
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            MemoryError, OverflowError) as e:  # RuntimeError: an encrypted member; NotImplementedError: its method
        raise DataError(f"{source} is not a readable .npz file ({type(e).__name__}: {_first_line(e)})") from None
    return ImageSet(images, f"npz file {source}")


def _read_npz_images(p: Path, source: str) -> np.ndarray:
    from numpy.lib import format as npy

    with zipfile.ZipFile(p) as z:
        keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        key = "arr_0" if "arr_0" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise DataError(f"{source} has no arr_0 array (keys: {', '.join(keys) or 'none'})")
        info = z.getinfo(key + ".npy")
        with z.open(info) as f:
            version = npy.read_magic(f)
            readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
            if version not in readers:
                raise DataError(f"{source}: {key} is .npy format version {version}; fastddpm reads 1.0 and 2.0")
            try:
                shape, fortran, dtype = readers[version](f)
            # numpy's header parser raises what its tokenizer and literal_eval raise (TokenError,
            # SyntaxError, ValueError, ...) for a damaged header: all mean "not an array header"
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{source}: {key} has a damaged .npy header ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
            if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
                raise DataError(f"{source}: expected uint8 images [N, H, W, C] with C = 1 or 3 under {key}, got "
                                f"{dtype} {list(shape)}")
            if shape[1] != shape[2]:
                raise DataError(f"{source} holds {shape[1]}x{shape[2]} images; only square images are supported")
            nbytes = int(np.prod(shape, dtype=np.int64))
            if nbytes != info.file_size - f.tell():
                raise DataError(f"{source}: {key} declares {list(shape)} ({nbytes} bytes) but its member holds "
                                f"{info.file_size - f.tell()} bytes of data")
            check_data_fits(nbytes, f"the images of {source}")  # a small file may inflate to gigabytes
            out = np.empty(nbytes, dtype=np.uint8)
            view, got = memoryview(out), 0
            while got < nbytes:
                n = f.readinto(view[got:got + _CHUNK])
                if not n:
                    raise DataError(f"{source} is truncated ({got} of {nbytes} bytes of {key})")
                got += n
            f.read(1)  # reaching the end makes zipfile compare the CRC-32
    return np.ascontiguousarray(out.reshape(shape, order="F" if fortran else "C"))
