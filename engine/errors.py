"""Exceptions the engine raises for bad input; each message names the problem. Also the type
tests the argument checks share."""
import numpy as np


class TailtuneError(Exception):
    """Base class of the engine's own errors."""


class ConfigError(TailtuneError, ValueError):
    """A configuration that does not describe a model the engine can build."""


class CheckpointError(TailtuneError, ValueError):
    """A checkpoint file that is missing, truncated, corrupt or of an unsupported kind."""


class InputError(TailtuneError, ValueError):
    """Arguments of the wrong shape, dtype or range, or a call made out of order."""


class DivergedError(TailtuneError, ArithmeticError):
    """Training produced a non-finite loss or gradient (learning rate too high, bad data)."""


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool (True is an int to Python, never a count here)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A Python or numpy int or float, not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
