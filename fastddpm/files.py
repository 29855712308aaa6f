"""Writing files so that nothing is ever half-written, and a full disk is one clear error.

Every output goes to a temporary name of ours beside its target (TMP_PREFIX, so leftovers of a
killed run are recognisable and removed by the next run that holds the folder's lock), is
flushed to disk (fsync), and is then renamed over the target: readers see the old file or the
new one, never a part. A set of files that belong together (samples.npz, grid.png, stats.json)
is written entirely under temporary names first and renamed only when every one is complete
(`publish_together`), so running out of space leaves the previous set as it was.

OSError from a write is turned into a typed error at one place (`output_error`): ENOSPC, EDQUOT
and EFBIG become OutOfSpaceError, anything else (no permission, read-only file system, a file
where a folder should be) OutputError; the command line prints either as one line, exit 2.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from .errors import FastDDPMError, OutOfSpaceError, OutputError

TMP_PREFIX = ".fastddpm-tmp."  # every temporary file we create starts with this
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Messages of libraries that wrap an OSError in their own exception (safetensors' SafetensorError).
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # never an output location


def is_out_of_space(e: BaseException) -> bool:
    """True for an OSError with errno ENOSPC / EDQUOT / EFBIG, or a wrapped one (by its message)."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    return not isinstance(e, OSError) and any(t in str(e) for t in _NO_SPACE_TEXT)


def output_error(e: BaseException, path) -> OutputError:
    """The typed error for a failed write of `path` (the one place OSError is mapped)."""
    if is_out_of_space(e):
        reason = {errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large for this file system"}.get(
            getattr(e, "errno", None), "no space left on device")
        return OutOfSpaceError(f"out of space writing {str(path)!r} ({reason}); nothing was published: free some "
                               "space or choose another output location")
    detail = getattr(e, "strerror", None) or str(e)
    return OutputError(f"cannot write {str(path)!r} ({detail})")


@contextlib.contextmanager
def mapped_write_errors(path):
    """Turn an OSError (or a library's wrapped out-of-space error) raised inside into output_error."""
    try:
        yield
    except FastDDPMError:
        raise
    except OSError as e:
        raise output_error(e, path) from None
    except Exception as e:  # e.g. SafetensorError("... No space left on device ...")
        if is_out_of_space(e):
            raise output_error(e, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path) -> None:
    """Flush a written file's data to disk, so the rename never publishes an empty or short file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder) -> None:
    """Flush a folder's entries (the renames); best effort: some file systems refuse it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(tmp, path) -> None:
    """The publishing step: atomic on POSIX. (Module-level so tests can stop a run right before it.)"""
    os.replace(tmp, path)


def write_temp(path, write) -> str:
    """Call write(tmp) for a new temporary file beside `path`, flush it; returns the temporary name.

    The caller renames it with `_rename` (or removes it). On any error the temporary file is gone.
    """
    path = Path(path)
    with mapped_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.close(fd)
    try:
        with mapped_write_errors(path):
            write(tmp)
            _fsync_path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, write) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, flush it, then rename it over `path`.

    The rename is atomic on POSIX: readers see the old file or the new one, never a part. An
    OSError becomes OutputError / OutOfSpaceError (see `output_error`), and no temporary is left.
    """
    path = Path(path)
    tmp = write_temp(path, write)
    try:
        with mapped_write_errors(path):
            _rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name (see `atomic_write`)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file through our own temporary name (safetensors' `save_file` would make
    its own `.tmpXXXX` file, which a kill leaves behind and no one removes)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def publish_together(folder, writers: dict, last: str | None = None) -> None:
    """Write a set of files in `folder` that belong together: all or none of them are published.

    writers: {file name: write(tmp_path) callable, or bytes}. Every file is written under a
    temporary name first (this is where a full disk fails, leaving the folder as it was); then
    the old `last` file is removed and the new files are renamed into place, `last` at the end,
    so a complete `last` file (e.g. stats.json) always belongs to the files beside it.
    """
    folder = Path(folder)
    order = [n for n in writers if n != last] + ([last] if last in writers else [])
    temps: dict[str, str] = {}
    try:
        for name in order:
            w = writers[name]
            if isinstance(w, (bytes, bytearray, memoryview)):
                data = bytes(w)

                def w(tmp, data=data):
                    with open(tmp, "wb") as f:
                        f.write(data)
            temps[name] = write_temp(folder / name, w)
        with mapped_write_errors(folder):
            if last is not None:
                (folder / last).unlink(missing_ok=True)
            for name in order:
                _rename(temps.pop(name), folder / name)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(folder)


def remove_leftovers(folder, name: str | None = None) -> list[Path]:
    """Delete temporary files of ours left in `folder` by a killed run (only those for output file
    `name`, if given); call it only while holding the lock that covers them (another live run's
    temporaries look the same). Returns what was removed."""
    removed = []
    folder = Path(folder)
    # TMP_PREFIX: this version; ".NAME.safetensors.XXXX.tmp": the temporaries of earlier versions
    patterns = (f"{TMP_PREFIX}*", ".*.safetensors.*.tmp") if name is None else (f"{TMP_PREFIX}{name}.*",)
    for pattern in patterns:
        for p in folder.glob(pattern):
            target = p.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
            if name is None and (folder / f".{target}.fastddpm.lock").exists():
                continue  # an output file under its own lock (fastddpm.run_folder.output_file_lock)
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _check_not_system(p: Path, flag: str) -> None:
    resolved = str(p.resolve())
    for system in SYSTEM_FOLDERS:
        if resolved == system or resolved.startswith(system + "/"):
            raise OutputError(f"{flag} {str(p)!r} is inside {system}, a system folder; choose another location")


def check_output_dir(path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be one, before any work: an empty name, an existing
    file, a system folder (/proc, /sys, /dev). Creating it and testing writes is RunFolder's job."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {str(p)!r} exists and is not a folder")
    _check_not_system(p, flag)
    return p


def check_output_file(path, flag: str = "--out") -> Path:
    """Refuse an output file path before any work: an empty name, an existing folder, a system
    location, or a place where the file cannot be created (tested with a probe file in the
    nearest existing folder above it, which is removed again)."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output file name")
    p = Path(path)
    if p.is_dir() or str(path).endswith(os.sep):
        raise OutputError(f"{flag} {str(p)!r} is a folder; give a file name")
    _check_not_system(p, flag)
    if p.exists() and not p.is_file():
        raise OutputError(f"{flag} {str(p)!r} exists and is not a regular file")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {str(p)!r}: {str(ancestor)!r} is not a folder")
    probe_writable(ancestor, p)
    return p


def probe_writable(folder, named=None) -> None:
    """Create and remove a file in `folder`, so an unwritable place fails before the work; the
    error (OutputError / OutOfSpaceError) names `named` (default the folder)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise output_error(e, named if named is not None else folder) from None


def ensure_writable_dir(path) -> Path:
    """Create folder `path` if needed and prove it writable now, before any long work starts."""
    p = check_output_dir(path, "output folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to output folder {str(p)!r} ({e.strerror or e})") from None
    return p
