"""Hugging Face <-> engine for BERT encoders, the RoBERTa family and DistilBERT (model_type
"bert", "roberta", "xlm-roberta", "distilbert"): config.json fields and tensor names. A
BertModel's tensors have no prefix; a task model's (BertForSequenceClassification,
BertForMaskedLM, ...) sit under "bert." ("roberta." for both RoBERTa families), its head beside. The engine keeps the sequence
classifier and drops the pretraining heads (BERT's "cls.*", masked-LM and next-sentence;
RoBERTa's "lm_head.*"), as transformers does when it loads such a file for classification.

RoBERTa is BERT's layout with three differences the engine covers: positions count from the
pad id + 1 (Config.position_offset: the table keeps its first rows, saved back as they were;
transformers also gives a pad token inside a text the pad's position and shifts the ones after
it, the engine counts straight on: the two differ only for a text holding the pad token),
one token type (pairs of texts are told apart by separators alone), and the classifier head
(dense + tanh on the first token, then out_proj) is BERT's pooler + classifier under other
names ("classifier.dense", "classifier.out_proj"; a RobertaModel's own pooler is
"pooler.dense").

DistilBERT is BERT's layout under its own names ("distilbert.transformer.layer.N...") and
DistilBertConfig's field names (dim, n_layers, ...), without token types; its classifier's
pre_classifier (dense + ReLU: Config.pooler_act) is the pooler's place. A DistilBertModel has
no pooler, nor has the engine's model of it.
"""
from __future__ import annotations

import sys

import numpy as np

from ..config import Config
from ..errors import CheckpointError, ConfigError

_GELUS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}
TYPES = ("bert", "roberta", "xlm-roberta", "distilbert")    # the model_types read here
_CLASS = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta",   # transformers'
          "distilbert": "DistilBert"}
_PREFIX = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.",  # a task model's
           "distilbert": "distilbert."}


def config_from_hf(hf: dict, get, head: bool = True) -> Config:
    """`get` is hf_names._get (checked lookups). head=False: the file's classifier head is not
    wanted (labels of the caller's replace it), so its kind is not checked either."""
    mt = hf.get("model_type", "bert")
    if mt == "distilbert":
        return _distilbert_config(hf, get, head)
    act = hf.get("hidden_act", "gelu")
    if act not in _GELUS:
        raise ConfigError(f"{mt} hidden_act {act!r} is not supported (only {sorted(_GELUS)})")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ConfigError(f"{mt} position_embedding_type {kind!r} is not supported (only "
                          "'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConfigError(f"a {mt} decoder (is_decoder / add_cross_attention) is not supported; "
                          "tailtune reads encoders")
    d, n_head = get(hf, "hidden_size", "size"), get(hf, "num_attention_heads", "size")
    if d % n_head:
        raise ConfigError(f"config.json: hidden_size={d} is not a multiple of "
                          f"num_attention_heads={n_head}")
    # (BertConfig's default pad id: 0, its embedding's padding_idx; a null one is none: no
    # padding row, as transformers reads it)
    extra = {"pad_token_id": get(hf, "pad_token_id", "id", None) if "pad_token_id" in hf else 0}
    if mt != "bert":
        # RobertaEmbeddings: position ids from padding_idx + 1 (its pad token's id)
        if hf.get("pad_token_id", 1) is None:
            raise ConfigError(f"config.json: a {mt} model needs pad_token_id (its positions count "
                              "from it)")
        pad = get(hf, "pad_token_id", "id", 1)
        extra = dict(model_type=mt, position_offset=pad + 1, pad_token_id=pad,
                     bos_token_id=get(hf, "bos_token_id", "id", 0),     # (RobertaConfig's
                     eos_token_id=get(hf, "eos_token_id", "id", 2))     # defaults)
    return Config.bert(vocab_size=get(hf, "vocab_size", "size"),
                       n_layer=get(hf, "num_hidden_layers", "size"), n_head=n_head, d_model=d,
                       d_ff=get(hf, "intermediate_size", "size"),
                       max_seq_len=get(hf, "max_position_embeddings", "size", 512),
                       type_vocab_size=get(hf, "type_vocab_size", "size", 2),
                       norm_eps=get(hf, "layer_norm_eps", "number", 1e-12), mlp=_GELUS[act],
                       init_std=get(hf, "initializer_range", "number", 0.02),
                       **_head(hf, head), **extra)


def _distilbert_config(hf: dict, get, head: bool) -> Config:
    """DistilBertConfig's own field names; no token types, LayerNorm eps 1e-12 (fixed in its
    code), the classifier's pre_classifier + ReLU in the pooler's place."""
    act = hf.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"distilbert activation {act!r} is not supported (only 'gelu')")
    if hf.get("sinusoidal_pos_embds"):
        raise ConfigError("distilbert sinusoidal_pos_embds is not supported (only learned "
                          "positions)")
    d, n_head = get(hf, "dim", "size", 768), get(hf, "n_heads", "size", 12)
    if d % n_head:
        raise ConfigError(f"config.json: dim={d} is not a multiple of n_heads={n_head}")
    return Config.distilbert(
        vocab_size=get(hf, "vocab_size", "size", 30522), n_layer=get(hf, "n_layers", "size", 6),
        n_head=n_head, d_model=d, d_ff=get(hf, "hidden_dim", "size", 3072),
        max_seq_len=get(hf, "max_position_embeddings", "size", 512),
        init_std=get(hf, "initializer_range", "number", 0.02), **_head(hf, head),
        # (a null one is none: no padding row, as transformers reads it)
        pad_token_id=get(hf, "pad_token_id", "id", None) if "pad_token_id" in hf else 0)


def _head(hf: dict, head: bool) -> dict:
    """The Config fields of an encoder file's head: a sequence classifier's labels, a token
    classifier's (per_token), or none (head False: the caller's labels replace them)."""
    if not head:
        return {}
    if _is_arch(hf, "ForTokenClassification"):
        return dict(labels=_id2label(hf), per_token=True)
    return dict(labels=labels_of(hf))


def _is_arch(hf: dict, suffix: str) -> bool:
    archs = hf.get("architectures") or []
    return any(isinstance(a, str) and a.endswith(suffix) for a in archs)


def labels_of(hf: dict) -> list[str] | None:
    """A sequence classifier's class names in logit order (id2label), else None."""
    if not _is_arch(hf, "ForSequenceClassification"):
        return None
    return _id2label(hf)


def _id2label(hf: dict) -> list[str]:
    problem = hf.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise ConfigError(f"problem_type {problem!r} is not supported (only single-label "
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
    mt = cfg.model_type
    if mt == "distilbert":
        return _distilbert_to_hf(cfg, ids)
    if cfg.mlp not in ("gelu", "gelu_erf"):
        raise ConfigError(f"cannot save as {mt}: it needs mlp 'gelu_erf' or 'gelu', this model "
                          f"has {cfg.mlp!r}")
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ConfigError(f"cannot save as {mt}: it needs n_kv_head == n_head and head_dim * "
                          "n_head == d_model")
    if not cfg.type_vocab_size:
        raise ConfigError(f"cannot save as {mt}: it needs token-type embeddings "
                          "(type_vocab_size >= 1)")
    if mt != "bert" and (ids["pad_token_id"] is None or cfg.position_offset != ids["pad_token_id"] + 1):
        raise ConfigError(f"cannot save as {mt}: its positions count from the pad id + 1, and this "
                          f"model has position_offset {cfg.position_offset} and pad_token_id "
                          f"{ids['pad_token_id']}")
    kind = _kind(cfg)
    hf = {"model_type": mt, "architectures": [_CLASS[mt] + kind],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "intermediate_size": cfg.d_ff, "hidden_act": "gelu" if cfg.mlp == "gelu_erf" else "gelu_new",
          "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
          "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
          "position_embedding_type": "absolute", "torch_dtype": "float32",
          "pad_token_id": ids["pad_token_id"]}
    if mt != "bert":
        hf.update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    _add_labels(hf, cfg)
    return hf


def _kind(cfg: Config) -> str:
    """transformers' model class of this head, after the family's prefix."""
    return ("Model" if not cfg.labels else "ForTokenClassification" if cfg.per_token
            else "ForSequenceClassification")


def _add_labels(hf: dict, cfg: Config) -> None:
    if cfg.labels:
        hf["id2label"] = {str(i): n for i, n in enumerate(cfg.labels)}
        hf["label2id"] = {n: i for i, n in enumerate(cfg.labels)}
        if not cfg.per_token:
            hf["problem_type"] = "single_label_classification"


def _distilbert_to_hf(cfg: Config, ids: dict) -> dict:
    """(Config fields DistilBERT fixes, checked by the family's fields before this.)"""
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ConfigError("cannot save as distilbert: it needs n_kv_head == n_head and head_dim "
                          "* n_head == d_model")
    hf = {"model_type": "distilbert",
          "architectures": ["DistilBert" + _kind(cfg)],
          "vocab_size": cfg.vocab_size, "dim": cfg.d_model, "n_layers": cfg.n_layer,
          "n_heads": cfg.n_head, "hidden_dim": cfg.d_ff, "activation": "gelu",
          "max_position_embeddings": cfg.max_seq_len, "sinusoidal_pos_embds": False,
          "initializer_range": cfg.init_std, "torch_dtype": "float32",
          "pad_token_id": ids["pad_token_id"]}
    _add_labels(hf, cfg)
    return hf


def _distilbert_map(cfg: Config, prefix: str) -> dict[str, str]:
    m = {"wte.weight": "embeddings.word_embeddings.weight",
         "wpe.weight": "embeddings.position_embeddings.weight",
         "ln_e.weight": "embeddings.LayerNorm.weight", "ln_e.bias": "embeddings.LayerNorm.bias"}
    parts = (("attn.q", "attention.q_lin"), ("attn.k", "attention.k_lin"),
             ("attn.v", "attention.v_lin"), ("attn.o", "attention.out_lin"),
             ("ln1", "sa_layer_norm"), ("mlp.up", "ffn.lin1"), ("mlp.down", "ffn.lin2"),
             ("ln2", "output_layer_norm"))
    for i in range(cfg.n_layer):
        for e, h in parts:
            for w in ("weight", "bias"):
                m[f"blocks.{i}.{e}.{w}"] = f"transformer.layer.{i}.{h}.{w}"
    m = {e: prefix + h for e, h in m.items()}
    if cfg.labels:   # (a DistilBertModel has no pooler, nor a token classifier)
        heads = (("pooler", "pre_classifier"),) * (not cfg.per_token) + (("classifier", "classifier"),)
        m.update({f"{e}.{w}": f"{h}.{w}" for e, h in heads for w in ("weight", "bias")})
    return m


def name_map(cfg: Config, prefix: str) -> dict[str, str]:
    """engine name -> HF name of the encoder (and the pooler); the classifier is not prefixed."""
    if cfg.model_type == "distilbert":
        return _distilbert_map(cfg, prefix)
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
    roberta_head = cfg.model_type != "bert" and cfg.labels and not cfg.per_token
    if not roberta_head and not cfg.per_token:   # (a token classifier has no pooler)
        m.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    m = {e: prefix + h for e, h in m.items()}
    if roberta_head:
        m.update({f"{e}.{w}": f"classifier.{h}.{w}" for e, h in (("pooler", "dense"),
                  ("classifier", "out_proj")) for w in ("weight", "bias")})
    elif cfg.labels:
        m.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    return m


def prefix_of(cfg: Config, names) -> str:
    p = _PREFIX[cfg.model_type]
    return p if any(n.startswith(p) for n in names) else ""


def other_head(cfg: Config, name: str) -> bool:
    """A tensor of the file's classifier that labels other than its own replace (BERT's
    classifier; RoBERTa's out_proj: its dense layer, the pooler's math, is kept as BERT's
    pooler is; all of it for a token classifier)."""
    return name.startswith("classifier.out_proj." if cfg.model_type in ("roberta", "xlm-roberta")
                           and not cfg.per_token else "classifier.")


def to_engine(cfg: Config, get, names, fetch, expect) -> dict[str, np.ndarray]:
    """The engine's params. A classifier head the file lacks (a BertModel, a masked-LM
    checkpoint; or one for other labels, left out of `names` by the caller) starts new, as
    transformers starts it, and says so."""
    names = set(names)
    if cfg.n_layer * 16 > len(names):
        raise CheckpointError(f"config.json has {cfg.n_layer} layers, and the checkpoint holds "
                              f"only {len(names)} tensors: too few for them (a wrong config.json?)")
    prefix = prefix_of(cfg, names)
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
        expect(out[e], shape, name_map(cfg, prefix)[e])
    return out


def dropped(cfg: Config, name: str) -> bool:
    """A tensor of the file the engine leaves out on purpose: the pretraining heads (masked-LM,
    next-sentence), a classifier the model has no use for (no labels, or other labels), and a
    RobertaModel's pooler under a RoBERTa classifier (which has its own dense layer), any
    pooler under a token classifier."""
    p = _PREFIX[cfg.model_type]
    bare = name[len(p):] if name.startswith(p) else name
    if cfg.per_token and bare.startswith("pooler."):
        return True
    if cfg.model_type == "bert":
        return bare.startswith(("cls.", "classifier."))
    if cfg.model_type == "distilbert":   # (its masked-LM head: vocab_*)
        return bare.startswith(("vocab_", "pre_classifier.", "classifier."))
    return bare.startswith(("lm_head.", "classifier.")) or bool(cfg.labels) and bare.startswith("pooler.")


def to_hf(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    prefix = _PREFIX[cfg.model_type] if cfg.labels else ""
    return {h: params[e] for e, h in name_map(cfg, prefix).items()}
