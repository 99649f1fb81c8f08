"""Fused AdamW update over one parameter, in one pass (torch.optim.AdamW's arithmetic)."""
import numpy as np

from .checks import same
from .jit import flat, pjit, prange

_BLK = 16384


@pjit
def _adamw_step(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt):
    n = p.shape[0]
    decay = np.float32(1.0 - lr * wd)
    b2 = np.float32(beta2)
    one_b1 = np.float32(1.0 - beta1)
    one_b2 = np.float32(1.0 - beta2)
    step = np.float32(lr / bc1)
    inv_bc2 = np.float32(1.0 / bc2_sqrt)
    e = np.float32(eps)
    for blk in prange((n + _BLK - 1) // _BLK):
        lo, hi = blk * _BLK, min(n, (blk + 1) * _BLK)
        # over 1-D slices: indexing the whole arrays left the loop scalar (2x slower)
        ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        for i in range(hi - lo):
            gi = gs[i]
            mi = ms[i] + one_b1 * (gi - ms[i])      # torch: exp_avg.lerp_(grad, 1 - beta1)
            vi = b2 * vs[i] + one_b2 * gi * gi
            ms[i] = mi
            vs[i] = vi
            ps[i] = ps[i] * decay - step * mi / (np.sqrt(vi) * inv_bc2 + e)


def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """Update p in place at step t (1-based); m, v are the first and second moments."""
    same("adamw_step", "p", p, g=g, m=m, v=v)
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"adamw_step: t is {t!r}, expected an integer step >= 1")
    bc1 = 1.0 - beta1 ** t
    bc2_sqrt = (1.0 - beta2 ** t) ** 0.5
    _adamw_step(flat(p), flat(g), flat(m), flat(v), lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt)
