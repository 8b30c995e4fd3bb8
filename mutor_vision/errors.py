"""The project's error kinds; each command line maps them to one exit code (``mutor_vision/cli.py``).

Every message says what is wrong and where (the config key, the file, the shard), in one line.
"""


class ConfigError(ValueError):
    """A config value or command-line flag is unknown, of the wrong type, or out of range."""


class InputError(RuntimeError):
    """Input data or a checkpoint is missing, corrupt, or does not match what it is used with."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; training stopped before the update."""
