"""Self-attention, causal or bidirectional, with grouped-query heads and right padding, forward
and backward.

Layouts: q, out: (B, Tq, H, D); k, v: (B, Tk, Hkv, D), query head h reads kv head h // (H // Hkv).
- causal=True (decoders): query i sits at absolute position pos0 + i and sees keys 0 .. pos0 + i
  (pos0 > 0 when a KV cache holds earlier tokens; Tk may be larger than needed, later keys are
  never read).
- causal=False (encoders: BERT): every query sees every key; pos0 must be 0.
- lengths (B,) integers in 1..Tk, or None (= Tk): sequence b is right-padded, its keys at
  positions >= lengths[b] are never read, nor attended to (their dk, dv come out 0). With causal,
  query i sees keys 0 .. min(pos0 + i, lengths[b] - 1). Query rows at or past lengths[b] are
  still computed, over the valid keys (as Hugging Face's BERT with an attention_mask does); the
  caller ignores their outputs. Both flags are plain arguments of one compiled kernel per path:
  they only set how many keys a block of rows reads (`n`) and each row sees (`vis`).
No score matrix is kept: forward saves only the log-sum-exp per query row (B, H, Tq); backward
recomputes the probabilities from it.

Two implementations behind `attention_forward` / `attention_backward` (backend=None picks):
- "blas" (default when numpy's OpenBLAS exposes an ILP64 cblas_sgemm, see blas.py): blocks of 64
  query rows; each block's products (scores, P V, and in backward dP, dQ, dK, dV) are GEMM calls
  into OpenBLAS from inside the parallel Numba loop, the softmax a vectorized Numba loop between
  them. Measured 1.1-1.6x torch's SDPA at T=256 and 1024 (benches/kernels.py).
- "numba" (fallback; also the only path under NUMBA_DISABLE_JIT): each head's rows are copied
  into flat 1-D buffers, every product is a set of dot products of contiguous rows, four query
  rows against two rows of the other operand (eight accumulators vectorized by LLVM along the
  shared dimension). Flat buffers with explicit offsets, because 2-D indexing in the inner loop
  stops vectorization. About 0.8x SDPA at T=1024: its dot products over D=64 end in horizontal
  sums, and each 4-row block streams all earlier keys and values through L2.
"""
import sys

import numba
import numpy as np

from .blas import NOTRANS, SGEMM, TRANS, one_thread, sgemm
from .checks import floats, position
from .dropout import check_key, mask_row, row_key, threshold as dropout_threshold
from .jit import jit, jit_inline, pjit, prange
from .tiles import dots4x2
from .vexp import exp_inplace

_R = 4  # query rows per block


@jit_inline
def _seen(causal, length, end):
    """How many keys a query row (or a block, by its last row) reads, when causality alone would
    let it see positions before `end`: those, capped by the sequence's length; all of the
    length's keys when not causal."""
    return min(length, end) if causal else length


@jit_inline
def _products(a, lda, b, ldb, rows_b, n, out, ld):
    """out[r * ld + j] = dot(a[r * lda : r * lda + n], b[j * ldb : j * ldb + n]) for the four
    rows r of a and the rows j < rows_b of b (flat arrays with row strides lda, ldb)."""
    y0 = a[0:n]
    y1 = a[lda:lda + n]
    y2 = a[2 * lda:2 * lda + n]
    y3 = a[3 * lda:3 * lda + n]
    j = 0
    while j < rows_b:
        j1 = min(j + 1, rows_b - 1)  # an odd last row is computed twice, harmlessly
        c00, c01, c10, c11, c20, c21, c30, c31 = dots4x2(
            y0, y1, y2, y3, b[j * ldb:j * ldb + n], b[j1 * ldb:j1 * ldb + n], n)
        out[j] = c00
        out[ld + j] = c10
        out[2 * ld + j] = c20
        out[3 * ld + j] = c30
        out[j1] = c01
        out[ld + j1] = c11
        out[2 * ld + j1] = c21
        out[3 * ld + j1] = c31
        j += 2


@jit
def _softmax_row(row, vis, bits):
    """row[:vis] becomes softmax probabilities, row[vis:] zero (masked keys); returns the
    log-sum-exp. Shared by both paths' forward."""
    mx = row[0]
    for j in range(vis):
        mx = max(mx, row[j])
    for j in range(vis):
        row[j] -= mx
    total = exp_inplace(row[:vis], bits)
    inv = np.float32(1.0) / total
    for j in range(vis):
        row[j] *= inv
    for j in range(vis, row.shape[0]):
        row[j] = np.float32(0.0)
    return mx + np.log(total)


@jit
def _probabilities_row(row, vis, lse, bits):
    """Scores to probabilities again from the saved log-sum-exp: row[:vis] = exp(row - lse),
    row[vis:] zero. Shared by both paths' backward."""
    for j in range(vis):
        row[j] -= lse
    exp_inplace(row[:vis], bits)
    for j in range(vis, row.shape[0]):
        row[j] = np.float32(0.0)


@pjit
def _forward_numba(q, k, v, out, lse, pos0, causal, lengths, dkey, dthr, dscale):
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        g = h // group
        Tk = _seen(causal, lengths[b], pos0 + Tq)   # keys any row reads: later ones are not copied
        nq = (Tq + _R - 1) // _R * _R
        qf = np.zeros(nq * D, np.float32)      # scaled queries, padded to a multiple of 4 rows
        kf = np.empty(Tk * D, np.float32)
        vt = np.empty(D * Tk, np.float32)      # values transposed: row d holds v[:, d]
        for i in range(Tq):
            for d in range(D):
                qf[i * D + d] = q[b, i, h, d] * scale
        for j in range(Tk):
            for d in range(D):
                kf[j * D + d] = k[b, j, g, d]
                vt[d * Tk + j] = v[b, j, g, d]
        o = np.empty(nq * D, np.float32)
        l_ = np.empty(nq, np.float32)
        _forward_head(qf, kf, vt, o, l_, Tq, Tk, D, pos0, causal, bh * Tq, dkey, dthr, dscale)
        for i in range(Tq):
            lse[b, h, i] = l_[i]
            for d in range(D):
                out[b, i, h, d] = o[i * D + d]


@jit
def _forward_head(qf, kf, vt, o, lse, Tq, Tk, D, pos0, causal, rbase, dkey, dthr, dscale):
    """One head: o (rows of D) and lse from flat scaled queries, the Tk keys it reads, transposed
    values. A plain function, not the parallel loop's body: compiled on its own it vectorizes.
    dthr > 0: the probabilities of query row i go through dropout row rbase + i of dkey."""
    s = np.empty(_R * Tk, np.float32)          # scores, then probabilities, of 4 query rows
    ob = np.empty(_R * D, np.float32)
    bits = np.empty(Tk, np.int32)
    for i0 in range(0, Tq, _R):
        n = _seen(causal, Tk, pos0 + i0 + _R)  # keys seen by the block's last row
        _products(qf[i0 * D:], D, kf, D, n, D, s, Tk)
        for r in range(_R):
            i = i0 + r
            if i >= Tq:
                for j in range(n):
                    s[r * Tk + j] = np.float32(0.0)
                continue
            vis = _seen(causal, Tk, pos0 + i + 1)
            lse[i] = _softmax_row(s[r * Tk:r * Tk + n], vis, bits)
            if dthr:
                mask_row(s[r * Tk:r * Tk + n], vis, row_key(dkey, rbase + i), dthr, dscale)
        _products(s, Tk, vt, Tk, D, n, ob, D)   # o[r, d] = dot(p_r[:n], vt[d, :n])
        for r in range(_R):
            for d in range(D):
                o[(i0 + r) * D + d] = ob[r * D + d]


@pjit
def _backward_numba(dout, q, k, v, out, lse, dq, dk, dv, causal, lengths, dkey, dthr, dscale):
    """Parallel over (batch, kv head): the query heads of one group are summed into the same dk, dv
    by one thread."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    nq = (T + _R - 1) // _R * _R
    for bg in prange(B * Hkv):
        b = bg // Hkv
        g = bg % Hkv
        nk = lengths[b]                        # keys past it: not copied, their dk, dv stay 0
        kf = np.empty(T * D, np.float32)
        vf = np.empty(T * D, np.float32)
        kt = np.empty(D * T, np.float32)       # keys transposed, for dq = ds k
        for j in range(nk):
            for d in range(D):
                kf[j * D + d] = k[b, j, g, d]
                vf[j * D + d] = v[b, j, g, d]
                kt[d * T + j] = k[b, j, g, d]
        dka = np.zeros(T * D, np.float32)
        dva = np.zeros(T * D, np.float32)
        qf = np.zeros(nq * D, np.float32)
        gf = np.zeros(nq * D, np.float32)      # dout rows
        dqf = np.empty(nq * D, np.float32)
        delta = np.zeros(nq, np.float32)
        l_ = np.zeros(nq, np.float32)
        for h in range(g * group, (g + 1) * group):
            for i in range(T):
                dl = np.float32(0.0)
                for d in range(D):
                    qf[i * D + d] = q[b, i, h, d] * scale
                    gf[i * D + d] = dout[b, i, h, d]
                    dl += dout[b, i, h, d] * out[b, i, h, d]
                delta[i] = dl
                l_[i] = lse[b, h, i]
            _backward_head(qf, gf, kf, vf, kt, l_, delta, dqf, dka, dva, T, nk, D, scale, causal,
                           (b * H + h) * T, dkey, dthr, dscale)
            for i in range(T):
                for d in range(D):
                    dq[b, i, h, d] = dqf[i * D + d]
        inv_scale = np.float32(1.0) / scale
        for j in range(T):
            for d in range(D):
                dk[b, j, g, d] = dka[j * D + d] * inv_scale   # qf held q * scale
                dv[b, j, g, d] = dva[j * D + d]


@jit
def _backward_head(qf, gf, kf, vf, kt, lse, delta, dqf, dka, dva, T, nk, D, scale, causal, rbase,
                   dkey, dthr, dscale):
    """One query head: dq rows into dqf; dk (times 1/scale), dv added into dka, dva, over the
    first nk keys (the sequence's length; T, the row stride of the buffers). dthr > 0: the
    forward's dropout of the probabilities (rows rbase + i of dkey)."""
    p = np.empty(_R * T, np.float32)
    ds = np.empty(_R * T, np.float32)
    dqb = np.empty(_R * D, np.float32)
    bits = np.empty(T, np.int32)
    for i0 in range(0, T, _R):
        n = _seen(causal, nk, i0 + _R)
        _products(qf[i0 * D:], D, kf, D, n, D, p, T)     # scores (queries pre-scaled)
        _products(gf[i0 * D:], D, vf, D, n, D, ds, T)    # dp = do . v
        for r in range(_R):
            i = i0 + r
            row = p[r * T:r * T + n]
            if i >= T:
                for j in range(n):
                    row[j] = np.float32(0.0)
                continue
            _probabilities_row(row, _seen(causal, nk, i + 1), lse[i], bits)
        for r in range(_R):
            dl = delta[i0 + r]
            pr = p[r * T:r * T + n]
            dr = ds[r * T:r * T + n]
            live = dthr > 0 and i0 + r < T
            rk = row_key(dkey, rbase + i0 + r) if live else 0
            if live:   # dp through the dropout; delta = sum(do * o) holds it already
                mask_row(dr, _seen(causal, nk, i0 + r + 1), rk, dthr, dscale)
            for j in range(n):                     # ds = p (dp - delta) scale, over dp
                dr[j] = pr[j] * (dr[j] - dl) * scale
            if live:   # p as the forward multiplied v by, for dv
                mask_row(pr, _seen(causal, nk, i0 + r + 1), rk, dthr, dscale)
        _products(ds, T, kt, T, D, n, dqb, D)   # dq[r, d] = sum_j ds[r, j] k[j, d]
        for r in range(_R):
            for d in range(D):
                dqf[(i0 + r) * D + d] = dqb[r * D + d]
        a = i0 * D
        q0, q1, q2, q3 = qf[a:a + D], qf[a + D:a + 2 * D], qf[a + 2 * D:a + 3 * D], qf[a + 3 * D:a + 4 * D]
        g0, g1, g2, g3 = gf[a:a + D], gf[a + D:a + 2 * D], gf[a + 2 * D:a + 3 * D], gf[a + 3 * D:a + 4 * D]
        for j in range(n):
            # dk[j] += sum_r ds[r, j] q[r];  dv[j] += sum_r p[r, j] do[r]
            s0, s1, s2, s3 = ds[j], ds[T + j], ds[2 * T + j], ds[3 * T + j]
            p0, p1, p2, p3 = p[j], p[T + j], p[2 * T + j], p[3 * T + j]
            dkj = dka[j * D:(j + 1) * D]
            dvj = dva[j * D:(j + 1) * D]
            for d in range(D):
                dkj[d] += s0 * q0[d] + s1 * q1[d] + s2 * q2[d] + s3 * q3[d]
                dvj[d] += p0 * g0[d] + p1 * g1[d] + p2 * g2[d] + p3 * g3[d]


# ---- BLAS path: blocks of query rows, each block's products by numpy's OpenBLAS --------------
# For a block of _QB query rows: S = scale Q K^T over the keys the block can see, the softmax in
# place, then O = P V; backward recomputes P and makes dP, dQ, dK, dV with four more GEMMs. Only
# the upper triangle of the diagonal tile is wasted work (causal; none when not). Padding keys
# are outside every block's GEMMs. Parallel over heads (forward) or (batch, kv head) pairs
# (backward); OpenBLAS runs single-threaded inside each Numba thread.

_QB = 64   # query rows per block: S (_QB x T) stays in L2 up to T = 1024


@jit
def _forward_head_blas(addr, q, k, v, out, lse, b, h, pos0, causal, nk, S, bits, dkey, dthr, dscale):
    """Head h of sequence b, whose rows read (at most) its first nk keys; dthr > 0: dropout of
    the probabilities, query row i by row (b H + h) Tq + i of dkey."""
    _, Tq, H, D = q.shape
    Hkv = k.shape[2]
    g = h // (H // Hkv)
    Tk = k.shape[1]
    scale = np.float32(1.0 / np.sqrt(D))
    qp = q.ctypes.data + ((b * Tq) * H + h) * D * 4          # row i at + i * H * D * 4
    op = out.ctypes.data + ((b * Tq) * H + h) * D * 4
    kp = k.ctypes.data + ((b * Tk) * Hkv + g) * D * 4
    vp = v.ctypes.data + ((b * Tk) * Hkv + g) * D * 4
    for i0 in range(0, Tq, _QB):
        m = min(_QB, Tq - i0)
        n = _seen(causal, nk, pos0 + i0 + m)
        Sb = S[:m * n]
        sgemm(addr, NOTRANS, TRANS, m, n, D, scale, qp + i0 * H * D * 4, H * D,
              kp, Hkv * D, np.float32(0.0), Sb.ctypes.data, n)
        for r in range(m):
            vis = _seen(causal, nk, pos0 + i0 + r + 1)
            lse[b, h, i0 + r] = _softmax_row(Sb[r * n:(r + 1) * n], vis, bits)
            if dthr:
                mask_row(Sb[r * n:(r + 1) * n], vis, row_key(dkey, (b * H + h) * Tq + i0 + r),
                         dthr, dscale)
        sgemm(addr, NOTRANS, NOTRANS, m, D, n, np.float32(1.0), Sb.ctypes.data, n,
              vp, Hkv * D, np.float32(0.0), op + i0 * H * D * 4, H * D)


@pjit
def _forward_blas(addr, q, k, v, out, lse, pos0, causal, lengths, dkey, dthr, dscale):
    B, Tq, H, D = q.shape
    for bh in prange(B * H):
        b = bh // H
        nk = _seen(causal, lengths[b], pos0 + Tq)
        S = np.empty(min(_QB, Tq) * nk, np.float32)
        bits = np.empty(nk, np.int32)
        _forward_head_blas(addr, q, k, v, out, lse, b, bh % H, pos0, causal, nk, S, bits, dkey, dthr,
                           dscale)


@jit
def _backward_group_blas(addr, dout, q, k, v, out, lse, dq, dk, dv, b, g, causal, nk, P, dP, delta,
                         bits, dkey, dthr, dscale):
    """kv head g of sequence b, whose first nk keys are read; dk, dv of the others stay 0."""
    _, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(T):
        for d in range(D):
            dk[b, j, g, d] = zero
            dv[b, j, g, d] = zero
    ld = H * D * 4                                           # bytes between query rows
    kp = k.ctypes.data + (b * T * Hkv + g) * D * 4
    vp = v.ctypes.data + (b * T * Hkv + g) * D * 4
    dkp = dk.ctypes.data + (b * T * Hkv + g) * D * 4
    dvp = dv.ctypes.data + (b * T * Hkv + g) * D * 4
    for h in range(g * group, (g + 1) * group):
        base = (b * T * H + h) * D * 4
        for i in range(T):
            s = np.float32(0.0)
            for d in range(D):
                s += dout[b, i, h, d] * out[b, i, h, d]
            delta[i] = s
        for i0 in range(0, T, _QB):
            m = min(_QB, T - i0)
            n = _seen(causal, nk, i0 + m)
            Pb = P[:m * n]
            dPb = dP[:m * n]
            qp = q.ctypes.data + base + i0 * ld
            gp = dout.ctypes.data + base + i0 * ld
            sgemm(addr, NOTRANS, TRANS, m, n, D, scale, qp, H * D, kp, Hkv * D, zero, Pb.ctypes.data, n)
            sgemm(addr, NOTRANS, TRANS, m, n, D, one, gp, H * D, vp, Hkv * D, zero, dPb.ctypes.data, n)
            for r in range(m):                                   # P = exp(S - lse), dS = P (dP - delta)
                vis = _seen(causal, nk, i0 + r + 1)
                row = Pb[r * n:(r + 1) * n]
                _probabilities_row(row, vis, lse[b, h, i0 + r], bits)
                dl = delta[i0 + r]
                drow = dPb[r * n:(r + 1) * n]
                rk = row_key(dkey, (b * H + h) * T + i0 + r) if dthr else 0
                if dthr:   # dP through the dropout (delta = sum(dO * O) holds it already)
                    mask_row(drow, vis, rk, dthr, dscale)
                for j in range(vis):
                    drow[j] = row[j] * (drow[j] - dl)
                for j in range(vis, n):
                    drow[j] = zero
                if dthr:   # P as the forward multiplied V by, for dV
                    mask_row(row, vis, rk, dthr, dscale)
            # dQ = scale dS K;  dK += scale dS^T Q;  dV += P^T dO
            sgemm(addr, NOTRANS, NOTRANS, m, D, n, scale, dPb.ctypes.data, n, kp, Hkv * D, zero,
                  dq.ctypes.data + base + i0 * ld, H * D)
            sgemm(addr, TRANS, NOTRANS, n, D, m, scale, dPb.ctypes.data, n, qp, H * D, one, dkp, Hkv * D)
            sgemm(addr, TRANS, NOTRANS, n, D, m, one, Pb.ctypes.data, n, gp, H * D, one, dvp, Hkv * D)


@pjit
def _backward_blas(addr, dout, q, k, v, out, lse, dq, dk, dv, causal, lengths, dkey, dthr, dscale):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    for bg in prange(B * Hkv):
        b = bg // Hkv
        P = np.empty(min(_QB, T) * T, np.float32)
        dP = np.empty(min(_QB, T) * T, np.float32)
        delta = np.empty(T, np.float32)
        bits = np.empty(T, np.int32)
        _backward_group_blas(addr, dout, q, k, v, out, lse, dq, dk, dv, b, bg % Hkv, causal,
                             lengths[b], P, dP, delta, bits, dkey, dthr, dscale)


# ---- dispatch ---------------------------------------------------------------------------------
def _check(q, k, v, out, lse, pos0, named=(), training=False):
    """Shapes and dtypes, before any kernel indexes (or a BLAS call addresses) these arrays."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention: q and k must be 4-D (B, T, heads, D), got {q.shape}, {k.shape}")
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: k {k.shape} / v {v.shape} do not fit q {q.shape}")
    if k.shape[1] < pos0 + Tq:
        raise ValueError(f"attention: {Tq} queries at position {pos0} need {pos0 + Tq} keys, k has {k.shape[1]}")
    if training and k.shape[1] != Tq:
        raise ValueError(f"attention backward: k has {k.shape[1]} positions, q {Tq} (no KV cache in training)")
    want = {"out": q.shape, "lse": (B, H, Tq), **{n: s for n, (_, s) in named}}
    arrays = {"q": q, "k": k, "v": v, "out": out, "lse": lse, **{n: a for n, (a, _) in named}}
    for n, a in arrays.items():
        # C order too: both paths assume it, and a strided view would compile a new Numba
        # signature (~8 s) on the fallback
        floats("attention", n, a, want.get(n))


def _masking(fn, q, k, pos0, causal, lengths):
    """causal a bool; lengths None or (B,) integers in 1..Tk. Returns them as the kernels take
    them: a Python bool, and a C-contiguous int64 array (None: every sequence Tk long), so that
    every call runs one compiled signature."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    if not causal and pos0:
        raise ValueError(f"{fn}: pos0 is {pos0}, expected 0 with causal=False (bidirectional "
                         "attention has no earlier positions in a cache)")
    B, Tk = q.shape[0], k.shape[1]
    if lengths is None:
        return bool(causal), np.full(B, Tk, np.int64)
    if not isinstance(lengths, np.ndarray):
        raise ValueError(f"{fn}: lengths must be a numpy array, got {type(lengths).__name__}")
    if lengths.dtype.kind not in "iu":
        raise ValueError(f"{fn}: lengths has dtype {lengths.dtype}, expected an integer dtype")
    if lengths.shape != (B,):
        raise ValueError(f"{fn}: lengths has shape {lengths.shape}, expected ({B},): one per sequence")
    if B:
        lo, hi = lengths.min(), lengths.max()
        if lo < 1 or hi > Tk:
            raise ValueError(f"{fn}: lengths holds {lo if lo < 1 else hi}, expected values in "
                             f"1..{Tk} (a sequence's valid keys, at least one)")
    return bool(causal), np.ascontiguousarray(lengths, np.int64)


_told = False


def _use_blas(backend) -> bool:
    global _told
    if backend is None:
        backend = "blas" if SGEMM else "numba"
        if not SGEMM and not _told and not numba.config.DISABLE_JIT:
            _told = True   # once per process, printed like the compile notice
            print("tailtune: numpy's BLAS is not an ILP64 OpenBLAS (MKL, Accelerate, a conda "
                  "build?): attention runs its Numba path (about 0.8x torch's SDPA at T = 1024, the "
                  "OpenBLAS path 1.1-1.6x; a pip-installed numpy wheel brings OpenBLAS)",
                  file=sys.stderr, flush=True)
    if backend == "blas":
        if not SGEMM:
            raise RuntimeError("attention backend 'blas' needs compiled kernels (not NUMBA_DISABLE_JIT) "
                               "and numpy linked to an ILP64 OpenBLAS")
        return True
    if backend != "numba":
        raise ValueError(f"unknown attention backend {backend!r} (blas, numba)")
    return False


def _dropout(fn, dropout, key):
    """(key, threshold, scale) as the kernels take them; threshold 0: no dropout."""
    t = dropout_threshold(dropout, fn, "dropout")
    return check_key(fn, key), t, np.float32(1.0 / (1.0 - dropout) if t else 1.0)


def attention_forward(q, k, v, out, lse, pos0, backend=None, *, causal=True, lengths=None,
                      dropout=0.0, key=0):
    """out = softmax(q k^T / sqrt(D), masked) v; lse per query row. Masked: causal, and the
    padding past lengths[b] (see the module docstring). dropout > 0 (training): the
    probabilities go through dropout.py's mask of `key`, query row i of head h of sequence b
    by row (b H + h) Tq + i; lse stays that of the whole softmax."""
    pos0 = position("attention_forward", "pos0", pos0)
    _check(q, k, v, out, lse, pos0)
    causal, lengths = _masking("attention_forward", q, k, pos0, causal, lengths)
    drop = _dropout("attention_forward", dropout, key)
    if drop[1] and pos0:
        raise ValueError(f"attention_forward: dropout is for training (pos0 0), got pos0 {pos0}")
    if _use_blas(backend):
        with one_thread():
            _forward_blas(SGEMM, q, k, v, out, lse, pos0, causal, lengths, *drop)
    else:
        _forward_numba(q, k, v, out, lse, pos0, causal, lengths, *drop)


def attention_backward(dout, q, k, v, out, lse, dq, dk, dv, backend=None, *, causal=True,
                       lengths=None, dropout=0.0, key=0):
    """Training only (pos0 = 0, Tk = Tq); causal, lengths, dropout and key as in the forward.
    dq, dk, dv written (not accumulated); dk, dv are 0 at padding keys."""
    _check(q, k, v, out, lse, 0, (("dout", (dout, q.shape)), ("dq", (dq, q.shape)),
                                  ("dk", (dk, k.shape)), ("dv", (dv, k.shape))), training=True)
    causal, lengths = _masking("attention_backward", q, k, 0, causal, lengths)
    drop = _dropout("attention_backward", dropout, key)
    if _use_blas(backend):
        with one_thread():
            _backward_blas(SGEMM, dout, q, k, v, out, lse, dq, dk, dv, causal, lengths, *drop)
    else:
        _backward_numba(dout, q, k, v, out, lse, dq, dk, dv, causal, lengths, *drop)
