"""Every kernel against its naive NumPy twin (tests/reference.py), the twin's gradients against
float64 finite differences, and PyTorch where it has the op. Shapes come from hypothesis and
include the edges (one row, T = 1, one head, widths that are not multiples of any block).

CI runs this file twice: compiled, and with NUMBA_DISABLE_JIT=1 (the plain Python path), so
shapes stay small.
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from kernels.activation import (erf_inplace, gelu_backward, gelu_erf_backward, gelu_erf_forward,
                                gelu_forward, swiglu_backward, swiglu_forward)
from kernels.adamw import adamw_step
from kernels.sgd import sgd_step
from kernels.attention import attention_backward, attention_forward
from kernels.bias import bias_add
from kernels.dropout import dropout_backward, dropout_forward
import engine
from kernels import blas as blas_mod
from kernels.blas import SGEMM, NOTRANS, TRANS, sgemm
from kernels.embedding import embedding_backward, embedding_forward
from kernels.loss import crossentropy_forward, crossentropy_forward_backward
from kernels.matmul import gemm_nn, gemm_nt, gemm_tn
from kernels.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from kernels.rope import rope_backward, rope_forward, rope_table
from kernels.stats import param_sums, sum_sq
from kernels.vexp import exp_inplace

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")
# the BLAS attention path needs compiled code; the plain-Python run tests the Numba path only
ATTN_BACKENDS = ["numba", "blas"] if JIT else ["numba"]

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
FWD_TOL = dict(rtol=2e-5, atol=2e-6)   # float32 kernel vs float64 twin, values O(1)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)  # gradients sum more terms: looser


def rng_of(seed):
    return np.random.default_rng(seed)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(actual, expected, tol, scale=None):
    """allclose with atol relative to the size of the expected values."""
    expected = np.asarray(expected, np.float64)
    s = scale if scale is not None else max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * s)


def check_twin_grad(loss_of, inputs, grads, rng, idx=None):
    """The twin's analytic gradients match float64 central differences of the twin's forward
    along a random direction, for each input index in idx."""
    for i in (range(len(inputs)) if idx is None else idx):
        u = rng.standard_normal(np.shape(inputs[i]))
        fd = ref.directional_fd(loss_of, inputs, i, u)
        an = float(np.sum(np.asarray(grads[i], np.float64) * u))
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(fd)), (i, fd, an)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


# ---- vectorized exp -------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_exp_inplace(n, seed):
    x = randn(rng_of(seed), n, scale=30.0).clip(-87, 88)
    out = x.copy()
    s = exp_inplace(out, np.empty(n, np.int32))
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=5e-7)
    np.testing.assert_allclose(s, want.sum(), rtol=1e-5)


def test_exp_inplace_extremes():
    x = np.array([-np.inf, -1000.0, -87.0, 0.0, 88.0], np.float32)
    out = x.copy()
    exp_inplace(out, np.empty(5, np.int32))
    assert np.all(out[:2] < 1e-37) and np.all(out >= 0)
    np.testing.assert_allclose(out[2:], np.exp(x[2:].astype(np.float64)), rtol=5e-7)


# ---- GEMM -----------------------------------------------------------------------------------
@SETTINGS
@given(M=st.integers(1, 19), K=st.integers(1, 40), N=st.integers(1, 19), seed=st.integers(0, 2**16),
       acc=st.booleans())
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
@pytest.mark.parametrize("backend", ["numba", "blas"])
def test_gemm(layout, backend, M, K, N, seed, acc):
    rng = rng_of(seed)
    shapes = {"nt": ((M, K), (N, K)), "nn": ((M, K), (K, N)), "tn": ((K, M), (K, N))}[layout]
    a, b = randn(rng, *shapes[0]), randn(rng, *shapes[1])
    out = randn(rng, M, N)
    base = out.astype(np.float64) if acc else 0.0
    fn = {"nt": gemm_nt, "nn": gemm_nn, "tn": gemm_tn}[layout]
    fn(a, b, out, accumulate=acc, backend=backend)
    close(out, base + ref.gemm(a, b, layout), FWD_TOL, scale=np.sqrt(K) + 1)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
@pytest.mark.parametrize("M, N, axis", [(3, 50, 1), (40, 100, 1), (100, 1700, 1), (100, 150, 0),
                                        (300, 1000, 0)])
@pytest.mark.parametrize("acc", [False, True])
def test_gemm_split_over_threads_by_rows_or_columns(monkeypatch, layout, M, N, axis, acc):
    """The BLAS path split over the engine's threads: by rows, or by columns where there are
    few rows against many columns (the LM head over a short batch); both give the product."""
    import kernels.matmul as MM
    if MM.num_threads() < 2:
        pytest.fail("needs 2 threads (NUMBA_NUM_THREADS) to split a GEMM")
    monkeypatch.setattr(MM, "_MIN_SPLIT_FLOPS", 0)
    axes, real = [], MM._blas_part
    monkeypatch.setattr(MM, "_blas_part", lambda ops, out, a, part, ax: (axes.append(ax), real(ops, out, a, part, ax)))
    rng, K = rng_of(M + N), 33
    shapes = {"nt": ((M, K), (N, K)), "nn": ((M, K), (K, N)), "tn": ((K, M), (K, N))}[layout]
    a, b = randn(rng, *shapes[0]), randn(rng, *shapes[1])
    out = randn(rng, M, N)
    base = out.astype(np.float64) if acc else 0.0
    {"nt": gemm_nt, "nn": gemm_nn, "tn": gemm_tn}[layout](a, b, out, accumulate=acc, backend="blas")
    close(out, base + ref.gemm(a, b, layout), FWD_TOL, scale=np.sqrt(K) + 1)
    assert axes and set(axes) == {axis}


def test_gemm_large_k_blocks():
    """K crosses the kernel's k-block boundary; M, N leave tails in both tile directions."""
    rng = rng_of(1)
    a, b = randn(rng, 7, 1100), randn(rng, 67, 1100)
    out = np.empty((7, 67), np.float32)
    gemm_nt(a, b, out, backend="numba")
    close(out, ref.gemm(a, b, "nt"), FWD_TOL, scale=40)


# ---- norms ----------------------------------------------------------------------------------
@SETTINGS
@given(N=st.integers(1, 9), C=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_layernorm(N, C, seed, scale):
    rng = rng_of(seed)
    x = randn(rng, N, C, scale=scale) + np.float32(scale)   # offset: mean far from 0
    w, b, dout = randn(rng, C), randn(rng, C), randn(rng, N, C)
    eps = 1e-5
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm_forward(x, w, b, out, mean, rstd, eps)
    close(out, ref.layernorm_fwd(x, w, b, eps), dict(rtol=1e-4, atol=1e-4))
    dx, dw, db = np.zeros_like(x), np.ones(C, np.float32), np.ones(C, np.float32)
    layernorm_backward(dout, x, w, mean, rstd, dx, dw, db)
    rdx, rdw, rdb = ref.layernorm_bwd(dout, x, w, eps)
    # the size of the terms that cancel inside dx: rstd * |dout * w|
    terms = float(np.abs(rstd).max() * np.abs(dout * w).max())
    close(dx, rdx, dict(rtol=1e-3, atol=1e-5), scale=terms)
    close(dw - 1, rdw, GRAD_TOL, scale=np.abs(rdw).max() + 1)  # parameter grads accumulate
    close(db - 1, rdb, GRAD_TOL)
    dx2 = dx.copy()
    layernorm_backward(dout, x, w, mean, rstd, dx2)       # so does dx (the residual stream)
    close(dx2, 2 * rdx, dict(rtol=1e-3, atol=1e-5), scale=terms)


@pytest.mark.parametrize("C", [7, 768, 2048])
def test_layernorm_rows_far_from_zero(C):
    # A row whose spread is small against its mean: float32 rounding of the mean, divided by
    # sqrt(var + eps), must not show. A constant row normalizes to exactly b.
    rng = rng_of(C)
    w, b = randn(rng, C), randn(rng, C)
    x = np.stack([np.full(C, 13.37, np.float32),
                  (50 + 1e-3 * rng.standard_normal(C)).astype(np.float32)])
    out, mean, rstd = np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32)
    layernorm_forward(x, w, b, out, mean, rstd, 1e-5)
    np.testing.assert_allclose(out[0], b, rtol=0, atol=1e-6)
    close(out[1:], ref.layernorm_fwd(x[1:], w, b, 1e-5), dict(rtol=0, atol=2e-3))


def test_layernorm_twin_and_torch():
    rng = rng_of(0)
    x, w, b, dout = randn(rng, 5, 13), randn(rng, 13), randn(rng, 13), randn(rng, 5, 13)
    loss = lambda x, w, b: float(np.sum(ref.layernorm_fwd(x, w, b, 1e-5) * dout))  # noqa: E731
    check_twin_grad(loss, [x, w, b], ref.layernorm_bwd(dout, x, w, 1e-5), rng)
    tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
    y = torch.nn.functional.layer_norm(tx, (13,), tw, tb, 1e-5)
    y.backward(t64(dout))
    np.testing.assert_allclose(y.detach().numpy(), ref.layernorm_fwd(x, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    for got, want in zip(ref.layernorm_bwd(dout, x, w, 1e-5), (tx.grad, tw.grad, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(N=st.integers(1, 9), C=st.integers(1, 70), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_rmsnorm(N, C, seed, scale):
    rng = rng_of(seed)
    x, w, dout = randn(rng, N, C, scale=scale), randn(rng, C), randn(rng, N, C)
    eps = 1e-6
    out, rstd = np.empty_like(x), np.empty(N, np.float32)
    rmsnorm_forward(x, w, out, rstd, eps)
    close(out, ref.rmsnorm_fwd(x, w, eps), dict(rtol=1e-4, atol=1e-5))
    dx, dw = np.zeros_like(x), np.ones(C, np.float32)
    rmsnorm_backward(dout, x, w, rstd, dx, dw)
    rdx, rdw = ref.rmsnorm_bwd(dout, x, w, eps)
    terms = float(np.abs(rstd).max() * np.abs(dout * w).max())
    close(dx, rdx, dict(rtol=1e-3, atol=1e-5), scale=terms)
    close(dw - 1, rdw, GRAD_TOL)
    rmsnorm_backward(dout, x, w, rstd, dx)
    close(dx, 2 * rdx, dict(rtol=1e-3, atol=1e-5), scale=terms)


def test_rmsnorm_twin_and_torch():
    rng = rng_of(0)
    x, w, dout = randn(rng, 4, 11), randn(rng, 11), randn(rng, 4, 11)
    loss = lambda x, w: float(np.sum(ref.rmsnorm_fwd(x, w, 1e-6) * dout))  # noqa: E731
    check_twin_grad(loss, [x, w], ref.rmsnorm_bwd(dout, x, w, 1e-6), rng)
    tx, tw = t64(x, True), t64(w, True)
    y = torch.nn.functional.rms_norm(tx, (11,), tw, 1e-6)
    y.backward(t64(dout))
    np.testing.assert_allclose(y.detach().numpy(), ref.rmsnorm_fwd(x, w, 1e-6), rtol=1e-12)
    for got, want in zip(ref.rmsnorm_bwd(dout, x, w, 1e-6), (tx.grad, tw.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


# ---- activations ----------------------------------------------------------------------------
# exp_inplace also returns the sum of the exps; the activations ignore it, and at scale 100 it
# overflows to inf. Compiled code does that silently, plain Python (NUMBA_DISABLE_JIT) warns.
_IGNORED_SUM = pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")


@_IGNORED_SUM
@SETTINGS
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 10.0, 100.0]))
def test_gelu(n, seed, scale):
    rng = rng_of(seed)
    x, dout = randn(rng, n, scale=scale), randn(rng, n)
    out, dx = np.empty_like(x), np.empty_like(x)
    gelu_forward(x, out)
    close(out, ref.gelu_fwd(x), FWD_TOL, scale=1.0)
    gelu_backward(dout, x, dx)
    close(dx, ref.gelu_bwd(dout, x), GRAD_TOL)


@pytest.mark.parametrize("approximate,fwd,bwd", [("tanh", ref.gelu_fwd, ref.gelu_bwd),
                                                 ("none", ref.gelu_erf_fwd, ref.gelu_erf_bwd)])
def test_gelu_twin_and_torch(approximate, fwd, bwd):
    """Both GELUs' twins: finite differences, and torch's gelu of the same form in float64."""
    rng = rng_of(0)
    x, dout = randn(rng, 40, scale=3), randn(rng, 40)
    check_twin_grad(lambda x: float(np.sum(fwd(x) * dout)), [x], [bwd(dout, x)], rng)
    tx = t64(x, True)
    y = torch.nn.functional.gelu(tx, approximate=approximate)
    y.backward(t64(dout))
    np.testing.assert_allclose(y.detach().numpy(), fwd(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tx.grad.numpy(), bwd(dout, x), rtol=1e-10, atol=1e-14)


def test_erf_inplace_accuracy():
    """The vectorized float32 erf against float64 math.erf, relative error, from tiny |x| (where
    erf(x) ~ 2x / sqrt(pi)) through both branches and their seam to erf = 1 in float32: about
    1e-7, float32 rounding (math.erf itself is a scalar call that stops vectorization)."""
    n = 20000 if JIT else 2000
    seams = np.array([0.9, 9.3], np.float32)
    pos = np.concatenate([np.geomspace(1e-37, 12, n), np.linspace(0.001, 5, n),
                          np.nextafter(seams, 0), seams, np.nextafter(seams, 10)]).astype(np.float32)
    x = np.concatenate([pos, -pos])
    got = x.copy()
    erf_inplace(got, np.empty_like(got), np.empty(len(got), np.int32))
    want = np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(np.float64)
    rel = np.abs(got - want) / np.abs(want)
    assert rel.max() < 1.5e-7, (rel.max(), x[rel.argmax()])
    ends = np.array([0.0, np.inf, -np.inf, 1e30, -1e30, 3e38], np.float32)
    erf_inplace(ends, np.empty(6, np.float32), np.empty(6, np.int32))
    assert list(ends) == [0.0, 1.0, -1.0, 1.0, -1.0, 1.0]


@SETTINGS
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 10.0, 100.0]))
def test_gelu_erf(n, seed, scale):
    rng = rng_of(seed)
    x, dout = randn(rng, n, scale=scale), randn(rng, n)
    out, dx = np.empty_like(x), np.full_like(x, 7.0)   # dx written, not added
    gelu_erf_forward(x, out)
    close(out, ref.gelu_erf_fwd(x), FWD_TOL, scale=1.0)
    gelu_erf_backward(dout, x, dx)
    close(dx, ref.gelu_erf_bwd(dout, x), GRAD_TOL)


def test_gelu_erf_tail_and_extremes():
    """Over several blocks: relative accuracy where Phi(x) is tiny (x down to -13, where
    1 + erf(x / sqrt 2) in float32, torch's form, keeps no digit), and the limits at extremes."""
    x = np.linspace(-13, 13, 3 * 4096 + 5 if JIT else 1001, dtype=np.float32)
    out, dx = np.empty_like(x), np.empty_like(x)
    gelu_erf_forward(x, out)
    want = ref.gelu_erf_fwd(x)
    tail = np.abs(want) > 1e-30
    np.testing.assert_allclose(out[tail], want[tail], rtol=5e-6, atol=0)
    assert np.all(np.abs(out[~tail]) <= 1e-30)
    gelu_erf_backward(np.ones_like(x), x, dx)
    np.testing.assert_allclose(dx, ref.gelu_erf_bwd(np.ones_like(x), x), rtol=1e-5, atol=3e-7)
    ext = np.array([0.0, 1e-40, -1e-40, 50, -50, 1e30, -1e30, 3e38, -3e38], np.float32)
    out, dx = np.empty_like(ext), np.empty_like(ext)
    gelu_erf_forward(ext, out)
    gelu_erf_backward(np.ones_like(ext), ext, dx)
    np.testing.assert_array_equal(out, np.array([0, 5e-41, -5e-41, 50, 0, 1e30, 0, 3e38, 0], np.float32))
    np.testing.assert_array_equal(dx, np.array([0.5, 0.5, 0.5, 1, 0, 1, 0, 1, 0], np.float32))


def test_gelu_erf_kernel_and_torch_float32():
    """The erf GELU kernel against torch's own float32 (what BERT in transformers runs)."""
    rng = rng_of(0)
    x, dout = randn(rng, 40, scale=3), randn(rng, 40)
    tx = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.gelu(tx, approximate="none")
    y.backward(torch.tensor(dout))
    out, dx = np.empty_like(x), np.empty_like(x)
    gelu_erf_forward(x, out)
    gelu_erf_backward(dout, x, dx)
    close(out, y.detach().numpy(), FWD_TOL, scale=1.0)
    close(dx, tx.grad.numpy(), GRAD_TOL)


@_IGNORED_SUM
@SETTINGS
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 10.0, 100.0]))
def test_swiglu(n, seed, scale):
    rng = rng_of(seed)
    g, u, dout = randn(rng, n, scale=scale), randn(rng, n), randn(rng, n)
    out, dg, du = np.empty_like(g), np.empty_like(g), np.empty_like(g)
    swiglu_forward(g, u, out)
    close(out, ref.swiglu_fwd(g, u), FWD_TOL)
    swiglu_backward(dout, g, u, dg, du)
    rdg, rdu = ref.swiglu_bwd(dout, g, u)
    close(dg, rdg, GRAD_TOL)
    close(du, rdu, GRAD_TOL)


def test_swiglu_twin_and_torch():
    rng = rng_of(0)
    g, u, dout = randn(rng, 30, scale=3), randn(rng, 30), randn(rng, 30)
    loss = lambda g, u: float(np.sum(ref.swiglu_fwd(g, u) * dout))  # noqa: E731
    check_twin_grad(loss, [g, u], ref.swiglu_bwd(dout, g, u), rng)
    tg, tu = t64(g, True), t64(u, True)
    y = torch.nn.functional.silu(tg) * tu
    y.backward(t64(dout))
    np.testing.assert_allclose(y.detach().numpy(), ref.swiglu_fwd(g, u), rtol=1e-12)
    for got, want in zip(ref.swiglu_bwd(dout, g, u), (tg.grad, tu.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-14)


# ---- rotary embeddings ----------------------------------------------------------------------
@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 9), H=st.integers(1, 3), half=st.integers(1, 6),
       seed=st.integers(0, 2**16), pos0=st.sampled_from([0, 5, 1000]))
def test_rope(B, T, H, half, seed, pos0):
    rng = rng_of(seed)
    D = 2 * half
    cos, sin = rope_table(T, D, 10000.0, offset=pos0)
    x, dout = randn(rng, B, T, H, D), randn(rng, B, T, H, D)
    y = x.copy()
    rope_forward(y, cos, sin)
    close(y, ref.rope_fwd(x, cos, sin), FWD_TOL)
    dx = dout.copy()
    rope_backward(dx, cos, sin)
    close(dx, ref.rope_bwd(dout, cos, sin), FWD_TOL)


def test_rope_twin_and_torch():
    """The twin's gradient is the transpose of the forward; the table and rotation match
    transformers' Llama rotary code."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    rng = rng_of(0)
    cos, sin = rope_table(7, 8, 500.0, offset=3)
    x, dout = randn(rng, 1, 7, 2, 8), randn(rng, 1, 7, 2, 8)
    check_twin_grad(lambda x: float(np.sum(ref.rope_fwd(x, cos, sin) * dout)), [x],
                    [ref.rope_bwd(dout, cos, sin)], rng)
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2, dtype=torch.int64).float() / 8))
    ang = torch.arange(3, 10).float()[:, None] * inv[None]
    np.testing.assert_allclose(cos, torch.cos(ang).numpy(), rtol=1e-6, atol=1e-7)
    emb = torch.cat([ang, ang], -1)
    tq = torch.tensor(x).transpose(1, 2)  # transformers: (B, H, T, D)
    q, _ = apply_rotary_pos_emb(tq, tq, emb.cos()[None], emb.sin()[None])
    np.testing.assert_allclose(ref.rope_fwd(x, cos, sin), q.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


# ---- attention ------------------------------------------------------------------------------
def _attn_inputs(rng, B, T, H, Hkv, D, scale=1.0):
    return (randn(rng, B, T, H, D, scale=scale), randn(rng, B, T, Hkv, D, scale=scale),
            randn(rng, B, T, Hkv, D), randn(rng, B, T, H, D))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 11), Hkv=st.integers(1, 3), group=st.integers(1, 3),
       D=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]))
def test_attention(backend, B, T, Hkv, group, D, seed, scale):
    rng = rng_of(seed)
    H = Hkv * group
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D, scale)
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, 0, backend=backend)
    rout, rlse = ref.attention_fwd(q, k, v)
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    attention_backward(dout, q, k, v, out, lse, dq, dk, dv, backend=backend)
    for got, want in zip((dq, dk, dv), ref.attention_bwd(dout, q, k, v)):
        close(got, want, dict(rtol=1e-3, atol=1e-4), scale=np.abs(want).max() + 1)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@SETTINGS
@given(T=st.integers(1, 6), past=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_attention_with_cache_offset(backend, T, past, seed):
    """Queries at positions past.. see the cached keys; keys beyond the query are never read."""
    rng = rng_of(seed)
    B, H, Hkv, D = 2, 4, 2, 5
    q = randn(rng, B, T, H, D)
    k, v = randn(rng, B, past + T + 3, Hkv, D), randn(rng, B, past + T + 3, Hkv, D)
    k[:, past + T:] = np.nan  # must not be read
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, past, backend=backend)
    rout, rlse = ref.attention_fwd(q, k, v, pos0=past)
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))


def test_attention_twin_and_torch():
    rng = rng_of(0)
    B, T, H, Hkv, D = 2, 6, 4, 2, 3
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D)
    loss = lambda q, k, v: float(np.sum(ref.attention_fwd(q, k, v)[0] * dout))  # noqa: E731
    check_twin_grad(loss, [q, k, v], ref.attention_bwd(dout, q, k, v), rng)
    tq, tk, tv = (t64(a, True).transpose(1, 2) for a in (q, k, v))  # (B, H, T, D)
    for t in (tq, tk, tv):
        t.retain_grad()
    y = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    y.backward(t64(dout).transpose(1, 2))
    np.testing.assert_allclose(y.transpose(1, 2).detach().numpy(), ref.attention_fwd(q, k, v)[0], rtol=1e-10)
    for got, want in zip(ref.attention_bwd(dout, q, k, v), (tq, tk, tv)):
        np.testing.assert_allclose(got, want.grad.transpose(1, 2).numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_long_sequence(backend):
    rng = rng_of(3)
    q, k, v, dout = _attn_inputs(rng, 1, 300, 2, 1, 16)
    out, lse = np.empty_like(q), np.empty((1, 2, 300), np.float32)
    attention_forward(q, k, v, out, lse, 0, backend=backend)
    close(out, ref.attention_fwd(q, k, v)[0], dict(rtol=1e-4, atol=1e-5))
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    attention_backward(dout, q, k, v, out, lse, dq, dk, dv, backend=backend)
    for got, want in zip((dq, dk, dv), ref.attention_bwd(dout, q, k, v)):
        close(got, want, dict(rtol=1e-3, atol=1e-4))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_blocks_cache_and_groups(backend):
    """Several 64-row query blocks, after 37 cached positions, with batch and kv-head groups;
    keys and values past the queries must never be read; then backward over several blocks."""
    rng = rng_of(11)
    B, T, H, Hkv, D, past = 2, 150, 4, 2, 4, 37
    q = randn(rng, B, T, H, D)
    k, v = randn(rng, B, past + T + 5, Hkv, D), randn(rng, B, past + T + 5, Hkv, D)
    k[:, past + T:] = np.nan
    v[:, past + T:] = np.nan
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, past, backend=backend)
    rout, rlse = ref.attention_fwd(q, k, v, pos0=past)
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))
    k, v, dout = k[:, :T].copy(), v[:, :T].copy(), randn(rng, B, T, H, D)
    out = np.empty_like(q)
    attention_forward(q, k, v, out, lse, 0, backend=backend)
    grads = np.full_like(q, 7.0), np.full_like(k, 7.0), np.full_like(v, 7.0)   # written, not added
    attention_backward(dout, q, k, v, out, lse, *grads, backend=backend)
    for got, want in zip(grads, ref.attention_bwd(dout, q, k, v)):
        close(got, want, dict(rtol=1e-3, atol=1e-4), scale=np.abs(want).max() + 1)


def _padded(rng, B, T):
    """(B,) lengths with 1 and T among them (B >= 2), and the (B, T) mask of padding positions."""
    lengths = rng.integers(1, T + 1, B)
    lengths[:2] = [1, T][:B]
    return lengths, np.arange(T)[None, :] >= lengths[:, None]


def _check_masked(backend, q, k, v, dout, causal, lengths, pad):
    """Both kernels against the twin with padding keys holding NaN (never read): outputs,
    log-sum-exps, and gradients written (not added) with dk = dv = 0 exactly at the padding."""
    B, T, H = q.shape[0], q.shape[1], q.shape[2]
    k[pad] = np.nan
    v[pad] = np.nan
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, 0, backend=backend, causal=causal, lengths=lengths)
    rout, rlse = ref.attention_fwd(q, k, v, causal=causal, lengths=lengths)
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))
    grads = np.full_like(q, 7.0), np.full_like(k, 7.0), np.full_like(v, 7.0)   # written, not added
    attention_backward(dout, q, k, v, out, lse, *grads, backend=backend, causal=causal, lengths=lengths)
    for got, want in zip(grads, ref.attention_bwd(dout, q, k, v, causal=causal, lengths=lengths)):
        close(got, want, dict(rtol=1e-3, atol=1e-4), scale=np.abs(want).max() + 1)
    assert np.all(grads[1][pad] == 0) and np.all(grads[2][pad] == 0)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 11), Hkv=st.integers(1, 3), group=st.integers(1, 3),
       D=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]),
       causal=st.booleans(), padded=st.booleans())
def test_attention_masked(backend, B, T, Hkv, group, D, seed, scale, causal, padded):
    """Bidirectional or causal, full length or right-padded: padding keys hold NaN (never read)
    and get dk = dv = 0 exactly; padding queries are computed like any other."""
    rng = rng_of(seed)
    H = Hkv * group
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D, scale)
    lengths, pad = _padded(rng, B, T) if padded else (None, np.zeros((B, T), bool))
    _check_masked(backend, q, k, v, dout, causal, lengths, pad)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_masked_blocks(backend, causal):
    """Lengths ending inside, at and past the edges of the 64-row (BLAS) and 4-row (Numba) query
    blocks, grouped heads; any integer dtype of lengths is taken."""
    rng = rng_of(12)
    B, T, H, Hkv, D = 4, 150, 4, 2, 4
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D)
    lengths = np.array([150, 1, 77, 64], np.int32)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    _check_masked(backend, q, k, v, dout, causal, lengths, pad)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_cache_offset_with_lengths(backend):
    """Causal after cached positions, each sequence capped by its length: one below the first
    query's position, one inside the queries, one past them (keys beyond are never read)."""
    rng = rng_of(13)
    B, T, H, Hkv, D, past = 3, 5, 4, 2, 6, 7
    q = randn(rng, B, T, H, D)
    k, v = randn(rng, B, past + T + 4, Hkv, D), randn(rng, B, past + T + 4, Hkv, D)
    lengths = np.array([3, past + 2, past + T + 4])
    for b, n in enumerate(lengths):
        k[b, min(n, past + T):] = np.nan
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, past, backend=backend, lengths=lengths)
    rout, rlse = ref.attention_fwd(q, k, v, pos0=past, lengths=lengths)
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("causal, padded", [(False, False), (False, True), (True, True)])
def test_attention_masked_twin_and_torch(causal, padded):
    """The twin against float64 finite differences, and against torch's SDPA (is_causal=False)
    with a boolean attn_mask: the padding, and the causal triangle when causal."""
    rng = rng_of(1)
    B, T, H, Hkv, D = 3, 6, 4, 2, 3
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D)
    lengths = np.array([6, 1, 4]) if padded else None
    loss = lambda q, k, v: float(np.sum(ref.attention_fwd(q, k, v, causal=causal, lengths=lengths)[0] * dout))  # noqa: E731
    grads = ref.attention_bwd(dout, q, k, v, causal=causal, lengths=lengths)
    check_twin_grad(loss, [q, k, v], grads, rng)
    seen = np.ones((B, 1, T, T), bool)                  # True: attend
    if padded:
        seen &= np.arange(T) < lengths[:, None, None, None]
    if causal:
        seen &= np.tril(np.ones((T, T), bool))
    tq, tk, tv = (t64(a, True).transpose(1, 2) for a in (q, k, v))  # (B, H, T, D)
    for t in (tq, tk, tv):
        t.retain_grad()
    y = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(seen),
                                                         is_causal=False, enable_gqa=True)
    y.backward(t64(dout).transpose(1, 2))
    want = ref.attention_fwd(q, k, v, causal=causal, lengths=lengths)[0]
    np.testing.assert_allclose(y.transpose(1, 2).detach().numpy(), want, rtol=1e-10, atol=1e-12)
    for got, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(got, t.grad.transpose(1, 2).numpy(), rtol=1e-9, atol=1e-12)


def test_attention_rejects_bad_arrays():
    """Checked before any kernel (or a BLAS call through a raw pointer) touches the arrays."""
    q = np.zeros((1, 4, 2, 8), np.float32)
    k = np.zeros((1, 4, 1, 8), np.float32)
    lse = np.empty((1, 2, 4), np.float32)
    cases = [((q.astype(np.float64), k, k, np.empty_like(q, np.float64), lse, 0), "float32"),
             ((q, k, k, np.empty_like(q), np.empty((1, 2, 3), np.float32), 0), "lse has shape"),
             ((q, k, k, np.empty_like(q), lse, 1), "need 5 keys"),
             ((q, np.zeros((1, 4, 3, 8), np.float32), np.zeros((1, 4, 3, 8), np.float32),
               np.empty_like(q), lse, 0), "do not fit")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            attention_forward(*args)
    kc = np.zeros((1, 9, 1, 8), np.float32)   # a cache-shaped k: not for training
    with pytest.raises(ValueError, match="no KV cache in training"):
        attention_backward(q, q, kc, kc, q, lse, q.copy(), kc.copy(), kc.copy())
    if JIT:
        with pytest.raises(ValueError, match="C-contiguous"):
            attention_forward(q[:, ::2], k[:, ::2], k[:, ::2], np.empty((1, 2, 2, 8), np.float32),
                              np.empty((1, 2, 2), np.float32), 0, backend="blas")


def test_attention_rejects_bad_lengths_and_flags():
    """lengths and causal checked, with messages that name them, before any kernel writes."""
    q = np.zeros((2, 4, 2, 8), np.float32)
    k = np.zeros((2, 4, 1, 8), np.float32)
    cases = [(dict(lengths=np.array([0, 4])), r"lengths holds 0, expected values in 1\.\.4"),
             (dict(lengths=np.array([4, 5])), r"lengths holds 5, expected values in 1\.\.4"),
             (dict(lengths=np.array([-1, 2]), causal=False), r"lengths holds -1"),
             (dict(lengths=np.array([4, 4, 4])), r"lengths has shape \(3,\), expected \(2,\)"),
             (dict(lengths=np.array([[4, 4]])), r"lengths has shape \(1, 2\), expected \(2,\)"),
             (dict(lengths=np.array([4.0, 4.0])), "lengths has dtype float64, expected an integer dtype"),
             (dict(lengths=np.array([True, True])), "lengths has dtype bool"),
             (dict(lengths=[4, 4]), "lengths must be a numpy array, got list"),
             (dict(causal=1), "causal must be a bool, got int"),
             (dict(causal=None), "causal must be a bool, got NoneType")]
    for kw, msg in cases:
        out, lse = np.full_like(q, 7.0), np.full((2, 2, 4), 7.0, np.float32)
        with pytest.raises(ValueError, match="attention_forward: " + msg):
            attention_forward(q, k, k, out, lse, 0, **kw)
        assert np.all(out == 7) and np.all(lse == 7)
        dq, dk = np.full_like(q, 7.0), np.full_like(k, 7.0)
        with pytest.raises(ValueError, match="attention_backward: " + msg):
            attention_backward(q, q, k, k, q, lse, dq, dk, dk.copy(), **kw)
        assert np.all(dq == 7) and np.all(dk == 7)
    kc = np.zeros((2, 9, 1, 8), np.float32)
    with pytest.raises(ValueError, match="pos0 is 2, expected 0 with causal=False"):
        attention_forward(q, kc, kc, np.empty_like(q), np.empty((2, 2, 4), np.float32), 2, causal=False)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("causal, padded, T", [(True, False, 9), (False, True, 9), (True, True, 150),
                                               (False, False, 150)])
def test_attention_dropout(backend, causal, padded, T):
    """Dropout of the probabilities: output, log-sum-exp (the whole softmax's) and gradients
    against the twin with the same mask; T = 150 crosses the 64-row and 4-row query blocks."""
    rng = rng_of(21)
    B, H, Hkv, D, p, key = 3, 4, 2, 5, 0.3, 987654321
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D)
    lengths = np.array([T, 1, T // 2 + 1]) if padded else None
    out, lse = np.empty_like(q), np.empty((B, H, T), np.float32)
    attention_forward(q, k, v, out, lse, 0, backend=backend, causal=causal, lengths=lengths,
                      dropout=p, key=key)
    rout, rlse = ref.attention_fwd(q, k, v, causal=causal, lengths=lengths, drop=(p, key))
    close(out, rout, dict(rtol=1e-4, atol=1e-5))
    close(lse, rlse, dict(rtol=1e-5, atol=1e-5))
    plain = np.empty_like(q)
    attention_forward(q, k, v, plain, lse, 0, backend=backend, causal=causal, lengths=lengths)
    assert not np.allclose(plain, out, atol=1e-3)          # the mask did something
    grads = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    attention_backward(dout, q, k, v, out, lse, *grads, backend=backend, causal=causal,
                       lengths=lengths, dropout=p, key=key)
    want = ref.attention_bwd(dout, q, k, v, causal=causal, lengths=lengths, drop=(p, key))
    for got, w in zip(grads, want):
        close(got, w, dict(rtol=1e-3, atol=1e-4), scale=np.abs(w).max() + 1)


def test_attention_dropout_twin_and_torch():
    """The twin's dropout against float64 finite differences (the mask is fixed by its key) and
    against torch autograd through softmax, the same mask as a constant, and the product."""
    rng = rng_of(2)
    B, T, H, Hkv, D, p, key = 2, 7, 4, 2, 3, 0.4, 31337
    q, k, v, dout = _attn_inputs(rng, B, T, H, Hkv, D)
    lengths = np.array([7, 3])
    loss = lambda q, k, v: float(np.sum(ref.attention_fwd(q, k, v, lengths=lengths, drop=(p, key))[0] * dout))  # noqa: E731
    grads = ref.attention_bwd(dout, q, k, v, lengths=lengths, drop=(p, key))
    check_twin_grad(loss, [q, k, v], grads, rng)
    seen = torch.tensor(np.tril(np.ones((T, T), bool)) & (np.arange(T) < lengths[:, None, None, None]))
    mask = torch.tensor(ref.dropout_mask(B * H * T, T, p, key).reshape(B, H, T, T) / (1 - p))
    tq, tk, tv = (t64(a, True) for a in (q, k, v))
    ke, ve = (t.repeat_interleave(H // Hkv, dim=2) for t in (tk, tv))
    s = torch.einsum("bihd,bjhd->bhij", tq, ke) / math.sqrt(D)
    probs = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
    y = torch.einsum("bhij,bjhd->bihd", probs * mask, ve)
    y.backward(t64(dout))
    np.testing.assert_allclose(y.detach().numpy(), ref.attention_fwd(q, k, v, lengths=lengths,
                                                                     drop=(p, key))[0], rtol=1e-10, atol=1e-12)
    for got, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_attention_rejects_bad_dropout():
    q = np.zeros((1, 4, 2, 8), np.float32)
    lse = np.zeros((1, 2, 4), np.float32)
    for kw, msg in [(dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
                    (dict(dropout=-0.1), "dropout must be a number"),
                    (dict(dropout=0.1, key=-1), r"key must be an integer in \[0, 2\*\*32\)"),
                    (dict(dropout=0.1, key=1.5), "key must be an integer")]:
        out = np.full_like(q, 7.0)
        with pytest.raises(ValueError, match="attention_forward: " + msg):
            attention_forward(q, q, q, out, lse, 0, **kw)
        assert np.all(out == 7)
        with pytest.raises(ValueError, match="attention_backward: " + msg):
            attention_backward(q, q, q, q, q, lse, out, q.copy(), q.copy(), **kw)


# ---- dropout --------------------------------------------------------------------------------
@SETTINGS
@given(rows=st.integers(1, 40), C=st.integers(1, 70), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       key=st.integers(0, 2**32 - 1), big=st.booleans())
def test_dropout_matches_twin(rows, C, p, key, big):
    """The kernel against the twin: the same mask, element for element, and the kept values
    scaled (big: many rows, across the threads); backward is the same scaled mask; p = 0
    changes nothing."""
    rng = rng_of(key % 1000)
    shape = (rows * (64 if big and JIT else 1), 8, C) if big else (rows, C)
    x = randn(rng, *shape)
    y = x.copy()
    dropout_forward(y, p, key)
    want = ref.dropout_fwd(x, p, key)
    np.testing.assert_array_equal(y != 0, want != 0)
    close(y, want, FWD_TOL)
    if p == 0:
        np.testing.assert_array_equal(y, x)
    g = x.copy()
    dropout_backward(g, p, key)
    np.testing.assert_array_equal(g, y)


def test_dropout_of_some_rows_takes_their_own_masks():
    """rows=: a layer run on some positions only drops out as it would with all of them."""
    rng = rng_of(3)
    x = randn(rng, 50, 17)
    full = x.copy()
    dropout_forward(full, 0.4, 99)
    rows = np.array([3, 0, 49, 17], np.int64)
    part = x[rows].copy()
    dropout_forward(part, 0.4, 99, rows)
    np.testing.assert_array_equal(part, full[rows])
    dropout_backward(part, 0.4, 99, rows)
    assert np.all((part != 0) == (full[rows] != 0))
    for bad, msg in [(rows[:3], r"rows must be an int64 array of shape \(4,\)"),
                     (rows.astype(np.int32), "rows must be an int64 array"),
                     (np.array([1, -2, 3, 4], np.int64), "rows holds -2")]:
        with pytest.raises(ValueError, match="dropout_forward: " + msg):
            dropout_forward(part, 0.4, 99, bad)


def test_dropout_keeps_the_expected_share_independently():
    """Over a million elements the kept share is 1 - p within 5 standard errors, the same in
    every row and column on average, and neighbouring rows, columns and keys are uncorrelated
    (a hash that repeated a row or shifted it would show here)."""
    p, n_rows, C = 0.1, 1024, 1024
    keep = ref.dropout_mask(n_rows, C, p, 4242).astype(np.float64)
    x = np.ones((n_rows, C), np.float32)
    dropout_forward(x, p, 4242)
    np.testing.assert_array_equal(x != 0, keep.astype(bool))
    se = math.sqrt(p * (1 - p) / keep.size)
    assert abs(keep.mean() - (1 - p)) < 5 * se
    assert abs(keep.mean(0).std() - math.sqrt(p * (1 - p) / n_rows)) < 0.2 * math.sqrt(p * (1 - p) / n_rows)
    other = ref.dropout_mask(n_rows, C, p, 4243).astype(np.float64)
    for a, b in [(keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1]), (keep, other),
                 (keep[1:, 1:], keep[:-1, :-1])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01


def test_dropout_rejects_bad_arguments():
    x = np.ones((3, 4), np.float32)
    for args, msg in [((x, 1.0, 0), r"dropout_forward: p must be a number in \[0, 1\)"),
                      ((x, float("nan"), 0), "p must be a number"),
                      ((x, 0.1, 2**32), r"key must be an integer in \[0, 2\*\*32\)"),
                      ((x.astype(np.float64), 0.1, 0), "x has dtype float64"),
                      ((x[:, ::2], 0.1, 0), "not C-contiguous")]:
        with pytest.raises(ValueError, match=msg):
            dropout_forward(*args)
    with pytest.raises(ValueError, match="dropout_backward: p must be"):
        dropout_backward(x, 1.5, 0)
    assert np.all(x == 1)
    frozen = np.ones((3, 4), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="dropout_forward: x is read-only"):
        dropout_forward(frozen, 0.1, 0)
    empty = np.ones((5, 0), np.float32)                # no columns: five rows of nothing
    dropout_forward(empty, 0.1, 0, np.arange(5, dtype=np.int64))


def test_attention_without_openblas_says_it_runs_the_slower_path(monkeypatch, capsys):
    """numpy on MKL or Accelerate has no ILP64 OpenBLAS: attention falls back to its Numba path,
    gives the same result, and says so once (not under NUMBA_DISABLE_JIT, where it always does)."""
    import kernels.attention as A
    monkeypatch.setattr(A, "SGEMM", 0)
    monkeypatch.setattr(A, "_told", False)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 2, 8), dtype=np.float32) for _ in range(3))
    outs = []
    for _ in range(2):
        out, lse = np.empty_like(q), np.empty((1, 2, 8), np.float32)
        attention_forward(q, k, v, out, lse, 0)
        outs.append(out)
    want = ref.attention_fwd(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))[0]
    np.testing.assert_allclose(outs[0], want, rtol=1e-4, atol=1e-5)
    err = capsys.readouterr().err
    assert err.count("attention runs its Numba path") == (1 if JIT else 0)


def test_blas_sgemm_from_numba():
    """The intrinsic calls numpy's cblas_sgemm with every transpose and strided leading dims."""
    if not JIT:   # plain Python cannot run the intrinsic: asking for the BLAS path says why
        q = np.zeros((1, 2, 1, 4), np.float32)
        with pytest.raises(RuntimeError, match="NUMBA_DISABLE_JIT"):
            attention_forward(q, q, q, np.empty_like(q), np.empty((1, 1, 2), np.float32), 0, backend="blas")
        return
    assert SGEMM, "numpy's OpenBLAS (ILP64 cblas_sgemm) not found: attention runs its fallback"
    from kernels.jit import jit

    @jit
    def run(addr, ta, tb, a, b, c, alpha, beta):
        m, n = c.shape[0], c.shape[1] - 3           # c has 3 spare columns: ldc > n
        k = a.shape[1] - 2 if ta == NOTRANS else a.shape[0]
        sgemm(addr, ta, tb, m, n, k, alpha, a.ctypes.data, a.shape[1], b.ctypes.data,
              b.shape[1], beta, c.ctypes.data, c.shape[1])

    rng = rng_of(5)
    m, n, k = 5, 7, 9
    for ta in (NOTRANS, TRANS):
        for tb in (NOTRANS, TRANS):
            a = randn(rng, m, k + 2) if ta == NOTRANS else randn(rng, k, m)   # spare columns: lda > k
            b = randn(rng, k, n + 1) if tb == NOTRANS else randn(rng, n, k + 4)   # ldb > width
            c = randn(rng, m, n + 3)
            opa = a[:, :k] if ta == NOTRANS else a.T
            opb = b[:, :n] if tb == NOTRANS else b[:, :k].T
            want = c.astype(np.float64)
            want[:, :n] = 0.5 * opa.astype(np.float64) @ opb + 2.0 * want[:, :n]
            run(SGEMM, ta, tb, a, b, c, np.float32(0.5), np.float32(2.0))
            close(c, want, FWD_TOL)


@SETTINGS
@given(N=st.integers(1, 40), M=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_bias_add(N, M, seed):
    rng = rng_of(seed)
    y, b = randn(rng, N, M), randn(rng, M)
    want = y.astype(np.float64) + b
    bias_add(y, b)
    close(y, want, FWD_TOL)


# ---- embedding ------------------------------------------------------------------------------
@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 7), V=st.integers(1, 9), C=st.integers(1, 130),
       seed=st.integers(0, 2**16), pos=st.booleans())
def test_embedding(B, T, V, C, seed, pos):
    rng = rng_of(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int64)   # repeats: scatter-add must sum them
    wte, wpe, dout = randn(rng, V, C), randn(rng, T + 2, C), randn(rng, B, T, C)
    out = np.empty((B, T, C), np.float32)
    embedding_forward(tokens, wte, wpe if pos else np.zeros((0, C), np.float32), 1 if pos else 0, out)
    close(out, ref.embedding_fwd(tokens, wte, wpe if pos else None, 1), FWD_TOL)
    dwte, dwpe = np.ones_like(wte), np.ones_like(wpe)
    embedding_backward(dout, tokens, dwte, dwpe if pos else None, 1 if pos else 0)
    rwte, rwpe = ref.embedding_bwd(dout, tokens, V, T + 2 if pos else None, 1)
    close(dwte - 1, rwte, GRAD_TOL)
    if pos:
        close(dwpe - 1, rwpe, GRAD_TOL)
    else:
        assert np.all(dwpe == 1)


def test_embedding_twin_and_torch():
    rng = rng_of(0)
    tokens = np.array([[1, 3, 1], [0, 3, 3]])
    wte, dout = randn(rng, 4, 5), randn(rng, 2, 3, 5)
    check_twin_grad(lambda w: float(np.sum(ref.embedding_fwd(tokens, w) * dout)), [wte],
                    [ref.embedding_bwd(dout, tokens, 4)[0]], rng)
    tw = t64(wte, True)
    y = torch.nn.functional.embedding(torch.tensor(tokens), tw)
    y.backward(t64(dout))
    np.testing.assert_allclose(ref.embedding_bwd(dout, tokens, 4)[0], tw.grad.numpy(), rtol=1e-12)
    # padding_idx: the row takes nothing from the lookup, as nn.Embedding(padding_idx=3)
    tw = t64(wte, True)
    torch.nn.functional.embedding(torch.tensor(tokens), tw, padding_idx=3).backward(t64(dout))
    np.testing.assert_allclose(ref.embedding_bwd(dout, tokens, 4, padding_idx=3)[0],
                               tw.grad.numpy(), rtol=1e-12)
    dwte = np.zeros_like(wte)
    embedding_backward(dout, tokens, dwte, padding_idx=3)
    close(dwte, ref.embedding_bwd(dout, tokens, 4, padding_idx=3)[0], GRAD_TOL)


# ---- cross-entropy --------------------------------------------------------------------------
@SETTINGS
@given(R=st.integers(1, 7), V=st.integers(1, 300), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 100.0, 1e4]))
def test_crossentropy(R, V, seed, scale):
    rng = rng_of(seed)
    logits = randn(rng, R, V, scale=scale)
    targets = rng.integers(0, V, R).astype(np.int64)
    targets[rng.random(R) < 0.3] = -100
    losses, lse = np.empty(R, np.float32), np.empty(R, np.float32)
    crossentropy_forward(logits, targets, losses, lse)
    rloss, rlse = ref.crossentropy_fwd(logits, targets)
    tol = dict(rtol=1e-5, atol=1e-5)
    close(losses, rloss, tol, scale=scale)
    close(lse, rlse, tol, scale=scale)
    g = logits.copy()
    losses2, lse2 = np.empty(R, np.float32), np.empty(R, np.float32)
    crossentropy_forward_backward(g, targets, losses2, lse2, 0.25)
    close(losses2, rloss, tol, scale=scale)
    close(g, ref.crossentropy_bwd(logits, targets, 0.25), dict(rtol=1e-4, atol=1e-6))


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_crossentropy_keeps_precision_when_logits_share_a_large_offset(offset):
    """The loss is a difference of the log-sum-exp and the target's logit: with every logit near
    1e4 that difference must be formed before adding the offset back, or float32 keeps ~1e-3 of
    it. Against float64, as close as torch's float32 (~1e-5)."""
    rng = rng_of(1)
    logits = (randn(rng, 16, 1000, scale=3) + np.float32(offset)).astype(np.float32)
    targets = rng.integers(0, 1000, 16)
    rloss, _ = ref.crossentropy_fwd(logits.astype(np.float64), targets)
    for fn in (crossentropy_forward, lambda x, *a: crossentropy_forward_backward(x.copy(), *a, 1.0)):
        losses, lse = np.empty(16, np.float32), np.empty(16, np.float32)
        fn(logits, targets, losses, lse)
        assert np.abs(losses - rloss).max() < 3e-5


def test_crossentropy_twin_and_torch():
    rng = rng_of(0)
    logits = randn(rng, 5, 17, scale=3)
    targets = np.array([3, -100, 0, 16, 5])
    check_twin_grad(lambda x: float(ref.crossentropy_fwd(x, targets)[0].sum() / 4), [logits],
                    [ref.crossentropy_bwd(logits, targets, 0.25)], rng)
    tx = t64(logits, True)
    loss = torch.nn.functional.cross_entropy(tx, torch.tensor(targets), ignore_index=-100)
    loss.backward()
    np.testing.assert_allclose(ref.crossentropy_fwd(logits, targets)[0].sum() / 4, loss.item(), rtol=1e-12)
    np.testing.assert_allclose(ref.crossentropy_bwd(logits, targets, 0.25), tx.grad.numpy(), rtol=1e-10, atol=1e-15)


# ---- AdamW ----------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 100), t=st.integers(1, 5), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_adamw(n, t, wd, seed):
    rng = rng_of(seed)
    p, g = randn(rng, n), randn(rng, n)
    m, v = randn(rng, n, scale=0.1), np.abs(randn(rng, n, scale=0.1))
    # where eps shows: 0 / (0 + eps) (a missing eps gives NaN), and sqrt(v_hat) ~ 1e-7, where
    # eps is ~10% of the denominator (eps left out, moved inside the sqrt or 1e4x too big fail)
    zero, tiny = slice(0, None, 3), slice(1, None, 3)
    g[zero] = m[zero] = v[zero] = 0
    g[tiny] *= np.float32(1e-6)
    m[tiny] = v[tiny] = 0
    want = ref.adamw(p, g, m, v, 1e-2, 0.9, 0.99, 1e-8, wd, t)
    adamw_step(p, g, m, v, 1e-2, 0.9, 0.99, 1e-8, wd, t)
    for got, w in zip((p, m, v), want):
        close(got, w, dict(rtol=1e-5, atol=1e-6))


def test_adamw_twin_matches_torch():
    rng = rng_of(0)
    p, g = randn(rng, 10), randn(rng, 10)
    tp = torch.nn.Parameter(torch.tensor(p, dtype=torch.float64))
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    tp.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    want, _, _ = ref.adamw(p, g, np.zeros(10), np.zeros(10), 1e-2, 0.9, 0.99, 1e-8, 0.1, 1)
    np.testing.assert_allclose(tp.detach().numpy(), want, rtol=1e-12)


# ---- SGD ------------------------------------------------------------------------------------
@SETTINGS
@given(n=st.sampled_from([1, 7, 16384, 16385, 40000]), momentum=st.sampled_from([0.0, 0.9]),
       wd=st.sampled_from([0.0, 0.01]), nesterov=st.booleans(), started=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sgd(n, momentum, wd, nesterov, started, seed):
    nesterov = nesterov and momentum > 0
    rng = rng_of(seed)
    p, g, buf = randn(rng, n), randn(rng, n), randn(rng, n)
    want_p, want_buf = ref.sgd(p, g, buf, 0.05, momentum, wd, nesterov, started)
    before = buf.copy()
    sgd_step(p, g, buf, 0.05, momentum, wd, nesterov, started)
    close(p, want_p, dict(rtol=1e-6, atol=1e-7))
    if momentum:
        close(buf, want_buf, dict(rtol=1e-6, atol=1e-7))
    else:   # no buffer without momentum: not touched
        assert np.array_equal(buf, before)


def test_sgd_without_decay_leaves_an_infinite_weight_finite_steps():
    """torch adds no decay term when weight_decay is 0: 0 * inf would make the weight NaN."""
    p, g = np.array([np.inf, 1.0], np.float32), np.array([0.5, 0.5], np.float32)
    sgd_step(p, g, g.copy(), 0.1)
    assert p[0] == np.inf and p[1] == np.float32(1.0) - np.float32(0.1) * np.float32(0.5)


@pytest.mark.parametrize("momentum, wd, nesterov", [(0.0, 0.0, False), (0.9, 0.01, False),
                                                    (0.9, 0.01, True)])
def test_sgd_twin_matches_torch(momentum, wd, nesterov):
    rng = rng_of(1)
    p = randn(rng, 10)
    tp = torch.nn.Parameter(torch.tensor(p, dtype=torch.float64))
    opt = torch.optim.SGD([tp], lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    want, buf = p.astype(np.float64), np.zeros(10)
    for step in range(3):
        g = randn(rng, 10)
        tp.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        want, buf = ref.sgd(want, g, buf, 0.05, momentum, wd, nesterov, step > 0)
    np.testing.assert_allclose(tp.detach().numpy(), want, rtol=1e-12)


@SETTINGS
@given(n=st.sampled_from([0, 1, 7, 65535, 65536, 65537, 200001]), seed=st.integers(0, 2**16),
       with_before=st.booleans())
def test_param_sums(n, seed, with_before):
    rng = rng_of(seed)
    p, w0, g, before = (randn(rng, n, scale=s) for s in (1.0, 1.0, 1e3, 1.0))
    b = before if with_before else None
    np.testing.assert_allclose(param_sums(p, w0, g, b), ref.param_sums(p, w0, g, b), rtol=1e-10, atol=1e-12)
    assert sum_sq(g) == pytest.approx(float((g.astype(np.float64) ** 2).sum()), rel=1e-10, abs=1e-12)


def test_openblas_runs_one_thread_inside_the_engine_and_the_hosts_setting_after(monkeypatch):
    """The engine splits GEMMs over its own threads with OpenBLAS at one thread; the host's
    numpy gets its own thread count back after every engine call (a library must not leave
    the process's numpy single-threaded)."""
    assert blas_mod._thread_controls(), "numpy is not linked to OpenBLAS here: nothing to test"
    from conftest import small_model
    from kernels import matmul
    set_fn, get_fn = blas_mod._thread_controls()[0]
    before = get_fn()
    set_fn(3)
    seen = []
    part = matmul._blas_part
    monkeypatch.setattr(matmul, "_blas_part", lambda *a: (seen.append(get_fn()), part(*a)))
    try:
        m = small_model("llama", n_layer=2).train_last(1)
        rng = rng_of(0)
        m.forward(rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8)))
        assert get_fn() == 3
        m.backward()
        engine.generate(m, [1, 2, 3], max_new_tokens=2)
        assert get_fn() == 3
        assert seen and set(seen) == {1}
    finally:
        set_fn(before)
