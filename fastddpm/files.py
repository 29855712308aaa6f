"""Writing files so that nothing is ever half-written, nothing outside the output is touched, no
input is destroyed, and a full disk is one clear error.

Every output goes to a temporary name of ours beside its target (TMP_PREFIX), created with
O_CREAT | O_EXCL | O_NOFOLLOW (so nothing planted at that name is opened), is flushed to disk
(fsync), and is then renamed over the target: readers see the old file or the new one, never a
part, and a link planted at the target's name is replaced, never followed. A set of files that
belong together (samples.npz, grid.png, stats.json) is written entirely under temporary names
first and renamed only when every one is complete (`publish_together`); every destination is
checked before the first rename, and the files a rename replaces are kept (as hard links) until
the last rename succeeded, so a failure part-way puts back exactly what was there. The set may
span subfolders (a diffusers pipeline: model_index.json, unet/..., scheduler/...), and folders it
had to create are removed again when it is not published.

A writer holds an exclusive flock on its temporary file for the file's whole life. The sweep
that removes a killed run's leftovers (`remove_leftovers`, when a run takes a folder) skips every
temporary whose flock is held, so it never deletes a live writer's file, whichever command that
writer runs (convert and export do not lock the folder); the kernel drops the flock of a killed
writer, whose temporaries are then removed.

Files written in place (a lock file, the training log) are opened through fastddpm.safe_open:
never through a symbolic link, a hard link, a FIFO or another user's file.

`refuse_overwriting_inputs` refuses, before any work, an output that is the same file as an
input (`export --checkpoint C --out C`); `check_not_an_input` also an output folder that holds
one (convert).

OSError from a write is turned into a typed error at one place (`output_error`): ENOSPC, EDQUOT
and EFBIG become OutOfSpaceError, anything else (no permission, read-only file system, a file
where a folder should be) OutputError; the command line prints either as one line, exit 2.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
from pathlib import Path

from .errors import FastDDPMError, OutOfSpaceError, OutputError, SameFileError
from .paths import NEVER_WRITTEN, SYSTEM_FOLDERS, check_not_system, check_output_dir, check_output_file  # noqa: F401
from .paths import probe_nearest_folder, stat_checked
from .safe_open import describe, open_write, refusal, same_entry

TMP_PREFIX = ".fastddpm-tmp."  # every temporary file we create starts with this
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Messages of libraries that wrap an OSError in their own exception (safetensors' SafetensorError).
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


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


def open_output(path, binary: bool = True, append: bool = False):
    """A file object writing `path` that never follows a link or writes into a hard-linked, special
    or foreign file (fastddpm.safe_open.open_write). The way a `write(tmp)` callback of
    `atomic_write` / `publish_together` opens its temporary, and a log is appended to."""
    return open_write(path, binary=binary, append=append)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path) -> None:
    """Flush a written file's data to disk, so the rename never publishes an empty or short file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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


class _Temp:
    """A temporary file of ours: its name and the descriptor that holds its flock until it is
    published or discarded."""

    def __init__(self, path: str, fd: int | None):
        self.path, self.fd = path, fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Remove the file (if it is still ours at its name) and release it."""
        try:
            if self.fd is None or same_entry(self.fd, self.path) or not os.path.lexists(self.path):
                Path(self.path).unlink(missing_ok=True)
        except OSError:
            pass
        self.close()


def _new_temp(path: Path) -> _Temp:
    """Create an empty temporary file of ours beside `path` and flock it (module docstring).

    A sweep may remove the file between its creation and the flock; then it is made again."""
    for _ in range(10):
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system (some network ones): unprotected, as before
            return _Temp(name, fd)
        except BaseException:
            os.close(fd)
            Path(name).unlink(missing_ok=True)
            raise
        if same_entry(fd, name):
            return _Temp(name, fd)
        os.close(fd)
    raise OutputError(f"cannot write {str(path)!r}: another process keeps removing its temporary files")


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def write_temp(path, write) -> _Temp:
    """A new, complete and flushed temporary file beside `path`, still flocked.

    write: a callable write(tmp_path), which should open the file with `open_output`, or bytes.
    The caller renames it with `_rename(temp.path, path)` and closes it (or discards it). On any
    error the temporary file is gone.
    """
    path = Path(path)
    with mapped_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _new_temp(path)
    try:
        with mapped_write_errors(path):
            if isinstance(write, (bytes, bytearray, memoryview)):
                _write_all(temp.fd, write)
            else:
                write(temp.path)
            _fsync_path(temp.path)
            os.fchmod(temp.fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    except BaseException:
        temp.discard()
        raise
    return temp


def _check_destination(path: Path) -> None:
    """Refuse, before any rename, a destination a rename cannot replace (a folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise output_error(e, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {str(path)!r}: a folder is in the way; nothing was published")


def atomic_write(path, write) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, flush it, then rename it over `path`.

    `write` may also be bytes. The rename is atomic on POSIX: readers see the old file or the new
    one, never a part, and a link at `path` is replaced, not followed. An OSError becomes
    OutputError / OutOfSpaceError (see `output_error`), and no temporary is left.
    """
    path = Path(path)
    temp = write_temp(path, write)
    try:
        with mapped_write_errors(path):
            _check_destination(path)
            _rename(temp.path, path)
    except BaseException:
        temp.discard()
        raise
    temp.close()
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name (see `atomic_write`)."""
    atomic_write(path, bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data)


def atomic_link(src, dst) -> None:
    """Make `dst` another name of our file `src`: a hard link made under a temporary name and renamed
    into place (atomic); where the file system has no hard links, an atomic copy."""
    src, dst = Path(src), Path(dst)
    for _ in range(10):
        tmp = dst.parent / f"{TMP_PREFIX}{dst.name}.{secrets.token_hex(4)}"
        try:
            os.link(src, tmp, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:
            break  # no hard links here (EPERM, EXDEV, ...): copy
        try:
            with mapped_write_errors(dst):
                _check_destination(dst)
                _rename(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dst.parent)
        return

    def copy(tmp):
        with open(src, "rb") as f, open_output(tmp) as g:
            while chunk := f.read(1 << 24):
                g.write(chunk)
    atomic_write(dst, copy)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file through our own temporary name (safetensors' `save_file` would make
    its own `.tmpXXXX` file, which a kill leaves behind and no one removes)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _keep_aside(path: Path, move: bool) -> Path | None:
    """Keep the file at `path` under a temporary name of ours until a publish is complete: a hard link
    to it (the file stays at `path`), or, with `move` or where hard links fail, the file itself
    renamed. None if nothing is at `path`."""
    if not os.path.lexists(path):
        return None
    backup = path.parent / f"{TMP_PREFIX}{path.name}.old-{secrets.token_hex(4)}"
    if not move:
        try:
            os.link(path, backup, follow_symlinks=False)
            return backup
        except OSError:
            pass
    os.rename(path, backup)
    return backup


def _put_back(folder: Path, renamed: list, backups: dict) -> None:
    """Undo a publish that failed part-way: every name already renamed gets its previous file back
    (or is removed if it had none), a file moved aside returns, and the hard links kept of files
    still in place are dropped. Best effort: it runs after an error."""
    for name in reversed(renamed):
        backup = backups.pop(name, None)
        try:
            if backup is not None:
                os.replace(backup, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        except OSError:
            pass
    for name, backup in backups.items():
        if backup is None:
            continue
        try:
            if os.path.lexists(folder / name):
                backup.unlink()  # a hard link of the file that is still in place
            else:
                os.replace(backup, folder / name)  # moved aside (the old `last` file)
        except OSError:
            pass


def publish_together(folder, writers: dict, last: str | None = None) -> None:
    """Write a set of files in `folder` that belong together: all or none of them are published.

    writers: {file name: write(tmp_path) callable, or bytes}. A name may lead into subfolders
    ("unet/config.json"); it may not leave `folder` (no absolute names, no ".."). Folders the set
    needs are made first and removed again if it is not published. Every file is written under a
    temporary name first (this is where a full disk fails, leaving the folder as it was); every
    destination is checked (a folder in the way is refused before any rename); then the old
    `last` file is moved aside and the new files are renamed into place, `last` at the end, so a
    complete `last` file (e.g. stats.json, model_index.json) always belongs to the files beside
    it. The files the renames replace are kept aside until every rename succeeded; if one fails,
    each name gets back exactly what it held.
    """
    folder = Path(folder)
    order = [n for n in writers if n != last] + ([last] if last in writers else [])
    targets = {name: _target_in(folder, name) for name in order}
    folders = sorted({t.parent for t in targets.values()}, key=lambda f: len(f.parts))
    created: list[Path] = []
    temps: dict[str, _Temp] = {}
    backups: dict[str, Path | None] = {}
    renamed: list[str] = []
    published = False
    try:
        with mapped_write_errors(folder):
            for name in order:
                _check_destination(targets[name])
        for f in folders:
            with mapped_write_errors(f):
                created += make_dirs(f, "output folder")
        for name in order:
            temps[name] = write_temp(targets[name], writers[name])
        with mapped_write_errors(folder):
            for name in order:
                _check_destination(targets[name])
            if last in writers:
                backups[last] = _keep_aside(targets[last], move=True)  # no stats.json while the set is mixed
            for name in order:
                if name not in backups:
                    backups[name] = _keep_aside(targets[name], move=False)
                _rename(temps[name].path, targets[name])
                renamed.append(name)
                temps.pop(name).close()
        published = True
    except BaseException:
        _put_back(folder, renamed, backups)
        raise
    finally:
        for temp in temps.values():
            temp.discard()
        if not published:
            remove_empty_dirs(created)
    for backup in backups.values():
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()
    for f in {*folders, *(c.parent for c in created)}:  # the renames, and the entries of new folders
        _fsync_dir(f)


def _target_in(folder: Path, name: str) -> Path:
    """folder / name for a name of a published set; one that would leave the folder is a bug (ValueError)."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"publish_together: {name!r} does not name a file inside the folder")
    return folder.joinpath(*parts)


def make_dirs(path, flag: str = "--out") -> list[Path]:
    """mkdir -p `path`; returns the folders that did not exist before, outermost first. A file where
    a folder must be is an OutputError; a failure part-way removes what this call made."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(p)!r} is not a folder")
    missing.reverse()
    made: list[Path] = []
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            remove_empty_dirs(made)
            raise output_error(e, path) from None
        made.append(folder)
    return made


def remove_empty_dirs(created: list) -> None:
    """Remove folders a call made (outermost first in `created`), innermost first, stopping at the
    first that is not empty (someone else put something there)."""
    for folder in reversed(created):
        try:
            Path(folder).rmdir()
        except OSError:
            break


def _remove_if_abandoned(p: Path) -> bool:
    """Remove temporary file `p` unless a live writer holds its flock; only regular files."""
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not same_entry(fd, p):
            return False
        os.unlink(p)
        return True
    except OSError:  # BlockingIOError: a live writer holds it; others: leave it alone
        return False
    finally:
        os.close(fd)


def remove_leftovers(folder, name: str | None = None) -> list[Path]:
    """Delete temporary files of ours left in `folder` by a killed run (only those for output file
    `name`, if given). A temporary whose writer is alive (its flock is held) is never touched, nor
    the temporaries of an output file under its own lock (fastddpm.run_folder.output_file_lock).
    Returns what was removed."""
    removed = []
    folder = Path(folder)
    # TMP_PREFIX: this version; ".NAME.safetensors.XXXX.tmp": the temporaries of earlier versions
    patterns = (f"{TMP_PREFIX}*", ".*.safetensors.*.tmp") if name is None else (f"{TMP_PREFIX}{name}.*",)
    for pattern in patterns:
        for p in folder.glob(pattern):
            target = p.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
            if name is None and (folder / f".{target}.fastddpm.lock").exists():
                continue  # an output file under its own lock (fastddpm.run_folder.output_file_lock)
            if _remove_if_abandoned(p):
                removed.append(p)
    return removed


def _identity(path) -> tuple[tuple[int, int] | None, str]:
    """((device, inode) of the file at `path`, links followed, or None), and its resolved path."""
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        key = None
    try:
        resolved = os.path.realpath(path)
    except (OSError, ValueError):
        resolved = os.path.abspath(path)
    return key, resolved


def refuse_overwriting_inputs(outputs, inputs) -> None:
    """Refuse, before any work, an output that is the same file as an input.

    outputs, inputs: iterables of (path, flag) pairs; `flag` names the option in the message
    ("--out", "--checkpoint"); a None path is skipped. Two paths are the same file when both exist
    and have the same device and inode (links followed: a symbolic or hard link to the input
    counts), or when they resolve to the same path. Raises SameFileError naming both.
    """
    seen = [(p, flag, *_identity(p)) for p, flag in inputs if p is not None and str(p).strip()]
    for out, out_flag in outputs:
        if out is None or not str(out).strip():
            continue
        key, resolved = _identity(out)
        for inp, in_flag, in_key, in_resolved in seen:
            if (key is not None and key == in_key) or resolved == in_resolved:
                raise SameFileError(f"{out_flag} {str(out)!r} is the same file as {in_flag} {str(inp)!r}; writing it "
                                    f"would destroy the input: choose another {out_flag}")


def check_not_an_input(out, inputs, flag: str = "--out") -> None:
    """Refuse (SameFileError naming both) an output that would destroy an input, before any work:
    `out` the same file as an input (device and inode: hard and symbolic links are caught), the same
    resolved path, or a folder that holds an input at any depth (writing into it could replace it).
    inputs: the files and folders the command reads."""
    out_key, out_real = _identity(out)
    for src in inputs:
        key, real = _identity(src)
        if (out_key is not None and out_key == key) or out_real == real:
            raise SameFileError(f"{flag} {str(out)!r} is the input {str(src)!r}; write the result somewhere else")
        if real.startswith(out_real.rstrip(os.sep) + os.sep):
            raise SameFileError(f"{flag} {str(out)!r} holds the input {str(src)!r}; write the result somewhere else")


def check_output_folder(path, flag: str = "--out") -> Path:
    """check_output_dir, and the folder can be made and written: the nearest existing folder above
    (or at) `path` is a folder, and a probe file can be created there (removed again). Nothing is
    created; the writer makes the folder (publish_together)."""
    p = check_output_dir(path, flag)
    with mapped_write_errors(p):
        probe_nearest_folder(p, p, flag)
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
    """Create folder `path`, where an output file goes, if needed and prove it writable now, before any
    long work starts (refused: a file, a link loop, a system folder; fastddpm.paths)."""
    p = Path(path)
    st = stat_checked(p, "output folder")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output folder {str(p)!r} exists and is not a folder")
    check_not_system(p, "output folder", folder=True, home_ok=True)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to output folder {str(p)!r} ({e.strerror or e})") from None
    return p


__all__ = ["TMP_PREFIX", "atomic_link", "atomic_write", "atomic_write_bytes", "check_output_dir", "check_output_file",
           "describe", "ensure_writable_dir", "is_out_of_space", "mapped_write_errors", "open_output", "output_error",
           "check_not_an_input", "check_output_folder", "make_dirs", "probe_writable", "publish_together",
           "remove_empty_dirs", "refusal", "refuse_overwriting_inputs", "remove_leftovers",
           "save_safetensors", "write_temp"]
