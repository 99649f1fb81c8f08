"""Naive NumPy twins of every kernel, in float64, written for clarity, not speed.

Each op is a pair fwd(...) -> out and bwd(dout, ...) -> input gradients, derived by hand
independently of the kernels; tests check the twins against float64 finite differences and
PyTorch, and the kernels against the twins.
"""
import math

import numpy as np


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ---- matmul -------------------------------------------------------------------------------
def gemm(a, b, layout):
    a, b = f64(a, b)
    return {"nt": lambda: a @ b.T, "nn": lambda: a @ b, "tn": lambda: a.T @ b}[layout]()


# ---- norms --------------------------------------------------------------------------------
def layernorm_fwd(x, w, b, eps):
    x, w, b = f64(x, w, b)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def layernorm_bwd(dout, x, w, eps):
    dout, x, w = f64(dout, x, w)
    C = x.shape[-1]
    mu = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x - mu) * rstd
    dxh = dout * w
    dx = rstd / C * (C * dxh - dxh.sum(-1, keepdims=True) - xh * (dxh * xh).sum(-1, keepdims=True))
    return dx, (dout * xh).sum(0), dout.sum(0)


def rmsnorm_fwd(x, w, eps):
    x, w = f64(x, w)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rmsnorm_bwd(dout, x, w, eps):
    dout, x, w = f64(dout, x, w)
    C = x.shape[-1]
    rstd = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    dxh = dout * w
    dx = rstd * dxh - x * rstd ** 3 / C * (dxh * x).sum(-1, keepdims=True)
    return dx, (dout * x * rstd).sum(0)


# ---- activations --------------------------------------------------------------------------
_K0, _K1 = np.sqrt(2 / np.pi), 0.044715


def gelu_fwd(x):
    (x,) = f64(x)
    return 0.5 * x * (1 + np.tanh(_K0 * (x + _K1 * x ** 3)))


def gelu_bwd(dout, x):
    dout, x = f64(dout, x)
    t = np.tanh(_K0 * (x + _K1 * x ** 3))
    return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _K0 * (1 + 3 * _K1 * x * x))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def gelu_erf_fwd(x):
    """x Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)) (BERT's GELU), written as 0.5 erfc(-x / sqrt 2):
    the same function, without float64 cancelling the lower tail away."""
    (x,) = f64(x)
    return x * 0.5 * _erfc(-x / np.sqrt(2)).astype(np.float64)


def gelu_erf_bwd(dout, x):
    dout, x = f64(dout, x)
    cdf = 0.5 * _erfc(-x / np.sqrt(2)).astype(np.float64)
    return dout * (cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi))


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow for large |x|


def swiglu_fwd(g, u):
    g, u = f64(g, u)
    return g * _sigmoid(g) * u


def swiglu_bwd(dout, g, u):
    dout, g, u = f64(dout, g, u)
    s = _sigmoid(g)
    return dout * u * (s + g * s * (1 - s)), dout * g * s


# ---- rotary embedding ---------------------------------------------------------------------
def rope_fwd(x, cos, sin):
    """x (B, T, H, D); cos, sin (T, D/2). Pairs (j, j + D/2) rotate by the angle of j."""
    x, cos, sin = f64(x, cos, sin)
    out = np.empty_like(x)
    h = x.shape[-1] // 2
    for j in range(h):
        c, s = cos[None, :, None, j], sin[None, :, None, j]
        out[..., j] = x[..., j] * c - x[..., j + h] * s
        out[..., j + h] = x[..., j + h] * c + x[..., j] * s
    return out


def rope_bwd(dout, cos, sin):
    return rope_fwd(dout, cos, -np.asarray(sin))


# ---- dropout ------------------------------------------------------------------------------
_M32 = np.uint64(0xFFFFFFFF)


def _fmix32(h):
    """murmur3's 32-bit finalizer, on uint64 arrays holding 32-bit values."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


def dropout_mask(rows, C, p, key):
    """(rows, C) bool, True where kept: element j of row r is kept when
    fmix32(((j * 0x9E3779B9) mod 2**32) xor fmix32(fmix32(r) xor key)) >= round(p * 2**32)."""
    r = np.arange(rows, dtype=np.uint64)
    j = np.arange(C, dtype=np.uint64)
    rk = _fmix32(_fmix32(r & _M32) ^ np.uint64(key))
    h = _fmix32(((j * np.uint64(0x9E3779B9)) & _M32)[None, :] ^ rk[:, None])
    return h >= np.uint64(min(round(p * 2.0 ** 32), 2 ** 32 - 1))


def dropout_fwd(x, p, key):
    """x (..., C): scaled by 1 / (1 - p) where kept, else 0."""
    (x,) = f64(x)
    C = x.shape[-1]
    keep = dropout_mask(x.size // C, C, p, key).reshape(x.shape)
    return np.where(keep, x / (1.0 - p), 0.0)


# ---- attention ----------------------------------------------------------------------------
def _expand_kv(k, H):
    return np.repeat(k, H // k.shape[2], axis=2)


def _seen(B, Tq, Tk, pos0, causal, lengths):
    """(B, 1, Tq, Tk) bool: query i (at position pos0 + i) attends to key j."""
    j = np.arange(Tk)
    seen = np.ones((B, 1, Tq, Tk), bool)
    if causal:
        seen &= j[None, :] <= (pos0 + np.arange(Tq))[:, None]
    if lengths is not None:
        seen &= j < np.asarray(lengths)[:, None, None, None]
    return seen


def _unpad(k, lengths):
    """Padding keys (or values) set to 0: their values must not matter (NaN in the tests)."""
    if lengths is None:
        return k
    valid = np.arange(k.shape[1]) < np.asarray(lengths)[:, None]    # (B, Tk)
    return np.where(valid[:, :, None, None], k, 0.0)


def _dropped(B, H, Tq, Tk, drop):
    """(B, H, Tq, Tk) float64: the scaled dropout mask of the probabilities (query row i of head
    h of sequence b is the mask's row (b H + h) Tq + i), or 1 without drop (p, key)."""
    if drop is None:
        return np.ones((B, H, Tq, Tk))
    p, key = drop
    return dropout_mask(B * H * Tq, Tk, p, key).reshape(B, H, Tq, Tk) / (1.0 - p)


def attention_fwd(q, k, v, pos0=0, causal=True, lengths=None, drop=None):
    """q (B, Tq, H, D), k, v (B, Tk, Hkv, D); query i at position pos0 + i. causal: it sees
    keys 0 .. pos0 + i (later keys not read); else all of them. lengths (B,): keys at positions
    >= lengths[b] are padding, never seen. drop (p, key): dropout of the probabilities (the
    log-sum-exp is the whole softmax's)."""
    q, k, v = f64(q, k, v)
    B, Tq, H, D = q.shape
    Tk = pos0 + Tq if causal else k.shape[1]
    k, v = _expand_kv(_unpad(k[:, :Tk], lengths), H), _expand_kv(_unpad(v[:, :Tk], lengths), H)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    s = np.where(_seen(B, Tq, Tk, pos0, causal, lengths), s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p * _dropped(B, H, Tq, Tk, drop), v), lse


def attention_bwd(dout, q, k, v, causal=True, lengths=None, drop=None):
    dout, q, k, v = f64(dout, q, k, v)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    ke, ve = _expand_kv(_unpad(k, lengths), H), _expand_kv(_unpad(v, lengths), H)
    s = np.einsum("bihd,bjhd->bhij", q, ke) / np.sqrt(D)
    s = np.where(_seen(B, T, T, 0, causal, lengths), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = _dropped(B, H, T, T, drop)
    dv = np.einsum("bhij,bihd->bjhd", p * m, dout)
    dp = np.einsum("bihd,bjhd->bhij", dout, ve) * m      # the gradient of p itself
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
    dq = np.einsum("bhij,bjhd->bihd", ds, ke)
    dk = np.einsum("bhij,bihd->bjhd", ds, q)
    fold = lambda a: a.reshape(B, T, Hkv, H // Hkv, D).sum(3)  # noqa: E731  sum a group's heads
    return dq, fold(dk), fold(dv)


# ---- embedding ----------------------------------------------------------------------------
def embedding_fwd(tokens, wte, wpe=None, pos0=0):
    (wte,) = f64(wte)
    out = wte[tokens]
    if wpe is not None:
        out = out + np.asarray(wpe, np.float64)[pos0:pos0 + tokens.shape[1]][None]
    return out


def embedding_bwd(dout, tokens, V, P=None, pos0=0, padding_idx=None):
    (dout,) = f64(dout)
    dwte = np.zeros((V, dout.shape[-1]))
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    if padding_idx is not None:
        dwte[padding_idx] = 0.0
    dwpe = None
    if P is not None:
        dwpe = np.zeros((P, dout.shape[-1]))
        dwpe[pos0:pos0 + tokens.shape[1]] = dout.sum(0)
    return dwte, dwpe


# ---- cross-entropy ------------------------------------------------------------------------
def crossentropy_fwd(logits, targets):
    """Per-row loss (0 where target < 0) and log-sum-exp."""
    (x,) = f64(logits)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    valid = targets >= 0
    loss = np.where(valid, lse - x[np.arange(len(x)), np.where(valid, targets, 0)], 0.0)
    return loss, lse


def crossentropy_bwd(logits, targets, scale):
    """d(scale * sum of losses)/d(logits)."""
    (x,) = f64(logits)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    valid = targets >= 0
    p[np.arange(len(x)), np.where(valid, targets, 0)] -= 1
    return np.where(valid[:, None], p * scale, 0.0)


# ---- AdamW --------------------------------------------------------------------------------
def adamw(p, g, m, v, lr, b1, b2, eps, wd, t):
    p, g, m, v = f64(p, g, m, v)
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * mh / (np.sqrt(vh) + eps), m, v


def sgd(p, g, buf, lr, momentum, wd, nesterov, started):
    """torch.optim.SGD's step, in float64: (p, buf) after it."""
    p, g, buf = f64(p, g, buf)
    d = g + wd * p
    if momentum:
        buf = momentum * buf + d if started else d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


# ---- telemetry reductions ----------------------------------------------------------------
def param_sums(p, w0, g, before=None):
    p, w0, g = f64(p, w0, g)
    upd = 0.0 if before is None else float(((p - f64(before)[0]) ** 2).sum())
    return np.array([(g * g).sum(), (p * p).sum(), (w0 * w0).sum(), ((p - w0) ** 2).sum(),
                     (p * w0).sum(), upd])


# ---- finite differences -------------------------------------------------------------------
def directional_fd(f, xs, i, u, h=1e-6):
    """Central difference of scalar f(*xs) along direction u of argument i, in float64."""
    xp = [np.array(x, np.float64) for x in xs]
    xm = [np.array(x, np.float64) for x in xs]
    xp[i] = xp[i] + h * u
    xm[i] = xm[i] - h * u
    return (f(*xp) - f(*xm)) / (2 * h)
