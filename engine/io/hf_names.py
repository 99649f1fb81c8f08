"""Hugging Face <-> engine: config.json fields and tensor names for the gpt2, llama, mistral,
phi3, qwen2, qwen3 and smollm3 families (all but gpt2 name their tensors as llama does; qwen3
adds q_norm, k_norm; phi3 holds q, k, v in one qkv_proj and the MLP's gate and up in one
gate_up_proj).

Engine weights are (out, in) like torch.nn.Linear. GPT-2's Conv1D stores (in, out) and fuses
q, k, v into one c_attn; both are undone on load and redone on save.
"""
from __future__ import annotations

import reprlib
import sys

import numpy as np

from ..config import FAMILIES, FAMILY_FIELDS, ROPE_SCALING_KEYS, Config
from ..errors import CheckpointError, ConfigError, is_int
from . import hf_bert

SUPPORTED = FAMILIES
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


_REQUIRED = object()


def _get(hf: dict, key: str, kind: str, default=_REQUIRED, within: str = ""):
    """hf[key] checked to be of `kind` ("size": positive integer, "number", "bool", "dict", "id":
    an integer, "ids": an integer or a non-empty list of them);
    a missing required key or a value of the wrong type is a ConfigError naming config.json and
    the key. A null counts as missing where the default is None (n_inner, head_dim, ...)."""
    v = hf.get(key, default)
    if v is _REQUIRED:
        raise ConfigError(f"config.json has no {within + key!r}")
    if v is None and default is None:
        return None
    ok = {"size": lambda: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "number": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda: isinstance(v, bool),
          "dict": lambda: isinstance(v, dict),
          "id": lambda: is_int(v),
          "ids": lambda: is_int(v) or isinstance(v, list) and v and all(map(is_int, v))}[kind]()
    if not ok:
        what = {"size": "a positive integer", "number": "a number", "bool": "true or false",
                "dict": "an object", "id": "a token id",
                "ids": "a token id or a non-empty list of them"}[kind]
        raise ConfigError(f"config.json: {within + key}={v!r} is not {what}")
    return v


def _token_ids(hf: dict) -> dict:
    return {"bos_token_id": _get(hf, "bos_token_id", "id", None),
            "eos_token_id": _get(hf, "eos_token_id", "ids", None),
            "pad_token_id": _get(hf, "pad_token_id", "id", None)}


def config_from_hf(hf: dict, head: bool = True) -> Config:
    """head=False: a classifier head of the file is to be replaced (bert: its labels, or a
    regression head, are not read)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ConfigError(f"unknown model type {mt!r} in config.json; tailtune supports {SUPPORTED}")
    if mt in hf_bert.TYPES:
        return hf_bert.config_from_hf(hf, _get, head)
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _TANH_GELUS:
            raise ConfigError(f"gpt2 activation_function {act!r} is not supported (only the tanh "
                              f"GELU forms {_TANH_GELUS})")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ConfigError("gpt2 attention scaling other than 1/sqrt(head_dim) is not supported")
        d = _get(hf, "n_embd", "size")
        return Config.gpt2(labels=hf_bert.labels_of(hf) if head else None,
                           vocab_size=_get(hf, "vocab_size", "size"),
                           n_layer=_get(hf, "n_layer", "size"), n_head=_get(hf, "n_head", "size"),
                           d_model=d, d_ff=_get(hf, "n_inner", "size", None) or 4 * d,
                           max_seq_len=_get(hf, "n_positions", "size", 1024),
                           norm_eps=_get(hf, "layer_norm_epsilon", "number", 1e-5),
                           tie_embeddings=_get(hf, "tie_word_embeddings", "bool", True),
                           **_token_ids(hf))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{mt} hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{mt} pretraining_tp != 1 is not supported")
    if mt in ("qwen2", "qwen3", "smollm3") and hf.get("use_sliding_window"):
        # transformers then gives the layers past max_window_layers windowed attention
        raise ConfigError(f"{mt} use_sliding_window=true is not supported (only full attention)")
    if (mt == "smollm3" and hf.get("sliding_window") is not None
            and "sliding_attention" in (hf.get("layer_types") or ())):
        # SmolLM3 windows the layers layer_types names whatever use_sliding_window says
        raise ConfigError("smollm3 layer_types with sliding_attention (sliding_window="
                          f"{hf['sliding_window']!r}) is not supported (only full attention)")
    max_pos = _get(hf, "max_position_embeddings", "size",   # transformers' defaults
                   {"llama": 2048, "mistral": 131072, "phi3": 4096}.get(mt, 32768))
    theta, rope_scaling = _rope(mt, hf, max_pos)
    if mt == "phi3" and rope_scaling is not None:   # Phi3Config takes longrope only
        raise ConfigError(f"phi3 rope scaling {rope_scaling['rope_type']!r} is not supported "
                          "(transformers' Phi-3 takes longrope only, which tailtune does not)")
    n_head = _get(hf, "num_attention_heads", "size")
    d = _get(hf, "hidden_size", "size")
    family = getattr(Config, mt)
    if mt == "qwen2":   # transformers' Qwen2: biases on q, k, v always, none elsewhere
        bias = dict(attn_bias=True, attn_out_bias=False, mlp_bias=False)
    elif mt in ("mistral", "phi3"):   # no biases, whatever the file says
        bias = dict(attn_bias=False, mlp_bias=False)
        _full_rotary(mt, hf)
    elif mt == "qwen3":   # attention_bias for all four projections, as llama; no MLP biases
        bias = dict(attn_bias=_get(hf, "attention_bias", "bool", False), mlp_bias=False)
    else:
        bias = dict(attn_bias=_get(hf, "attention_bias", "bool", False),
                    mlp_bias=_get(hf, "mlp_bias", "bool", False))
    n_layer = _get(hf, "num_hidden_layers", "size")
    extra = {"no_rope_blocks": _no_rope_blocks(hf, n_layer)} if mt == "smollm3" else {}
    if mt in ("mistral", "phi3"):   # the configs' default windows when the key is absent
        default = 4096 if mt == "mistral" else None
        extra["sliding_window"] = (None if hf.get("sliding_window", default) is None
                                   else _get(hf, "sliding_window", "size", default))
    return family(labels=hf_bert.labels_of(hf) if head else None,
                  vocab_size=_get(hf, "vocab_size", "size"),
                  n_layer=n_layer, n_head=n_head,
                  # (MistralConfig's default is 8 key / value heads, the others' n_head)
                  n_kv_head=_get(hf, "num_key_value_heads", "size", None)
                  or (8 if mt == "mistral" else n_head),
                  d_model=d,
                  # (transformers' Qwen3Config has heads 128 wide by default)
                  head_dim=(_get(hf, "head_dim", "size", None)
                            or (128 if mt == "qwen3" else d // n_head)),
                  d_ff=_get(hf, "intermediate_size", "size"),
                  max_seq_len=max_pos,
                  # (Phi3Config's default is 1e-5, the others' 1e-6)
                  norm_eps=_get(hf, "rms_norm_eps", "number", 1e-5 if mt == "phi3" else 1e-6),
                  rope_theta=float(theta),
                  tie_embeddings=_get(hf, "tie_word_embeddings", "bool", mt == "smollm3"),
                  rope_scaling=rope_scaling, **bias, **extra, **_token_ids(hf))


def _full_rotary(mt: str, hf: dict) -> None:
    """Refuse a rotary embedding over part of each head (Phi-4-mini's partial_rotary_factor),
    looked up where transformers takes it: a non-empty rope_scaling replaces rope_parameters."""
    params = next((d for d in (hf.get("rope_scaling"), hf.get("rope_parameters"))
                   if isinstance(d, dict) and d), {})
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ConfigError(f"{mt} partial_rotary_factor={factor!r} is not supported (only a "
                          "rotary embedding over whole heads)")


def _no_rope_blocks(hf: dict, n_layer: int) -> list[int]:
    """SmolLM3's no_rope_layers (per layer, 1 = rotary, 0 = none) as the blocks without; when
    absent, every no_rope_layer_interval-th block (transformers' SmolLM3Config does the same)."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        step = _get(hf, "no_rope_layer_interval", "size", 4)
        return [i for i in range(n_layer) if (i + 1) % step == 0]
    if (not isinstance(flags, list) or len(flags) < n_layer
            or not all(f in (0, 1) and not isinstance(f, float) for f in flags)):
        raise ConfigError(f"config.json: no_rope_layers must be {n_layer} flags of 0 or 1, got "
                          f"{reprlib.repr(flags)}")
    return [i for i, f in enumerate(flags[:n_layer]) if not f]   # transformers reads the first


def _rope(mt: str, hf: dict, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, Config.rope_scaling) as transformers reads config.json: a non-empty
    rope_scaling replaces rope_parameters whole; the type is rope_type, else type, else default;
    theta comes from that dict, else the top level; llama3's original context defaults to
    max_position_embeddings."""
    scaling = _get(hf, "rope_scaling", "dict", None)
    where = "rope_scaling" if scaling else "rope_parameters"
    d = scaling or _get(hf, "rope_parameters", "dict", None) or {}
    kind = d["rope_type"] if "rope_type" in d else d.get("type", "default")
    if not isinstance(kind, str):
        raise ConfigError(f"config.json: {where} type {kind!r} is not a string")
    theta = _get(d, "rope_theta", "number", None, within=f"{where}.")
    if theta is None:   # transformers' defaults: SmolLM3Config's 2e6, the others' 1e4
        theta = _get(hf, "rope_theta", "number", 2e6 if mt == "smollm3" else 10000.0)
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"{mt} rope scaling {where} type {kind!r} is not supported (only "
                          f"default, {', '.join(ROPE_SCALING_KEYS)})")
    out = {"rope_type": kind}
    for k in ROPE_SCALING_KEYS[kind]:
        if k == "original_max_position_embeddings":
            out[k] = _get(d, k, "size", max_pos, within=f"{where}.")
        else:
            out[k] = _get(d, k, "number", within=f"{where}.")
    return float(theta), out


def config_to_hf(cfg: Config) -> dict:
    """config.json for transformers (see _config_to_hf); a causal LM with labels as its
    *ForSequenceClassification, with id2label."""
    hf = _config_to_hf(cfg)
    if cfg.labels is not None and not cfg.encoder:
        arch = hf["architectures"][0]
        base = arch[:-len("LMHeadModel")] if arch.endswith("LMHeadModel") else arch[:-len("ForCausalLM")]
        hf["architectures"] = [base + "ForSequenceClassification"]
        hf["id2label"] = {str(i): n for i, n in enumerate(cfg.labels)}
        hf["label2id"] = {n: i for i, n in enumerate(cfg.labels)}
        hf["problem_type"] = "single_label_classification"
    return hf


def _config_to_hf(cfg: Config) -> dict:
    """config.json for transformers; refuses configs no such family holds. The token
    ids are written even when unknown (null): a missing one would become transformers' default
    (gpt2: 50256, llama: 1 and 2), which need not be a token of this model at all."""
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    want = dict(FAMILY_FIELDS[cfg.model_type])
    # transformers' llama, qwen3 and smollm3 have one attention_bias for all four projections
    want.setdefault("attn_out_bias", cfg.attn_bias)
    _require(cfg, want)
    if cfg.model_type in hf_bert.TYPES:
        return hf_bert.config_to_hf(cfg, ids)
    if cfg.model_type == "gpt2":
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            raise ConfigError("gpt2 needs head_dim * n_head == d_model")
        if cfg.n_kv_head != cfg.n_head:
            raise ConfigError("gpt2 has no grouped-query attention (n_kv_head must equal n_head)")
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", **ids}
    if cfg.model_type == "llama" and cfg.d_model % cfg.n_head:
        # transformers' LlamaConfig refuses it, whatever head_dim says (its Mistral, Qwen2,
        # Qwen3 and SmolLM3 take head_dim as given)
        raise ConfigError(f"{cfg.model_type} in transformers needs d_model a multiple of n_head; "
                          f"this model has d_model={cfg.d_model}, n_head={cfg.n_head}")
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
              "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta,
              "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
              "tie_word_embeddings": cfg.tie_embeddings,
              "attention_dropout": 0.0, "torch_dtype": "float32", **ids}
    if cfg.model_type == "mistral":
        return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **common,
                "sliding_window": cfg.sliding_window}
    if cfg.model_type == "phi3":
        return {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], **common,
                "sliding_window": cfg.sliding_window,
                "original_max_position_embeddings": cfg.max_seq_len}
    if cfg.model_type == "qwen2":
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **common,
                "use_sliding_window": False}
    if cfg.model_type == "qwen3":
        return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **common,
                "attention_bias": cfg.attn_bias, "use_sliding_window": False}
    if cfg.model_type == "smollm3":
        no_rope = set(cfg.no_rope_blocks or ())
        return {"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"], **common,
                "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias,
                "no_rope_layers": [int(i not in no_rope) for i in range(cfg.n_layer)],
                "use_sliding_window": False}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
            "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias}


def _require(cfg: Config, want: dict) -> None:
    for k, v in want.items():
        if getattr(cfg, k) != v:
            hint = (" (Mistral has a sliding window: model_type='mistral')"
                    if k == "sliding_window" else "")
            raise ConfigError(f"cannot save as {cfg.model_type}: it needs {k}={v!r}, "
                              f"this model has {getattr(cfg, k)!r}{hint}")


def _llama_map(cfg: Config) -> dict[str, str]:
    """engine name -> HF name."""
    m = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    if not cfg.tie_embeddings and cfg.labels is None:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layer):
        e, h = f"blocks.{i}.", f"model.layers.{i}."
        m[e + "ln1.weight"] = h + "input_layernorm.weight"
        m[e + "ln2.weight"] = h + "post_attention_layernorm.weight"
        if cfg.qk_norm:
            m[e + "attn.q_norm.weight"] = h + "self_attn.q_norm.weight"
            m[e + "attn.k_norm.weight"] = h + "self_attn.k_norm.weight"
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            m[e + f"attn.{a}.weight"] = h + f"self_attn.{b}.weight"
            if cfg.attn_out_bias if a == "o" else cfg.attn_bias:
                m[e + f"attn.{a}.bias"] = h + f"self_attn.{b}.bias"
        for a, b in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            m[e + f"mlp.{a}.weight"] = h + f"mlp.{b}.weight"
            if cfg.mlp_bias:
                m[e + f"mlp.{a}.bias"] = h + f"mlp.{b}.bias"
    return m


def _fused(cfg: Config) -> dict[str, tuple[tuple[str, int], ...]]:
    """The tensors a llama-named family stores fused: HF name -> (engine name, rows) of its
    parts, in order. Phi-3's (q, k, v in qkv_proj; gate, then up, in gate_up_proj); none for
    the others."""
    out = {}
    if cfg.model_type != "phi3":
        return out
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        e, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "self_attn.qkv_proj.weight"] = ((e + "attn.q.weight", q),
                                                (e + "attn.k.weight", kv),
                                                (e + "attn.v.weight", kv))
        out[h + "mlp.gate_up_proj.weight"] = ((e + "mlp.gate.weight", cfg.d_ff),
                                              (e + "mlp.up.weight", cfg.d_ff))
    return out


def _one_to_one(cfg: Config) -> dict[str, str]:
    """engine name -> HF name, for the tensors stored as they are."""
    parts = {e for ps in _fused(cfg).values() for e, _ in ps}
    return {e: h for e, h in _llama_map(cfg).items() if e not in parts}


def to_engine(cfg: Config, get, names) -> dict[str, np.ndarray]:
    """Build engine params from HF tensors. `get(name)` returns a float32 array, `names` the set
    of HF names available. Missing tensors and unexpected shapes raise CheckpointError."""
    names = set(names)
    if cfg.model_type in hf_bert.TYPES:
        return hf_bert.to_engine(cfg, get, names, _fetch, _expect)
    # every layer has at least 9 tensors (Llama's; GPT-2's 12; Phi-3's 6, some fused)
    if cfg.n_layer * (6 if cfg.model_type == "phi3" else 9) > len(names):
        # before the name map is built: a config.json of 10^9 layers would take minutes and GBs
        raise CheckpointError(f"config.json has {cfg.n_layer} layers, and the checkpoint holds "
                              f"only {len(names)} tensors: too few for them (a wrong config.json?)")
    out: dict[str, np.ndarray] = {}
    if cfg.model_type != "gpt2":  # no slicing or transposing: Model checks shapes by name
        for e, h in _one_to_one(cfg).items():
            out[e] = _fetch(get, names, h)
        for h, parts in _fused(cfg).items():
            a = _fetch(get, names, h)
            _expect(a, (sum(r for _, r in parts), cfg.d_model), h)   # before it is cut
            at = np.cumsum([r for _, r in parts])[:-1]
            for (e, _), piece in zip(parts, np.split(a, at)):
                out[e] = np.ascontiguousarray(piece)
        return with_scores(cfg, get, names, out)
    prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    C, F = cfg.d_model, cfg.d_ff

    def g(n, shape):
        # checked under the file's own name before any slicing or transposing: a wrong c_attn
        # must not be reported as the shape of one of its q, k, v pieces
        a = _fetch(get, names, prefix + n)
        _expect(a, shape, prefix + n)
        return a

    out["wte.weight"] = g("wte.weight", (cfg.vocab_size, C))
    out["wpe.weight"] = g("wpe.weight", (cfg.max_seq_len, C))
    for i in range(cfg.n_layer):
        e, h = f"blocks.{i}.", f"h.{i}."
        for ln, hl in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[e + ln + ".weight"] = g(h + hl + ".weight", (C,))
            out[e + ln + ".bias"] = g(h + hl + ".bias", (C,))
        w = g(h + "attn.c_attn.weight", (C, 3 * C))  # Conv1D is (in, out)
        b = g(h + "attn.c_attn.bias", (3 * C,))
        for j, a in enumerate("qkv"):
            out[e + f"attn.{a}.weight"] = np.ascontiguousarray(w[:, j * C:(j + 1) * C].T)
            out[e + f"attn.{a}.bias"] = np.ascontiguousarray(b[j * C:(j + 1) * C])
        out[e + "attn.o.weight"] = np.ascontiguousarray(g(h + "attn.c_proj.weight", (C, C)).T)
        out[e + "attn.o.bias"] = g(h + "attn.c_proj.bias", (C,))
        out[e + "mlp.up.weight"] = np.ascontiguousarray(g(h + "mlp.c_fc.weight", (C, F)).T)
        out[e + "mlp.up.bias"] = g(h + "mlp.c_fc.bias", (F,))
        out[e + "mlp.down.weight"] = np.ascontiguousarray(g(h + "mlp.c_proj.weight", (F, C)).T)
        out[e + "mlp.down.bias"] = g(h + "mlp.c_proj.bias", (C,))
    out["ln_f.weight"] = g("ln_f.weight", (C,))
    out["ln_f.bias"] = g("ln_f.bias", (C,))
    if not cfg.tie_embeddings and cfg.labels is None:
        out["lm_head.weight"] = _fetch(get, names, "lm_head.weight")
    return with_scores(cfg, get, names, out)


def with_scores(cfg: Config, get, names, out: dict) -> dict:
    """A causal LM with labels: its classifier, the file's "score" (a *ForSequenceClassification
    checkpoint) or a new one, as transformers starts it (a causal LM's checkpoint; one for other
    labels, whose score the caller left out of `names`), said so."""
    if cfg.labels is None:
        return out
    if "score.weight" in names:
        out["classifier.weight"] = get("score.weight")
        _expect(out["classifier.weight"], (len(cfg.labels), cfg.d_model), "score.weight")
        return out
    from ..model import new_head
    out.update(new_head(cfg, out))
    print(f"tailtune: the checkpoint has no classifier for these {len(cfg.labels)} labels: "
          "it starts from random weights (train it)", file=sys.stderr, flush=True)
    return out


def dropped_for_scores(cfg: Config, name: str) -> bool:
    """A causal LM's tensor a classifier leaves out: the LM head, another classifier."""
    return cfg.labels is not None and name in ("lm_head.weight", "score.weight")


def to_hf(cfg: Config, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors (as transformers' save_pretrained names them) from engine params."""
    if cfg.model_type in hf_bert.TYPES:
        return hf_bert.to_hf(cfg, params)
    if cfg.model_type != "gpt2":
        out = {h: params[e] for e, h in _one_to_one(cfg).items()}
        for h, parts in _fused(cfg).items():
            out[h] = np.concatenate([params[e] for e, _ in parts])
        if cfg.labels is not None:
            out["score.weight"] = params["classifier.weight"]
        return out
    out = {"transformer.wte.weight": params["wte.weight"], "transformer.wpe.weight": params["wpe.weight"]}
    for i in range(cfg.n_layer):
        e, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ln, hl in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + hl + ".weight"] = params[e + ln + ".weight"]
            out[h + hl + ".bias"] = params[e + ln + ".bias"]
        out[h + "attn.c_attn.weight"] = np.concatenate(
            [params[e + f"attn.{a}.weight"] for a in "qkv"], axis=0).T
        out[h + "attn.c_attn.bias"] = np.concatenate([params[e + f"attn.{a}.bias"] for a in "qkv"])
        out[h + "attn.c_proj.weight"] = params[e + "attn.o.weight"].T
        out[h + "attn.c_proj.bias"] = params[e + "attn.o.bias"]
        out[h + "mlp.c_fc.weight"] = params[e + "mlp.up.weight"].T
        out[h + "mlp.c_fc.bias"] = params[e + "mlp.up.bias"]
        out[h + "mlp.c_proj.weight"] = params[e + "mlp.down.weight"].T
        out[h + "mlp.c_proj.bias"] = params[e + "mlp.down.bias"]
    out["transformer.ln_f.weight"] = params["ln_f.weight"]
    out["transformer.ln_f.bias"] = params["ln_f.bias"]
    if cfg.labels is not None:
        out["score.weight"] = params["classifier.weight"]
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head.weight"]
    return out


def _fetch(get, names, name):
    if name not in names:
        raise CheckpointError(f"checkpoint has no tensor {name!r}")
    return get(name)


def _expect(a, shape, name):
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
