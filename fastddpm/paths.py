"""Checking the paths a user gives before any work: lengths, link loops and system folders.

What is refused (each is one line on stderr and exit 2 on the command line):
  - a path longer than PATH_MAX - 1 = 4095 bytes, or with a component over NAME_MAX = 255 bytes
    (the kernel would answer ENAMETOOLONG half-way through a run);
  - a path that is a symbolic link loop;
  - system folders as output locations. /proc, /sys and /dev are never written, at any depth.
    The folders SYSTEM_FOLDERS lists (/, /bin, /boot, /dev, /etc, /lib*, /proc, /run, /sbin, /sys,
    /usr and every folder directly inside /usr, /var) are refused as output folders, an output
    file directly inside one of them is refused (/etc/x.json, /x.json), and so is a new output
    folder that would be created directly inside one (--out /etc/samples). The home folder of
    the user (and /root, root's home) is refused as an output folder (`--out ~` would scatter
    samples.npz, grid.png and stats.json into it); files and folders inside it are the user's.
Paths are compared after resolving links (os.path.realpath), so a link to /etc is /etc.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import FastDDPMError, OutputError

PATH_MAX = 4096  # bytes, with the terminating NUL (Linux)
NAME_MAX = 255  # bytes per path component
NEVER_WRITTEN = ("/proc", "/sys", "/dev")  # never an output location, at any depth
SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib*", "/proc", "/run", "/sbin", "/sys", "/usr", "/usr/*",
                  "/var")  # documented form; `is_system_folder` tests it
_EXACT = frozenset(f for f in SYSTEM_FOLDERS if "*" not in f)


def check_path_length(path, flag: str, error=FastDDPMError) -> None:
    """Raise `error` (a FastDDPMError type) when `path` is too long for the kernel: over 4095 bytes
    in all or a component over 255 bytes."""
    raw = os.fsencode(str(path))
    if len(raw) >= PATH_MAX:
        raise error(f"{flag} is {len(raw)} bytes long; paths are limited to {PATH_MAX - 1} bytes")
    longest = max((len(c) for c in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise error(f"{flag} has a path component of {longest} bytes; file and folder names are limited to "
                    f"{NAME_MAX} bytes")


def stat_checked(path, flag: str, error=OutputError) -> os.stat_result | None:
    """os.stat of `path` (following links), None if nothing is there; a link loop, a name too long,
    or a file where a folder should be raise `error` with one line."""
    check_path_length(path, flag, error)
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{flag} {str(path)!r} is a symbolic link loop (or a chain of more than 40 links)") from None
        if e.errno == errno.ENOTDIR:
            raise error(f"{flag} {str(path)!r}: a component of the path is not a folder") from None
        if e.errno == errno.ENAMETOOLONG:
            raise error(f"{flag} {str(path)!r} is too long for this file system") from None
        return None  # e.g. no permission on a folder above it: the write reports it


def is_system_folder(resolved: str) -> bool:
    """True for a resolved absolute path listed in SYSTEM_FOLDERS (/lib* and /usr/* as patterns)."""
    if resolved in _EXACT:
        return True
    parent, name = os.path.split(resolved)
    return (parent == "/" and name.startswith("lib")) or parent == "/usr"


def home_folders() -> set[str]:
    """The resolved home folders that are never an output folder: $HOME, the password database's
    home of the effective user, and /root."""
    homes = {"/root"}
    candidates = [os.environ.get("HOME")]
    try:
        import pwd

        candidates.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    for home in candidates:
        if home and home.strip():
            homes.add(os.path.realpath(home))
    homes.discard("/")  # "/" is refused as a system folder, with that reason
    return homes


def _never_written(resolved: str) -> str | None:
    for tree in NEVER_WRITTEN:
        if resolved == tree or resolved.startswith(tree + "/"):
            return tree
    return None


def _nearest_existing(p: str) -> str:
    """The deepest existing folder at or above resolved path p."""
    while not os.path.isdir(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    return p


def check_not_system(path, flag: str, folder: bool, home_ok: bool = False) -> None:
    """Refuse `path` as an output folder (`folder`) or output file in or at a system folder (module
    docstring); OutputError names the folder. `home_ok`: `path` is only the folder an output file
    goes into (the home folder may hold one)."""
    resolved = os.path.realpath(path)
    tree = _never_written(resolved)
    if tree is not None:
        raise OutputError(f"{flag} {str(path)!r} is inside {tree}, a system folder; choose another location")
    if folder and is_system_folder(resolved):
        raise OutputError(f"{flag} {str(path)!r} is {resolved}, a system folder; choose another location")
    if folder and not home_ok and resolved in home_folders():
        raise OutputError(f"{flag} {str(path)!r} is the home folder {resolved}; a run writes several files into its "
                          "output folder: give a folder inside it, e.g. ~/samples")
    # where a new entry would be made: the file's folder, or the nearest existing folder above a new one
    if folder and os.path.isdir(resolved):
        return  # an existing folder that is none of the above
    where = _nearest_existing(os.path.dirname(resolved))
    if is_system_folder(where):
        what = "directly inside" if where == os.path.dirname(resolved) else "to be created in"
        raise OutputError(f"{flag} {str(path)!r} is {what} {where}, a system folder; choose another location")


def check_output_dir(path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be one, before any work: an empty name, a name too long,
    a link loop, an existing file, a system folder (module docstring). Creating it and testing
    writes is RunFolder's job."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output folder")
    p = Path(path)
    st = stat_checked(p, flag)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{flag} {str(p)!r} exists and is not a folder")
    check_not_system(p, flag, folder=True)
    return p


def check_output_file(path, flag: str = "--out") -> Path:
    """Refuse an output file path before any work: an empty name, a name too long, a link loop, an
    existing folder, a system location, or a place where the file cannot be created (tested with
    a probe file in the nearest existing folder above it, which is removed again)."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give an output file name")
    p = Path(path)
    st = stat_checked(p, flag)
    if (st is not None and stat.S_ISDIR(st.st_mode)) or str(path).endswith(os.sep):
        raise OutputError(f"{flag} {str(p)!r} is a folder; give a file name")
    check_not_system(p, flag, folder=False)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{flag} {str(p)!r} exists and is not a regular file")
    probe_nearest_folder(p.parent, p, flag)
    return p


def probe_nearest_folder(where: Path, named: Path, flag: str) -> None:
    """The nearest existing entry at or above `where` must be a folder in which a file can be made
    (a probe file, removed again); OutputError naming `named` otherwise."""
    from .files import probe_writable

    ancestor = Path(where)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {str(named)!r}: {str(ancestor)!r} is not a folder")
    probe_writable(ancestor, named)
