"""tailtune: fine-tune the last layers of a pretrained transformer on a CPU.

Public names are imported on first use, so `import engine` stays cheap (the command line starts
fast and the Numba kernels load only when a model needs them).
"""
from importlib import import_module

# The OpenMP wait policy must be set before any library loads OpenMP (kernels/openmp.py).
import kernels.openmp  # noqa: E402,F401

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "engine.config",
    "Model": "engine.model",
    "load": "engine.io",
    "Trainer": "engine.trainer",
    "AdamW": "engine.optim",
    "SGD": "engine.optim",
    "clip_grad_norm": "engine.optim",
    "CosineSchedule": "engine.optim",
    "load_tokenizer": "engine.tokenizer",
    "ByteTokenizer": "engine.tokenizer",
    "TailtuneError": "engine.errors",
    "ConfigError": "engine.errors",
    "CheckpointError": "engine.errors",
    "InputError": "engine.errors",
    "DivergedError": "engine.errors",
}

__all__ = sorted(_EXPORTS) + ["generate"]

# Imported now, not lazily: the function shares its name with the module engine/generate.py,
# and a lazy import would leave `engine.generate` bound to the module.
from .generate import generate  # noqa: E402


# Submodules the README shows as engine.<name>.<thing>, loaded on first use as well.
_SUBMODULES = ("schedules", "prefix_cache", "probes", "data", "train", "trainer")


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = import_module(f"engine.{name}")
    else:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    globals()[name] = value
    return value
