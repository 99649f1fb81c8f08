"""Causal self-attention with grouped-query heads, forward and backward.

Layouts: q, out: (B, Tq, H, D); k, v: (B, Tk, Hkv, D), query head h reads kv head h // (H // Hkv).
Query i sits at absolute position pos0 + i and sees keys 0 .. pos0 + i (pos0 > 0 when a KV cache
holds earlier tokens; Tk may be larger than needed, later keys are never read).
No score matrix is kept: forward saves only the log-sum-exp per query row (B, H, Tq); backward
recomputes the probabilities from it. Inner loops run over contiguous 1-D slices: keys are
transposed per head to (D, Tk) so that the score loop vectorizes over keys.
"""
import numpy as np

from .jit import pjit, prange
from .vexp import exp_inplace


@pjit
def attention_forward(q, k, v, out, lse, pos0):
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    Tk = pos0 + Tq
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        g = h // group
        kt = np.empty((D, Tk), np.float32)
        for j in range(Tk):
            kj = k[b, j, g]
            for d in range(D):
                kt[d, j] = kj[d]
        s = np.empty(Tk, np.float32)
        bits = np.empty(Tk, np.int32)
        acc = np.empty(D, np.float32)
        for i in range(Tq):
            n = pos0 + i + 1
            qi = q[b, i, h]
            for j in range(n):
                s[j] = np.float32(0.0)
            for d in range(D):
                qd = qi[d] * scale
                kd = kt[d]
                for j in range(n):
                    s[j] += qd * kd[j]
            m = s[0]
            for j in range(n):
                m = max(m, s[j])
            for j in range(n):
                s[j] -= m
            total = exp_inplace(s[:n], bits)
            for d in range(D):
                acc[d] = np.float32(0.0)
            for j in range(n):
                p = s[j]
                vj = v[b, j, g]
                for d in range(D):
                    acc[d] += p * vj[d]
            inv = np.float32(1.0) / total
            o = out[b, i, h]
            for d in range(D):
                o[d] = acc[d] * inv
            lse[b, h, i] = m + np.log(total)


@pjit
def attention_backward(dout, q, k, v, out, lse, dq, dk, dv):
    """Training only (pos0 = 0, Tk = Tq). dq, dk, dv written (not accumulated).
    Parallel over (batch, kv head): the query heads of one group are summed into the same dk, dv
    by one thread."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    for bg in prange(B * Hkv):
        b = bg // Hkv
        g = bg % Hkv
        kt = np.empty((D, T), np.float32)
        vt = np.empty((D, T), np.float32)
        for j in range(T):
            kj = k[b, j, g]
            vj = v[b, j, g]
            for d in range(D):
                kt[d, j] = kj[d]
                vt[d, j] = vj[d]
        dka = np.zeros((T, D), np.float32)
        dva = np.zeros((T, D), np.float32)
        p = np.empty(T, np.float32)
        dp = np.empty(T, np.float32)
        bits = np.empty(T, np.int32)
        dqi = np.empty(D, np.float32)
        for h in range(g * group, (g + 1) * group):
            for i in range(T):
                n = i + 1
                qi = q[b, i, h]
                doi = dout[b, i, h]
                oi = out[b, i, h]
                li = lse[b, h, i]
                for j in range(n):
                    p[j] = np.float32(0.0)
                    dp[j] = np.float32(0.0)
                for d in range(D):
                    qd = qi[d] * scale
                    gd = doi[d]
                    kd = kt[d]
                    vd = vt[d]
                    for j in range(n):
                        p[j] += qd * kd[j]
                        dp[j] += gd * vd[j]
                for j in range(n):
                    p[j] -= li
                exp_inplace(p[:n], bits)
                delta = np.float32(0.0)
                for d in range(D):
                    delta += doi[d] * oi[d]
                for d in range(D):
                    dqi[d] = np.float32(0.0)
                for j in range(n):
                    pj = p[j]
                    ds = pj * (dp[j] - delta) * scale
                    kj = k[b, j, g]
                    dkj = dka[j]
                    dvj = dva[j]
                    for d in range(D):
                        dqi[d] += ds * kj[d]
                        dkj[d] += ds * qi[d]
                        dvj[d] += pj * doi[d]
                dqo = dq[b, i, h]
                for d in range(D):
                    dqo[d] = dqi[d]
        for j in range(T):
            dk[b, j, g] = dka[j]
            dv[b, j, g] = dva[j]
