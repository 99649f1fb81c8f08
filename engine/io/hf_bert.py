"""Hugging Face <-> engine for BERT encoders (model_type "bert"): config.json fields and tensor
names. A BertModel's tensors have no prefix; a task model's (BertForSequenceClassification,
BertForMaskedLM, ...) sit under "bert.", its head beside. The engine keeps the sequence
classifier (pooler + classifier) and drops the pretraining heads ("cls.*": masked-LM and
next-sentence), as transformers does when it loads such a file for classification.
"""
from __future__ import annotations

import sys

import numpy as np

from ..config import Config
from ..errors import CheckpointError, ConfigError

_GELUS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}


def config_from_hf(hf: dict, get, head: bool = True) -> Config:
    """`get` is hf_names._get (checked lookups). head=False: the file's classifier head is not
    wanted (labels of the caller's replace it), so its kind is not checked either."""
    act = hf.get("hidden_act", "gelu")
    if act not in _GELUS:
        raise ConfigError(f"bert hidden_act {act!r} is not supported (only {sorted(_GELUS)})")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ConfigError(f"bert position_embedding_type {kind!r} is not supported (only "
                          "'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConfigError("a bert decoder (is_decoder / add_cross_attention) is not supported; "
                          "tailtune reads BERT encoders")
    d, n_head = get(hf, "hidden_size", "size"), get(hf, "num_attention_heads", "size")
    if d % n_head:
        raise ConfigError(f"config.json: hidden_size={d} is not a multiple of "
                          f"num_attention_heads={n_head}")
    return Config.bert(vocab_size=get(hf, "vocab_size", "size"),
                       n_layer=get(hf, "num_hidden_layers", "size"), n_head=n_head, d_model=d,
                       d_ff=get(hf, "intermediate_size", "size"),
                       max_seq_len=get(hf, "max_position_embeddings", "size", 512),
                       type_vocab_size=get(hf, "type_vocab_size", "size", 2),
                       norm_eps=get(hf, "layer_norm_eps", "number", 1e-12), mlp=_GELUS[act],
                       init_std=get(hf, "initializer_range", "number", 0.02),
                       labels=_labels(hf) if head else None,
                       # (BertConfig's default: 0, its embedding's padding_idx; a null one
                       # is none: no padding row, as transformers reads it)
                       pad_token_id=get(hf, "pad_token_id", "id", None) if "pad_token_id" in hf else 0)


def _labels(hf: dict) -> list[str] | None:
    """A sequence classifier's class names in logit order (id2label), else None."""
    archs = hf.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs):
        return None
    problem = hf.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise ConfigError(f"bert problem_type {problem!r} is not supported (only single-label "
                          "classification)")
    id2label = hf.get("id2label")
    n = len(id2label) if isinstance(id2label, dict) else hf.get("num_labels", 2)
    if not isinstance(id2label, dict):
        id2label = {str(i): f"LABEL_{i}" for i in range(n)}
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config.json: id2label keys must be integers, got "
                          f"{sorted(id2label)[:5]}") from None
    if sorted(by_id) != list(range(len(by_id))) or not all(isinstance(v, str) and v for v in by_id.values()):
        raise ConfigError("config.json: id2label must map 0..n-1 to class names")
    if len(by_id) < 2:
        raise ConfigError("config.json: one label is a regression head, which tailtune does "
                          "not train (only classification over two or more labels)")
    return [by_id[i] for i in range(len(by_id))]


def config_to_hf(cfg: Config, ids: dict) -> dict:
    if cfg.mlp not in ("gelu", "gelu_erf"):
        raise ConfigError(f"cannot save as bert: it needs mlp 'gelu_erf' or 'gelu', this model "
                          f"has {cfg.mlp!r}")
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ConfigError("cannot save as bert: it needs n_kv_head == n_head and head_dim * "
                          "n_head == d_model")
    if not cfg.type_vocab_size:
        raise ConfigError("cannot save as bert: it needs token-type embeddings "
                          "(type_vocab_size >= 1)")
    hf = {"model_type": "bert",
          "architectures": ["BertForSequenceClassification" if cfg.labels else "BertModel"],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "intermediate_size": cfg.d_ff, "hidden_act": "gelu" if cfg.mlp == "gelu_erf" else "gelu_new",
          "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
          "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
          "position_embedding_type": "absolute", "torch_dtype": "float32",
          "pad_token_id": ids["pad_token_id"]}
    if cfg.labels:
        hf["id2label"] = {str(i): n for i, n in enumerate(cfg.labels)}
        hf["label2id"] = {n: i for i, n in enumerate(cfg.labels)}
        hf["problem_type"] = "single_label_classification"
    return hf


def name_map(cfg: Config, prefix: str) -> dict[str, str]:
    """engine name -> HF name of the encoder (and the pooler); the classifier is not prefixed."""
    m = {"wte.weight": "embeddings.word_embeddings.weight",
         "wpe.weight": "embeddings.position_embeddings.weight",
         "ln_e.weight": "embeddings.LayerNorm.weight", "ln_e.bias": "embeddings.LayerNorm.bias"}
    if cfg.type_vocab_size:
        m["wtt.weight"] = "embeddings.token_type_embeddings.weight"
    parts = (("attn.q", "attention.self.query"), ("attn.k", "attention.self.key"),
             ("attn.v", "attention.self.value"), ("attn.o", "attention.output.dense"),
             ("ln1", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
             ("mlp.down", "output.dense"), ("ln2", "output.LayerNorm"))
    for i in range(cfg.n_layer):
        for e, h in parts:
            for w in ("weight", "bias"):
                m[f"blocks.{i}.{e}.{w}"] = f"encoder.layer.{i}.{h}.{w}"
    m.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    m = {e: prefix + h for e, h in m.items()}
    if cfg.labels:
        m.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    return m


def prefix_of(names) -> str:
    return "bert." if any(n.startswith("bert.") for n in names) else ""


def to_engine(cfg: Config, get, names, fetch, expect) -> dict[str, np.ndarray]:
    """The engine's params. A classifier head the file lacks (a BertModel, a masked-LM
    checkpoint; or one for other labels, left out of `names` by the caller) starts new, as
    transformers starts it, and says so."""
    names = set(names)
    if cfg.n_layer * 16 > len(names):
        raise CheckpointError(f"config.json has {cfg.n_layer} layers, and the checkpoint holds "
                              f"only {len(names)} tensors: too few for them (a wrong config.json?)")
    prefix = prefix_of(names)
    out, new = {}, []
    for e, h in name_map(cfg, prefix).items():
        if e.startswith(("pooler.", "classifier.")) and h not in names:
            new.append(e)
            continue
        if h not in names and ".LayerNorm." in h:
            # the first BERT checkpoints (bert-base-uncased's) name them gamma and beta
            old = h.replace(".weight", ".gamma").replace(".bias", ".beta")
            h = old if old in names else h
        out[e] = fetch(get, names, h)
    if new:
        from ..model import new_head
        out.update(new_head(cfg, out))
        heads = sorted({e.split(".")[0] for e in new})
        what = f" for these {len(cfg.labels)} labels" if "classifier" in heads else ""
        print(f"tailtune: the checkpoint has no {' or '.join(heads)}{what}: "
              f"{' and '.join(heads)} start{'' if len(heads) > 1 else 's'} from random "
              "weights (train them)", file=sys.stderr, flush=True)
    for e, shape in (("wte.weight", (cfg.vocab_size, cfg.d_model)),
                     ("wpe.weight", (cfg.max_seq_len, cfg.d_model))):
        expect(out[e], shape, prefix + name_map(cfg, "")[e])
    return out


def dropped(cfg: Config, name: str) -> bool:
    """A tensor of the file the engine leaves out on purpose: the pretraining heads (masked-LM,
    next-sentence), and a classifier the model has no use for (no labels, or other labels)."""
    bare = name[5:] if name.startswith("bert.") else name
    return bare.startswith(("cls.", "classifier."))


def to_hf(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    prefix = "bert." if cfg.labels else ""
    return {h: params[e] for e, h in name_map(cfg, prefix).items()}
