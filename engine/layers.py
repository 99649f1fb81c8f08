"""Layers: parameter shapes, forward, backward. Parameters live in the model's dicts and are
passed in (`P` = params, `G` = grads of the trainable params only); a layer owns no arrays.

A weight's gradient is computed only when the weight is in G (trainable); an input gradient only
when something below needs it (`need_dx`). That is all truncated backward needs from a layer.
Activations are (N, C) rows, N = B * T.
"""
from __future__ import annotations

from time import perf_counter

import numpy as np

from kernels.activation import (gelu_backward, gelu_erf_backward, gelu_erf_forward, gelu_forward,
                                swiglu_backward, swiglu_forward)
from kernels.attention import attention_backward, attention_forward
from kernels.bias import bias_add
from kernels.dropout import dropout_backward, dropout_forward
from kernels.matmul import gemm_nn, gemm_nt, gemm_tn
from kernels.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from kernels.rope import inverse_frequencies, rope_backward, rope_forward

from .config import Config
from .dropout import ATTENTION_OUT, MLP_OUT

# Set to a probes.StepProfile to time phases per layer; None (the default) costs one check.
PROFILE = None


class Packing:
    """The real positions of a right-padded (B, T) batch, for an encoder whose padding no output
    reads: its blocks run their row-wise layers (projections, MLP, norms) on these rows alone,
    packed (N = their count); attention puts q, k, v back in the (B, T) layout it takes."""

    def __init__(self, lengths, B: int, T: int):
        self.B, self.T = B, T
        self.idx = np.flatnonzero(np.arange(T)[None, :] < lengths[:, None])   # (N,) of B * T
        self.first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)   # (B,)

    def pad(self, a):
        """(N, W) packed rows -> (B * T, W), zeros at the padding."""
        out = np.zeros((self.B * self.T, a.shape[1]), np.float32)
        out[self.idx] = a
        return out

    def rows_of(self, flat):
        """The packed rows of positions `flat` (of B * T; real ones)."""
        return np.searchsorted(self.idx, flat)


def _row_ids(rows, pack=None):
    """The rows a layer's output holds, as dropout masks number them (positions of B * T):
    `rows` of the batch, or of the packed rows."""
    if pack is not None:
        return pack.idx if rows is None else pack.idx[rows]
    return None if rows is None else np.asarray(rows, np.int64)


def _drop(y, drop, site: int, rows=None, pack=None):
    """Dropout of y in place at a block's site (dropout.py's ATTENTION_OUT, MLP_OUT), when
    drop (the block's (p, attention rate, keys...), or None) asks for it. rows (and pack): y
    holds these positions only (forward's rows=), which keep their own masks."""
    if drop is not None and drop[0]:
        dropout_forward(y, drop[0], drop[2 + site], _row_ids(rows, pack))


def _dropped(dy, drop, site: int, rows=None, pack=None):
    """The gradient at a site's input: a copy of dy through that site's dropout, or dy itself
    when there is none (the caller still reads dy, on the residual path)."""
    if drop is None or not drop[0]:
        return dy
    d = dy.copy()
    dropout_backward(d, drop[0], drop[2 + site], _row_ids(rows, pack))
    return d


def _attention_dropout(drop) -> dict:
    return {} if drop is None or not drop[1] else dict(dropout=drop[1], key=drop[2])


def rope_frequencies(cfg: Config) -> np.ndarray:
    """The rotary inverse frequencies (head_dim // 2,), rescaled as cfg.rope_scaling says, in
    float32 step by step as transformers computes them (its _compute_llama3_parameters). The
    rescaling's steps are exact float32 operations; the frequencies they start from are within
    an ulp of torch's (kernels.rope.inverse_frequencies)."""
    inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    factor = np.float32(sc["factor"])
    if sc["rope_type"] == "linear":
        return (inv / factor).astype(np.float32)
    low, high = sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    # torch computes a scalar over a tensor as the tensor's reciprocal times the scalar
    wavelen = ((1 / inv).astype(np.float32) * np.float32(2 * np.pi)).astype(np.float32)
    scaled = np.where(wavelen > old / low, inv / factor, inv).astype(np.float32)
    smooth = (((1 / wavelen).astype(np.float32) * np.float32(old) - low)
              / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class Linear:
    """y = x @ W.T (+ b); W is (out, in) like torch.nn.Linear."""

    def __init__(self, name: str, n_in: int, n_out: int, bias: bool):
        self.w = name + ".weight"
        self.b = name + ".bias" if bias else None
        self.n_in, self.n_out = n_in, n_out

    def shapes(self) -> dict:
        s = {self.w: (self.n_out, self.n_in)}
        if self.b:
            s[self.b] = (self.n_out,)
        return s

    def names(self) -> tuple:
        return (self.w, self.b) if self.b else (self.w,)

    def forward(self, P, x):
        y = np.empty((x.shape[0], self.n_out), np.float32)  # (N, out)
        gemm_nt(x, P[self.w], y)
        if self.b:
            bias_add(y, P[self.b])
        return y

    def backward(self, P, G, dy, x, need_dx, dx=None):
        """Accumulates dW, db for trainable ones; returns dx (N, in) when need_dx, added into
        `dx` when one is given (several projections read the same input)."""
        if self.w in G:
            t0 = perf_counter() if PROFILE else 0.0
            gemm_tn(dy, x, G[self.w], accumulate=True)
            if self.b in G:
                G[self.b] += dy.sum(axis=0)
            if PROFILE:
                PROFILE.add(self.w, "weight-grad", perf_counter() - t0)
        elif self.b in G:
            G[self.b] += dy.sum(axis=0)
        if not need_dx:
            return None
        if dx is None:
            dx = np.empty((dy.shape[0], self.n_in), np.float32)
            gemm_nn(dy, P[self.w], dx)
        else:
            gemm_nn(dy, P[self.w], dx, accumulate=True)
        return dx


class Norm:
    """LayerNorm (weight, bias) or RMSNorm (weight) over the last axis."""

    def __init__(self, cfg: Config, name: str, width: int | None = None):
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.C = width or cfg.d_model
        self.w = name + ".weight"
        self.b = None if self.rms else name + ".bias"

    def shapes(self) -> dict:
        s = {self.w: (self.C,)}
        if self.b:
            s[self.b] = (self.C,)
        return s

    def names(self) -> tuple:
        return (self.w, self.b) if self.b else (self.w,)

    def forward(self, P, x):
        """Returns the output and the per-row statistics backward needs."""
        N = x.shape[0]
        out = np.empty_like(x)
        rstd = np.empty(N, np.float32)
        if self.rms:
            rmsnorm_forward(x, P[self.w], out, rstd, self.eps)
            return out, (rstd,)
        mean = np.empty(N, np.float32)
        layernorm_forward(x, P[self.w], P[self.b], out, mean, rstd, self.eps)
        return out, (mean, rstd)

    def backward(self, P, G, dout, x, stats, dx):
        """Accumulates the input gradient into dx (N, C) and the parameter grads into G."""
        if self.rms:
            rmsnorm_backward(dout, x, P[self.w], stats[0], dx, G.get(self.w))
        else:
            layernorm_backward(dout, x, P[self.w], stats[0], stats[1], dx, G.get(self.w), G.get(self.b))


class Block:
    """A transformer block. Pre-norm (GPT-2, Llama): x1 = x + attn(ln1(x)); out = x1 +
    mlp(ln2(x1)). Post-norm (BERT, cfg.post_norm): x1 = ln1(x + attn(x)); out = ln2(x1 +
    mlp(x1)). With qk_norm, each head of q and of k is normalized (a weight of head_dim each)
    before the rotary embedding. Attention is causal, or over the whole sequence in an encoder
    (cfg.causal False), where `lengths` (B,) marks each sequence's padding (right) unseen."""

    q_norm = k_norm = None    # blocks pickled before qk_norm existed have none
    causal, post_norm, act = True, False, None   # and before encoders (act None: from swiglu)
    attn_out_dropout = True                      # and before dropout

    def __init__(self, cfg: Config, index: int):
        p = f"blocks.{index}."
        self.index = index
        C, H, Hkv, D, F = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
        self.H, self.Hkv, self.D = H, Hkv, D
        self.rope = cfg.positions == "rope" and index not in (cfg.no_rope_blocks or ())
        self.swiglu = cfg.mlp == "swiglu"
        self.act = cfg.mlp
        self.causal, self.post_norm = cfg.causal, cfg.post_norm
        # transformers' DistilBERT has no dropout after its attention's output projection
        self.attn_out_dropout = cfg.model_type != "distilbert"
        self.ln1 = Norm(cfg, p + "ln1")
        self.ln2 = Norm(cfg, p + "ln2")
        self.q = Linear(p + "attn.q", C, H * D, cfg.attn_bias)
        self.k = Linear(p + "attn.k", C, Hkv * D, cfg.attn_bias)
        self.v = Linear(p + "attn.v", C, Hkv * D, cfg.attn_bias)
        self.o = Linear(p + "attn.o", H * D, C, cfg.attn_out_bias)
        self.gate = Linear(p + "mlp.gate", C, F, cfg.mlp_bias) if self.swiglu else None
        self.up = Linear(p + "mlp.up", C, F, cfg.mlp_bias)
        self.down = Linear(p + "mlp.down", F, C, cfg.mlp_bias)
        self.q_norm = Norm(cfg, p + "attn.q_norm", D) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, p + "attn.k_norm", D) if cfg.qk_norm else None

    def layers(self):
        return [m for m in (self.ln1, self.q, self.q_norm, self.k, self.k_norm, self.v, self.o,
                            self.ln2, self.gate, self.up, self.down) if m is not None]

    def shapes(self) -> dict:
        s = {}
        for m in self.layers():
            s.update(m.shapes())
        return s

    def forward(self, P, x, rope_cs, keep, cache=None, pos0=0, rows=None, lengths=None, drop=None,
                pack=None):
        """x: (B, T, C). Returns (out (B, T, C), saved or None). keep: the names of the values
        backward will read (backward_plan(...)["keep"]); None or empty: nothing is retained,
        and the frozen prefix runs through here. With a KV cache (k, v arrays of shape
        (B, T_max, Hkv, D)), x holds positions pos0 .. pos0 + T - 1 and their keys and values
        are written into the cache (generation; no backward).
        rows (indices into the B * T positions): the output is wanted at these rows only, as
        (len(rows), C). Keys and values still come from every position; the attention output
        projection, the residuals and the MLP run on these rows alone (the top block, when only
        some positions have a target).
        lengths (B,) int64 or None: keys at positions >= lengths[b] are padding, never attended to.
        drop (training): (p, attention rate, the keys of the attention probabilities', output's
        and MLP output's masks) from dropout.Keys.block, or None.
        pack (an encoder's, a Packing): x is (N, C), the batch's real positions alone; rows
        then number those packed rows."""
        if self.post_norm:
            return self._forward_post(P, x, rope_cs, keep, cache, pos0, rows, lengths, drop, pack)
        if pack is not None:
            raise ValueError("packed rows are an encoder's (post-norm blocks)")
        B, T, C = x.shape
        N = B * T
        x2 = x.reshape(N, C)
        h, st1 = self.ln1.forward(P, x2)                       # (N, C)
        x1, a2, sa = self._attention_branch(P, h, x2, B, T, rope_cs, cache, pos0, rows, lengths,
                                            drop)
        h2, st2 = self.ln2.forward(P, x1)
        g, u, act = self._mlp(P, h2)
        out = self.down.forward(P, act)
        _drop(out, drop, MLP_OUT, rows)
        out += x1
        saved = None
        if keep:
            saved = dict(n=N, x=x2, h=h, st1=st1, x1=x1, h2=h2, st2=st2, g=g, u=u, act=act,
                         lengths=lengths, drop=drop, **sa)
            if rows is not None:
                saved.update(rows=rows, a_rows=a2)
            saved = {n: s for n, s in saved.items() if n in keep}
        return (out.reshape(B, T, C) if rows is None else out), saved

    def _forward_post(self, P, x, rope_cs, keep, cache, pos0, rows, lengths, drop, pack):
        """Post-norm forward; with rows, as the pre-norm one (an encoder's classifier reads the
        first position only: the top block's keys and values come from every position, the rest
        runs on those rows)."""
        if pack is None:
            B, T, C = x.shape
            N = B * T
            x2 = x.reshape(N, C)
        else:
            (N, C), B, T = x.shape, pack.B, pack.T
            x2 = x
        y1, a2, sa = self._attention_branch(P, x2, x2, B, T, rope_cs, cache, pos0, rows, lengths,
                                            drop, pack)
        h2, st1 = self.ln1.forward(P, y1)
        g, u, act = self._mlp(P, h2)
        y2 = self.down.forward(P, act)
        _drop(y2, drop, MLP_OUT, rows, pack)
        y2 += h2                                               # (N, C) residual, before ln2
        out, st2 = self.ln2.forward(P, y2)
        saved = None
        if keep:
            saved = dict(n=N, h=x2, y1=y1, st1=st1, h2=h2, y2=y2, st2=st2, g=g, u=u, act=act,
                         lengths=lengths, drop=drop, rows=rows, pack=pack,
                         a_rows=a2 if rows is not None else None, **sa)
            saved = {n: s for n, s in saved.items() if n in keep}
        return (out.reshape(B, T, C) if rows is None and pack is None else out), saved

    def _attention_branch(self, P, h, x2, B, T, rope_cs, cache, pos0, rows, lengths, drop=None,
                          pack=None):
        """The residual stream x2 (N, C) plus attention over h (N, C) and its output projection:
        (N, C), or (M, C) at `rows` only (keys and values still from every position). Returns
        it, the projection's input (N or M, H*D) and what backward may read of attention."""
        a, sa = self._attend(P, h, B, T, rope_cs, cache, pos0, lengths, drop, pack)
        a2 = a.reshape(B * T, self.H * self.D)
        if pack is not None:
            a2 = a2[pack.idx]                                  # (N packed, H*D)
        res = x2
        if rows is not None:
            a2, res = a2[rows], x2[rows]                       # (M, H*D), (M, C)
        y = self.o.forward(P, a2)
        _drop(y, drop if self.attn_out_dropout else None, ATTENTION_OUT, rows, pack)
        y += res                                               # residual
        return y, a2, sa

    def _attention_branch_backward(self, P, G, dy, s, rope_cs, need_qkv, need_h):
        """From the branch output's gradient dy ((N or M, C), rows= as in forward) back through
        the output projection and attention: the gradient of its input h at every position
        (N, C) when need_h, else None. The residual's share is the caller's."""
        rows, pack = s.get("rows"), s.get("pack")
        # the projection's input, read only when o trains (packed rows: gathered from the
        # attention output kept for attention's backward, not kept twice)
        o_in = s.get("a_rows") if rows is not None else s.get("a")
        if o_in is not None and rows is None and pack is not None:
            o_in = o_in.reshape(-1, self.H * self.D)[pack.idx]
        drop = s.get("drop") if self.attn_out_dropout else None
        da = self.o.backward(P, G, _dropped(dy, drop, ATTENTION_OUT, rows, pack),
                             None if o_in is None else o_in.reshape(-1, self.H * self.D),
                             need_qkv)
        if not need_qkv:
            return None
        if rows is not None:                                  # back to every position
            da_rows, da = da, np.zeros((s["n"], da.shape[1]), np.float32)
            da[rows] = da_rows
        return self._attend_backward(P, G, da, s, rope_cs, need_h)

    def _attend(self, P, h, B, T, rope_cs, cache, pos0, lengths, drop=None, pack=None):
        """Attention over h (N, C): q, k, v, the per-head norms, the rotary embedding, the
        KV cache. Returns its output (B, T, H, D) and the values backward may read. pack: h
        holds the real positions alone, which q, k, v take back to (B, T) (zeros at padding)."""
        q_pre, k_pre = self.q.forward(P, h), self.k.forward(P, h)    # (N, H*D), (N, Hkv*D)
        v_pre = self.v.forward(P, h)
        if pack is not None:
            q_pre, k_pre, v_pre = pack.pad(q_pre), pack.pad(k_pre), pack.pad(v_pre)
        stq = stk = None
        if self.q_norm:    # one row per head: (N * H, D)
            q, stq = self.q_norm.forward(P, q_pre.reshape(-1, self.D))
            k, stk = self.k_norm.forward(P, k_pre.reshape(-1, self.D))
        else:
            q, k = q_pre, k_pre
        q = q.reshape(B, T, self.H, self.D)
        k = k.reshape(B, T, self.Hkv, self.D)
        v = v_pre.reshape(B, T, self.Hkv, self.D)
        if self.rope:
            rope_forward(q, *rope_cs)
            rope_forward(k, *rope_cs)
        if cache is not None:
            kc, vc = cache
            kc[:, pos0:pos0 + T] = k
            vc[:, pos0:pos0 + T] = v
            k, v = kc, vc
        a = np.empty((B, T, self.H, self.D), np.float32)
        lse = np.empty((B, self.H, T), np.float32)
        attention_forward(q, k, v, a, lse, pos0, causal=self.causal, lengths=lengths,
                          **_attention_dropout(drop))
        return a, dict(q=q, k=k, v=v, a=a, lse=lse, q_pre=q_pre, k_pre=k_pre, stq=stq, stk=stk)

    def _mlp(self, P, h2):
        """(g, u, act) of the MLP's input h2 (M, C); g is None without a gate."""
        g = self.gate.forward(P, h2) if self.swiglu else None   # (M, F)
        u = self.up.forward(P, h2)
        act = np.empty_like(u)
        if self.swiglu:
            swiglu_forward(g, u, act)
        elif self.act == "gelu_erf":
            gelu_erf_forward(u, act)
        else:
            gelu_forward(u, act)
        return g, u, act

    def backward_plan(self, G, need_dx: bool, gathered: bool = False) -> dict:
        """Which parts of backward run, given the trainable set G: a part runs only when it leads
        to a trainable parameter or to the block's input (need_dx); and "keep", the values of the
        forward those parts read (gathered: the forward ran with rows=). The cost model reads it
        too."""
        if self.post_norm:
            return self._plan_post(G, need_dx, gathered)
        tr = lambda *ms: any(n in G for m in ms if m is not None for n in m.names())  # noqa: E731
        dw = lambda *ms: any(m is not None and m.w in G for m in ms)  # noqa: E731
        attn = need_dx or tr(self.ln1, self.q, self.q_norm, self.k, self.k_norm, self.v, self.o)
        mlp = attn or tr(self.ln2, self.gate, self.up, self.down)
        need_h2 = mlp and (attn or tr(self.ln2))
        need_act = mlp and (need_h2 or tr(self.gate, self.up))
        need_h = attn and (need_dx or tr(self.ln1))
        need_qkv = attn and (need_h or tr(self.q, self.q_norm, self.k, self.k_norm, self.v))
        # a weight's gradient reads its layer's input; an input gradient through a norm or an
        # activation reads what that op saw (a frozen weight in range keeps nothing for itself)
        keep = {"n", "rows", "lengths", "drop", "pack"}
        keep |= {"act"} if mlp and dw(self.down) else set()
        keep |= ({"g", "u"} if self.swiglu else {"u"}) if need_act else set()
        keep |= {"h2"} if need_act and dw(self.gate, self.up) else set()
        keep |= {"x1", "st2"} if need_h2 else set()
        keep |= {("a_rows" if gathered else "a")} if attn and dw(self.o) else set()
        keep |= self._attention_keep(G, need_qkv, need_h)
        keep |= {"x", "st1"} if need_h else set()
        return dict(mlp=mlp, attn=attn, need_h2=need_h2, need_act=need_act, need_h=need_h,
                    need_qkv=need_qkv, keep=keep)

    def _attention_keep(self, G, need_qkv: bool, need_h: bool) -> set:
        """What the attention's backward reads: q, k, v and its output and statistics; the q /
        k norms' inputs on a side that leads to a trainable parameter or to h; h itself for a
        trainable q, k or v weight."""
        if not need_qkv:
            return set()
        tr = lambda *ms: any(n in G for m in ms if m is not None for n in m.names())  # noqa: E731
        keep = {"q", "k", "v", "a", "lse"}
        if self.q_norm:
            keep |= {"q_pre", "stq"} if need_h or tr(self.q, self.q_norm) else set()
            keep |= {"k_pre", "stk"} if need_h or tr(self.k, self.k_norm) else set()
        keep |= {"h"} if any(m.w in G for m in (self.q, self.k, self.v)) else set()
        return keep

    def _plan_post(self, G, need_dx: bool, gathered: bool) -> dict:
        """backward_plan of a post-norm block. Backward meets ln2, the MLP, ln1, then attention;
        each runs when it or anything after it leads to a trainable parameter or the input."""
        tr = lambda *ms: any(n in G for m in ms if m is not None for n in m.names())  # noqa: E731
        dw = lambda *ms: any(m is not None and m.w in G for m in ms)  # noqa: E731
        attn = need_dx or tr(self.q, self.k, self.v, self.o)    # gradient at the attention output
        ln1 = attn or tr(self.ln1)                              # ... at y1, ln1's input
        mlp = ln1 or tr(self.gate, self.up, self.down)          # ... at y2's MLP branch
        ln2 = mlp or tr(self.ln2)
        need_act = mlp and (ln1 or tr(self.gate, self.up))      # through the activation
        need_qkv = attn and (need_dx or tr(self.q, self.k, self.v))
        keep = {"n", "rows", "lengths", "drop", "pack"}
        keep |= {"y2", "st2"} if ln2 else set()
        keep |= {"act"} if mlp and dw(self.down) else set()
        keep |= ({"g", "u"} if self.swiglu else {"u"}) if need_act else set()
        keep |= {"h2"} if need_act and dw(self.gate, self.up) else set()
        keep |= {"y1", "st1"} if ln1 else set()
        keep |= {("a_rows" if gathered else "a")} if attn and dw(self.o) else set()
        keep |= self._attention_keep(G, need_qkv, need_dx)
        # (need_h2 and need_h as the pre-norm plan names them, for the cost model: the MLP
        # input's gradient, and the block input's through q, k and v)
        return dict(post=True, ln2=ln2, mlp=mlp, need_act=need_act, ln1=ln1, attn=attn,
                    need_qkv=need_qkv, need_h2=ln1, need_h=need_dx, keep=keep)

    def backward(self, P, G, dout, s, rope_cs, need_dx):
        """dout: (N, C) gradient of the block output ((M, C) after forward(rows=)); consumed
        (used as scratch); the input gradient is (N, C) either way.
        Returns the gradient w.r.t. the block input when need_dx, else None. Runs only the parts
        of the block that lead to a trainable parameter or to the input (backward_plan)."""
        plan = self.backward_plan(G, need_dx)
        if self.post_norm:
            return self._backward_post(P, G, dout, s, rope_cs, need_dx, plan)
        attn_branch = plan["attn"]
        if plan["mlp"]:
            need_h2, need_act = plan["need_h2"], plan["need_act"]
            dact = self.down.backward(P, G, _dropped(dout, s.get("drop"), MLP_OUT, s.get("rows")),
                                      s.get("act"), need_act)
            if need_act:
                dh2 = self._mlp_backward(P, G, dact, s, need_h2)
                if need_h2:
                    # dout becomes d(x1): the residual path plus the norm's input gradient
                    dx1 = dout if attn_branch else np.zeros_like(dout)
                    self.ln2.backward(P, G, dh2, s["x1"], s["st2"], dx1)
        if not attn_branch:
            return None
        dx1 = dout
        need_h, need_qkv = plan["need_h"], plan["need_qkv"]
        rows = s.get("rows")
        dh = self._attention_branch_backward(P, G, dx1, s, rope_cs, need_qkv, need_h)
        if not need_h:                                        # (need_h implies need_qkv)
            return None
        if rows is not None:
            dx = np.zeros_like(s["x"])
            if need_dx:
                dx[rows] = dx1                                 # the residual path
        else:
            dx = dx1 if need_dx else np.zeros_like(dx1)
        self.ln1.backward(P, G, dh, s["x"], s["st1"], dx)
        return dx if need_dx else None

    def _backward_post(self, P, G, dout, s, rope_cs, need_dx, plan):
        """dout and everything after attention: (N, C), or (M, C) after forward(rows=)."""
        rows = s.get("rows")
        if not plan["ln2"]:
            return None
        dy2 = np.zeros_like(dout)                             # (N, C) at ln2's input
        self.ln2.backward(P, G, dout, s["y2"], s["st2"], dy2)
        if not plan["mlp"]:
            return None
        dact = self.down.backward(P, G, _dropped(dy2, s.get("drop"), MLP_OUT, rows, s.get("pack")),
                                  s.get("act"), plan["need_act"])
        dh2 = self._mlp_backward(P, G, dact, s, plan["ln1"]) if plan["need_act"] else None
        if not plan["ln1"]:
            return None
        dy2 += dh2                                            # d(h2): the residual and the MLP
        dy1 = np.zeros_like(dy2)                              # (N, C) at ln1's input
        self.ln1.backward(P, G, dy2, s["y1"], s["st1"], dy1)
        if not plan["attn"]:
            return None
        dx = self._attention_branch_backward(P, G, dy1, s, rope_cs, plan["need_qkv"], need_dx)
        if not need_dx:
            return None
        if rows is None:
            dx += dy1                                         # the residual path
        else:
            dx[rows] += dy1
        return dx

    def _mlp_backward(self, P, G, dact, s, need_in):
        """From the activation's output gradient to the MLP input's (M, C) (None unless
        need_in), accumulating the gate and up weights' gradients."""
        if self.swiglu:
            dg = np.empty_like(dact)
            du = np.empty_like(dact)
            swiglu_backward(dact, s["g"], s["u"], dg, du)
            dh2 = self.gate.backward(P, G, dg, s.get("h2"), need_in)
            return self.up.backward(P, G, du, s.get("h2"), need_in, dh2)
        du = np.empty_like(dact)
        if self.act == "gelu_erf":
            gelu_erf_backward(dact, s["u"], du)
        else:
            gelu_backward(dact, s["u"], du)
        return self.up.backward(P, G, du, s.get("h2"), need_in)

    def _attend_backward(self, P, G, da, s, rope_cs, need_h):
        """From the attention output's gradient da (N, H*D) to its input h's (N, C) (None
        unless need_h), accumulating the q, k, v (and q / k norm) gradients."""
        N = s["n"]
        q, k, v = s["q"], s["k"], s["v"]
        pack = s.get("pack")
        if pack is not None:                  # the packed rows' gradients to (B, T), zeros at padding
            da = pack.pad(da)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        attention_backward(da.reshape(q.shape), q, k, v, s["a"], s["lse"], dq, dk, dv,
                           causal=self.causal, lengths=s.get("lengths"),
                           **_attention_dropout(s.get("drop")))
        if self.rope:
            rope_backward(dq, *rope_cs)
            rope_backward(dk, *rope_cs)
        if self.q_norm:      # back through the per-head norms, to the projections' outputs
            dq, dk = self._qk_norm_backward(P, G, dq, dk, s)
        if pack is not None:                  # and back to the packed rows
            dq, dk, dv = (d.reshape(pack.B * pack.T, -1)[pack.idx] for d in (dq, dk, dv))
        h = s.get("h")
        dh = self.q.backward(P, G, dq.reshape(N, -1), h, need_h)
        dh = self.k.backward(P, G, dk.reshape(N, -1), h, need_h, dh)
        return self.v.backward(P, G, dv.reshape(N, -1), h, need_h, dh)

    def _qk_norm_backward(self, P, G, dq, dk, s):
        """Back through the q and k norms, on the sides whose inputs were kept (backward_plan);
        a side not kept leads nowhere and keeps its gradient as it is, unread."""
        out = []
        for norm, d, pre, st in ((self.q_norm, dq, "q_pre", "stq"),
                                 (self.k_norm, dk, "k_pre", "stk")):
            if pre not in s:
                out.append(d)
                continue
            dpre = np.zeros_like(s[pre])        # (N, heads * D)
            norm.backward(P, G, d.reshape(-1, self.D), s[pre].reshape(-1, self.D), s[st],
                          dpre.reshape(-1, self.D))
            out.append(dpre)
        return out
