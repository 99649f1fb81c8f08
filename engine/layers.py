"""Layers: parameter shapes, forward, backward. Parameters live in the model's dicts and are
passed in (`P` = params, `G` = grads of the trainable params only); a layer owns no arrays.

A weight's gradient is computed only when the weight is in G (trainable); an input gradient only
when something below needs it (`need_dx`). That is all truncated backward needs from a layer.
Activations are (N, C) rows, N = B * T.
"""
from __future__ import annotations

from time import perf_counter

import numpy as np

from kernels.activation import gelu_backward, gelu_forward, swiglu_backward, swiglu_forward
from kernels.attention import attention_backward, attention_forward
from kernels.bias import bias_add
from kernels.matmul import gemm_nn, gemm_nt, gemm_tn
from kernels.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from kernels.rope import inverse_frequencies, rope_backward, rope_forward

from .config import Config

# Set to a probes.StepProfile to time phases per layer; None (the default) costs one check.
PROFILE = None


def rope_frequencies(cfg: Config) -> np.ndarray:
    """The rotary inverse frequencies (head_dim // 2,), rescaled as cfg.rope_scaling says, in
    float32 step by step as transformers computes them (its _compute_llama3_parameters). The
    rescaling is exact; numpy's float32 power and torch's can differ by one ulp."""
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
    """Pre-norm transformer block: x1 = x + attn(ln1(x)); out = x1 + mlp(ln2(x1)). With qk_norm,
    each head of q and of k is normalized (a weight of head_dim each) before the rotary
    embedding."""

    q_norm = k_norm = None    # blocks pickled before qk_norm existed have none

    def __init__(self, cfg: Config, index: int):
        p = f"blocks.{index}."
        self.index = index
        C, H, Hkv, D, F = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
        self.H, self.Hkv, self.D = H, Hkv, D
        self.rope = cfg.positions == "rope" and index not in (cfg.no_rope_blocks or ())
        self.swiglu = cfg.mlp == "swiglu"
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

    def forward(self, P, x, rope_cs, keep, cache=None, pos0=0, rows=None):
        """x: (B, T, C). Returns (out (B, T, C), saved or None). keep: the names of the values
        backward will read (backward_plan(...)["keep"]); None or empty: nothing is retained,
        and the frozen prefix runs through here. With a KV cache (k, v arrays of shape
        (B, T_max, Hkv, D)), x holds positions pos0 .. pos0 + T - 1 and their keys and values
        are written into the cache (generation; no backward).
        rows (indices into the B * T positions): the output is wanted at these rows only, as
        (len(rows), C). Keys and values still come from every position; the attention output
        projection, the residuals and the MLP run on these rows alone (the top block, when only
        some positions have a target)."""
        B, T, C = x.shape
        N = B * T
        x2 = x.reshape(N, C)
        h, st1 = self.ln1.forward(P, x2)                       # (N, C)
        q_pre, k_pre = self.q.forward(P, h), self.k.forward(P, h)    # (N, H*D), (N, Hkv*D)
        stq = stk = None
        if self.q_norm:    # one row per head: (N * H, D)
            q, stq = self.q_norm.forward(P, q_pre.reshape(-1, self.D))
            k, stk = self.k_norm.forward(P, k_pre.reshape(-1, self.D))
        else:
            q, k = q_pre, k_pre
        q = q.reshape(B, T, self.H, self.D)
        k = k.reshape(B, T, self.Hkv, self.D)
        v = self.v.forward(P, h).reshape(B, T, self.Hkv, self.D)
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
        attention_forward(q, k, v, a, lse, pos0)
        a2 = a.reshape(N, self.H * self.D)
        if rows is not None:
            a2, res = a2[rows], x2[rows]                       # (M, H*D), (M, C)
        else:
            res = x2
        x1 = self.o.forward(P, a2)
        x1 += res                                              # (N or M, C) residual
        h2, st2 = self.ln2.forward(P, x1)
        if self.swiglu:
            g = self.gate.forward(P, h2)                       # (N, F)
            u = self.up.forward(P, h2)
            act = np.empty_like(u)
            swiglu_forward(g, u, act)
        else:
            g = None
            u = self.up.forward(P, h2)
            act = np.empty_like(u)
            gelu_forward(u, act)
        out = self.down.forward(P, act)
        out += x1
        saved = None
        if keep:
            saved = dict(n=N, x=x2, h=h, st1=st1, q=q, k=k, v=v, a=a, lse=lse, x1=x1, h2=h2,
                         st2=st2, g=g, u=u, act=act, q_pre=q_pre, k_pre=k_pre, stq=stq, stk=stk)
            if rows is not None:
                saved.update(rows=rows, a_rows=a2)
            saved = {n: s for n, s in saved.items() if n in keep}
        return (out.reshape(B, T, C) if rows is None else out), saved

    def backward_plan(self, G, need_dx: bool, gathered: bool = False) -> dict:
        """Which parts of backward run, given the trainable set G: a part runs only when it leads
        to a trainable parameter or to the block's input (need_dx); and "keep", the values of the
        forward those parts read (gathered: the forward ran with rows=). The cost model reads it
        too."""
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
        keep = {"n", "rows"}
        keep |= {"act"} if mlp and dw(self.down) else set()
        keep |= ({"g", "u"} if self.swiglu else {"u"}) if need_act else set()
        keep |= {"h2"} if need_act and dw(self.gate, self.up) else set()
        keep |= {"x1", "st2"} if need_h2 else set()
        keep |= {("a_rows" if gathered else "a")} if attn and dw(self.o) else set()
        keep |= {"q", "k", "v", "a", "lse"} if need_qkv else set()
        # a q / k norm's backward reads its input (the projection's output), needed when that
        # side leads to a trainable parameter or to the block's input
        if need_qkv and self.q_norm:
            keep |= {"q_pre", "stq"} if need_h or tr(self.q, self.q_norm) else set()
            keep |= {"k_pre", "stk"} if need_h or tr(self.k, self.k_norm) else set()
        keep |= {"h"} if need_qkv and dw(self.q, self.k, self.v) else set()
        keep |= {"x", "st1"} if need_h else set()
        return dict(mlp=mlp, attn=attn, need_h2=need_h2, need_act=need_act, need_h=need_h,
                    need_qkv=need_qkv, keep=keep)

    def backward(self, P, G, dout, s, rope_cs, need_dx):
        """dout: (N, C) gradient of the block output ((M, C) after forward(rows=)); consumed
        (used as scratch); the input gradient is (N, C) either way.
        Returns the gradient w.r.t. the block input when need_dx, else None. Runs only the parts
        of the block that lead to a trainable parameter or to the input (backward_plan)."""
        plan = self.backward_plan(G, need_dx)
        attn_branch = plan["attn"]
        if plan["mlp"]:
            need_h2, need_act = plan["need_h2"], plan["need_act"]
            dact = self.down.backward(P, G, dout, s.get("act"), need_act)
            if need_act:
                if self.swiglu:
                    dg = np.empty_like(dact)
                    du = np.empty_like(dact)
                    swiglu_backward(dact, s["g"], s["u"], dg, du)
                    dh2 = self.gate.backward(P, G, dg, s.get("h2"), need_h2)
                    dh2 = self.up.backward(P, G, du, s.get("h2"), need_h2, dh2)
                else:
                    du = np.empty_like(dact)
                    gelu_backward(dact, s["u"], du)
                    dh2 = self.up.backward(P, G, du, s.get("h2"), need_h2)
                if need_h2:
                    # dout becomes d(x1): the residual path plus the norm's input gradient
                    dx1 = dout if attn_branch else np.zeros_like(dout)
                    self.ln2.backward(P, G, dh2, s["x1"], s["st2"], dx1)
        if not attn_branch:
            return None
        dx1 = dout
        need_h, need_qkv = plan["need_h"], plan["need_qkv"]
        rows = s.get("rows")
        N = s["n"]                                            # every position, even after rows=
        o_in = s.get("a_rows") if rows is not None else s.get("a")   # read only when o trains
        da = self.o.backward(P, G, dx1, None if o_in is None else o_in.reshape(-1, self.H * self.D),
                             need_qkv)
        if rows is not None and need_qkv:                     # back to every position
            da_rows, da = da, np.zeros((N, da.shape[1]), np.float32)
            da[rows] = da_rows
        dx = None
        if need_qkv:
            q, k, v = s["q"], s["k"], s["v"]
            dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
            attention_backward(da.reshape(q.shape), q, k, v, s["a"], s["lse"], dq, dk, dv)
            if self.rope:
                rope_backward(dq, *rope_cs)
                rope_backward(dk, *rope_cs)
            if self.q_norm:      # back through the per-head norms, to the projections' outputs
                dq, dk = self._qk_norm_backward(P, G, dq, dk, s)
            h = s.get("h")
            dh = self.q.backward(P, G, dq.reshape(N, -1), h, need_h)
            dh = self.k.backward(P, G, dk.reshape(N, -1), h, need_h, dh)
            dh = self.v.backward(P, G, dv.reshape(N, -1), h, need_h, dh)
            if need_h:
                if rows is not None:
                    dx = np.zeros_like(s["x"])
                    if need_dx:
                        dx[rows] = dx1                         # the residual path
                else:
                    dx = dx1 if need_dx else np.zeros_like(dx1)
                self.ln1.backward(P, G, dh, s["x"], s["st1"], dx)
        return dx if need_dx else None

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
