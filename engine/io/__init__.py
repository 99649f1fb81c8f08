"""Loading and saving models: Hugging Face directories (safetensors), GGUF files, and the
directories `Model.save` writes (which are Hugging Face directories)."""
from __future__ import annotations

import json
import os

import numpy as np

from ..config import Config
from ..errors import CheckpointError, InputError
from . import hf_names
from .safetensors import WRITE_DTYPES, SafetensorsFile, write as write_safetensors


def load(path: str):
    """A Model from a Hugging Face directory (config.json + *.safetensors; gpt2 or llama),
    a .gguf file (llama), a directory written by Model.save, or a short name such as 'smollm2'."""
    from ..model import Model
    cfg, params = load_params(path)
    return Model(cfg, params)


def load_params(path: str) -> tuple[Config, dict]:
    from .resolve import resolve_model_path
    path = resolve_model_path(str(path))
    from .gguf import is_gguf, load_gguf   # by content too: a GGUF file need not end in .gguf
    if os.path.isfile(path) and (path.endswith(".gguf") or is_gguf(path)):
        return load_gguf(path)
    if os.path.isdir(path):
        return _load_hf_dir(path)
    raise CheckpointError(f"{path}: not a model (expected a directory with config.json and "
                          f"*.safetensors, or a .gguf file)")


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    return hf


def _load_hf_dir(path: str) -> tuple[Config, dict]:
    hf = read_hf_config(path)
    cfg = hf_names.config_from_hf(hf)
    files = _safetensors_files(path)
    where: dict[str, SafetensorsFile] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.keys():
            where[name] = st
    try:
        params = hf_names.to_engine(cfg, lambda n: _finite(where[n], n), where.keys())
    except CheckpointError as e:  # name the directory when the message does not already
        if str(e).startswith(path):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, params


def _finite(st: SafetensorsFile, name: str):
    a = st.float32(name)
    if not np.isfinite(a).all():
        # A NaN or inf weight makes every loss NaN later, far from the cause: name it here
        # (the GGUF loader checks the same).
        raise CheckpointError(f"{st.path}: tensor {name!r} holds NaN or infinite values "
                              "(corrupt file)")
    return a


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        for s in shards:
            if not isinstance(s, str) or os.path.basename(s) != s:
                raise CheckpointError(f"{index}: shard name {s!r} is not a plain file name")
            if not os.path.isfile(os.path.join(path, s)):
                raise CheckpointError(f"{index}: shard {s} is missing")
        return [os.path.join(path, s) for s in shards]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
        raise CheckpointError(f"{path}: only PyTorch pickle weights found; tailtune reads "
                              "safetensors (pickles can run code). Convert with "
                              "transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{path}: no model.safetensors (or sharded index) in the directory")


def save_model(model, path: str, dtype: str = "F32") -> None:
    """config.json + model.safetensors in the Hugging Face layout, each written atomically."""
    if dtype not in WRITE_DTYPES:  # checked before anything is written
        raise InputError(f"save dtype {dtype!r} is not supported; choose one of "
                         f"{', '.join(WRITE_DTYPES)}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"save path must be a str or path, got {type(path).__name__}")
    cfg = model.config
    hf = hf_names.config_to_hf(cfg)
    hf["torch_dtype"] = WRITE_DTYPES[dtype]
    tensors = hf_names.to_hf(cfg, model.params)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path} is an existing file; Model.save writes a directory "
                         "(config.json + model.safetensors)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the directory {path}: {e.strerror or e}") from None
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"}, dtype)
    write_json(os.path.join(path, "config.json"), hf)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
