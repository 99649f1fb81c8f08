"""Loading and saving models: Hugging Face directories (safetensors), GGUF files, and the
directories `Model.save` writes (which are Hugging Face directories)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

from ..config import Config
from ..errors import CheckpointError, ConfigError, InputError
from . import hf_names
from .safetensors import WRITE_DTYPES, SafetensorsFile, write_atomic
from .safetensors import write as write_safetensors


def load(path: str, labels=None, per_token: bool = False):
    """A Model from a Hugging Face directory (config.json + *.safetensors; gpt2, llama,
    mistral, phi3, qwen2, qwen3, smollm3 or bert), a .gguf file (llama, qwen2, qwen3, smollm3,
    phi3 or gpt2), a directory written by Model.save, or a short name such as 'smollm2'.
    labels: the class names of a sequence classifier (an encoder's head; a causal LM's on its
    last token, in place of its LM head), kept from the file when it has one for these
    labels, else started from random weights. per_token: with labels, an encoder's token
    classifier (one label per token: NER), for which a file's sequence classifier and
    pooler are left out."""
    from ..model import Model
    from .resolve import resolve_model_path
    path = resolve_model_path(str(path))
    cfg, params = load_params(path, labels, per_token)
    try:
        return Model(cfg, params)
    except CheckpointError as e:   # a tensor that disagrees with the file's own config
        raise CheckpointError(f"{path}: {e}") from None


def load_params(path: str, labels=None, per_token: bool = False) -> tuple[Config, dict]:
    from .resolve import resolve_model_path
    path = resolve_model_path(str(path))
    from .gguf import is_gguf, load_gguf   # by content too: a GGUF file need not end in .gguf
    if per_token is not False and (per_token is not True or labels is None):
        raise InputError(f"per_token must be True or False, and True only with labels (a token "
                         f"classifier's), got {per_token!r}")
    if os.path.isfile(path) and (path.endswith(".gguf") or is_gguf(path)):
        if per_token:
            raise InputError(f"{path}: a GGUF file holds a causal LM; a token classifier is an "
                             "encoder's (BERT, RoBERTa, DistilBERT)")
        cfg, params = load_gguf(path)
        if labels is not None:   # (a GGUF file holds an LM: the classifier is new)
            if isinstance(labels, str) or not hasattr(labels, "__iter__"):
                raise InputError(f"labels must be a list of class names, got {labels!r}")
            cfg = dataclasses.replace(cfg, labels=list(labels))
            params = {n: a for n, a in params.items() if n != "lm_head.weight"}
            params.update(hf_names.with_scores(cfg, None, (), params))
        return cfg, params
    if os.path.isdir(path):
        return _load_hf_dir(path, labels, per_token)
    raise CheckpointError(f"{path}: not a model (expected a directory with config.json and "
                          f"*.safetensors, or a .gguf file)")


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    return _read_json_object(cfg_path)


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: also a number past int()'s 4300 digits; RecursionError: deep nesting
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def _load_hf_dir(path: str, labels=None, per_token: bool = False) -> tuple[Config, dict]:
    hf = read_hf_config(path)
    other_head = False     # the file's classifier is for other labels: a new one replaces it
    if labels is None:
        cfg = hf_names.config_from_hf(hf)
    else:
        if isinstance(labels, str) or not hasattr(labels, "__iter__"):
            raise InputError(f"labels must be a list of class names, got {labels!r}")
        cfg = hf_names.config_from_hf(hf, head=False)   # the file's head, of whatever kind, aside
        labels = list(labels)
        if per_token and not cfg.encoder:
            raise InputError(f"{path}: a {cfg.model_type} model is a causal LM; a token "
                             "classifier is an encoder's (BERT, RoBERTa, DistilBERT)")
        try:
            own = hf_names.config_from_hf(hf)
            other_head = (own.labels, own.per_token) != (labels, per_token)
        except ConfigError:   # a regression or multi-label head: replaced
            other_head = True
        cfg = dataclasses.replace(cfg, labels=labels, per_token=per_token)
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json_object(gen_path) if os.path.isfile(gen_path) else None
    # one that says no more than the ids is left to be rebuilt from them (Model.save writes such
    # a file), so a save and load gives back an equal Config
    if gen is not None and gen != generation_config(cfg):
        cfg = dataclasses.replace(cfg, generation=gen)
    files = _safetensors_files(path)
    where: dict[str, SafetensorsFile] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.keys():
            where[name] = st
    used = set()

    def get(name):
        used.add(name)
        return _finite(where[name], name)
    names = [n for n in where if not (other_head and (hf_names.hf_bert.other_head(cfg, n)
                                                      if cfg.encoder else n == "score.weight"))]
    try:
        params = hf_names.to_engine(cfg, get, names)
    except CheckpointError as e:  # name the directory when the message does not already
        if str(e).startswith(path):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.tie_embeddings and "lm_head.weight" in where and cfg.labels is None:
        cfg = _untie_a_distinct_head(path, cfg, params, get("lm_head.weight"))
    # a tensor with no place in the model (a block past config.json's layer count, an adapter)
    # means a model the engine would run wrongly; buffers transformers saves are not weights
    extra = sorted(n for n in set(where) - used if not n.endswith(_BUFFERS)
                   and not (cfg.model_type in hf_names.hf_bert.TYPES and hf_names.hf_bert.dropped(cfg, n))
                   and not hf_names.dropped_for_scores(cfg, n))
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise CheckpointError(f"{path}: tensors the {cfg.model_type} model of config.json "
                              f"({cfg.n_layer} layers) has no place for: {shown}")
    return cfg, params


def _untie_a_distinct_head(path: str, cfg: Config, params: dict, head) -> Config:
    """A config that ties the embeddings, and a file with an lm_head.weight of its own: a copy
    of the embedding is the tied head; a different one is what transformers runs ("will NOT tie
    them"), so the model is untied with that head instead of dropping it."""
    wte = params["wte.weight"]
    if head.shape != wte.shape:
        raise CheckpointError(f"{path}: lm_head.weight has shape {head.shape}, the embedding "
                              f"{wte.shape}")
    if np.array_equal(head, wte):
        return cfg
    print(f"tailtune: {path}: config.json ties the embeddings, but lm_head.weight differs from "
          "them; loaded untied with that head, as transformers does", file=sys.stderr, flush=True)
    params["lm_head.weight"] = head
    return dataclasses.replace(cfg, tie_embeddings=False)


# non-weight tensors some transformers versions save: GPT-2's causal mask, rotary frequencies,
# BERT's position ids
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".position_ids")


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
        except (OSError, ValueError, KeyError, TypeError, AttributeError,   # weight_map not a dict
                RecursionError) as e:
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


# What Model.save writes, in the order the files are swapped in (config.json last: a directory
# whose config.json is new holds the new weights too).
SAVED_FILES = ("model.safetensors", "generation_config.json", "config.json")


def save_model(model, path: str, dtype: str = "F32") -> None:
    """config.json, generation_config.json and model.safetensors in the Hugging Face layout.
    All three are written to a staging folder inside `path` first and only then moved into place,
    so a failure leaves an existing model whole instead of new weights next to an old config."""
    if dtype not in WRITE_DTYPES:  # checked before anything is written
        raise InputError(f"save dtype {dtype!r} is not supported; choose one of "
                         f"{', '.join(WRITE_DTYPES)}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"save path must be a str or path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise InputError("save path is empty (Model.save writes a directory: name one)")
    _check_params(model)
    cfg = model.config
    try:
        hf = hf_names.config_to_hf(cfg)
    except ConfigError as e:   # a research config (GQA in GPT-2, ...): say how to keep the work
        raise ConfigError(f"{e}: no Hugging Face model holds this configuration, so nothing was "
                          "saved; pickle the model (pickle.dump(model, f)) to keep its weights "
                          "and configuration") from None
    hf["torch_dtype"] = WRITE_DTYPES[dtype]
    tensors = hf_names.to_hf(cfg, model.params)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path} is an existing file; Model.save writes a directory "
                         "(config.json + model.safetensors)")
    for name in SAVED_FILES:
        dst = os.path.join(path, name)
        if os.path.lexists(dst) and not os.path.isfile(dst):
            raise InputError(f"{dst} exists and is not a file; Model.save will not replace it")
    created = not os.path.exists(path)
    remove_abandoned(path, ".save.tmp")
    stage = os.path.join(path, f".save.tmp{os.getpid()}")
    try:
        os.makedirs(stage, exist_ok=True)  # one left by a killed save is reused, then removed
    except OSError as e:
        raise InputError(f"cannot create the directory {path}: {e.strerror or e}") from None
    try:
        write_safetensors(os.path.join(stage, "model.safetensors"), tensors, {"format": "pt"},
                          dtype)
        write_json(os.path.join(stage, "generation_config.json"), generation_config(cfg))
        write_json(os.path.join(stage, "config.json"), hf)
        for name in SAVED_FILES:
            os.replace(os.path.join(stage, name), os.path.join(path, name))
    except (OSError, CheckpointError) as e:   # named by the file, not the staging folder
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).replace(stage + os.sep, "")
        raise CheckpointError(f"{path}: could not save the model: {why}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created:  # a failed save into a new directory leaves none behind
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty


def _check_params(model) -> None:
    """Every parameter as the model's shapes say, float32 and finite: what engine.load accepts
    back (a diverged loop's NaN, an array replaced by hand, would save and then not load)."""
    for n, shape in model.shapes.items():
        a = model.params.get(n)
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise InputError(f"parameter {n} is {got}, expected float32 {shape}: nothing was saved")
        if not np.isfinite(a).all():
            raise InputError(f"parameter {n} holds NaN or infinite values (a diverged training "
                             "step?): nothing was saved")


_ABANDONED_AFTER = 600   # seconds without a write


def remove_abandoned(parent: str, prefix: str) -> None:
    """Remove parent/<prefix><pid> staging folders of processes no longer running: a save
    killed outright (SIGKILL, the OOM killer) cannot clean up after itself. Only when nothing in
    the folder was written for ten minutes too: a pid is local, and the same folder may be
    in use from another container or host, where that pid means another process."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        path = os.path.join(parent, name)
        if (name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid()
                and not _alive(int(pid)) and _idle_for(path) > _ABANDONED_AFTER):
            shutil.rmtree(path, ignore_errors=True)


def _idle_for(path: str) -> float:
    """Seconds since anything in the folder `path` was last written."""
    newest = 0.0
    for root, _, files in os.walk(path):
        for f in (root, *(os.path.join(root, f) for f in files)):
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(f).st_mtime)
    return time.time() - newest


_WINDOWS = os.name == "nt"


def _alive(pid: int) -> bool:
    if _WINDOWS:   # there os.kill(pid, 0) is TerminateProcess: never probe, keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # another user's process
        return True
    return True


def generation_config(cfg: Config) -> dict:
    """generation_config.json: the source model's as loaded, else the token ids that are known."""
    if cfg.generation is not None:
        return cfg.generation
    return {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(cfg, k) is not None}


def write_json(path: str, obj) -> None:
    """obj as JSON, atomically; a failure leaves no temporary file and raises a CheckpointError
    naming the path."""
    try:
        text = json.dumps(obj, indent=2)
    except (TypeError, ValueError) as e:  # before any file is touched
        raise InputError(f"{path}: cannot write as JSON: {e}") from None
    write_atomic(path, [text.encode("utf-8")])
