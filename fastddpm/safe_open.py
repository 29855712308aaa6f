"""Opening a file in an output folder without following links: how fastddpm opens every file it
writes into, appends to or locks.

An output folder may hold names someone planted: `out/.fastddpm.lock` a symbolic link to
~/victim.txt, `t/log.jsonl` a hard link to another file (a second name of the same inode), a FIFO
(whose open would block until a reader comes), a device, a file of another user. Python's plain
open() for appending writes through all of them. So every such open here

  - passes O_NOFOLLOW (a symbolic link as the last component fails with ELOOP instead of being
    followed), O_NONBLOCK (a FIFO opens, or fails, at once) and O_CLOEXEC, and never O_TRUNC;
  - then checks what it opened with fstat: a regular file, owned by this process's effective
    user, with one name (st_nlink == 1), else closes it and raises UnsafeOutputError (one line,
    exit 2 on the command line) naming the path and what was found there;
  - and only then truncates, when asked to.

New temporary files are made with O_CREAT | O_EXCL (tempfile.mkstemp, fastddpm.files), so nothing
planted can be opened in their place; this module is for names that may already exist (a lock
file, a log) and for reopening a temporary by its name. Folders above the last component are the
user's choice (`--out` may be a link to a folder) and are followed.
"""
from __future__ import annotations

import errno
import os
import stat

from .errors import UnsafeOutputError

_BASE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def describe(st: os.stat_result) -> str | None:
    """Why a file with lstat/fstat result `st` must not be written through, or None if it may."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"a file of another user (uid {st.st_uid})"
    if st.st_nlink != 1:
        return f"a file with {st.st_nlink} names (a hard link to another file)"
    return None


def refusal(path, found: str) -> UnsafeOutputError:
    """The error for output `path` holding `found` (a phrase from `describe`)."""
    return UnsafeOutputError(f"refusing to write {str(path)!r}: it is {found}, and fastddpm never writes "
                             "through links or into special files in an output folder; remove it or choose "
                             "another output location")


def open_fd(path, flags: int, mode: int = 0o666, truncate: bool = False) -> int:
    """os.open(path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC), checked (module docstring).

    Returns a blocking fd of a regular, single-named file of ours; `truncate` empties it after the
    check. Raises UnsafeOutputError for anything else at `path`, or OutputError / OutOfSpaceError
    (fastddpm.files.output_error) for an ordinary failure such as no permission.
    """
    flags &= ~os.O_TRUNC
    try:
        fd = os.open(path, flags | _BASE, mode)
    except OSError as e:
        found = _found_at(path)
        if found is not None and e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM,
                                             errno.ENOTDIR, errno.ETXTBSY, errno.EWOULDBLOCK):
            raise refusal(path, found) from None
        from .files import output_error

        raise output_error(e, path) from None
    try:
        found = describe(os.fstat(fd))
        if found is not None:
            raise refusal(path, found)
        os.set_blocking(fd, True)
        if truncate:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _found_at(path) -> str | None:
    """What `describe` says about the entry at `path` without following it (None: nothing wrong, or gone)."""
    try:
        return describe(os.lstat(path))
    except OSError:
        return None


def open_write(path, binary: bool = True, append: bool = False):
    """A file object writing `path` (created if missing) through a checked no-follow open: emptied
    first, or appended to with `append`. Text mode writes UTF-8."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
    fd = open_fd(path, flags, truncate=not append)
    mode = ("a" if append else "w") + ("b" if binary else "")  # on the checked descriptor, no path is reopened
    try:
        return os.fdopen(fd, mode) if binary else os.fdopen(fd, mode, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path) -> bytes | None:
    """The contents of regular file `path` of ours, opened without following a link; None if there is
    no file. Anything else there (a link, a FIFO, another user's file) is UnsafeOutputError: a run
    reads this way what it will rewrite (its log)."""
    try:
        fd = open_fd(path, os.O_RDONLY)
    except UnsafeOutputError:
        raise
    except Exception:
        if not os.path.lexists(path):
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def same_entry(fd: int, path) -> bool:
    """True while `path` (not followed) is still the file open as `fd` (same device and inode)."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

