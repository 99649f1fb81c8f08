"""Model: embeddings -> blocks -> final norm -> LM head, with freezing and truncated backward.
An encoder (BERT; config.causal False): embeddings -> blocks -> a classifier head over the first
position (pooler + classifier), or no head (forward gives the hidden states).

Freezing is structural: only trainable parameters own a gradient buffer; blocks below the lowest
trainable one run forward without keeping activations, and backward stops at that block.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import math
import weakref
from time import perf_counter

import numpy as np

from kernels.blas import one_thread
from kernels.dropout import dropout_backward, dropout_forward
from kernels.embedding import embedding_backward, embedding_forward
from kernels.loss import IGNORE, crossentropy_forward, crossentropy_forward_backward
from kernels.matmul import gemm_nn, gemm_nt, gemm_tn
from kernels.rope import rope_table

from . import layers
from .config import Config
from .dropout import Dropout
from .errors import CheckpointError, ConfigError, InputError, is_int, is_number
from .heap import keep_freed_memory
from .layers import Block, Linear, Norm, Packing, rope_frequencies

_LOGIT_CHUNK = 1 << 25   # floats of logits alive at once in the fused head + loss (128 MiB):
                         # fewer, taller GEMMs (measured 80 -> 135 GFLOP/s from 166 to 667 rows)


def head_chunk_rows(N: int, V: int, need_dw: bool) -> int:
    """Rows per chunk of the fused head + loss over N rows and a vocabulary of V."""
    R = max(1, min(N, _LOGIT_CHUNK // V))
    if need_dw:
        R = N if N * V <= 4 * _LOGIT_CHUNK else R   # fewer passes over the (V, C) gradient
    return -(-N // -(-N // R))   # equal chunks: 512 + 512 rows, not 682 + 342 (a short GEMM is slow)


EMBEDDINGS = ("wte.", "wpe.", "wtt.", "ln_e.")   # parameters of the embedding stage


def _drops_cls(cfg: Config) -> bool:
    """RoBERTa's classifier head (RobertaClassificationHead) drops out its input, the first
    position, before its dense layer (the pooler's place) too; BERT's does not."""
    return cfg.model_type in ("roberta", "xlm-roberta")


def _has_pooler(cfg: Config) -> bool:
    """An encoder's pooler is there with or without a head (transformers' BertModel and
    RobertaModel have one); a DistilBertModel has none (its classifier brings pre_classifier),
    nor has a token classifier (transformers builds its encoder without one)."""
    return cfg.encoder and not cfg.per_token and (cfg.labels is not None
                                                  or cfg.model_type != "distilbert")


def new_head(cfg: Config, params: dict, seed: int = 0) -> dict:
    """The classifier head's parameters missing from `params` (an encoder's pooler, the
    classifier), as transformers initializes them: N(0, init_std) weights drawn from `seed`,
    zero biases (a causal LM's classifier, transformers' "score", has none)."""
    rng = np.random.default_rng(seed)
    C, out = cfg.d_model, {}
    for name, rows in (("pooler", C if _has_pooler(cfg) else 0), ("classifier", len(cfg.labels or ()))):
        if rows and name + ".weight" not in params:
            out[name + ".weight"] = (rng.standard_normal((rows, C), dtype=np.float32)
                                     * np.float32(cfg.init_std))
            if cfg.encoder:
                out[name + ".bias"] = np.zeros(rows, np.float32)
    return out


def block_of(name: str) -> int | None:
    """The block of a parameter or layer name ('blocks.3.mlp.up.weight', 'blocks.3' -> 3);
    None outside the blocks."""
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


def _blas_one_thread(method):
    """OpenBLAS at one thread while the engine runs (it splits GEMMs over its own threads), and
    the host's setting back after: see kernels.blas.one_thread."""
    @functools.wraps(method)
    def scoped(*args, **kwargs):
        with one_thread():
            return method(*args, **kwargs)
    return scoped


class Model:
    ln_e = pooler = classifier = None   # models pickled before encoders existed have none
    dropout = None                      # a Dropout (set_dropout), or None: off
    pack_padding = True                 # a classifier encoder's blocks skip the padding (False:
                                        # they compute it, as transformers does; for comparison)

    def __init__(self, config: Config, params: dict | None = None, seed: int = 0):
        """A model of `config`: random weights from `seed`, or `params` (name -> array). Arrays
        that are float32 and C-contiguous already are used as they are, not copied (a model
        loads without a second copy of its weights): training this model changes them, so give
        a copy (`{n: p.copy() for n, p in other.params.items()}`) to train a clone."""
        from .warmup import ensure_compiled
        ensure_compiled()  # before any kernel runs in this process (see warmup.py)
        if not isinstance(config, Config):
            hint = " (build one with Config.from_dict)" if isinstance(config, dict) else ""
            raise ConfigError(f"Model needs an engine.Config, got {type(config).__name__}{hint}")
        config.validate()
        self.config = config
        c = config
        self.blocks = [Block(c, i) for i in range(c.n_layer)]
        self.ln_f = None if c.post_norm else Norm(c, "ln_f")
        self.ln_e = Norm(c, "ln_e") if c.embed_norm else None
        # the LM head's weight; an encoder, or a causal LM with labels, has none (a classifier
        # head, or no head at all)
        self.head = (None if c.encoder or c.labels is not None else
                     "wte.weight" if c.tie_embeddings else "lm_head.weight")
        # an encoder's pooler (BERT's, on the first position) is there with or without a head
        # (transformers' BertModel has it); the classifier comes with labels (a causal LM's:
        # on its last token, no bias)
        self.pooler = Linear("pooler", c.d_model, c.d_model, True) if _has_pooler(c) else None
        self.classifier = (Linear("classifier", c.d_model, len(c.labels), c.encoder)
                           if c.labels is not None else None)
        self.shapes = self._shapes()
        self.params = self._init(seed) if params is None else self._checked(params)
        self.grads: dict[str, np.ndarray] = {}
        self._no_grad_yet: set[str] = set()   # unfrozen or zeroed since the last backward
        self._updated: dict[str, int] = {}     # per parameter: updates applied (_weights_now)
        self._optimizers = weakref.WeakSet()
        self._tape = None
        self._rope = None
        self.last_backward_blocks: list[int] = []  # blocks the last backward ran through, top first
        self.unfreeze()

    # ---- parameters -------------------------------------------------------------------------
    def _shapes(self) -> dict:
        c = self.config
        s = {"wte.weight": (c.vocab_size, c.d_model)}
        if c.positions == "learned":
            s["wpe.weight"] = (c.max_seq_len, c.d_model)
        if c.type_vocab_size:
            s["wtt.weight"] = (c.type_vocab_size, c.d_model)
        for m in (self.ln_e, *self.blocks, self.ln_f, self.pooler, self.classifier):
            if m is not None:
                s.update(m.shapes())
        if self.head == "lm_head.weight":
            s["lm_head.weight"] = (c.vocab_size, c.d_model)
        return s

    def top_params(self) -> list[str]:
        """The parameters after the last block: the final norm (an encoder's classifier head
        instead: its pooler and classifier), not the LM head."""
        if self.classifier is None and self.ln_f is None:
            return []             # a head-less encoder: its pooler is not on any loss's path
        return [n for m in (self.ln_f, self.pooler, self.classifier) if m is not None
                for n in m.names()]

    def _init(self, seed):
        """GPT-2 style: N(0, init_std) weights, residual projections scaled by 1/sqrt(2 L)."""
        rng = np.random.default_rng(seed)
        c = self.config
        out = {}
        for name, shape in self.shapes.items():
            if name.endswith(".bias"):
                out[name] = np.zeros(shape, np.float32)
            elif len(shape) == 1:
                out[name] = np.ones(shape, np.float32)
            else:
                std = c.init_std
                if name.endswith(("attn.o.weight", "mlp.down.weight")):
                    std /= np.sqrt(2 * c.n_layer)
                out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
        return out

    def _checked(self, params):
        if not isinstance(params, dict):
            raise CheckpointError(f"params must be a dict of name -> array, got "
                                  f"{type(params).__name__}")
        missing = [n for n in self.shapes if n not in params]
        extra = [n for n in params if n not in self.shapes]
        if missing or extra:
            raise CheckpointError(f"parameters do not match the config: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
        out = {}
        for n, shape in self.shapes.items():
            a = params[n]
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
                raise CheckpointError(f"parameter {n!r} must be a floating-point NumPy array, "
                                      f"got {got}")
            if tuple(a.shape) != shape:
                raise CheckpointError(f"parameter {n!r} has shape {tuple(a.shape)}, the config "
                                      f"needs {shape}")
            out[n] = np.ascontiguousarray(a, dtype=np.float32)
        return out

    def num_params(self, trainable_only: bool = False) -> int:
        names = self.trainable if trainable_only else self.params
        return int(sum(self.params[n].size for n in names))

    # ---- freezing ---------------------------------------------------------------------------
    @property
    def trainable(self) -> list[str]:
        return [n for n in self.params if n in self.grads]

    def _match(self, patterns):
        if not patterns:
            return list(self.params)
        names = []
        for p in patterns:
            if not isinstance(p, str):
                raise InputError(f"freeze/unfreeze patterns must be strings (globs such as "
                                 f"'blocks.3.*'), got {p!r}")
            hit = [n for n in self.params if fnmatch.fnmatchcase(n, p)]
            if not hit:
                raise InputError(f"pattern {p!r} matches no parameter (names look like "
                                 f"'blocks.0.attn.q.weight', 'wte.weight', 'ln_f.weight')")
            names += hit
        return names

    def freeze(self, *patterns):
        """Freeze the parameters matching the glob patterns; no pattern freezes everything."""
        for n in self._match(patterns):
            self.grads.pop(n, None)
            self._no_grad_yet.discard(n)
        self._trainable_changed()
        return self

    def unfreeze(self, *patterns):
        """Make the matching parameters trainable (a zeroed gradient buffer each). Until a
        backward fills it, an optimizer step leaves a newly trainable parameter alone (torch skips
        a parameter whose .grad is None)."""
        for n in self._match(patterns):
            if n not in self.grads:
                self.grads[n] = np.zeros_like(self.params[n])
                self._no_grad_yet.add(n)
        self._trainable_changed()
        return self

    def train_last(self, k: int):
        """Exactly the last k blocks and the final norm (an encoder's classifier head) trainable,
        everything else frozen. What
        stays trainable keeps its gradient and optimizer state (growing k mid-run, ULMFiT by
        hand, does not restart the Adam moments of the blocks already training)."""
        L = self.config.n_layer
        if not is_int(k) or not 0 <= k <= L:
            raise InputError(f"train_last(k): k must be an integer in 0..{L}, got {k!r}")
        tail = [n for n in self.params if (block_of(n) if n.startswith("blocks.") else -1) >= L - k]
        return self.set_trainable(self.top_params() + tail)

    def set_dropout(self, p: float, attention: float | None = None, seed: int = 0):
        """Dropout in training forwards (those that keep what backward needs): rate p on the
        hidden states, `attention` (default p) on the attention probabilities, masks drawn from
        `seed`; 0 (both): off, the default. In the blocks backward runs through, not in the frozen
        prefix below them (engine/dropout.py says where, and why). Returns the model."""
        self.dropout = Dropout.make(p, attention, seed)
        return self

    def set_trainable(self, names):
        """Exactly the parameters `names` trainable, all others frozen. Those that stay
        trainable keep their gradient buffer and optimizer state; a parameter frozen loses its
        state, and one unfrozen starts afresh (as after unfreeze)."""
        names = set(names)
        unknown = sorted(names - set(self.params))
        if unknown:
            raise InputError(f"set_trainable: no parameter named {unknown[0]!r}")
        gone = [n for n in self.grads if n not in names]
        # allocated before anything changes: out of memory here leaves the set as it was
        new = {n: np.zeros_like(self.params[n]) for n in self.params
               if n in names and n not in self.grads}
        before = dict(self.grads), set(self._no_grad_yet)
        for n in gone:
            del self.grads[n]
            self._no_grad_yet.discard(n)
        self.grads.update(new)
        self._no_grad_yet.update(new)
        if gone or new:
            try:
                self._trainable_changed()
            except BaseException:   # an optimizer could not make its state: back as it was
                self.grads.clear()
                self.grads.update(before[0])
                self._no_grad_yet = before[1]
                self._trainable_changed()
                raise
        return self

    def _trainable_changed(self):
        self._tape = None
        # gradients in the parameters' order, however the set was built: the global norm's
        # float64 sum (and so clipping) is then the same for the same set, to the last bit
        # (a resumed run rebuilds its set in another order than the run made it)
        order = [(n, self.grads[n]) for n in self.params if n in self.grads]
        if list(self.grads) != [n for n, _ in order]:
            self.grads.clear()
            self.grads.update(order)
        for opt in list(self._optimizers):
            opt._sync()

    def zero_grad(self):
        """Gradients to zero. Until a backward fills them, an optimizer step leaves the
        parameters alone, as after torch's zero_grad() (set_to_none=True, its default): Adam's
        moments would otherwise move them on a step that saw no data."""
        for n, g in self.grads.items():
            g.fill(0.0)
            self._no_grad_yet.add(n)

    def trainable_blocks(self) -> list[int]:
        """Blocks holding a trainable parameter, in order."""
        return sorted({block_of(n) for n in self.grads} - {None})

    def lowest_trainable_block(self) -> int:
        """-1 when an embedding is trainable (backward reaches the lookup), n_layer when only
        the final norm / head are, else the lowest block holding a trainable parameter."""
        L = self.config.n_layer
        low = L
        for n in self.grads:
            b = block_of(n)
            if b is not None:
                low = min(low, b)
            elif n.startswith(EMBEDDINGS):
                return -1
        return low

    # ---- forward / backward -----------------------------------------------------------------
    def _tokens(self, tokens, what="tokens", allow_ignore=False):
        if isinstance(tokens, (list, tuple)):
            try:
                tokens = np.asarray(tokens)
            except ValueError:  # rows of different lengths
                raise InputError(f"{what} must be a 2-D integer array (B, T); the rows given have "
                                 "different lengths (pad them)") from None
        if not isinstance(tokens, np.ndarray):
            raise InputError(f"{what} must be a 2-D integer array (B, T), got {type(tokens).__name__}")
        if tokens.dtype.kind not in "iu":
            raise InputError(f"{what} must hold integers, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise InputError(f"{what} must be 2-D (batch, time), got shape {tokens.shape}")
        B, T = tokens.shape
        if B == 0 or T == 0:
            raise InputError(f"{what} is empty: shape {tokens.shape}")
        if T > self.config.context_length:
            raise InputError(f"sequence length {T} exceeds the model's context of "
                             f"{self.config.context_text()}")
        V = self.config.vocab_size
        # range checked on the ids as given, before the int64 cast (a uint64 id >= 2**63 would
        # wrap to a negative number); the element-wise mask only runs when min or max is out
        # (or the targets hold -100s)
        if tokens.min() < 0 or tokens.max() >= V:
            bad = (tokens >= V) | (tokens < 0)
            if allow_ignore and tokens.dtype.kind == "i":
                bad &= tokens != IGNORE
            if bad.any():
                v = tokens[bad].flat[0]
                raise InputError(f"{what} holds id {v}, outside the vocabulary 0..{V - 1}"
                                 + (" (or -100 to ignore)" if allow_ignore else ""))
        return np.ascontiguousarray(tokens.astype(np.int64))

    def _rope_tables(self, T, pos0=0):
        """cos, sin (T, head_dim / 2) for positions pos0 .. pos0 + T - 1."""
        c = self.config
        if c.positions != "rope":
            return None
        end = pos0 + T
        if self._rope is None or self._rope[0].shape[0] < end:  # grown on demand: context may be huge
            self._rope = rope_table(max(end, 256), c.head_dim, c.rope_theta,
                                    inv_freq=rope_frequencies(c))
        cos, sin = self._rope
        return np.ascontiguousarray(cos[pos0:end]), np.ascontiguousarray(sin[pos0:end])

    def embed(self, tokens, pos0=0, types=None):
        return self._embed(tokens, pos0, types=self._types(types, tokens.shape))[0]

    def _embed(self, tokens, pos0=0, keep=False, types=None):
        """(B, T, C) input of block 0, and (kept for backward through the embedding norm) its
        input and statistics, or None. types: (B, T) token types (checked), None: all 0."""
        B, T = tokens.shape
        P = self.params
        x = np.empty((B, T, self.config.d_model), np.float32)
        wpe = P.get("wpe.weight")
        if wpe is None:
            wpe = np.zeros((0, self.config.d_model), np.float32)
        embedding_forward(tokens, P["wte.weight"], wpe, pos0 + self.config.position_offset, x)
        if "wtt.weight" in P:
            x += P["wtt.weight"][0] if types is None else P["wtt.weight"][types]
        if self.ln_e is None:
            return x, None
        y, st = self.ln_e.forward(P, x.reshape(-1, x.shape[-1]))
        return y.reshape(x.shape), ((x, st) if keep else None)

    def _lengths(self, lengths, B: int, T: int):
        """Each sequence's unpadded length as a contiguous int64 (B,), or None (all T)."""
        if lengths is None:
            return None
        a = np.asarray(lengths)
        if a.dtype.kind not in "iu" or a.shape != (B,):
            raise InputError(f"lengths must be {B} integers (one per sequence), got "
                             f"{a.dtype} of shape {a.shape}")
        if a.min() < 1 or a.max() > T:
            raise InputError(f"lengths must be in 1..{T} (the padded length), got {a.min()} .. "
                             f"{a.max()}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _types(self, types, shape):
        """Token types (B, T) as int64 (BERT's segments: 0 for a text, 1 for its pair), or None
        (all 0)."""
        if types is None:
            return None
        V = self.config.type_vocab_size
        if not V:
            raise InputError("this model has no token types (types= is for encoders such as BERT)")
        try:
            a = np.asarray(types)
        except ValueError:
            raise InputError(f"types must be integers of the tokens' shape {tuple(shape)} "
                             "(rows of one length)") from None
        if a.dtype.kind not in "iu" or a.shape != tuple(shape):
            raise InputError(f"types must be integers of the tokens' shape {tuple(shape)}, got "
                             f"{a.dtype} of shape {a.shape}")
        if a.min() < 0 or a.max() >= V:
            raise InputError(f"types must be in 0..{V - 1}, got {a.min()} .. {a.max()}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _labels(self, targets, B: int):
        """A classifier's targets: (B,) class indices (or -100: ignored) as int64."""
        K = len(self.config.labels)
        t = np.asarray(targets)
        if t.dtype.kind not in "iu" or t.shape != (B,):
            raise InputError(f"a classifier's targets are {B} class indices (one per sequence, "
                             f"0..{K - 1}), got {t.dtype} of shape {t.shape}")
        bad = (t < 0) | (t >= K)
        if t.dtype.kind == "i":
            bad &= t != IGNORE
        if bad.any():
            raise InputError(f"targets hold class {t[bad][0]}, outside 0..{K - 1} (the labels "
                             f"{self.config.labels[:5]}{'...' if K > 5 else ''}) or -100")
        return np.ascontiguousarray(t, dtype=np.int64)

    @_blas_one_thread
    def forward(self, tokens, targets=None, *, grad=True, hidden=None, start=0, lengths=None,
                types=None, keep=False):
        """tokens (B, T) -> logits (B, T, V); with targets (B, T) -> mean loss over positions
        whose target is not -100. With targets and grad=True, keeps what backward() needs for
        the trainable part only (grad=False: evaluation, keeps nothing).
        hidden (B, T, d_model), the input of block `start` (from prefix(), or a cache of it),
        replaces the embeddings and blocks below `start`; none of those may be trainable.
        An encoder: tokens (B, T) -> class logits (B, len(labels)), or the last hidden states
        (B, T, d_model) without a classifier head; targets are (B,) class indices; lengths (B,)
        the unpadded length of each sequence (padding on the right is never attended to);
        types (B, T) the token types (a text 0, its pair 1; default all 0). keep=True (an encoder
        without a head): keep what backward(dhidden=) needs, for an objective computed outside
        from the hidden states (sentence embeddings)."""
        tokens = self._tokens(tokens)
        self._tape = None
        B, T = tokens.shape
        lengths = self._lengths(lengths, B, T)
        types = self._types(types, (B, T))
        if self.config.encoder:
            return self._forward_encoder(tokens, targets, grad, hidden, start, lengths, types, keep)
        if self.config.labels is not None:
            if keep:
                raise InputError("keep=True is for an encoder without a head; this model is a "
                                 "classifier: give targets")
            return self._forward_scores(tokens, targets, grad, hidden, start, lengths, types)
        if keep:
            raise InputError("keep=True is for an encoder without a head (backward(dhidden=)); "
                             "a causal LM keeps what backward needs given targets")
        if targets is not None:
            targets = self._tokens(targets, "targets", allow_ignore=True)
            if targets.shape != tokens.shape:
                raise InputError(f"targets shape {targets.shape} differs from tokens shape {tokens.shape}")
        keep = targets is not None and grad and bool(self.grads)
        low, x, emb, start, keys = self._start(tokens, keep, hidden, start, types)
        rope = self._rope_tables(T)
        prof = layers.PROFILE
        # Positions without a target (-100: padding, a masked prompt) need no output from the
        # top block: it runs its projection, residuals and MLP on the target rows alone, and
        # the final norm and the head see only those
        rows, n_targets = None, 0
        if targets is not None:
            valid = targets.reshape(-1) != IGNORE
            n_targets = int(valid.sum())
            if 0 < n_targets < valid.size:
                rows = np.flatnonzero(valid)
        x, saved = self._run_blocks(x, start, low, keep, rope, rows, lengths, keys)
        t0 = perf_counter() if prof else 0.0
        C = self.config.d_model
        x2 = x.reshape(-1, C)                       # (B * T, C), or the target rows alone
        if rows is not None and start == self.config.n_layer:
            x2 = x2[rows]       # no block ran; nothing is trainable below (checked above)
        h, st = self.ln_f.forward(self.params, x2)
        if targets is None:
            logits = np.empty((B * T, self.config.vocab_size), np.float32)
            gemm_nt(h, self.params[self.head], logits)
            return logits.reshape(B, T, -1)
        need_dh = keep and (low < self.config.n_layer or any(n in self.grads for n in self.ln_f.names()))
        need_dw = keep and self.head in self.grads
        t = targets.reshape(-1)
        loss, dh, dw = self._head_loss(h, t if rows is None else t[rows], keep, need_dh, need_dw)
        if prof:  # the head's input gradient is formed here, inside the fused head + loss
            prof.add("head", "forward+input-grad", perf_counter() - t0)
        if keep:
            self._tape = dict(tokens=tokens, saved=saved, low=low, x=x2, st=st, dh=dh, dw=dw, rope=rope,
                              emb=emb, types=types, keys=keys, weights=self._weights_now(),
                              empty=n_targets == 0)
        return loss

    def _start(self, tokens, keep, hidden, start, types=None):
        """(lowest block backward reaches, block `start`'s input, what the embedding norm keeps,
        start, this forward's dropout keys or None): the embeddings, or the given hidden state
        of block `start`."""
        if keep:
            keep_freed_memory()   # once per process (see heap.py)
        low = self.lowest_trainable_block() if keep else self.config.n_layer
        keys = self.dropout.draw(self.config.n_layer) if keep and self.dropout else None
        if hidden is None:
            prof = layers.PROFILE
            t0 = perf_counter() if prof else 0.0
            x, emb = self._embed(tokens, keep=keep and low == -1, types=types)
            if keys is not None and low == -1 and keys.p:   # an embedding trains
                dropout_forward(x, keys.p, keys.embeddings)
            if prof:
                prof.add("embeddings", "forward", perf_counter() - t0)
            return low, x, emb, 0, keys
        x = self._hidden(hidden, *tokens.shape, start)
        if keep and low < start:
            raise InputError(f"block {max(low, 0)} (or an embedding) is trainable, below the "
                             f"given hidden state of block {start}")
        return low, x, None, start, keys

    def _packing(self, lengths, B: int, T: int, start: int):
        """A Packing of the real positions when the batch has padding and blocks run, else None."""
        if not self.pack_padding or lengths is None or start >= self.config.n_layer \
                or int(lengths.sum()) == B * T:
            return None
        return Packing(lengths, B, T)

    def _run_blocks(self, x, start, low, keep, rope, rows, lengths, keys=None, pack=None):
        """Blocks start.. forward; those backward will reach keep what it reads (and drop out
        by `keys`). rows: the top block's output is wanted at these rows only. pack: x holds the
        real positions alone (rows number those). Returns (output, {block: saved})."""
        prof = layers.PROFILE
        saved = {}
        for b in self.blocks[start:]:
            t0 = perf_counter() if prof else 0.0
            top = rows if b.index == self.config.n_layer - 1 else None
            kept = (b.backward_plan(self.grads, b.index > low, top is not None)["keep"]
                    if keep and b.index >= low else None)
            drop = keys.block(b.index) if keys is not None and b.index >= low else None
            x, s = b.forward(self.params, x, rope, kept, rows=top, lengths=lengths, drop=drop,
                             pack=pack)
            if prof:
                prof.add(f"blocks.{b.index}", "forward", perf_counter() - t0)
            if s is not None:
                saved[b.index] = s
        return x, saved

    def _forward_encoder(self, tokens, targets, grad, hidden, start, lengths, types, keep_hidden):
        """An encoder's forward: the hidden states, or the classifier head's logits over the
        first position (BERT's pooler: tanh (DistilBERT: ReLU) of a linear map, then one logit
        per label), or with targets the mean cross-entropy."""
        c = self.config
        B, T = tokens.shape
        if c.per_token:
            if keep_hidden:
                raise InputError("keep=True is for an encoder without a head; this one is a "
                                 "token classifier: give targets")
            return self._forward_tokens(tokens, targets, grad, hidden, start, lengths, types)
        if targets is not None:
            if c.labels is None:
                raise InputError("this encoder has no classifier head (forward gives its hidden "
                                 "states); add one with model.with_classifier(labels)")
            targets = self._labels(targets, B)
        if keep_hidden and c.labels is not None:
            raise InputError("keep=True is for an encoder without a head; this one has a "
                             "classifier: give targets")
        keep = (targets is not None or keep_hidden) and grad and bool(self.grads)
        low, x, emb, start, keys = self._start(tokens, keep, hidden, start, types)
        rope = self._rope_tables(T)
        first = np.arange(B) * T if c.labels is not None else None   # the first position's rows
        # a classifier reads the first positions alone: the blocks skip the padding (a head-less
        # encoder's states are wanted at every position, as transformers gives them)
        pack = self._packing(lengths, B, T, start) if c.labels is not None else None
        if pack is not None:
            x, first = x.reshape(-1, c.d_model)[pack.idx], pack.first
        x, saved = self._run_blocks(x, start, low, keep, rope, first, lengths, keys, pack)
        if c.labels is None:
            if keep:
                self._tape = dict(encoder=True, hidden=True, tokens=tokens, saved=saved, low=low,
                                  emb=emb, types=types, rope=rope, shape=x.shape, keys=keys,
                                  weights=self._weights_now(), empty=False)
            return x                                  # (B, T, C)
        prof = layers.PROFILE
        t0 = perf_counter() if prof else 0.0
        P = self.params
        cls = np.ascontiguousarray(x[:, 0] if x.ndim == 3 else x)   # (B, C)
        if keys is not None and keys.p and _drops_cls(c):
            cls = cls.copy()
            dropout_forward(cls, keys.p, keys.pooler)
        pooled = self.pooler.forward(P, cls)
        if c.pooler_act == "tanh":
            np.tanh(pooled, out=pooled)
        else:                                         # DistilBERT's pre_classifier: ReLU
            np.maximum(pooled, 0, out=pooled)
        pooled_in = pooled                            # the classifier's input: dropped out in
        if keys is not None and keys.p:               # training, as transformers' BERT does
            pooled_in = pooled.copy()
            dropout_forward(pooled_in, keys.p, keys.classifier)
        logits = self.classifier.forward(P, pooled_in)   # (B, K)
        if targets is None:
            return logits
        loss = self._class_loss(logits, targets, keep, dict(
            encoder=True, tokens=tokens, saved=saved, low=low, cls=cls, pooled=pooled,
            pooled_in=pooled_in, emb=emb, types=types, rope=rope, keys=keys, pack=pack))
        if prof:
            prof.add("head", "forward", perf_counter() - t0)
        return loss

    def _forward_tokens(self, tokens, targets, grad, hidden, start, lengths, types):
        """An encoder's token classifier (transformers' *ForTokenClassification): class logits
        (B, T, K) at every position (0 at the padding past `lengths`, which the blocks skip), or
        with targets (B, T) (-100: no label: padding, special tokens, a word's later pieces)
        the mean cross-entropy over the labeled positions; the top block runs its projection
        and MLP on those rows only."""
        c = self.config
        B, T = tokens.shape
        rows = None
        if targets is not None:
            targets = self._token_targets(targets, (B, T))
            valid = targets.reshape(-1) != IGNORE
            if 0 < int(valid.sum()) < valid.size:
                rows = np.flatnonzero(valid)
        keep = targets is not None and grad and bool(self.grads)
        low, x, emb, start, keys = self._start(tokens, keep, hidden, start, types)
        rope = self._rope_tables(T)
        # the blocks skip the padding when no label is there (none is, in data from files)
        pack = self._packing(lengths, B, T, start)
        if pack is not None and targets is not None and (
                rows is None or not (rows % T < lengths[rows // T]).all()):
            pack = None
        top = rows
        if pack is not None:
            x = x.reshape(-1, c.d_model)[pack.idx]
            top = None if rows is None else pack.rows_of(rows)
        x, saved = self._run_blocks(x, start, low, keep, rope, top, lengths, keys, pack)
        prof = layers.PROFILE
        t0 = perf_counter() if prof else 0.0
        h = x.reshape(-1, c.d_model)       # (B * T, C), packed (N, C), or the labeled rows alone
        if rows is not None and start == c.n_layer:
            h = h[rows]         # no block ran; nothing is trainable below (checked in _start)
        h = np.ascontiguousarray(h)
        ids = rows if pack is None or rows is not None else pack.idx   # h's positions of B * T
        h_in = h                                       # the classifier's input: dropped out
        if keys is not None and keys.p:                # in training, as transformers' BERT
            h_in = h.copy()
            dropout_forward(h_in, keys.p, keys.classifier, ids)
        logits = self.classifier.forward(self.params, h_in)   # (B * T, N or M, K)
        if targets is None:        # (padding positions, which blocks skipped: logits 0)
            return (logits if pack is None else pack.pad(logits)).reshape(B, T, -1)
        t = targets.reshape(-1)
        loss = self._class_loss(logits, t if rows is None else t[rows], keep, dict(
            encoder=True, per_token=True, tokens=tokens, saved=saved, low=low, h_in=h_in,
            rows=ids, emb=emb, types=types, rope=rope, keys=keys, pack=pack))
        if prof:
            prof.add("head", "forward", perf_counter() - t0)
        return loss

    def _token_targets(self, targets, shape):
        """A token classifier's targets: (B, T) class indices, -100 where a position has no
        label, as int64."""
        K = len(self.config.labels)
        t = np.asarray(targets)
        if t.dtype.kind not in "iu" or t.shape != shape:
            raise InputError(f"a token classifier's targets are class indices (0..{K - 1}, or "
                             f"-100: no label) of the tokens' shape {shape}, got {t.dtype} of "
                             f"shape {t.shape}")
        bad = ((t < 0) & (t != IGNORE)) | (t >= K)
        if bad.any():
            raise InputError(f"targets hold class {t[bad][0]}, outside 0..{K - 1} (the labels "
                             f"{self.config.labels[:5]}{'...' if K > 5 else ''}) or -100")
        return np.ascontiguousarray(t, dtype=np.int64)

    def _token_classifier_backward(self, tape, dlog, below):
        """Through a token classifier: its gradients, and the gradient of the top block's output
        at the labeled rows (or every row), or None when nothing below trains."""
        dh = self.classifier.backward(self.params, self.grads, dlog, tape["h_in"], below)
        keys = tape["keys"]
        if dh is not None and keys is not None and keys.p:
            dropout_backward(dh, keys.p, keys.classifier, tape["rows"])
        return dh if below else None

    def _class_loss(self, logits, targets, keep, tape: dict) -> float:
        """The mean cross-entropy of class logits (B, K) against targets (B,). keep: the logits
        become their gradient, in place, and `tape` (with them) is what backward() reads."""
        n = int((targets != IGNORE).sum())
        if n == 0:   # nothing to average, as torch: NaN, and a backward that adds nothing
            if keep:
                self._tape = dict(empty=True, weights=self._weights_now())
            return float("nan")
        B = len(targets)
        losses, lse = np.empty(B, np.float32), np.empty(B, np.float32)
        if keep:
            crossentropy_forward_backward(logits, targets, losses, lse, 1.0 / n)
            self._tape = dict(tape, dlogits=logits, weights=self._weights_now(), empty=False)
        else:
            crossentropy_forward(logits, targets, losses, lse)
        return float(losses.sum(dtype=np.float64) / n)

    def _forward_scores(self, tokens, targets, grad, hidden, start, lengths, types):
        """A causal LM's sequence classifier (transformers' *ForSequenceClassification): class
        logits (B, K) from each sequence's last token that is not the pad id (_last_tokens;
        padding on the right) after the final norm, or with targets (B,) the mean
        cross-entropy. The top block runs its projection and MLP on those B rows only."""
        c = self.config
        B, T = tokens.shape
        if targets is not None:
            targets = self._labels(targets, B)
        keep = targets is not None and grad and bool(self.grads)
        low, x, emb, start, keys = self._start(tokens, keep, hidden, start, types)
        rope = self._rope_tables(T)
        last = np.arange(B) * T + self._last_tokens(tokens, lengths)
        x, saved = self._run_blocks(x, start, low, keep, rope, last, lengths, keys)
        prof = layers.PROFILE
        t0 = perf_counter() if prof else 0.0
        P = self.params
        x2 = x if x.ndim == 2 else np.ascontiguousarray(x.reshape(-1, c.d_model)[last])
        h, st = self.ln_f.forward(P, x2)                # (B, C)
        logits = self.classifier.forward(P, h)          # (B, K)
        if targets is None:
            return logits
        loss = self._class_loss(logits, targets, keep, dict(
            scores=True, tokens=tokens, saved=saved, low=low, x=x2, st=st, h=h, emb=emb,
            types=types, rope=rope, keys=keys))
        if prof:
            prof.add("head", "forward", perf_counter() - t0)
        return loss

    def _last_tokens(self, tokens, lengths):
        """(B,) the position a causal classifier reads in each sequence: transformers' rule, the
        last one (of its `lengths` real ones) whose token is not the pad id; the first when all
        are; the last real one when there is no pad id."""
        B, T = tokens.shape
        n = np.full(B, T) if lengths is None else lengths
        pad = self.config.pad_token_id
        if pad is None:
            return n - 1
        real = (tokens != pad) & (np.arange(T)[None] < n[:, None])
        return np.where(real.any(1), T - 1 - np.argmax(real[:, ::-1], axis=1), 0)

    def _scores_backward(self, tape, dlog, below):
        """Through a causal LM's classifier and final norm: their gradients, and the gradient
        of the top block's output at the last tokens (B, C), or None when nothing below trains."""
        P, G = self.params, self.grads
        dh = self.classifier.backward(P, G, dlog, tape["h"],
                                      below or any(n in G for n in self.ln_f.names()))
        dx = None
        if dh is not None:
            dx = np.zeros_like(dh)
            self.ln_f.backward(P, G, dh, tape["x"], tape["st"], dx)
        return dx if below else None

    @_blas_one_thread
    def prefix(self, tokens, upto: int, hidden=None, start: int = 0, lengths=None, types=None):
        """The input of block `upto` (B, T, d_model): embeddings and blocks below it, run
        forward without keeping anything. forward(..., hidden=, start=upto) continues from it.
        With hidden (the input of block `start`), only blocks start .. upto - 1 run."""
        tokens = self._tokens(tokens)
        lengths = self._lengths(lengths, *tokens.shape)
        if not is_int(upto) or not 0 <= upto <= self.config.n_layer:
            raise InputError(f"prefix upto={upto!r} must be an integer in 0..{self.config.n_layer} "
                             "(the model's blocks run below it)")
        rope = self._rope_tables(tokens.shape[1])
        if hidden is None:
            x, start = self.embed(tokens, types=types), 0
        else:
            if not is_int(start) or not 0 <= start <= upto:
                raise InputError(f"prefix start={start!r} must be an integer in 0..upto={upto}")
            x = self._hidden(hidden, *tokens.shape, start)
        for b in self.blocks[start:upto]:
            x, _ = b.forward(self.params, x, rope, False, lengths=lengths)
        return x

    def _hidden(self, hidden, B, T, start):
        if not is_int(start) or not 0 <= start <= self.config.n_layer:
            raise InputError(f"start={start!r} must be an integer in 0..{self.config.n_layer} "
                             "(the block whose input hidden is)")
        h = np.asarray(hidden)
        if h.shape != (B, T, self.config.d_model):
            raise InputError(f"hidden has shape {h.shape}, expected {(B, T, self.config.d_model)}")
        return np.ascontiguousarray(h, dtype=np.float32)

    # ---- incremental decoding -------------------------------------------------------------
    def new_cache(self, batch: int, length: int) -> list:
        """Per block (k, v) arrays of shape (batch, length, n_kv_head, head_dim)."""
        c = self.config
        if c.encoder:
            raise InputError("an encoder (bidirectional attention) does not generate text: it "
                             "has no KV cache")
        if c.labels is not None:
            raise InputError("a sequence classifier (labels) does not generate text: it has no "
                             "LM head")
        for what, v in (("batch", batch), ("length", length)):
            if not is_int(v) or v < 1:
                raise InputError(f"new_cache {what} must be a positive integer, got {v!r}")
        if length > c.context_length:
            raise InputError(f"cache length {length} exceeds the model's context of "
                             f"{c.context_text()}")
        shape = (batch, length, c.n_kv_head, c.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in self.blocks]

    @_blas_one_thread
    def forward_cached(self, tokens, cache, pos0: int):
        """Logits (B, V) of the last of `tokens` (B, T), which sit at positions pos0 ..
        pos0 + T - 1; their keys and values are appended to `cache` (from new_cache), so earlier
        positions are never run again."""
        tokens = self._tokens(tokens)
        B, T = tokens.shape
        if self.config.encoder:
            raise InputError("an encoder (bidirectional attention) does not generate text")
        Bc, Lc = self._cache_shape(cache)
        if not is_int(pos0) or pos0 < 0:
            raise InputError(f"forward_cached pos0 must be an integer >= 0, got {pos0!r}")
        if B != Bc:
            raise InputError(f"tokens have batch {B}, the cache was made for batch {Bc}")
        if pos0 + T > Lc:
            raise InputError(f"positions up to {pos0 + T} do not fit the cache of length {Lc}")
        if pos0 + T > self.config.context_length:   # a cache made by hand may be longer
            raise InputError(f"positions up to {pos0 + T} exceed the model's context of "
                             f"{self.config.context_text()}")
        rope = self._rope_tables(T, pos0)
        x = self.embed(tokens, pos0)
        for b, kv in zip(self.blocks, cache):
            x, _ = b.forward(self.params, x, rope, False, cache=kv, pos0=pos0)
        last = np.ascontiguousarray(x[:, -1])                 # (B, C)
        h, _ = self.ln_f.forward(self.params, last)
        logits = np.empty((B, self.config.vocab_size), np.float32)
        gemm_nt(h, self.params[self.head], logits)
        return logits

    def _cache_shape(self, cache) -> tuple[int, int]:
        """(batch, length) of a cache from new_cache; anything else is an InputError (one
        attribute check per block: this runs once per generated token)."""
        c = self.config
        if not isinstance(cache, (list, tuple)) or len(cache) != c.n_layer:
            got = type(cache).__name__
            if isinstance(cache, (list, tuple)):
                got += f" of length {len(cache)}"
            raise InputError(f"cache must be the list of {c.n_layer} (k, v) pairs new_cache "
                             f"returns, got {got}")
        k0 = cache[0][0] if isinstance(cache[0], (list, tuple)) and len(cache[0]) == 2 else None
        shape = getattr(k0, "shape", ())
        for kv in cache:
            if (not isinstance(kv, (list, tuple)) or len(kv) != 2
                    or not all(isinstance(a, np.ndarray) and a.dtype == np.float32
                               and a.shape == shape and a.flags.c_contiguous for a in kv)
                    or len(shape) != 4 or shape[2:] != (c.n_kv_head, c.head_dim)):
                raise InputError("cache entries must be (k, v) C-contiguous float32 arrays of "
                                 f"shape (batch, length, {c.n_kv_head}, {c.head_dim}) as new_cache "
                                 "makes them")
        return shape[0], shape[1]

    def _head_loss(self, h, targets, grad, need_dh, need_dw):
        """Fused LM head + cross-entropy over row chunks, so (B, T, V) logits never exist.
        With grad, the logits' gradient is formed in place and turned at once into dh (N, C)
        and the head's dW; backward() later only adds them in. A row whose target is -100 adds
        nothing (forward() hands the head the target rows alone when there are others)."""
        W = self.params[self.head]                      # (V, C)
        N, V = h.shape[0], W.shape[0]
        n_valid = int((targets != IGNORE).sum())
        dw = np.zeros_like(W) if need_dw else None
        if n_valid == 0:                                # nothing to average, as torch: NaN
            return float("nan"), (np.zeros_like(h) if need_dh else None), dw
        R = head_chunk_rows(N, V, need_dw)
        logits = np.empty((R, V), np.float32)
        losses = np.empty(N, np.float32)
        lse = np.empty(N, np.float32)
        dh = np.empty_like(h) if need_dh else None
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            lg = logits[:r1 - r0]
            gemm_nt(h[r0:r1], W, lg)
            if grad:
                crossentropy_forward_backward(lg, targets[r0:r1], losses[r0:r1], lse[r0:r1],
                                              1.0 / n_valid)
                if need_dh:
                    gemm_nn(lg, W, dh[r0:r1])
                if need_dw:
                    gemm_tn(lg, h[r0:r1], dw, accumulate=True)
            else:
                crossentropy_forward(lg, targets[r0:r1], losses[r0:r1], lse[r0:r1])
        return float(losses.sum(dtype=np.float64) / n_valid), dh, dw

    @_blas_one_thread
    def backward(self, scale: float = 1.0, dhidden=None):
        """Fill self.grads (accumulating) from the last forward(tokens, targets): the gradients
        of scale x its mean loss (torch's (scale * loss).backward()). Accumulating micro-batches
        as one batch weights each by its share of the target positions.
        dhidden (B, T, d_model), after forward(tokens, keep=True) of an encoder without a head:
        the gradient of an outside objective with respect to the hidden states it returned."""
        if not is_number(scale) or not math.isfinite(scale):
            raise InputError(f"backward scale must be a finite number, got {scale!r}")
        tape = self._tape
        if tape is not None and (dhidden is not None) != bool(tape.get("hidden")):
            raise InputError("backward(dhidden=) goes with forward(tokens, keep=True) of an encoder "
                             "without a head, and only with it")
        if tape is None:
            raise InputError("backward() needs the tape of a forward(tokens, targets) with trainable "
                             "parameters (an encoder without a head: forward(tokens, keep=True), "
                             "then backward(dhidden=)), and any later forward (an evaluation, "
                             "say), freeze/unfreeze or backward replaces it: run forward again "
                             "right before backward()")
        if tape["weights"] != self._weights_now():
            raise InputError("the weights changed between forward(tokens, targets) and backward() "
                             "(an optimizer step, or a parameter replaced): the saved activations "
                             "belong to the old ones; run forward again before backward()")
        self._tape = None
        if tape["empty"]:
            # no target in the batch: it adds nothing, and a step after it alone must not move
            # the weights (Adam's moments and weight decay would; torch's gradients are NaN)
            self.last_backward_blocks = []
            return
        # a head-less encoder's pooler, even if trainable, is on no path from the hidden
        # states: it stays without a gradient (torch: .grad None, no step, no weight decay)
        self._no_grad_yet = ({n for n in self._no_grad_yet if n.startswith("pooler.")}
                             if tape.get("hidden") else set())
        self.last_backward_blocks = []
        if tape.get("hidden"):
            try:
                dh = np.asarray(dhidden, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError("dhidden must be a float array of the hidden states' shape "
                                 f"{tape['shape']}") from None
            if dh.shape != tape["shape"]:
                raise InputError(f"dhidden has shape {dh.shape}, the hidden states {tape['shape']}")
            dh = np.array(dh, dtype=np.float32, order="C")       # a copy: blocks use it as scratch
            if scale != 1.0:
                dh *= np.float32(scale)
            self._backward_blocks(tape, dh.reshape(-1, dh.shape[-1]))
            return
        head = (self._token_classifier_backward if tape.get("per_token") else
                self._classifier_backward if tape.get("encoder") else
                self._scores_backward if tape.get("scores") else None)
        if head is not None:       # a classifier: its logits' gradient, scaled, through it
            prof = layers.PROFILE
            t0 = perf_counter() if prof else 0.0
            dlog = tape["dlogits"]
            if scale != 1.0:
                dlog *= np.float32(scale)
            dx = head(tape, dlog, tape["low"] < self.config.n_layer)
            if prof:
                prof.add("head", "backward", perf_counter() - t0)
            self._backward_blocks(tape, dx)
            return
        P, G = self.params, self.grads
        prof = layers.PROFILE
        t0 = perf_counter() if prof else 0.0
        dh, dw = tape["dh"], tape["dw"]
        if scale != 1.0:   # every gradient below is linear in the head's (the tape's own arrays)
            for a in (dh, dw):
                if a is not None:
                    a *= np.float32(scale)
        if dw is not None:
            G[self.head] += dw
        dx = None
        if dh is not None:
            dx = np.zeros_like(dh)                       # (N, C)
            self.ln_f.backward(P, G, dh, tape["x"], tape["st"], dx)
        if prof:   # the head's share of backward: its dW added in, the final norm's backward
            prof.add("head", "backward", perf_counter() - t0)
        self._backward_blocks(tape, dx)

    def _classifier_backward(self, tape, dlog, below):
        """Through an encoder's classifier head: its gradients, and the gradient of the top
        block's output at the first positions (B, C), or None when nothing below trains."""
        P, G = self.params, self.grads
        pooled = tape["pooled"]
        dpooled = self.classifier.backward(P, G, dlog, tape.get("pooled_in", pooled),
                                           below or any(n in G for n in self.pooler.names()))
        dcls = None
        if dpooled is not None:
            keys = tape.get("keys")
            if keys is not None and keys.p:
                dropout_backward(dpooled, keys.p, keys.classifier)
            if self.config.pooler_act == "tanh":
                dpooled *= 1 - pooled * pooled
            else:
                dpooled *= pooled > 0
            dcls = self.pooler.backward(P, G, dpooled, tape["cls"], below)
            if dcls is not None and keys is not None and keys.p and _drops_cls(self.config):
                dropout_backward(dcls, keys.p, keys.pooler)
        return dcls

    def _backward_blocks(self, tape, dx):
        """From the top block's output gradient dx down to the lowest trainable block, then
        through the embeddings when one of them trains."""
        if dx is None:
            return
        P, G = self.params, self.grads
        prof = layers.PROFILE
        low = tape["low"]
        for b in reversed(self.blocks):
            if b.index < low or dx is None:
                break
            self.last_backward_blocks.append(b.index)
            t0 = perf_counter() if prof else 0.0
            dx = b.backward(P, G, dx, tape["saved"].pop(b.index), tape["rope"], need_dx=b.index > low)
            if prof:
                prof.add(f"blocks.{b.index}", "backward", perf_counter() - t0)
        if low == -1 and dx is not None:
            t0 = perf_counter() if prof else 0.0
            tokens = tape["tokens"]
            if tape.get("pack") is not None:   # the packed rows back to (B * T), 0 at padding
                dx = tape["pack"].pad(dx)
            keys = tape.get("keys")
            if keys is not None and keys.p:
                dropout_backward(dx, keys.p, keys.embeddings)
            if self.ln_e is not None:
                x, st = tape["emb"]
                dx_e = np.zeros_like(dx)
                self.ln_e.backward(P, G, dx, x.reshape(dx.shape), st, dx_e)
                dx = dx_e
            if "wtt.weight" in G:
                dx2, types = dx.reshape(-1, dx.shape[-1]), tape.get("types")
                if types is None:       # every token of type 0
                    G["wtt.weight"][0] += dx2.sum(axis=0)
                else:                   # a few types: a masked sum each
                    t = types.reshape(-1)
                    for v in range(len(G["wtt.weight"])):
                        G["wtt.weight"][v] += dx2[t == v].sum(axis=0)
            embedding_backward(dx.reshape(*tokens.shape, -1), tokens, G.get("wte.weight"),
                               G.get("wpe.weight"), pos0=self.config.position_offset,
                               padding_idx=self._padding_row())
            if prof:
                prof.add("embeddings", "backward", perf_counter() - t0)

    def _padding_row(self) -> int | None:
        """The token embedding row that the lookup's gradient leaves alone: the pad token's,
        as transformers' embeddings (nn.Embedding's padding_idx) in every family but GPT-2's. A
        tied LM head's gradient still reaches it, as in torch."""
        c = self.config
        p = c.pad_token_id
        if c.model_type == "gpt2" or p is None or not -c.vocab_size <= p < c.vocab_size:
            return None
        return p % c.vocab_size          # nn.Embedding reads a negative padding_idx from the end

    def _weights_now(self, names=None) -> tuple:
        """Which array each parameter (of `names`, default all) is and how many updates it has
        taken: backward checks it against its forward's, a prefix cache against its prefix's
        when it was made (edits in place by hand are not seen)."""
        return tuple((n, id(self.params[n]), self._updated.get(n, 0))
                     for n in (self.params if names is None else names))

    def saved_bytes(self) -> int:
        """Bytes of activations the last forward kept for backward."""
        if self._tape is None:
            return 0
        total = 0
        stack = [self._tape]
        while stack:
            o = stack.pop()
            if isinstance(o, np.ndarray):
                total += o.nbytes
            elif isinstance(o, dict):
                stack += list(o.values())
            elif isinstance(o, (tuple, list)):
                stack += list(o)
        return total

    def with_classifier(self, labels, seed: int = 0, per_token: bool = False) -> "Model":
        """This model with a new classifier head over `labels` (the class names, in the order
        of the logits): an encoder's pooler (kept if this BERT has one; new for RoBERTa) and a
        classifier (a causal LM's on its last token, in place of its LM head) drawn from
        `seed`; labels None: no head (an encoder's hidden states; a causal LM whose embeddings
        are tied is a language model again). per_token: an encoder's token classifier (one
        label per token, no pooler). The new model shares this one's other weight arrays, and
        everything is trainable, as in a new model."""
        c = self.config
        if not c.encoder and labels is None and not c.tie_embeddings and c.labels is not None:
            raise InputError("this causal classifier's LM head was left out when it became one "
                             "(its embeddings are not tied): load the language model again")
        if isinstance(labels, str):
            raise InputError(f"with_classifier labels must be a list of class names, got the "
                             f"string {labels!r}")
        if per_token and (not c.encoder or labels is None):
            raise InputError("a token classifier (per_token=True) is an encoder's, with labels")
        cfg = dataclasses.replace(c, labels=list(labels) if labels is not None else None,
                                  per_token=bool(per_token))
        # RoBERTa's (DistilBERT's) classifier has its own dense layer where BERT's has the
        # pooler, and a headless model's pooler is not it (a RobertaModel's, which transformers
        # does not use; a DistilBertModel has none): from one of those, both heads start anew
        heads = (("classifier.",) if (c.model_type == "bert" or c.labels is not None)
                 and not (per_token or c.per_token) else ("classifier.", "pooler."))
        if not c.encoder:   # a causal LM's classifier replaces its LM head
            heads = ("classifier.", "lm_head.") if labels is not None else ("classifier.",)
        params = {n: a for n, a in self.params.items() if not n.startswith(heads)}
        params.update(new_head(cfg, params, seed))
        new = Model(cfg, params)
        new.dropout, new.pack_padding = copy.copy(self.dropout), self.pack_padding
        return new

    # ---- saving -----------------------------------------------------------------------------
    def save(self, path: str, dtype: str = "F32", tokenizer=None):
        """Write a Hugging Face directory (config.json + model.safetensors) that transformers'
        AutoModelForCausalLM.from_pretrained loads, and `tokenizer`'s files beside it if given.
        A path ending in .gguf writes one GGUF file instead (llama.cpp runs it),
        which needs the tokenizer; dtype may then also be a GGUF quantization such as Q8_0."""
        if str(path).lower().endswith(".gguf"):
            from .io.gguf_write import save_gguf
            save_gguf(self, path, tokenizer, dtype=dtype)
            return
        from .io import save_model
        save_model(self, path, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save(path, token_types=self.config.type_vocab_size > 1)

    def __getstate__(self):
        """Pickling and copying (multiprocessing, joblib): parameters, gradients and the
        trainable set; not the optimizers that track the model, a pending backward's tape, or
        the rotary table (rebuilt on demand)."""
        return {**self.__dict__, "_optimizers": None, "_tape": None, "_rope": None,
                "dropout": copy.copy(self.dropout)}   # a copy draws its own masks

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_updated", {})   # pickled before the counts existed
        self._optimizers = weakref.WeakSet()

    def __repr__(self):
        c = self.config
        return (f"Model({c.model_type}, {c.n_layer} blocks, d_model={c.d_model}, "
                f"{self.num_params() / 1e6:.1f}M params, {self.num_params(True) / 1e6:.1f}M trainable"
                f"{'' if self.dropout is None else ', ' + str(self.dropout)})")
