"""Writing files so that nothing is ever half-written: temporary name, then rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import FastDDPMError


def atomic_write(path, write) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX: readers see the old file or the new one, never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def ensure_writable_dir(path) -> Path:
    """Create folder `path` if needed and prove it writable now, before any long work starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FastDDPMError(f"cannot write to output folder {str(p)!r} ({e.strerror or e})") from None
    return p
