"""One run at a time per output: an exclusive OS lock on the output folder for the run's life.

`RunFolder(path)` (a context manager) checks the path, creates the folder if needed, takes an
exclusive `fcntl.flock` on the lock file `.fastddpm.lock` inside it, removes temporary files a
killed run of ours left there, and proves the folder writable, all before any long work. A
second process asking for the same folder gets FolderBusyError at once (exit 2 on the command
line). The kernel drops the lock when the holder dies, so a SIGKILL never leaves a stale lock:
the lock file may stay, unlocked, and the next run simply locks it again.

On leaving, the lock file is removed; if the run failed and the folder was created by this run
and is still empty, it is removed too, so a failed command leaves no empty --out folder behind.

`RunFolder(path, lock_name=".NAME.fastddpm.lock")` is the same for a single output file (eval's
JSON): the lock file sits beside the output, so two evaluations of other files in one folder
do not block each other.

The lock file is opened without following links (fastddpm.safe_open): a symbolic link, a hard
link, a FIFO or a device planted at its name is refused with one line, never written through.

Removing a lock file while others may be waiting on it is safe because every acquirer checks,
after flock succeeds, that the file it locked is still the one at the path (same inode), and
retries otherwise. Processes forked (without exec) while the lock is held inherit it: they must
not outlive the run (torch's workers do not).
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from .errors import FolderBusyError, UnsafeOutputError
from .files import (check_output_dir, make_dirs, output_error, probe_writable, remove_empty_dirs,
                    remove_leftovers)
from .safe_open import open_fd, same_entry

LOCK_NAME = ".fastddpm.lock"


class RunFolder:
    """Exclusive use of output folder `path` by this process (use in a `with` block).

    enabled=False (the non-zero ranks of a torchrun job, which write nothing) makes it a no-op
    that only remembers the path. `flag` names the option in messages ("--out").
    """

    def __init__(self, path, flag: str = "--out", enabled: bool = True, lock_name: str = LOCK_NAME,
                 file_name: str | None = None):
        self.file_name = file_name  # set by output_file_lock: the lock covers this one file only
        self.flag = flag
        self.enabled = enabled
        self.lock_name = lock_name
        self.path = check_output_dir(path, flag) if lock_name == LOCK_NAME else Path(path)
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def lock_path(self) -> Path:
        return self.path / self.lock_name

    def __enter__(self) -> "RunFolder":
        if not self.enabled:
            return self
        self._created = make_dirs(self.path, self.flag)
        try:
            self._lock()
            remove_leftovers(self.path, self.file_name)
            probe_writable(self.path)
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            self._release(failed=exc_type is not None)

    def _lock(self) -> None:
        for _ in range(10):  # each retry means another run removed the file between open and flock
            fd = self._open_lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError as e:
                os.close(fd)
                raise output_error(e, self.lock_path) from None
            if same_entry(fd, self.lock_path):
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError as e:
                    os.close(fd)
                    raise output_error(e, self.lock_path) from None
                self._fd = fd
                return
            os.close(fd)
        raise FolderBusyError(f"could not lock {str(self.path)!r}: other runs keep replacing {self.lock_name}")

    def _open_lock_file(self) -> int:
        """The lock file, opened without following a link (fastddpm.safe_open): a link, a hard link, a
        FIFO or a device planted at its name is refused, never written through. Another user's
        lock file is refused too, unless its run is alive (then the folder is busy)."""
        try:
            return open_fd(self.lock_path, os.O_RDWR | os.O_CREAT)
        except UnsafeOutputError:
            if self._held_by_another_user():
                raise self._busy() from None
            raise

    def _held_by_another_user(self) -> bool:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _busy(self) -> FolderBusyError:
        holder = _read_pid(self.lock_path)
        return FolderBusyError(
            f"{str(self.path)!r} is in use by another fastddpm run{f' (pid {holder})' if holder else ''}; "
            f"wait for it to finish or choose another {self.flag}")

    def __del__(self):
        if getattr(self, "_fd", None) is not None:  # never released (a Trainer dropped unrun): free the lock
            os.close(self._fd)
            self._fd = None

    def _release(self, failed: bool) -> None:
        if self._fd is not None:
            try:
                if same_entry(self._fd, self.lock_path):  # ours: remove it while still holding it (module docstring)
                    self.lock_path.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if failed:
            remove_empty_dirs(self._created)  # innermost first; stops at the first non-empty one
        self._created = []


def output_file_lock(path, flag: str = "--out", enabled: bool = True) -> RunFolder:
    """A RunFolder on the folder of output file `path`, locking only that file's name."""
    p = Path(path)
    return RunFolder(p.parent, flag=flag, enabled=enabled, lock_name=f".{p.name}.fastddpm.lock", file_name=p.name)


def _read_pid(path) -> int | None:
    """The pid written in a lock file (read without following a link), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


class lock_on_main:
    """`with lock_on_main(folder, dist):` rank 0 of a torchrun job (or the only process) enters
    RunFolder `folder`; then every rank learns whether it could, so that when rank 0 is refused
    (a busy or unwritable folder) the other ranks stop with an error too instead of waiting for
    it in a collective. `dist` is a fastddpm.distributed.Distributed."""

    def __init__(self, folder: RunFolder, dist):
        self.folder, self.dist = folder, dist
        self.folder.enabled = self.folder.enabled and dist.is_main

    def __enter__(self) -> RunFolder:
        error = None
        try:
            self.folder.__enter__()
        except BaseException as e:  # noqa: B036 (re-raised below, after the ranks agree)
            error = e
        if self.dist.enabled:
            import torch

            failed = torch.tensor([0.0 if error is None else 1.0], device=self.dist.device)
            if self.dist.all_reduce_sum(failed).item() > 0 and error is None:
                self.folder.__exit__(FolderBusyError, None, None)
                raise FolderBusyError(f"rank 0 could not take the output folder {str(self.folder.path)!r}")
        if error is not None:
            raise error
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        self.folder.__exit__(exc_type, exc, tb)
