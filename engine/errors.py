"""Exceptions the engine raises for bad input; each message names the problem."""


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
