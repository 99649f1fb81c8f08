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


def check_flags(rules):
    """rules: (flag, value, test, what it must be). An InputError naming the first flag whose
    value fails its test; a TypeError in the test fails it too (a string or None where a number
    belongs: API callers, saved checkpoints)."""
    for flag, v, ok, must in rules:
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            raise InputError(f"{flag} {v}: must be {must}")


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool (True is an int to Python, never a count here)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A Python or numpy int or float, not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


HF_EXTRA = "pip install 'tailtune[hf]'"


def optional_import(package: str, *modules: str, error=TailtuneError, what: str):
    """Import an optional package (and its submodules `modules`), or raise `error`: when the
    package itself is missing, saying how to install it; when it is there but fails to import
    (a module it needs and does not declare), naming what is missing instead."""
    import importlib
    try:
        mod = importlib.import_module(package)
        for m in modules:
            importlib.import_module(m)
        return mod
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == package:
            raise error(f"{what} needs the '{package}' package: {HF_EXTRA}") from None
        raise error(f"the '{package}' package is installed but does not import ({e}); install "
                    f"what it names, or another version of {package}") from None
    except ImportError as e:
        raise error(f"the '{package}' package is installed but does not import ({e})") from None
