"""Model configuration: one field per architectural choice."""
from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class Config:
    model_type: str = "gpt2"        # Hugging Face family used when saving (FAMILIES)
    vocab_size: int = 50257         # number of token ids
    n_layer: int = 12               # transformer blocks
    n_head: int = 12                # query heads
    n_kv_head: int | None = None    # key/value heads (grouped-query attention); None = n_head
    d_model: int = 768              # residual stream width
    head_dim: int | None = None     # width of one head; None = d_model // n_head
    d_ff: int | None = None         # MLP hidden width; None = 4 * d_model
    max_seq_len: int = 1024         # longest sequence: learned position table size / rope range
    norm: str = "layernorm"         # "layernorm" (weight and bias) or "rmsnorm" (weight only)
    norm_eps: float = 1e-5          # epsilon inside the norm's square root
    mlp: str = "gelu"               # "gelu": down(gelu_tanh(up x)); "gelu_erf": down(gelu(up x)),
                                    # the exact GELU (BERT); "swiglu": down(silu(gate x) * up x)
    positions: str = "learned"      # "learned" absolute position table, or "rope" rotary embeddings
    rope_theta: float = 10000.0     # rotary base frequency (rope only)
    rope_scaling: dict | None = None  # rotary frequencies rescaled as Hugging Face's rope_scaling
                                      # says: {"rope_type": "linear", "factor"} or "llama3" (Llama
                                      # 3.1 / 3.2) with factor, low_freq_factor, high_freq_factor,
                                      # original_max_position_embeddings; None = plain
    attn_bias: bool = True          # biases on the q, k and v projections (and the output's,
                                    # unless attn_out_bias says otherwise)
    attn_out_bias: bool | None = None  # bias on the output projection; None = attn_bias
                                       # (Qwen2: q, k, v have biases, the output has none).
                                       # Resolved on creation: dataclasses.replace of attn_bias
                                       # alone keeps the old output bias
    mlp_bias: bool = True           # biases on the MLP projections
    qk_norm: bool = False           # RMSNorm over each head of q and of k (head_dim wide, a weight
                                    # each) before the rotary embedding (Qwen3)
    no_rope_blocks: list[int] | None = None  # blocks whose attention skips the rotary embedding
                                             # (SmolLM3: every 4th); None = none
    sliding_window: int | None = None  # attention sees this many positions at most, itself
                                       # included (Mistral); None = all. The engine computes full
                                       # attention, so it runs sequences of up to this many
                                       # tokens only (context_length), where the two agree
    tie_embeddings: bool = True     # the LM head is the token embedding (one parameter)
    causal: bool = True             # False: an encoder (BERT): every position attends to every
                                    # position of its sequence, and there is no LM head
    post_norm: bool = False         # norms after each residual add, none at the end (BERT);
                                    # False: before each branch, and a final norm (GPT-2, Llama)
    embed_norm: bool = False        # a norm over the summed embeddings (BERT)
    type_vocab_size: int = 0        # token-type (segment) embeddings, added to every position; 0 = none
    position_offset: int = 0        # the learned position table's row of a sequence's first token
                                    # (RoBERTa: its pad id + 1); the rows below are never read
    pooler_act: str = "tanh"        # an encoder's pooler activation: "tanh" (BERT, RoBERTa) or
                                    # "relu" (DistilBERT's pre_classifier)
    labels: list[str] | None = None  # a sequence classifier's classes. An encoder: a pooler on
                                     # the first position, then one logit per label; None = no
                                     # head: forward gives the last hidden states. A causal LM:
                                     # one logit per label from its last token after the final
                                     # norm (Hugging Face's *ForSequenceClassification "score"),
                                     # in place of the LM head
    per_token: bool = False         # with labels, an encoder's token classifier (NER): one
                                    # logit per label at every position, no pooler
    init_std: float = 0.02          # std of the normal init of weights for models built from scratch
    # Not architecture: carried from the loaded files to the saved ones, so that transformers
    # generates (and stops) as it did with the source. None = unknown.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # several ids: any of them ends generation
    pad_token_id: int | None = None
    generation: dict | None = None  # the source's generation_config.json; None = built from the ids

    def __post_init__(self):
        if isinstance(self.eos_token_id, tuple):  # e.g. tok.eos_ids; a list is what JSON gives back
            self.eos_token_id = list(self.eos_token_id)
        # the defaults below are derived from these: check them first (n_head="2" is not a 2)
        for name in ("n_head", "d_model", "n_kv_head", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.d_model % self.n_head:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                                  "set head_dim explicitly")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.attn_out_bias is None:
            self.attn_out_bias = self.attn_bias
        if isinstance(self.rope_scaling, dict):   # its own copy: a caller's dict may change
            self.rope_scaling = dict(self.rope_scaling)
        if isinstance(self.labels, tuple):
            self.labels = list(self.labels)
        b = self.no_rope_blocks
        if isinstance(b, (list, tuple)):   # a sorted copy of ints (numpy's too); none = None
            ints = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in b)
            self.no_rope_blocks = (sorted(int(i) for i in b) or None) if ints else list(b)
        self.validate()

    def __setstate__(self, state):
        # pickled before attn_out_bias existed: the class default (None) would read as no
        # output bias; the other later fields' class defaults are their old meaning
        self.__dict__.update(state)
        if self.__dict__.get("attn_out_bias") is None:
            self.attn_out_bias = self.attn_bias

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff",
                     "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        choices = {"model_type": FAMILIES, "norm": ("layernorm", "rmsnorm"),
                   "mlp": ("gelu", "gelu_erf", "swiglu"), "positions": ("learned", "rope"),
                   "pooler_act": ("tanh", "relu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"Config.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.qk_norm and self.norm != "rmsnorm":
            raise ConfigError("Config.qk_norm needs norm='rmsnorm' (Qwen3's per-head q and k norms)")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        for name, zero_ok in (("norm_eps", False), ("rope_theta", False), ("init_std", True)):
            v = getattr(self, name)
            if not _finite_real(v) or not (v >= 0 if zero_ok else v > 0):
                raise ConfigError(f"Config.{name} must be a finite number "
                                  f"{'>= 0' if zero_ok else '> 0'}, got {v!r}")
        # past these every logit is NaN or inf (a float32 eps of 1e308 is inf; a base below 1
        # makes the rotary frequencies overflow): a config from an untrusted file
        if self.norm_eps > 1:
            raise ConfigError(f"Config.norm_eps must be at most 1 (models use 1e-5 or 1e-6), "
                              f"got {self.norm_eps!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.positions)
        if self.no_rope_blocks is not None:
            b = self.no_rope_blocks
            if (self.positions != "rope" or not isinstance(b, list) or len(set(b)) != len(b)
                    or not all(isinstance(i, int) and not isinstance(i, bool)
                               and 0 <= i < self.n_layer for i in b)):
                raise ConfigError(f"Config.no_rope_blocks must be distinct block indices below "
                                  f"n_layer={self.n_layer} of a rope model, got {b!r}")
        if self.positions == "rope" and not 1 <= self.rope_theta <= _F32_MAX:
            raise ConfigError(f"Config.rope_theta must be at least 1 and a float32 (models use "
                              f"1e4 to 1e6), got {self.rope_theta!r}")
        self._validate_encoder()
        for name in ("attn_bias", "attn_out_bias", "mlp_bias", "qk_norm", "tie_embeddings",
                     "causal", "post_norm", "embed_norm"):
            # a truthy string such as "false" would silently mean True
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"Config.{name} must be True or False, got {v!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is None:
                continue
            ids = v if name == "eos_token_id" and isinstance(v, list) else [v]
            if not ids or not all(map(_is_id, ids)):
                what = "an id or a non-empty list of ids" if name == "eos_token_id" else "an id"
                raise ConfigError(f"Config.{name} must be a token {what} (or None), got {v!r}")
        if self.generation is not None and not isinstance(self.generation, dict):
            raise ConfigError(f"Config.generation must be a dict (generation_config.json) or None, "
                              f"got {type(self.generation).__name__}")

    def _validate_encoder(self) -> None:
        if not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool) \
                or self.type_vocab_size < 0:
            raise ConfigError(f"Config.type_vocab_size must be an integer >= 0, got "
                              f"{self.type_vocab_size!r}")
        off = self.position_offset
        if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off < self.max_seq_len:
            raise ConfigError(f"Config.position_offset must be an integer from 0 to max_seq_len - 1 "
                              f"= {self.max_seq_len - 1}, got {off!r}")
        if off and self.positions != "learned":
            raise ConfigError("Config.position_offset needs learned positions (positions='learned')")
        if self.labels is not None:
            lb = self.labels
            if (not isinstance(lb, list) or len(lb) < 2
                    or not all(isinstance(x, str) and x for x in lb) or len(set(lb)) != len(lb)):
                raise ConfigError(f"Config.labels must be a list of two or more distinct "
                                  f"non-empty strings (the classes), got {reprlib.repr(lb)}")
        if not isinstance(self.per_token, bool):
            raise ConfigError(f"Config.per_token must be True or False, got {self.per_token!r}")
        if self.per_token and (self.labels is None or self.causal is not False):
            raise ConfigError("Config.per_token (a token classifier) needs labels and an encoder "
                              "(causal=False)")
        if self.causal is False and self.tie_embeddings is not False:
            raise ConfigError("an encoder (causal=False) has no LM head to tie: set "
                              "tie_embeddings=False")
        if self.post_norm is True and self.qk_norm is True:
            raise ConfigError("Config.qk_norm is not supported with post_norm")
        if (isinstance(self.causal, bool) and isinstance(self.post_norm, bool)
                and self.post_norm == self.causal):
            raise ConfigError("Config.post_norm goes with an encoder (causal=False, BERT's "
                              "layout) and pre-norm with a causal LM: other pairings are not "
                              "supported")

    @property
    def encoder(self) -> bool:
        """No LM head: bidirectional attention, and a classifier head or none."""
        return self.causal is False

    @classmethod
    def bert(cls, **overrides) -> "Config":
        """BERT: bidirectional attention, learned positions and token types, a LayerNorm over
        the embeddings and after each residual add, the exact GELU."""
        base = dict(FAMILY_FIELDS["bert"], model_type="bert", norm_eps=1e-12, vocab_size=30522,
                    n_layer=12, n_head=12, d_model=768, d_ff=3072, max_seq_len=512,
                    type_vocab_size=2)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def distilbert(cls, **overrides) -> "Config":
        """DistilBERT: BERT's layout without token types, 6 blocks; its classifier's
        pre_classifier (ReLU) in the pooler's place."""
        base = dict(FAMILY_FIELDS["distilbert"], model_type="distilbert", vocab_size=30522,
                    n_layer=6, n_head=12, d_model=768, d_ff=3072, max_seq_len=512, pad_token_id=0)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def gpt2(cls, **overrides) -> "Config":
        """GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied head."""
        base = dict(FAMILY_FIELDS["gpt2"], model_type="gpt2", tie_embeddings=True, norm_eps=1e-5)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def llama(cls, **overrides) -> "Config":
        """Llama: RMSNorm, rotary positions, SwiGLU MLP, no biases."""
        base = dict(FAMILY_FIELDS["llama"], model_type="llama", attn_bias=False, mlp_bias=False,
                    tie_embeddings=False, norm_eps=1e-6, vocab_size=32000, n_layer=22, n_head=32,
                    n_kv_head=4, d_model=2048, d_ff=5632, max_seq_len=2048)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def mistral(cls, **overrides) -> "Config":
        """Mistral: Llama's blocks, attention over a sliding window of positions."""
        base = dict(FAMILY_FIELDS["mistral"], model_type="mistral", tie_embeddings=False,
                    norm_eps=1e-5, vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8,
                    d_model=4096, d_ff=14336, max_seq_len=32768, sliding_window=4096)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def phi3(cls, **overrides) -> "Config":
        """Phi-3: Llama's blocks (q, k, v in one tensor and the MLP's gate and up in another,
        in its files), a sliding window in Phi-3-mini."""
        base = dict(FAMILY_FIELDS["phi3"], model_type="phi3", tie_embeddings=False,
                    norm_eps=1e-5, vocab_size=32064, n_layer=32, n_head=32, n_kv_head=32,
                    d_model=3072, d_ff=8192, max_seq_len=4096, sliding_window=2047)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def qwen2(cls, **overrides) -> "Config":
        """Qwen2 (Qwen2.5): Llama's blocks with biases on q, k, v (not on the output)."""
        base = dict(FAMILY_FIELDS["qwen2"], model_type="qwen2", tie_embeddings=True, norm_eps=1e-6,
                    rope_theta=1000000.0, vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2,
                    d_model=896, d_ff=4864, max_seq_len=32768)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def qwen3(cls, **overrides) -> "Config":
        """Qwen3: Llama's blocks with an RMSNorm on each head of q and k, heads 128 wide."""
        base = dict(FAMILY_FIELDS["qwen3"], model_type="qwen3", attn_bias=False,
                    tie_embeddings=True, norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936,
                    n_layer=28, n_head=16, n_kv_head=8, d_model=1024, head_dim=128, d_ff=3072,
                    max_seq_len=40960)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def smollm3(cls, **overrides) -> "Config":
        """SmolLM3: Llama's blocks, every 4th without the rotary embedding (NoPE)."""
        n_layer = overrides.get("n_layer", 36)
        base = dict(FAMILY_FIELDS["smollm3"], model_type="smollm3", attn_bias=False,
                    mlp_bias=False, tie_embeddings=True, norm_eps=1e-6,
                    rope_theta=5000000.0, vocab_size=128256, n_layer=n_layer, n_head=16,
                    n_kv_head=4, d_model=2048, d_ff=11008, max_seq_len=65536,
                    no_rope_blocks=every_fourth(n_layer))
        return cls.from_dict({**base, **overrides})

    @property
    def context_length(self) -> int:
        """The longest sequence the engine runs: max_seq_len (less the rows below
        position_offset), or the sliding window if shorter (beyond it, windowed attention would
        differ from the engine's full attention)."""
        n = self.max_seq_len - self.position_offset
        return min(n, self.sliding_window or n)

    def context_text(self) -> str:
        """context_length for messages, saying when the sliding window sets it."""
        windowed = self.context_length < self.max_seq_len - self.position_offset
        return f"{self.context_length}{' (its sliding window)' if windowed else ''}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """to_dict() without the token ids and generation settings: what the model computes.
        Fingerprints and checkpoint checks use it (a run's identity does not hang on an eos id)."""
        d = self.to_dict()
        for k in _NOT_ARCHITECTURE:
            d.pop(k)
        # fields added later, at the value that means "absent": left out, so that the runs made
        # before they existed still resume
        if d["attn_out_bias"] == d["attn_bias"]:
            d.pop("attn_out_bias")
        for k in ("qk_norm", "rope_scaling", "no_rope_blocks", "sliding_window", "post_norm",
                  "embed_norm", "type_vocab_size", "position_offset", "labels", "per_token"):
            if not d[k]:
                d.pop(k)
        if d["causal"]:
            d.pop("causal")
        if d["pooler_act"] == "tanh":
            d.pop("pooler_act")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"Config.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown Config fields: {sorted(unknown)}")
        return cls(**d)


# What makes a model each family (model_type), as Config fields: saving in a family's Hugging
# Face or GGUF layout needs them. Fields a family leaves open (llama's biases) are not listed.
_DECODER = dict(causal=True, post_norm=False, embed_norm=False, type_vocab_size=0,
                position_offset=0)   # (labels free: an LM head, or a sequence classifier's)
_ENCODER = dict(norm="layernorm", positions="learned", attn_bias=True, attn_out_bias=True,
                mlp_bias=True, qk_norm=False, no_rope_blocks=None, sliding_window=None,
                tie_embeddings=False, causal=False, post_norm=True, embed_norm=True)
FAMILY_FIELDS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", attn_bias=True,
                 attn_out_bias=True, mlp_bias=True, sliding_window=None, **_DECODER),
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", qk_norm=False,
                  no_rope_blocks=None, sliding_window=None, **_DECODER),
    "mistral": dict(norm="rmsnorm", mlp="swiglu", positions="rope", attn_bias=False,
                    attn_out_bias=False, mlp_bias=False, qk_norm=False, no_rope_blocks=None,
                    **_DECODER),
    "phi3": dict(norm="rmsnorm", mlp="swiglu", positions="rope", attn_bias=False,
                 attn_out_bias=False, mlp_bias=False, qk_norm=False, no_rope_blocks=None,
                 rope_scaling=None, **_DECODER),
    "qwen2": dict(norm="rmsnorm", mlp="swiglu", positions="rope", attn_bias=True,
                  attn_out_bias=False, mlp_bias=False, qk_norm=False, no_rope_blocks=None,
                  sliding_window=None, **_DECODER),
    "qwen3": dict(norm="rmsnorm", mlp="swiglu", positions="rope", mlp_bias=False, qk_norm=True,
                  no_rope_blocks=None, sliding_window=None, **_DECODER),
    "smollm3": dict(norm="rmsnorm", mlp="swiglu", positions="rope", qk_norm=False,
                    sliding_window=None, **_DECODER),
    # (labels is free: a classifier head or none; mlp gelu_erf, or gelu (tanh))
    "bert": dict(position_offset=0, pooler_act="tanh", **_ENCODER),
    # BERT's layout; positions from the pad id + 1 (position_offset), one token type, and the
    # classifier head (dense + tanh on the first token, then out_proj) is the pooler's math
    "roberta": dict(pooler_act="tanh", **_ENCODER),
    "xlm-roberta": dict(pooler_act="tanh", **_ENCODER),
    # BERT's layout without token types; its classifier head's pre_classifier (ReLU) is the
    # pooler's place; LayerNorm eps fixed at 1e-12
    "distilbert": dict(position_offset=0, type_vocab_size=0, pooler_act="relu", mlp="gelu_erf",
                       norm_eps=1e-12, **_ENCODER),
}
FAMILIES = tuple(FAMILY_FIELDS)   # the Hugging Face families loaded and saved
_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "pad_token_id", "generation")


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}


def _check_rope_scaling(d, positions: str) -> None:
    if positions != "rope":
        raise ConfigError("Config.rope_scaling needs positions='rope'")
    kind = d.get("rope_type") if isinstance(d, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"Config.rope_scaling must be a dict whose rope_type is one of "
                          f"{tuple(ROPE_SCALING_KEYS)}, got {d!r}")
    want = {"rope_type", *ROPE_SCALING_KEYS[kind]}
    if set(d) != want:
        raise ConfigError(f"Config.rope_scaling of type {kind!r} needs exactly the keys "
                          f"{sorted(want)}, got {sorted(d)}")
    for k in ROPE_SCALING_KEYS[kind]:
        # bounded: from an untrusted file a factor of 1e-300 would make every logit NaN
        v = d[k]
        if not _finite_real(v) or not 1e-6 <= v <= 1e9:
            raise ConfigError(f"Config.rope_scaling[{k!r}] must be a number from 1e-6 to 1e9, "
                              f"got {v!r}")
    if kind == "llama3" and d["factor"] < 1:
        raise ConfigError(f"Config.rope_scaling: a llama3 factor stretches the context, it must "
                          f"be at least 1, got {d['factor']!r}")
    if kind == "llama3" and d["high_freq_factor"] <= d["low_freq_factor"]:
        raise ConfigError("Config.rope_scaling: high_freq_factor must be above low_freq_factor, "
                          f"got {d['high_freq_factor']!r} and {d['low_freq_factor']!r}")


_F32_MAX = float(3.4028234663852886e38)   # rotary tables are float32


def every_fourth(n_layer) -> list[int]:
    """SmolLM3's (and llama.cpp's smollm3's) blocks without rotary embedding: 3, 7, 11, ..."""
    return [i for i in range(n_layer) if (i + 1) % 4 == 0] if isinstance(n_layer, int) else []


def _finite_real(v) -> bool:
    """A real number, not a bool, finite (an int too large for a float is not)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_id(v) -> bool:
    # any integer: configs in the wild hold ids past the vocabulary (GPT-2's 50256 in small
    # models) and pad -1; the engine only carries them through to the saved files. A Python
    # int, not errors.is_int's numpy integers too: these go into config.json as they are
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(name, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"Config.{name} must be a positive integer, got {v!r}")
