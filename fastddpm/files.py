"""Writing files so that nothing is ever half-written, and a full disk is one clear error.

Every output goes to a temporary name of ours beside its target (TMP_PREFIX, so leftovers of a
killed run are recognisable and removed by the next run that holds the folder's lock), is
flushed to disk (fsync), and is then renamed over the target: readers see the old file or the
new one, never a part. A set of files that belong together (samples.npz, grid.png, stats.json)
is written entirely under temporary names first and renamed only when every one is complete
(`publish_together`), so running out of space leaves the previous set as it was; the set may
span subfolders (a diffusers pipeline: model_index.json, unet/..., scheduler/...), and folders it
had to create are removed again when it is not published.

Output paths are checked before any work (`check_output_file`, `check_output_dir`,
`check_output_folder`): names the kernel would refuse (a component over 255 bytes, a path over
4095), system folders, a file where a folder must be; and `check_not_an_input` refuses an output
that is, or holds, a file the same command reads.

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
NAME_MAX, PATH_MAX = 255, 4096  # Linux: bytes in one file name; bytes in a path, its closing NUL included


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

    writers: {file name: write(tmp_path) callable, or bytes}. A name may lead into subfolders
    ("unet/config.json"); it may not leave `folder` (no absolute names, no ".."). Every file is
    written under a temporary name beside its target first (this is where a full disk fails,
    leaving everything as it was, and removing again the folders this call created); then the
    old `last` file is removed and the new files are renamed into place, `last` at the end, so a
    complete `last` file (e.g. stats.json, model_index.json) always belongs to the files beside it.
    A target that exists as a folder is refused (OutputError) before anything is written.
    """
    folder = Path(folder)
    order = [n for n in writers if n != last] + ([last] if last in writers else [])
    targets = {name: _target_in(folder, name) for name in order}
    folders = sorted({t.parent for t in targets.values()}, key=lambda f: len(f.parts))
    created: list[Path] = []
    temps: dict[str, str] = {}
    published = False
    with mapped_write_errors(folder):
        for target in targets.values():
            _refuse_folder_target(target)
    try:
        for f in folders:
            with mapped_write_errors(f):
                created += make_dirs(f, "output folder")
        for name in order:
            temps[name] = write_temp(targets[name], _writer(writers[name]))
        with mapped_write_errors(folder):
            if last is not None:
                targets[last].unlink(missing_ok=True)
            for name in order:
                _rename(temps.pop(name), targets[name])
        published = True
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        if not published:
            remove_empty_dirs(created)
    for f in {*folders, *(c.parent for c in created)}:  # the renames, and the entries of new folders
        _fsync_dir(f)


def _target_in(folder: Path, name: str) -> Path:
    """folder / name for a relative name that stays inside folder (a programming error otherwise)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"publish_together: {name!r} is not a file name inside the folder")
    return folder / rel


def _refuse_folder_target(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: a folder of that name is in the way")


def _writer(w):
    """A write(tmp) callable for a writers entry: bytes are written as they are."""
    if not isinstance(w, (bytes, bytearray, memoryview)):
        return w
    data = bytes(w)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def make_dirs(path, flag: str = "--out") -> list[Path]:
    """mkdir -p `path`; returns the folders that did not exist before, outermost first. A file where a
    folder must be is an OutputError naming it; on a failed mkdir the folders made so far are removed."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(p)!r} is not a folder")
    missing.reverse()
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            remove_empty_dirs(missing[:missing.index(folder)])
            raise output_error(e, path) from None
    return missing


def remove_empty_dirs(created: list) -> None:
    """Remove folders made by `make_dirs` (outermost first in `created`), innermost first, stopping at
    the first one that is not empty (something else was put there meanwhile)."""
    for folder in reversed(created):
        try:
            Path(folder).rmdir()
        except OSError:
            break


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


def check_path_names(path, flag: str = "--out") -> None:
    """Refuse a path the kernel would refuse with ENAMETOOLONG (OutputError), before any call that
    would raise it: a file or folder name over NAME_MAX (255) bytes, or a path of PATH_MAX (4096)
    bytes or more (the limit counts the closing NUL)."""
    raw = os.fsencode(str(path))
    if len(raw) >= PATH_MAX:
        raise OutputError(f"{flag} is a path of {len(raw)} bytes ({str(path)[:40]!r}...); paths are limited to "
                          f"{PATH_MAX - 1} bytes")
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        name = os.fsdecode(longest)
        raise OutputError(f"{flag} {str(path)[:60]!r}... holds a name of {len(longest)} bytes ({name[:24]!r}...); "
                          f"file and folder names are limited to {NAME_MAX} bytes")


def check_not_an_input(out, inputs, flag: str = "--out") -> None:
    """Refuse (OutputError naming both) an output that would destroy an input, before any work: `out`
    the same file as an input (same device and inode: hard and symbolic links are caught), the same
    resolved path, or a folder that holds an input at any depth (writing into it could replace it).
    inputs: the files and folders the command reads."""
    out_path = Path(out)
    out_id, out_real = _file_id(out_path), os.path.realpath(out_path)
    for src in inputs:
        src_id, src_real = _file_id(Path(src)), os.path.realpath(src)
        if (out_id is not None and out_id == src_id) or out_real == src_real:
            raise OutputError(f"{flag} {str(out)!r} is the input {str(src)!r}; write the result somewhere else")
        if src_real.startswith(out_real.rstrip(os.sep) + os.sep):
            raise OutputError(f"{flag} {str(out)!r} holds the input {str(src)!r}; write the result somewhere else")


def _file_id(p: Path):
    """(device, inode) of an existing path, else None."""
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_not_system(p: Path, flag: str) -> None:
    resolved = str(p.resolve())
    for system in SYSTEM_FOLDERS:
        if resolved == system or resolved.startswith(system + "/"):
            raise OutputError(f"{flag} {str(p)!r} is inside {system}, a system folder; choose another location")


def check_output_dir(path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be one, before any work: an empty name, a name too long
    (check_path_names), an existing file, a system folder (/proc, /sys, /dev). Creating it and
    testing writes is RunFolder's job."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output folder")
    check_path_names(path, flag)
    p = Path(path)
    with mapped_write_errors(p):
        if p.exists() and not p.is_dir():
            raise OutputError(f"{flag} {str(p)!r} exists and is not a folder")
        _check_not_system(p, flag)
    return p


def check_output_folder(path, flag: str = "--out") -> Path:
    """check_output_dir, and the folder can be made and written: the nearest existing folder above
    (or at) `path` is a folder, and a probe file can be created there (removed again). Nothing is
    created; the writer makes the folder (publish_together)."""
    p = check_output_dir(path, flag)
    with mapped_write_errors(p):
        ancestor = _nearest_existing(p)
        if not ancestor.is_dir():
            raise OutputError(f"{flag} {str(p)!r}: {str(ancestor)!r} is not a folder")
    probe_writable(ancestor, p)
    return p


def check_output_file(path, flag: str = "--out") -> Path:
    """Refuse an output file path before any work: an empty name, a name too long (check_path_names),
    an existing folder, a system location, or a place where the file cannot be created (tested with
    a probe file in the nearest existing folder above it, which is removed again)."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output file name")
    check_path_names(path, flag)
    p = Path(path)
    with mapped_write_errors(p):
        if p.is_dir() or str(path).endswith(os.sep):
            raise OutputError(f"{flag} {str(p)!r} is a folder; give a file name")
        _check_not_system(p, flag)
        if p.exists() and not p.is_file():
            raise OutputError(f"{flag} {str(p)!r} exists and is not a regular file")
        ancestor = _nearest_existing(p.parent)
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
