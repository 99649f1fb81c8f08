"""Rotary position embeddings in the Hugging Face "rotate_half" convention.

For a head vector split in halves (x1, x2): out = (x1 cos - x2 sin, x2 cos + x1 sin).
Applied in place; backward is the inverse rotation, also in place.
"""
import numpy as np

from .checks import floats
from .jit import pjit, prange


def inverse_frequencies(head_dim, theta):
    """theta^(-2i / head_dim) for i < head_dim / 2, in float32 as transformers computes them:
    the float32 power, then its float32 reciprocal. The power is correctly rounded (computed in
    float64), so the result is the same on every machine: numpy's own float32 power is off by an
    ulp on AVX-512 machines (SVML), and torch's (Sleef) is within an ulp, equal to the correctly
    rounded one for Llama's and Llama 3's constants, one ulp off in an entry for some others
    (head_dim 128 with theta 1e6 or 5e6, head_dim 96 with theta 1e4)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)  # (half,)


def rope_table(n_pos, head_dim, theta, offset=0, inv_freq=None):
    """cos, sin of shape (n_pos, head_dim // 2) for positions offset .. offset + n_pos - 1, from
    inverse_frequencies(head_dim, theta) or the given (rescaled) ones.

    The angles are float32 products as in transformers (inv_freq times the position), so that
    long positions round the same way; their cos and sin are correctly rounded to float32
    (within an ulp of torch's)."""
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, theta)
    elif np.shape(inv_freq) != (head_dim // 2,):
        raise ValueError(f"rope_table: inv_freq has shape {np.shape(inv_freq)}, expected "
                         f"({head_dim // 2},)")
    inv_freq = np.asarray(inv_freq, np.float32)
    pos = np.arange(offset, offset + n_pos, dtype=np.float32)
    ang = (pos[:, None] * inv_freq[None, :]).astype(np.float64)  # (n_pos, half), float32 products
    # cos and sin correctly rounded (numpy's float32 ones are not on AVX-512 machines)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pjit
def _rotate(x, cos, sin, sign):
    B, T, H, D = x.shape
    h2 = D // 2
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        c = cos[t]
        s = sin[t]
        for h in range(H):
            xv = x[b, t, h]
            for j in range(h2):
                x1 = xv[j]
                x2 = xv[j + h2]
                sj = sign * s[j]
                xv[j] = x1 * c[j] - x2 * sj
                xv[j + h2] = x2 * c[j] + x1 * sj


def _check(fn, x, xname, cos, sin):
    """x (B, T, H, D) with D even; cos, sin (P, D // 2) with P >= T (row t is position t of x);
    all C-contiguous float32."""
    B, T, H, D = floats(fn, xname, x, ndim=4, dims="(B, T, H, D)").shape
    if D % 2:
        raise ValueError(f"{fn}: {xname} has shape {x.shape}, expected (B, T, H, D) with D even")
    for name, a in (("cos", cos), ("sin", sin)):
        floats(fn, name, a, ndim=2, dims="(T, D // 2)")
        if a.shape[0] < T or a.shape[1] != D // 2:
            raise ValueError(f"{fn}: {name} has shape {a.shape}, expected ({T}, {D // 2}) "
                             f"(at least {T} rows: one per position of {xname})")


def rope_forward(x, cos, sin):
    """x: (B, T, H, D) rotated in place; cos, sin: (T, D // 2) (longer is fine: row t rotates
    x[:, t])."""
    _check("rope_forward", x, "x", cos, sin)
    _rotate(x, cos, sin, np.float32(1.0))


def rope_backward(dx, cos, sin):
    """dx: (B, T, H, D) gradient w.r.t. the rotated x, turned in place into the gradient w.r.t.
    the input (the transpose of a rotation is the rotation by the opposite angle)."""
    _check("rope_backward", dx, "dx", cos, sin)
    _rotate(dx, cos, sin, np.float32(-1.0))
