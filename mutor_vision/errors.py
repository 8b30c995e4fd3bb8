"""The project's error kinds; each command line maps them to one exit code (``mutor_vision/cli.py``).

Every message says what is wrong and where (the config key, the file, the shard), in one line.
"""


class ConfigError(ValueError):
    """A config value or command-line flag is unknown, of the wrong type, or out of range."""


class InputError(RuntimeError):
    """Input data or a checkpoint is missing, corrupt, or does not match what it is used with."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; training stopped before the update."""


class StorageError(RuntimeError):
    """A write failed for lack of room or a failing disk (ENOSPC, EFBIG, EDQUOT, EIO).

    Not the input's fault and not a bug: the message names the folder and the OS error, and the
    partial file or folder is already removed, so the same command succeeds once there is room.
    """

    def __init__(
        self, message: str, folder: str | None = None, errno: int | None = None, cause: str | None = None
    ) -> None:
        super().__init__(message)
        self.folder = folder
        self.errno = errno
        self.cause = cause  # the OS error alone, "[Errno 28] No space left on device (12 MB free)"


class PeerLost(RuntimeError):
    """Another rank of a distributed run, or its machine, stopped answering (died, killed, cut off):
    every rank stops, and the same command, run again on every machine, goes on (training: with
    ``--resume auto``)."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (library errors go on with details), or its kind's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
