"""Typed errors for bad input.

The library raises these for anything a user can fix (a wrong value, a missing or corrupt
file, a backend this machine cannot run). `fastddpm.cli` turns each into one line on stderr
and exit status 2; Python callers can catch them like any ValueError.
"""


class FastDDPMError(ValueError):
    """Bad input a user can fix. The message is one complete sentence naming the bad value."""


class CheckpointError(FastDDPMError):
    """A checkpoint is missing, truncated, foreign, or does not match the model."""


class BackendUnavailableError(FastDDPMError):
    """The requested backend cannot run here (no CUDA, no Triton, no onnxruntime...)."""


class DataError(FastDDPMError):
    """A data set is missing, empty, unreadable or inconsistent."""


def check_choice(name: str, value, choices) -> None:
    """Raise FastDDPMError naming `value` and listing the valid `choices` if it is not one."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise FastDDPMError(f"unknown {name} {value!r}; choose one of {valid}")


class OutputError(FastDDPMError):
    """An output cannot be written: a path that is not a folder, no permission, a read-only or
    system location. Nothing half-written is left (see fastddpm.files)."""


class OutOfSpaceError(OutputError):
    """The disk (or the user's quota, or the file-size limit) ran out while writing an output:
    ENOSPC, EDQUOT or EFBIG. The outputs of that write were not published."""


class FolderBusyError(OutputError):
    """Another fastddpm process holds the output folder's lock (a run is writing there)."""


class TrainingDiverged(FastDDPMError):
    """Too many training steps in a row had a non-finite loss or gradient, or a checkpoint about to
    be written holds a NaN or an infinity. Raised by fastddpm.train and fastddpm.train_state
    (defined here, below both, so train_state need not import train); `from fastddpm.train import
    TrainingDiverged` still works."""


class OutOfMemoryError(FastDDPMError):
    """The work did not fit in memory (host or GPU); the message names the flag to lower."""


class FastDDPMWarning(UserWarning):
    """Something the user should know that does not stop the run: a fast backend that failed its
    verification and was replaced by the next candidate (fastddpm.auto)."""


class UnsafeOutputError(OutputError):
    """A name a run would write in its output folder is a symbolic link, a hard link to another
    file, a FIFO, a device or a file of another user: fastddpm refuses to write through it."""


class SameFileError(OutputError):
    """An output names the same file as an input: writing it would destroy the input."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM). `signum` is the signal; the command line
    exits 128 + signum (130, 143) with one line. A KeyboardInterrupt, so code that cleans up on
    Ctrl-C cleans up on SIGTERM too."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message
