"""Looking inside a training step: per-layer cost predicted from shapes.

FLOP model (multiply-add = 2 FLOPs; N = B * T tokens):
  linear forward 2 N in out; its input gradient the same; its weight gradient the same
  causal attention forward 2 * (2 B H T^2 D / 2) (scores and weighted sum over the lower
  triangle; an encoder's over the whole square, twice that); backward 2.5x that (scores
  recomputed, then four products)
A block below the lowest trainable one runs forward only; inside the range, backward runs only
the parts that lead to a trainable parameter or to the block's input (the lowest trainable block
needs no gradient at its own input); frozen weights cost no weight gradient.
Byte model (elementwise kernels: norms, activation, biases, rope, residual adds, the loss over
the logits): float32 bytes read and written, from shapes; their time is bytes / the rate those
kernels reach now (ElementwiseRate). GEMM and attention operands are not counted there.
Optimizer: 28 bytes per trainable parameter (AdamW) / the AdamW kernel's rate (AdamWRate).
"""
from __future__ import annotations

import math
import time

import numpy as np

from kernels import stats
from kernels.blas import one_thread

from .model import EMBEDDINGS, IGNORE, block_of, head_chunk_rows


def _linears(block):
    return [m for m in (block.q, block.k, block.v, block.o, block.gate, block.up, block.down) if m]


_ADAMW_BYTES = 28   # per trainable parameter: read weight, grad, two moments; write three


def _rows(b, m, N: int, M: int) -> int:
    """Rows a linear layer of block b runs on: q, k, v every position; the attention output
    projection and the MLP M (fewer in the top block when only some positions have a target)."""
    return N if m in (b.q, b.k, b.v) else M


def _input_grad_flops(b, N: int, plan: dict, attn_fwd: float, M: int | None = None) -> float:
    M = N if M is None else M
    lin = lambda *ms: sum(2 * _rows(b, m, N, M) * m.n_in * m.n_out for m in ms if m is not None)  # noqa: E731
    return ((lin(b.down) if plan["need_act"] else 0) + (lin(b.gate, b.up) if plan["need_h2"] else 0)
            + (lin(b.o) + 2.5 * attn_fwd if plan["need_qkv"] else 0)
            + (lin(b.q, b.k, b.v) if plan["need_h"] else 0))


def _elementwise_bytes(c, N: int, b, G, plan: dict | None, M: int | None = None) -> tuple[int, int]:
    """float32 bytes moved by a block's elementwise kernels: forward, and backward (plan: the
    parts that run, None: no backward); norms and activations read their saved inputs. M rows
    (default N) after attention; fewer adds their gather and scatter."""
    M = N if M is None else M
    C, F, Hd, Kd = c.d_model, c.d_ff, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    lin = _linears(b)
    swiglu = c.mlp == "swiglu"
    biased = sum(m.n_out * _rows(b, m, N, M) for m in lin if m.b)
    rope = 2 * (Hd + Kd) if b.rope else 0
    qk = 2 * (Hd + Kd) if c.qk_norm else 0       # the q and k norms read and write q and k
    # ln1, the q / k norms and rope over every position; ln2, both residual adds and the
    # activation over M
    fwd = (N * (2 * C + qk + rope) + M * (2 * C + 2 * 3 * C + (3 if swiglu else 2) * F)
           + 2 * biased)
    gather = 2 * M * (Hd + C) if M < N else 0               # the attention output and x, read and written
    if plan is None:
        return 4 * (fwd + gather), 0
    # norms read x, dout and add into dx; the activation reads its inputs and dout; trainable
    # biases read dout; k, v (and up, beside gate) add their input gradient into the one before
    # (read, add, write)
    bwd = (M * ((4 * C + (3 * C if swiglu else 0) if plan["need_h2"] else 0)
                + ((5 if swiglu else 3) * F if plan["need_act"] else 0))
           + N * ((4 * C + 3 * 2 * C if plan["need_h"] else 0)
                  + (rope + 2 * qk if plan["need_qkv"] else 0))
           + sum(m.n_out * _rows(b, m, N, M) for m in lin if m.b in G))
    if M < N:   # dO and dx scattered back into zeroed arrays of every position
        bwd += (N + M) * ((Hd if plan["need_qkv"] else 0) + (C if plan["need_h"] else 0))
    # a trainable weight's gradient is added into its accumulator: read both, write one, per
    # element (N-independent)
    dw_add = 12 * sum(m.n_in * m.n_out for m in lin if m.w in G)
    return 4 * (fwd + gather), 4 * bwd + dw_add


def _kept_bytes(c, B: int, T: int, M: int, keep: set) -> int:
    """Bytes of the values a block's forward keeps (Block.backward_plan's "keep"): those before
    attention over every position, those after it over M rows (fewer in the top block when only
    some positions have a target: then also the gathered attention output and the row indices)."""
    N = B * T
    C, F, Hd, Kd = c.d_model, c.d_ff, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    per_row = 1 if c.norm == "rmsnorm" else 2      # norm statistics: rstd (and the mean)
    elements = dict(x=N * C, h=N * C, st1=N * per_row, q=N * Hd, k=N * Kd, v=N * Kd, a=N * Hd,
                    lse=B * c.n_head * T, x1=M * C, h2=M * C, st2=M * per_row, g=M * F, u=M * F,
                    act=M * F, a_rows=M * Hd if M < N else 0, rows=2 * M if M < N else 0,
                    y1=M * C, y2=M * C,                       # a post-norm block's norm inputs
                    q_pre=N * Hd, k_pre=N * Kd, stq=N * c.n_head, stk=N * c.n_kv_head)
    return 4 * sum(elements.get(n, 0) for n in keep)


def block_costs(model, B: int, T: int, everything: bool = False,
                target_rows: int | None = None) -> list[dict]:
    """One row per block plus the head: parameters, trainable, predicted FLOPs of forward,
    input-gradient and weight-gradient work, and activation bytes kept for backward.
    everything=True: as if every parameter were trainable (full fine-tuning).
    target_rows: how many of the B * T positions have a target (default all); the head, and the
    top block after its attention, run on those alone (Model.forward)."""
    c = model.config
    N = B * T
    if c.labels is not None and not c.per_token:   # the classifier reads one position (an
        target_rows = B        # encoder's first, a causal LM's last): the top block's rows after
                               # attention (a token classifier's and a head-less encoder's
                               # objective read them all, or the labeled ones)
    M = N if target_rows is None else target_rows
    top_rows = 0 < M < N                           # the top block hands on the target rows only
    stats = 1 if c.norm == "rmsnorm" else 2        # per row and norm: rstd (and the mean)
    G = set(model.params) if everything else set(model.grads)
    low = -1 if everything else model.lowest_trainable_block()
    attn_fwd = 2 * B * c.n_head * T * T * c.head_dim  # two causal products
    if c.encoder:                                     # ... over the whole square
        attn_fwd *= 2
    C = c.d_model
    emb = [n for n in model.params if n.startswith(EMBEDDINGS)]
    own = [n for n in emb if n != model.head]        # a tied wte is counted in the head row
    rows = [{"layer": "embeddings", "params": sum(model.params[n].size for n in emb),
             "trainable": any(n in G for n in emb),
             "opt_bytes": _ADAMW_BYTES * sum(model.params[n].size for n in own if n in G),
             "fwd_flops": 0, "dx_flops": 0, "dw_flops": 0,
             # an embedding norm keeps its input and statistics when backward reaches it
             "kept_bytes": 4 * N * (C + stats) if low == -1 and model.ln_e is not None else 0,
             # the lookup reads a row of each table and writes x; backward (only when an
             # embedding is trainable) reads dx and adds it into each trainable table's rows
             "fwd_bytes": 4 * N * C * (len(emb) + 1),
             "bwd_bytes": 12 * N * C * sum(n in G for n in emb) if low == -1 else 0,
             "attn_fwd_flops": 0, "attn_bwd_flops": 0}]
    for b in model.blocks:
        lin = _linears(b)
        Mb = M if top_rows and b.index == c.n_layer - 1 else N
        params = sum(model.params[n].size for n in b.shapes())
        fwd = sum(2 * _rows(b, m, N, Mb) * m.n_in * m.n_out for m in lin) + attn_fwd
        in_range = b.index >= low
        plan = b.backward_plan(G, b.index > low, Mb < N) if in_range else None
        dx = _input_grad_flops(b, N, plan, attn_fwd, Mb) if in_range else 0
        dw = sum(2 * _rows(b, m, N, Mb) * m.n_in * m.n_out for m in lin if m.w in G) if in_range else 0
        kept = _kept_bytes(c, B, T, Mb, plan["keep"]) if in_range else 0
        ew_f, ew_b = _elementwise_bytes(c, N, b, G, plan, Mb)
        n_train = sum(model.params[n].size for n in b.shapes() if n in G)
        rows.append({"layer": f"blocks.{b.index}", "params": params, "opt_bytes": _ADAMW_BYTES * n_train,
                     "trainable": any(n in G for n in b.shapes()), "fwd_flops": fwd,
                     "dx_flops": dx, "dw_flops": dw, "kept_bytes": kept,
                     "fwd_bytes": ew_f, "bwd_bytes": ew_b, "attn_fwd_flops": attn_fwd,
                     "attn_bwd_flops": 2.5 * attn_fwd if plan and plan["need_qkv"] else 0})
    if c.encoder:   # (pooling and an objective outside a head-less one: B x C, not counted)
        if c.labels is not None:
            rows.append(_classifier_costs(model, M, G, low))
        return rows
    if c.labels is not None:
        rows.append(_score_costs(model, B, G, low))
        return rows
    head = 2 * M * c.d_model * c.vocab_size
    Nh = M if top_rows else N                      # rows reaching the final norm
    need_dh = low < c.n_layer or any(n in G for n in model.ln_f.names())
    need_dw = model.head in G
    VC = c.vocab_size * c.d_model
    chunks = -(-M // head_chunk_rows(M, c.vocab_size, need_dw)) if M else 0
    n_train = sum(model.params[n].size for n in (*model.ln_f.names(), model.head) if n in G)
    rows.append({"layer": "ln_f + head", "opt_bytes": _ADAMW_BYTES * n_train,
                 "params": sum(model.params[n].size for n in model.ln_f.names())
                 + VC * (0 if c.tie_embeddings else 1),
                 "trainable": any(n in G for n in (*model.ln_f.names(), model.head)),
                 "fwd_flops": head, "dx_flops": head if need_dh else 0,
                 "dw_flops": head if need_dw else 0,
                 # ln_f's input and stats, dh (when needed) and a trainable head's dW
                 "kept_bytes": 4 * Nh * (c.d_model * (1 + need_dh) + stats) + (4 * VC if need_dw else 0),
                 # the fused head + loss (its dx and dW GEMMs run there too): the final norm, the
                 # loss reading the logits and writing their gradient in place; a trainable
                 # head's gradient zeroed, then each chunk's added in
                 "fwd_bytes": 4 * Nh * 2 * c.d_model + 4 * M * 2 * c.vocab_size
                 + ((4 + 12 * chunks) * VC if need_dw else 0),
                 # in backward(): that gradient added into the accumulator; the final norm's
                 # backward reads x and dout and adds into a zeroed dx
                 "bwd_bytes": (12 * VC if need_dw else 0) + (4 * Nh * 5 * c.d_model if need_dh else 0),
                 "attn_fwd_flops": 0, "attn_bwd_flops": 0})
    return rows


def _classifier_costs(model, R: int, G, low: int) -> dict:
    """An encoder's head row: the pooler (a token classifier has none) and the classifier, on
    R rows: the first position of each sequence, or a token classifier's labeled positions."""
    c = model.config
    C, K = c.d_model, len(c.labels)
    names = [n for n in model.params if n.startswith(("pooler.", "classifier."))]
    pool = model.pooler is not None
    fwd = 2 * R * C * ((C if pool else 0) + K)
    below = low < c.n_layer
    dw = (2 * R * C * C if "pooler.weight" in G else 0) + (2 * R * C * K if "classifier.weight" in G else 0)
    return {"layer": "classifier", "params": sum(model.params[n].size for n in names),
            "trainable": any(n in G for n in names),
            "opt_bytes": _ADAMW_BYTES * sum(model.params[n].size for n in names if n in G),
            "fwd_flops": fwd, "dx_flops": ((2 * R * C * K if below or pool else 0)
                                           + (2 * R * C * C if below and pool else 0)),
            "dw_flops": dw, "kept_bytes": 4 * R * ((1 + pool) * C + K),
            "fwd_bytes": 4 * R * ((2 + pool) * C + 2 * K), "bwd_bytes": 4 * R * ((2 + pool) * C + 2 * K),
            "attn_fwd_flops": 0, "attn_bwd_flops": 0}


def _score_costs(model, B: int, G, low: int) -> dict:
    """A causal LM classifier's head row: the final norm and the classifier ("score"), on the
    last position of each of the B sequences."""
    c = model.config
    C, K = c.d_model, len(c.labels)
    names = [*model.ln_f.names(), "classifier.weight"]
    stats = 1 if c.norm == "rmsnorm" else 2
    need_dh = low < c.n_layer or any(n in G for n in model.ln_f.names())
    return {"layer": "ln_f + score", "params": sum(model.params[n].size for n in names),
            "trainable": any(n in G for n in names),
            "opt_bytes": _ADAMW_BYTES * sum(model.params[n].size for n in names if n in G),
            "fwd_flops": 2 * B * C * K, "dx_flops": 2 * B * C * K if need_dh else 0,
            "dw_flops": 2 * B * C * K if "classifier.weight" in G else 0,
            "kept_bytes": 4 * B * (2 * C + K + stats),
            "fwd_bytes": 4 * B * (3 * C + 2 * K), "bwd_bytes": 4 * B * (5 * C + 2 * K) if need_dh else 0,
            "attn_fwd_flops": 0, "attn_bwd_flops": 0}


def cost_table(model, B: int, T: int, target_rows: int | None = None) -> str:
    rows = block_costs(model, B, T, target_rows=target_rows)
    on = "" if target_rows is None else (f"; the head, and the top block after its attention, on "
                                         f"the {target_rows} positions with a target")
    lines = [f"per training step of {B} x {T} tokens (GFLOP predicted from shapes{on}):",
             f"{'layer':<14}{'params':>12}  {'train':<6}{'forward':>9}{'input-grad':>12}"
             f"{'weight-grad':>13}{'kept MiB':>10}{'MiB moved':>11}"]
    for r in rows:
        moved = r["fwd_bytes"] + r["bwd_bytes"] + r["opt_bytes"]
        lines.append(f"{r['layer']:<14}{r['params']:>12,}  {'yes' if r['trainable'] else '-':<6}"
                     f"{r['fwd_flops'] / 1e9:>9.2f}{r['dx_flops'] / 1e9:>12.2f}{r['dw_flops'] / 1e9:>13.2f}"
                     f"{r['kept_bytes'] / 2**20:>10.1f}{moved / 2**20:>11.1f}")
    total = lambda rs: sum(r["fwd_flops"] + r["dx_flops"] + r["dw_flops"] for r in rs)  # noqa: E731
    step, full = total(rows), total(block_costs(model, B, T, everything=True, target_rows=target_rows))
    lines.append(f"step: {step / 1e9:.1f} GFLOP; full fine-tuning would be about {full / 1e9:.1f} "
                 f"GFLOP ({full / step:.2f}x); trainable {model.num_params(True):,} of "
                 f"{model.num_params():,} parameters")
    lines.append("kept MiB: activations kept for backward; MiB moved: bytes the elementwise")
    lines.append("kernels and AdamW read and write (GEMM and attention operands not counted)")
    return "\n".join(lines)


# ---- training telemetry -------------------------------------------------------------------
def _layer_of(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]


def _centered_gram(x):
    """(N, N) Gram matrix of the rows of x (..., C) flattened to (N, C), each column's mean
    (taken in float64) removed first: one float32 BLAS product."""
    x = x.reshape(-1, x.shape[-1])
    x = (x - x.mean(0, dtype=np.float64)).astype(np.float32)
    with one_thread():    # no OpenBLAS threads left spinning beside the engine's
        return x @ x.T


def _cka_of_grams(kx, ky, ky_norm: float) -> float:
    with one_thread():    # a long dot: OpenBLAS would split it over threads left spinning
        num = float(np.dot(kx.ravel().astype(np.float64), ky.ravel().astype(np.float64)))
    den = math.sqrt(stats.sum_sq(kx)) * ky_norm
    return num / den if den > 0 else float("nan")


def linear_cka(x, y) -> float:
    """Linear CKA of two (N, C) representations (Kornblith et al. 2019): 1 = same up to an
    orthogonal transform and scale. From the centered rows' (N, N) Gram matrices, as
    ||Y^T X||² = <X X^T, Y Y^T>: float32 products, float64 sums (on SmolLM2's blocks within
    1e-9 of float64 throughout; the (C, C) form in float32 was 1e-6 off, as large as 1 - CKA
    of a barely changed block). Meant for a probe's few hundred rows: the Grams are N x N."""
    ky = _centered_gram(y)
    return _cka_of_grams(_centered_gram(x), ky, math.sqrt(stats.sum_sq(ky)))


def block_outputs(model, tokens, start: int = 0, hidden=None, lengths=None, types=None) -> list:
    """Each block's output (B, T, C) for `tokens`, forward only; with `hidden`, the input of
    block `start`, only blocks start.. run (the list then begins with block `start`). An
    encoder's rows are padded on the right: lengths (B,) their real tokens (the rest is never
    attended to), types (B, T) their token types."""
    tokens = model._tokens(tokens)
    rope = model._rope_tables(tokens.shape[1])
    lengths = model._lengths(lengths, *tokens.shape)
    x = model.embed(tokens, types=types) if hidden is None else hidden
    outs = []
    for b in model.blocks[start:]:
        x, _ = b.forward(model.params, x, rope, False, lengths=lengths)
        outs.append(x.copy())
    return outs


# parameters after the last block: they change no block's output
_AFTER_BLOCKS = ("ln_f.", "lm_head.", "pooler.", "classifier.")
# the probe's size cap: CKA is stable at a few hundred tokens, and the probe's forward through
# every block above the lowest trained one is most of a record's time
PROBE_TOKENS = 512


class Telemetry:
    """Per-layer statistics on the steps `due` says: after every `every` updates (0-based steps
    every - 1, 2 * every - 1, ...) and after the last one (step + 1 == total_steps, when given).
    They are: gradient norm (before clipping), update-to-weight ratio (the update's norm over
    the weights' norm after it), drift from the pretrained weights (relative distance and
    cosine), Adam moment norms, and linear CKA of each block's
    output against the pretrained model's on a fixed probe batch (its first rows, at most
    PROBE_TOKENS tokens; at least one row; over the real tokens of each row when `lengths`
    gives them).

    Per step: before_update(step) once the gradients are final but before clipping them and
    before the optimizer step; record(step, opt) after the step, when due(step).

    Pretrained weights are copied lazily, the first time a parameter becomes trainable (until
    then it is untouched), so memory follows what has trained. `pretrained` names parameters
    that have trained before (a resumed run's earlier blocks, frozen now or not): construct
    before loading a checkpoint, so that their current values are still the pretrained ones.
    Costs nothing when off; when on, one probe forward and a few norms per recorded step."""

    def __init__(self, model, probe_tokens, every: int = 10, total_steps: int | None = None,
                 pretrained=(), lengths=None, types=None):
        self.model, self.every, self.total_steps = model, max(1, every), total_steps
        probe = np.asarray(probe_tokens)
        self.probe = probe[:max(1, PROBE_TOKENS // probe.shape[1])]
        B = len(self.probe)
        # lengths: each probe row's real tokens; CKA compares those rows only (padding never
        # carries a loss: its rows would add untrained positions to the similarity). An
        # encoder's attention is kept off the padding too (a causal LM's never reaches it)
        self.real = None if lengths is None else (
            np.arange(self.probe.shape[1]) < np.asarray(lengths)[:B, None])  # (B, T)
        encoder = model.config.encoder
        self.run = dict(lengths=None if lengths is None or not encoder else np.asarray(lengths)[:B],
                        types=None if types is None else np.asarray(types)[:B])
        self.w0: dict[str, np.ndarray] = {n: model.params[n].copy() for n in (*model.grads, *pretrained)}
        self.ref = block_outputs(model, self.probe, **self.run)
        # the reference side of each block's CKA, made once
        self.ref_gram = [_centered_gram(self._real(y)) for y in self.ref]     # (N, N) each
        self.ref_gram_norm = [math.sqrt(stats.sum_sq(k)) for k in self.ref_gram]
        self.before: dict[str, np.ndarray] = {}
        self.grad_sq: dict[str, float] = {}

    def _real(self, out):
        """A block output (B, T, C) as the rows of the probe's real tokens (N, C)."""
        return out if self.real is None else out[self.real]

    def _lowest_changed(self) -> int:
        """The lowest block whose output may differ from the pretrained model's: the lowest
        block with a parameter that has ever been trainable (0 if the embeddings have)."""
        n_layer = len(self.model.blocks)
        low = n_layer
        for n in self.w0:
            L = _layer_of(n)
            if L.startswith("blocks."):
                low = min(low, block_of(L))
            elif not any(n.startswith(f) for f in _AFTER_BLOCKS):
                return 0
        return low

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.total_steps

    def before_update(self, step: int) -> None:
        """Before clipping and the update: on a recorded step, each layer's gradient sum of
        squares (clipping would scale every layer to the same global norm) and the weights (for
        the update ratio)."""
        for n in self.model.grads:
            if n not in self.w0:
                self.w0[n] = self.model.params[n].copy()
        if self.due(step):
            self.before = {n: self.model.params[n].copy() for n in self.model.grads}
            self.grad_sq = {}
            for n, g in self.model.grads.items():
                L = _layer_of(n)
                self.grad_sq[L] = self.grad_sq.get(L, 0.0) + stats.sum_sq(g)

    def record(self, step: int, opt) -> dict:
        """Statistics after the update of `step`, per layer (block, embedding, final norm):
        drift and cosine for every layer that has trained, the rest for the trainable ones."""
        m, acc = self.model, {}

        def add(layer, key, value):
            acc.setdefault(layer, {}).setdefault(key, 0.0)
            acc[layer][key] += value

        # in the model's order, not the order parameters first trained in: a resumed run
        # sums each layer's squares as the uninterrupted run did, to the last bit
        for n in (n for n in m.params if n in self.w0):
            w0, L, p = self.w0[n], _layer_of(n), m.params[n]
            # a parameter frozen since it trained has no gradient: its weight stands in (that
            # column is unused, grad_sq comes from before_update)
            sums = stats.param_sums(p, w0, m.grads.get(n, p), self.before.get(n))
            for key, col in (("w_sq", stats.W_SQ), ("w0_sq", stats.W0_SQ), ("diff_sq", stats.DIFF_SQ),
                             ("dot_w0", stats.DOT_W0)):
                add(L, key, float(sums[col]))
            if n in self.before:   # the ratio over the weights that were updated
                add(L, "upd_sq", float(sums[stats.UPD_SQ]))
                add(L, "upd_w_sq", float(sums[stats.W_SQ]))
            st = opt.state.get(n, {}) if n in m.grads else {}
            for k in ("m", "v"):
                if k in st:
                    add(L, f"{k}_sq", stats.sum_sq(st[k]))
        trainable = {_layer_of(n) for n in m.grads}
        out = {}
        for L, a in acc.items():
            w, w0 = math.sqrt(a["w_sq"]), math.sqrt(a["w0_sq"])
            out[L] = {"drift": math.sqrt(a["diff_sq"]) / w0 if w0 else None,
                      "cosine_to_pretrained": a["dot_w0"] / (w * w0) if w and w0 else None}
            if L in trainable:
                wu = math.sqrt(a.get("upd_w_sq", 0.0))
                out[L].update({
                    "grad_norm": math.sqrt(self.grad_sq[L]) if L in self.grad_sq else None,
                    "update_ratio": math.sqrt(a["upd_sq"]) / wu if wu else None,
                    "adam_m_norm": math.sqrt(a["m_sq"]) if "m_sq" in a else None,
                    "adam_v_norm": math.sqrt(a["v_sq"]) if "v_sq" in a else None})
        # blocks below the lowest one that ever trained still have their pretrained weights and
        # input: their outputs equal the reference (CKA 1), so the probe runs from there on
        start = self._lowest_changed()
        now = block_outputs(m, self.probe, start, self.ref[start - 1] if start else None, **self.run)
        for i in range(len(self.ref)):
            cka = 1.0 if i < start else _cka_of_grams(_centered_gram(self._real(now[i - start])),
                                                      self.ref_gram[i], self.ref_gram_norm[i])
            out.setdefault(f"blocks.{i}", {})["cka_to_pretrained"] = cka
        self.before, self.grad_sq = {}, {}
        return out


def plot_telemetry(records: list, png: str) -> None:
    """One panel per statistic, one line per layer over steps (needs matplotlib). records:
    {"step": s, "telemetry": Telemetry.record(...)} dicts, as the metrics log's lines hold
    them. A layer has one colour in every panel and the figure one legend of all layers: panels
    plot different layer sets (frozen blocks have only CKA), so per-panel colour cycles would
    disagree."""
    import matplotlib
    from matplotlib.figure import Figure   # not pyplot: the host's backend and figures stay as they are
    from matplotlib.lines import Line2D
    keys = ["grad_norm", "update_ratio", "drift", "cosine_to_pretrained", "adam_m_norm",
            "adam_v_norm", "cka_to_pretrained"]
    fig = Figure(figsize=(18, 7))
    axes = fig.subplots(2, 4)
    layers = sorted({L for r in records for L in r["telemetry"]},
                    key=lambda s: (block_of(s) is None, block_of(s) or 0))
    lines = {}   # (statistic, layer) -> points; a CKA that stays 1 (an unchanged block) is left out
    for key in keys:
        for L in layers:
            pts = [(r["step"], r["telemetry"][L].get(key)) for r in records
                   if L in r["telemetry"] and r["telemetry"][L].get(key) is not None]
            if pts and (key != "cka_to_pretrained" or any(abs(v - 1) > 1e-9 for _, v in pts)):
                lines[key, L] = pts
    layers = [L for L in layers if any((k, L) in lines for k in keys)]   # the legend: drawn ones
    # beyond 10 layers colours follow depth, and neighbours, close in colour, differ in marker
    few = len(layers) <= 10
    cmap = matplotlib.colormaps["tab10" if few else "turbo"]
    style = {L: dict(color=cmap(i if few else i / max(1, len(layers) - 1)), marker="os^Dv"[i % 5],
                     ms=3.5, lw=1, label=L) for i, L in enumerate(layers)}   # markers: one record is a point
    for ax, key in zip(axes.ravel(), keys):
        for L in layers:
            if (key, L) in lines:
                ax.plot(*zip(*lines[key, L]), **style[L])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    spare = axes.ravel()[-1]                # 7 statistics on 8 panels: the legend goes there
    spare.axis("off")
    fig.tight_layout()
    if layers:
        handles = [Line2D([], [], **style[L]) for L in layers]
        fig.legend(handles=handles, loc="center", bbox_to_anchor=spare.get_position().bounds,
                   ncol=math.ceil(len(layers) / 20), fontsize=7)
    fig.savefig(png, dpi=90)


# ---- measured cost per layer --------------------------------------------------------------
class StepProfile:
    """Wall time per layer and phase, filled by the hooks in layers / model / optim while it is
    installed as engine.layers.PROFILE (see measure())."""

    def __init__(self):
        self.t: dict[tuple, float] = {}

    def add(self, name: str, phase: str, seconds: float):
        key = (_layer_of(name) if name != "head" else "head", phase)
        self.t[key] = self.t.get(key, 0.0) + seconds


def measure(model, B: int, T: int, steps: int = 3, seed: int = 0, between=None,
            target_rows: int | None = None) -> dict:
    """Measured milliseconds per layer and phase of a training step on random tokens (AdamW):
    the median over `steps` steps after one warm-up step (medians, because a shared machine
    slows single steps by 30% and more). Phases: forward, backward (input + weight gradients),
    of which weight-grad, optimizer; head: the fused head + loss. between(), when given, runs
    before each measured step (measured_costs samples the GEMM rate there, so that predicted
    and measured see the same machine)."""
    from . import layers
    from .optim import AdamW
    rng = np.random.default_rng(seed)
    c = model.config
    x, y = rng.integers(0, c.vocab_size, (B, T)), rng.integers(0, c.vocab_size, (B, T))
    if target_rows is not None:   # the first positions carry no loss, as a chat's prompts
        y.reshape(-1)[:B * T - target_rows] = IGNORE
    dh = None
    if c.encoder or c.labels:   # a class per sequence; a head-less encoder's objective is
        # outside it: a gradient of its states
        y = (rng.integers(0, len(c.labels), (B, T) if c.per_token else B) if c.labels
             else None)
        if c.per_token and target_rows is not None:
            y.reshape(-1)[:B * T - target_rows] = IGNORE
        dh = None if c.labels else rng.standard_normal((B, T, c.d_model), dtype=np.float32) * 1e-3
    saved = {n: model.params[n].copy() for n in model.grads}
    updated = dict(model._updated)   # restored with the weights: nothing changed for a cache
    drop = None if model.dropout is None else (model.dropout.position, model.dropout.drawn)
    opt = AdamW(model, lr=1e-6)

    def step():
        model.zero_grad()
        if dh is None:
            model.forward(x, y)
            model.backward()
        else:
            model.forward(x, keep=True)
            model.backward(dhidden=dh)
        opt.step()

    step()
    per_step, totals = [], []
    try:
        for _ in range(steps):
            if between is not None:
                between()
            prof = StepProfile()
            layers.PROFILE = prof
            t0 = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t0)
            layers.PROFILE = None
            per_step.append(prof.t)
    finally:
        layers.PROFILE = None
        for n, a in saved.items():     # measuring must not change the model
            model.params[n][...] = a
        model._updated = updated
        if drop is not None:           # nor the masks a user's own loop draws next
            model.dropout.position, model.dropout.drawn = drop
        model.zero_grad()
    keys = {k for t in per_step for k in t}
    ms = {k: 1e3 * float(np.median([t.get(k, 0.0) for t in per_step])) for k in keys}
    return {"step_ms": 1e3 * float(np.median(totals)), "ms": ms}


class ModelGemmRate:
    """FLOP/s of the forward GEMMs of this model's own linear layers at B x T rows, a few blocks
    per sample, rotating through the model: weights come from memory as in a step (a small
    operand that stays in cache runs 5-10% faster than the step's GEMMs do)."""

    def __init__(self, model, B: int, T: int, blocks_per_sample: int = 2):
        rng = np.random.default_rng(0)
        self.model, self.k, self.next = model, blocks_per_sample, 0
        lins = [_linears(b) for b in model.blocks]
        self.x = {n: rng.standard_normal((B * T, n), dtype=np.float32)
                  for n in {m.n_in for ls in lins for m in ls}}
        self.out = {n: np.empty((B * T, n), np.float32) for n in {m.n_out for ls in lins for m in ls}}
        self.lins = lins

    def sample(self) -> float:
        from kernels.matmul import gemm_nt
        P = self.model.params
        flops, t0 = 0, time.perf_counter()
        for _ in range(self.k):
            for m in self.lins[self.next]:
                x = self.x[m.n_in]
                gemm_nt(x, P[m.w], self.out[m.n_out])
                flops += 2 * x.shape[0] * m.n_in * m.n_out
            self.next = (self.next + 1) % len(self.lins)
        return flops / (time.perf_counter() - t0)


class AttentionRates:
    """FLOP/s of the attention kernels, forward and backward, on this model's head shapes at
    B x T (their FLOPs as block_costs counts them); sample() times one call of each."""

    def __init__(self, model, B: int, T: int):
        c = model.config
        rng = np.random.default_rng(0)
        self.q, self.dout = (rng.standard_normal((B, T, c.n_head, c.head_dim), dtype=np.float32)
                             for _ in range(2))
        self.k, self.v = (rng.standard_normal((B, T, c.n_kv_head, c.head_dim), dtype=np.float32)
                          for _ in range(2))
        self.out, self.dq = np.empty_like(self.q), np.empty_like(self.q)
        self.dk, self.dv = np.empty_like(self.k), np.empty_like(self.v)
        self.lse = np.empty((B, c.n_head, T), np.float32)
        self.causal = c.causal
        self.flops = 2 * B * c.n_head * T * T * c.head_dim * (1 if c.causal else 2)

    def sample(self) -> tuple[float, float]:
        from kernels.attention import attention_backward, attention_forward
        t0 = time.perf_counter()
        attention_forward(self.q, self.k, self.v, self.out, self.lse, 0, causal=self.causal)
        t1 = time.perf_counter()
        attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, self.dq,
                           self.dk, self.dv, causal=self.causal)
        return self.flops / (t1 - t0), 2.5 * self.flops / (time.perf_counter() - t1)


def predicted_ms(rows: list, gemm_rate: float, attn_rates: tuple[float, float],
                 ew_rate: float | None = None, opt_rate: float | None = None) -> list[dict]:
    """Per row: forward and backward milliseconds predicted from FLOPs, the GEMM rate for the
    linear layers and the head, the attention kernels' rates for attention, and from bytes,
    the elementwise kernels' rate (ew_rate, bytes/s) and the optimizer's (opt_rate); None
    leaves those out."""
    out = []
    for r in rows:
        af, ab = r["attn_fwd_flops"], r["attn_bwd_flops"]
        ef = r["fwd_bytes"] / ew_rate if ew_rate else 0.0
        eb = r["bwd_bytes"] / ew_rate if ew_rate else 0.0
        out.append({"fwd": ((r["fwd_flops"] - af) / gemm_rate + af / attn_rates[0] + ef) * 1e3,
                    "bwd": ((r["dx_flops"] + r["dw_flops"] - ab) / gemm_rate + ab / attn_rates[1] + eb) * 1e3,
                    "opt": (r["opt_bytes"] / opt_rate if opt_rate else 0.0) * 1e3})
    return out


class AdamWRate:
    """Bytes/s (_ADAMW_BYTES per parameter) of the AdamW kernel on one block's parameters, one
    call per tensor as the optimizer makes them; sample() times one pass."""

    def __init__(self, model):
        rng = np.random.default_rng(0)
        shapes = list(model.blocks[-1].shapes().values())
        self.ts = [tuple(rng.standard_normal(s, dtype=np.float32) for _ in range(4)) for s in shapes]
        for _, _, _, v in self.ts:
            np.abs(v, out=v)
        self.bytes = _ADAMW_BYTES * sum(int(np.prod(s)) for s in shapes)
        self.step = 0

    def sample(self) -> float:
        from kernels.adamw import adamw_step
        self.step += 1
        t0 = time.perf_counter()
        for p, g, m, v in self.ts:
            adamw_step(p, g, m, v, 1e-6, 0.9, 0.999, 1e-8, 0.0, self.step)
        return self.bytes / (time.perf_counter() - t0)


class ElementwiseRate:
    """Bytes/s of this model's elementwise forward kernels at B x T (norm, activation, a bias
    add, a residual add), bytes counted as _elementwise_bytes counts them; sample() times one
    round."""

    def __init__(self, model, B: int, T: int):
        c = model.config
        N, C, F = B * T, c.d_model, c.d_ff
        rng = np.random.default_rng(0)
        self.model = model
        self.x, self.y = (rng.standard_normal((N, C), dtype=np.float32) for _ in range(2))
        self.u, self.g = (rng.standard_normal((N, F), dtype=np.float32) for _ in range(2))
        self.act = np.empty_like(self.u)
        self.bias = np.zeros(F, np.float32)
        self.mlp = c.mlp
        self.bytes = 4 * N * (2 * C + (3 if self.mlp == "swiglu" else 2) * F + 2 * F + 3 * C)

    def sample(self) -> float:
        from kernels.activation import gelu_erf_forward, gelu_forward, swiglu_forward
        from kernels.bias import bias_add
        t0 = time.perf_counter()
        self.model.blocks[0].ln1.forward(self.model.params, self.x)
        if self.mlp == "swiglu":
            swiglu_forward(self.g, self.u, self.act)
        else:
            (gelu_erf_forward if self.mlp == "gelu_erf" else gelu_forward)(self.u, self.act)
        bias_add(self.u, self.bias)
        self.x += self.y
        return self.bytes / (time.perf_counter() - t0)


def measured_costs(model, B: int, T: int, steps: int = 3, target_rows: int | None = None) -> dict:
    """Per layer, predicted (FLOPs / measured kernel rates) and measured milliseconds of
    forward and backward in a training step; for the head, forward + input gradient together.
    Every rate (GEMM on this model's weights, attention, elementwise, AdamW) is sampled before
    each measured step and its median used: a shared machine's speed drifts during a
    measurement, and rates sampled once at the start missed by up to 30%."""
    samplers = {"gemm": ModelGemmRate(model, B, T), "attn": AttentionRates(model, B, T),
                "ew": ElementwiseRate(model, B, T), "opt": AdamWRate(model)}
    for sampler in samplers.values():
        sampler.sample()   # warm-up
    samples = {k: [] for k in samplers}

    def between():
        for k, sampler in samplers.items():
            samples[k].append(sampler.sample())
    got = measure(model, B, T, steps, between=between, target_rows=target_rows)
    rate, ew, opt = (float(np.median(samples[k])) for k in ("gemm", "ew", "opt"))
    attn = tuple(float(r) for r in np.median(samples["attn"], axis=0))
    rows = block_costs(model, B, T, target_rows=target_rows)
    ms = got["ms"]
    out = []
    for r, p in zip(rows, predicted_ms(rows, rate, attn, ew, opt)):
        if r["layer"] == "embeddings":
            out.append({"layer": "embeddings", "fwd_pred": p["fwd"],
                        "fwd_meas": ms.get(("embeddings", "forward"), 0.0), "bwd_pred": p["bwd"],
                        "bwd_meas": ms.get(("embeddings", "backward"), 0.0), "dw_pred": 0.0, "dw_meas": 0.0,
                        "opt_pred": p["opt"], "opt_meas": sum(
                            ms.get((L, "optimizer"), 0.0) for L in
                            {_layer_of(n) for n in model.params
                             if n.startswith(EMBEDDINGS) and n != model.head})})
            continue
        if r["layer"] in ("classifier", "ln_f + score"):
            # a classifier's head (an encoder's pooler and classifier; a causal LM's final norm
            # and classifier) and the loss
            own = ("pooler", "classifier") if r["layer"] == "classifier" else ("ln_f", "classifier")
            out.append({"layer": r["layer"], "fwd_pred": p["fwd"],
                        "fwd_meas": ms.get(("head", "forward"), 0.0), "bwd_pred": p["bwd"],
                        "bwd_meas": ms.get(("head", "backward"), 0.0),
                        "dw_pred": r["dw_flops"] / rate * 1e3,
                        "dw_meas": sum(ms.get((L, "weight-grad"), 0.0) for L in own),
                        "opt_pred": p["opt"],
                        "opt_meas": sum(ms.get((L, "optimizer"), 0.0) for L in own)})
            continue
        if r["layer"].startswith("ln_f"):
            # the head's input- and weight-gradient GEMMs run in the fused forward; its
            # backward() part is bytes only
            late = r["bwd_bytes"] / ew * 1e3
            out.append({"layer": r["layer"], "fwd_pred": p["fwd"] + p["bwd"] - late,
                        "fwd_meas": ms.get(("head", "forward+input-grad"), 0.0), "bwd_pred": late,
                        "bwd_meas": ms.get(("head", "backward"), 0.0), "dw_pred": 0.0, "dw_meas": 0.0,
                        "opt_pred": p["opt"],
                        "opt_meas": ms.get(("ln_f", "optimizer"), 0.0)
                        + ms.get((_layer_of(model.head), "optimizer"), 0.0)})
            continue
        L = r["layer"]
        out.append({"layer": L, "fwd_pred": p["fwd"], "fwd_meas": ms.get((L, "forward"), 0.0),
                    "bwd_pred": p["bwd"], "bwd_meas": ms.get((L, "backward"), 0.0),
                    "dw_pred": r["dw_flops"] / rate * 1e3,   # its GEMMs; part of bwd pred
                    "dw_meas": ms.get((L, "weight-grad"), 0.0), "opt_pred": p["opt"],
                    "opt_meas": ms.get((L, "optimizer"), 0.0)})
    return {"rows": out, "gemm_rate": rate, "attention_rates": attn, "elementwise_rate": ew,
            "adamw_rate": opt, "step_meas": got["step_ms"],
            "step_pred": sum(r["fwd_pred"] + r["bwd_pred"] + r["opt_pred"] for r in out)}


def measured_table(model, B: int, T: int, steps: int = 3, costs: dict | None = None,
                   target_rows: int | None = None) -> str:
    c = costs or measured_costs(model, B, T, steps, target_rows)
    lines = [f"per step of {B} x {T} tokens; predicted = FLOPs / rate measured now: GEMM "
             f"{c['gemm_rate'] / 1e9:.0f} GFLOP/s (this model's weights), attention forward {c['attention_rates'][0] / 1e9:.0f}, "
             f"backward {c['attention_rates'][1] / 1e9:.0f}, elementwise {c['elementwise_rate'] / 1e9:.0f} GB/s, AdamW {c['adamw_rate'] / 1e9:.0f} GB/s; "
             "measured = wall time in a step; a causal LM head's fwd includes its input- and "
             "weight-gradient GEMMs (fused with the loss)",
             f"{'layer (ms)':<14}{'fwd pred':>10}{'fwd meas':>10}{'bwd pred':>10}{'bwd meas':>10}"
             f"{'dW pred':>9}{'dW meas':>9}{'opt pred':>9}{'opt meas':>9}"]
    for r in c["rows"]:
        lines.append(f"{r['layer']:<14}{r['fwd_pred']:>10.1f}{r['fwd_meas']:>10.1f}{r['bwd_pred']:>10.1f}"
                     f"{r['bwd_meas']:>10.1f}{r['dw_pred']:>9.1f}{r['dw_meas']:>9.1f}"
                     f"{r['opt_pred']:>9.2f}{r['opt_meas']:>9.2f}")
    lines.append(f"step: predicted {c['step_pred']:.0f} ms, measured {c['step_meas']:.0f} ms")
    return "\n".join(lines)
