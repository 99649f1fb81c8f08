"""The public kernel functions check their arguments before any compiled code touches them.

Each bad call here used to crash the process (SIGSEGV, SIGBUS, heap corruption), read or write
out of bounds silently, fall back to another backend, or JIT-compile a float64 version; now it
raises a ValueError naming the function, the argument and what was expected. Because the check
runs before the kernel, these cases are safe to run in-process.

The second half: valid calls still work, including the cases the checks must not refuse (other
integer dtypes for ids, ignored targets, strided GEMM operands, a rope table longer than T, ...),
compared with the naive twins of tests/reference.py. tests/test_kernels.py has the thorough
numerical tests of every kernel.
"""
import re

import numpy as np
import pytest

import reference as ref
from kernels.activation import gelu_backward, gelu_forward, swiglu_backward, swiglu_forward
from kernels.adamw import adamw_step
from kernels.attention import attention_backward, attention_forward
from kernels.bias import bias_add
from kernels.embedding import embedding_backward, embedding_forward
from kernels.loss import IGNORE, crossentropy_forward, crossentropy_forward_backward
from kernels.matmul import gemm_nn, gemm_nt, gemm_tn
from kernels.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from kernels.rope import rope_backward, rope_forward, rope_table
from kernels.stats import param_sums

TOL = dict(rtol=1e-4, atol=1e-5)


def f32(*s):
    return np.zeros(s, np.float32)


def r32(*s, seed=0):
    return np.random.default_rng(seed).standard_normal(s).astype(np.float32)


def f64(*s):
    return np.zeros(s)


def ids(*values, dtype=np.int64):
    return np.array(values, dtype)


F64 = "has dtype float64, expected float32"

# (id, call, expected message fragment); each call must raise ValueError containing the fragment
BAD = [
    # ---- cross-entropy: out-of-range and short targets used to SIGSEGV / SIGBUS
    ("ce target >= V", lambda: crossentropy_forward(r32(4, 10), ids(0, 1, 2, 10**9), f32(4), f32(4)),
     "crossentropy_forward: targets holds 1000000000, expected values in [0, 10) or -100"),
    ("ce fb target >= V", lambda: crossentropy_forward_backward(r32(4, 10), ids(0, 1, 2, 10), f32(4), f32(4), 1.0),
     "crossentropy_forward_backward: targets holds 10, expected values in [0, 10) or -100"),
    ("ce target negative, not ignore", lambda: crossentropy_forward(r32(4, 10), ids(0, -100, -1, 3), f32(4), f32(4)),
     "crossentropy_forward: targets holds -1, expected values in [0, 10) or -100"),
    ("ce target below ignore", lambda: crossentropy_forward(r32(4, 10), ids(0, -101, 2, 3), f32(4), f32(4)),
     "targets holds -101"),
    ("ce targets short", lambda: crossentropy_forward(r32(4, 10), ids(0, 1), f32(4), f32(4)),
     "crossentropy_forward: targets has shape (2,), expected (4,)"),
    ("ce fb targets short", lambda: crossentropy_forward_backward(r32(4, 10), ids(0, 1), f32(4), f32(4), 1.0),
     "crossentropy_forward_backward: targets has shape (2,), expected (4,)"),
    ("ce targets float", lambda: crossentropy_forward(r32(4, 10), np.zeros(4), f32(4), f32(4)),
     "crossentropy_forward: targets has dtype float64, expected an integer dtype"),
    ("ce losses short", lambda: crossentropy_forward(r32(4, 10), ids(0, 1, 2, 3), f32(3), f32(4)),
     "crossentropy_forward: losses has shape (3,), expected (4,)"),
    ("ce V = 0", lambda: crossentropy_forward(f32(2, 0), ids(IGNORE, IGNORE), f32(2), f32(2)),
     "crossentropy_forward: logits has shape (2, 0), expected (R, V) with V >= 1"),
    ("ce f64", lambda: crossentropy_forward(f64(4, 10), ids(0, 1, 2, 3), f32(4), f32(4)),
     "crossentropy_forward: logits " + F64),
    ("ce fb f64 lse", lambda: crossentropy_forward_backward(r32(4, 10), ids(0, 1, 2, 3), f32(4), f64(4), 1.0),
     "crossentropy_forward_backward: lse " + F64),
    # ---- embedding: out-of-range token used to SIGSEGV
    ("emb token >= V", lambda: embedding_forward(ids(0, 10**9).reshape(1, 2), r32(10, 8), f32(0, 8), 0, f32(1, 2, 8)),
     "embedding_forward: tokens holds 1000000000, expected values in [0, 10)"),
    ("emb token negative", lambda: embedding_forward(ids(0, -100).reshape(1, 2), r32(10, 8), f32(0, 8), 0, f32(1, 2, 8)),
     "embedding_forward: tokens holds -100, expected values in [0, 10)"),
    ("emb tokens float", lambda: embedding_forward(np.array([[0.0, 1.0]]), r32(10, 8), f32(0, 8), 0, f32(1, 2, 8)),
     "embedding_forward: tokens has dtype float64, expected an integer dtype"),
    ("emb tokens 1-D", lambda: embedding_forward(ids(0, 1), r32(10, 8), f32(0, 8), 0, f32(1, 2, 8)),
     "embedding_forward: tokens has shape (2,), expected (B, T)"),
    ("emb f64", lambda: embedding_forward(ids(0, 1).reshape(1, 2), f64(10, 8), f32(0, 8), 0, f32(1, 2, 8)),
     "embedding_forward: wte " + F64),
    ("emb out wrong", lambda: embedding_forward(ids(0, 1).reshape(1, 2), r32(10, 8), f32(0, 8), 0, f32(1, 2, 4)),
     "embedding_forward: out has shape (1, 2, 4), expected (1, 2, 8)"),
    ("emb wpe short for pos0 + T", lambda: embedding_forward(ids(0, 1).reshape(1, 2), r32(10, 8), r32(4, 8), 3, f32(1, 2, 8)),
     "embedding_forward: wpe has shape (4, 8), expected (P, 8) with P = 0 or P >= pos0 + T = 5"),
    ("emb wpe width", lambda: embedding_forward(ids(0, 1).reshape(1, 2), r32(10, 8), r32(4, 7), 0, f32(1, 2, 8)),
     "embedding_forward: wpe has shape (4, 7), expected (P, 8)"),
    ("emb pos0 negative", lambda: embedding_forward(ids(0, 1).reshape(1, 2), r32(10, 8), r32(4, 8), -1, f32(1, 2, 8)),
     "embedding_forward: pos0 is -1, expected >= 0"),
    ("emb bwd token >= V", lambda: embedding_backward(f32(1, 2, 8), ids(0, 10).reshape(1, 2), f32(10, 8)),
     "embedding_backward: tokens holds 10, expected values in [0, 10)"),
    ("emb bwd dwpe short", lambda: embedding_backward(f32(1, 2, 8), ids(0, 1).reshape(1, 2), None, f32(2, 8), 1),
     "embedding_backward: dwpe has shape (2, 8), expected (P, 8) with P = 0 or P >= pos0 + T = 3"),
    ("emb bwd tokens shape", lambda: embedding_backward(f32(1, 2, 8), ids(0, 1, 2).reshape(1, 3), f32(10, 8)),
     "embedding_backward: tokens has shape (1, 3), expected (1, 2)"),
    # ---- activations: out smaller than x used to corrupt the heap
    ("gelu size mismatch", lambda: gelu_forward(r32(8), f32(4)),
     "gelu_forward: out has shape (4,), expected (8,)"),
    ("gelu same size, other shape", lambda: gelu_forward(r32(2, 4), f32(4, 2)),
     "gelu_forward: out has shape (4, 2), expected (2, 4)"),
    ("gelu f64", lambda: gelu_forward(f64(8), f64(8)), "gelu_forward: x " + F64),
    ("gelu bwd mismatch", lambda: gelu_backward(r32(4), r32(8), f32(8)),
     "gelu_backward: dout has shape (4,), expected (8,)"),
    ("gelu not contiguous", lambda: gelu_forward(r32(4, 8)[:, ::2], f32(4, 4)),
     "gelu_forward: x (shape (4, 4), strides (32, 8)) is not C-contiguous"),
    ("swiglu mismatch", lambda: swiglu_forward(r32(8), r32(4), f32(8)),
     "swiglu_forward: up has shape (4,), expected (8,)"),
    ("swiglu bwd mismatch", lambda: swiglu_backward(r32(8), r32(8), r32(8), f32(8), f32(7)),
     "swiglu_backward: dup has shape (7,), expected (8,)"),
    # ---- GEMM
    ("gemm_nt K mismatch numba", lambda: gemm_nt(r32(4, 8), r32(5, 7), f32(4, 5), backend="numba"),
     "gemm_nt: b has shape (5, 7), expected (N, K) with K = 8 (a has shape (4, 8), (M, K))"),
    ("gemm_nt K mismatch blas", lambda: gemm_nt(r32(4, 8), r32(5, 7), f32(4, 5)),
     "gemm_nt: b has shape (5, 7), expected (N, K) with K = 8"),
    ("gemm_nn K mismatch numba", lambda: gemm_nn(r32(4, 8), r32(7, 5), f32(4, 5), backend="numba"),
     "gemm_nn: b has shape (7, 5), expected (K, N) with K = 8 (a has shape (4, 8), (M, K))"),
    ("gemm_tn K mismatch numba", lambda: gemm_tn(r32(8, 4), r32(7, 5), f32(4, 5), backend="numba"),
     "gemm_tn: b has shape (7, 5), expected (K, N) with K = 8 (a has shape (8, 4), (K, M))"),
    ("gemm_nt bad backend", lambda: gemm_nt(r32(4, 8), r32(5, 8), f32(4, 5), backend="cuda"),
     "gemm_nt: unknown backend 'cuda', expected one of ('blas', 'numba')"),
    ("gemm_nt 1-D a", lambda: gemm_nt(r32(8), r32(5, 8), f32(8, 5)),
     "gemm_nt: a has shape (8,), expected (M, K)"),
    ("gemm_nn 3-D b", lambda: gemm_nn(r32(4, 8), r32(8, 5, 1), f32(4, 5)),
     "gemm_nn: b has shape (8, 5, 1), expected (K, N)"),
    ("gemm_nt out wrong", lambda: gemm_nt(r32(4, 8), r32(5, 8), f32(5, 4)),
     "gemm_nt: out has shape (5, 4), expected (4, 5)"),
    ("gemm_tn f64", lambda: gemm_tn(f64(8, 4), r32(8, 5), f32(4, 5)), "gemm_tn: a " + F64),
    # ---- norms
    ("layernorm w short", lambda: layernorm_forward(r32(4, 8), np.ones(3, np.float32), f32(8), f32(4, 8), f32(4), f32(4), 1e-5),
     "layernorm_forward: w has shape (3,), expected (8,)"),
    ("layernorm out short", lambda: layernorm_forward(r32(4, 8), np.ones(8, np.float32), f32(8), f32(2, 8), f32(4), f32(4), 1e-5),
     "layernorm_forward: out has shape (2, 8), expected (4, 8)"),
    ("layernorm rstd short", lambda: layernorm_forward(r32(4, 8), np.ones(8, np.float32), f32(8), f32(4, 8), f32(4), f32(3), 1e-5),
     "layernorm_forward: rstd has shape (3,), expected (4,)"),
    ("layernorm 1-D", lambda: layernorm_forward(r32(8), np.ones(8, np.float32), f32(8), f32(8), f32(1), f32(1), 1e-5),
     "layernorm_forward: x has shape (8,), expected (N, C)"),
    ("layernorm f64", lambda: layernorm_forward(f64(4, 8), np.ones(8), f64(8), f64(4, 8), f64(4), f64(4), 1e-5),
     "layernorm_forward: x " + F64),
    ("layernorm x not contiguous", lambda: layernorm_forward(r32(8, 4).T, np.ones(8, np.float32), f32(8), f32(4, 8), f32(4), f32(4), 1e-5),
     "layernorm_forward: x (shape (4, 8), strides (4, 16)) is not C-contiguous"),
    ("layernorm bwd dw short", lambda: layernorm_backward(r32(4, 8), r32(4, 8), r32(8), f32(4), f32(4), f32(4, 8), f32(7), f32(8)),
     "layernorm_backward: dw has shape (7,), expected (8,)"),
    ("layernorm bwd dx short", lambda: layernorm_backward(r32(4, 8), r32(4, 8), r32(8), f32(4), f32(4), f32(3, 8)),
     "layernorm_backward: dx has shape (3, 8), expected (4, 8)"),
    ("rmsnorm f64", lambda: rmsnorm_forward(f64(4, 8), np.ones(8), f64(4, 8), f64(4), 1e-5),
     "rmsnorm_forward: x " + F64),
    ("rmsnorm w short", lambda: rmsnorm_forward(r32(4, 8), np.ones(3, np.float32), f32(4, 8), f32(4), 1e-5),
     "rmsnorm_forward: w has shape (3,), expected (8,)"),
    ("rmsnorm bwd f64 dout", lambda: rmsnorm_backward(f64(4, 8), r32(4, 8), r32(8), f32(4), f32(4, 8)),
     "rmsnorm_backward: dout " + F64),
    # ---- rope
    ("rope odd D", lambda: rope_forward(r32(1, 4, 2, 7), *rope_table(4, 7, 10000.0)),
     "rope_forward: x has shape (1, 4, 2, 7), expected (B, T, H, D) with D even"),
    ("rope table short", lambda: rope_forward(r32(1, 8, 2, 8), *rope_table(2, 8, 10000.0)),
     "rope_forward: cos has shape (2, 4), expected (8, 4) (at least 8 rows: one per position of x)"),
    ("rope table width", lambda: rope_forward(r32(1, 4, 2, 8), *rope_table(4, 6, 10000.0)),
     "rope_forward: cos has shape (4, 3), expected (4, 4)"),
    ("rope bwd table short", lambda: rope_backward(r32(1, 8, 2, 8), *rope_table(2, 8, 10000.0)),
     "rope_backward: cos has shape (2, 4), expected (8, 4)"),
    ("rope 3-D", lambda: rope_forward(r32(4, 2, 8), *rope_table(4, 8, 10000.0)),
     "rope_forward: x has shape (4, 2, 8), expected (B, T, H, D)"),
    # ---- attention (its own _check; pos0 is new)
    ("attn pos0 negative", lambda: attention_forward(r32(1, 4, 2, 8), r32(1, 4, 2, 8), r32(1, 4, 2, 8), f32(1, 4, 2, 8), f32(1, 2, 4), -3),
     "attention_forward: pos0 is -3, expected >= 0"),
    ("attn k not contiguous", lambda: attention_forward(r32(1, 4, 2, 8), r32(1, 8, 2, 8)[:, ::2], r32(1, 4, 2, 8), f32(1, 4, 2, 8), f32(1, 2, 4), 0),
     "attention: k (shape (1, 4, 2, 8), strides (512, 128, 32, 4)) is not C-contiguous"),
    ("attn dq not contiguous", lambda: attention_backward(r32(1, 4, 2, 8), r32(1, 4, 2, 8), r32(1, 4, 2, 8), r32(1, 4, 2, 8), r32(1, 4, 2, 8), f32(1, 2, 4),
                                                           f32(1, 4, 2, 16)[..., ::2], f32(1, 4, 2, 8), f32(1, 4, 2, 8), backend="numba"),
     "attention: dq (shape (1, 4, 2, 8), strides (512, 128, 64, 8)) is not C-contiguous"),
    ("attn pos0 float", lambda: attention_forward(r32(1, 4, 2, 8), r32(1, 4, 2, 8), r32(1, 4, 2, 8), f32(1, 4, 2, 8), f32(1, 2, 4), 0.0),
     "attention_forward: pos0 must be an integer, got float"),
    # ---- optimizer, bias, telemetry
    ("adamw mismatch", lambda: adamw_step(r32(8), r32(4), f32(8), f32(8), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1),
     "adamw_step: g has shape (4,), expected (8,)"),
    ("adamw f64", lambda: adamw_step(f64(8), f64(8), f64(8), f64(8), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1),
     "adamw_step: p " + F64),
    ("adamw f64 state", lambda: adamw_step(r32(8), r32(8), f32(8), f64(8), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1),
     "adamw_step: v " + F64),
    ("adamw step 0", lambda: adamw_step(r32(8), r32(8), f32(8), f32(8), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0),
     "adamw_step: t is 0, expected an integer step >= 1"),
    ("bias_add short", lambda: bias_add(r32(4, 8), r32(3)),
     "bias_add: b has shape (3,), expected (8,)"),
    ("bias_add 1-D y", lambda: bias_add(r32(8), r32(8)),
     "bias_add: y has shape (8,), expected (N, M)"),
    ("bias_add f64", lambda: bias_add(f64(4, 8), r32(8)), "bias_add: y " + F64),
    ("param_sums mismatch", lambda: param_sums(r32(8), r32(8), r32(4)),
     "param_sums: g has shape (4,), expected (8,)"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_checks_leave_arrays_untouched():
    """A refused call writes nothing: the check runs before the kernel."""
    logits = r32(4, 10)
    before = logits.copy()
    with pytest.raises(ValueError):
        crossentropy_forward_backward(logits, ids(0, 1, 2, 10), f32(4), f32(4), 1.0)
    np.testing.assert_array_equal(logits, before)
    y = r32(4, 8)
    with pytest.raises(ValueError):
        bias_add(y, r32(3))
    np.testing.assert_array_equal(y, r32(4, 8))


# ---- valid calls still work -------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "blas", "numba"])
def test_gemm_valid(backend):
    a, b = r32(5, 7), r32(6, 7, seed=1)
    out = f32(5, 6)
    gemm_nt(a, b, out, backend=backend)
    np.testing.assert_allclose(out, ref.gemm(a, b, "nt"), **TOL)
    out = f32(5, 6)
    gemm_nn(a, b.T, out, backend=backend)            # strided b: the check takes any strides
    np.testing.assert_allclose(out, ref.gemm(a, b.T, "nn"), **TOL)
    out = f32(5, 6)
    gemm_tn(a.T.copy(), b.T.copy(), out, backend=backend)
    np.testing.assert_allclose(out, ref.gemm(a.T, b.T, "tn"), **TOL)


def test_gemm_strided_out():
    a, b = r32(5, 7), r32(6, 7, seed=1)
    out = f32(6, 5).T                                 # (5, 6), not C-contiguous
    gemm_nt(a, b, out)
    np.testing.assert_allclose(out, ref.gemm(a, b, "nt"), **TOL)


def test_norms_valid():
    x, w, b = r32(3, 8), r32(8, seed=1), r32(8, seed=2)
    out, mean, rstd = f32(3, 8), f32(3), f32(3)
    layernorm_forward(x, w, b, out, mean, rstd, 1e-5)
    np.testing.assert_allclose(out, ref.layernorm_fwd(x, w, b, 1e-5), **TOL)
    dout, dx, dw = r32(3, 8, seed=3), f32(3, 8), f32(8)
    layernorm_backward(dout, x, w, mean, rstd, dx, dw)            # db not given
    rdx, rdw, _ = ref.layernorm_bwd(dout, x, w, 1e-5)
    np.testing.assert_allclose(dx, rdx, **TOL)
    np.testing.assert_allclose(dw, rdw, **TOL)
    dx = f32(3, 8)
    layernorm_backward(dout, x, w, mean, rstd, dx)                 # neither dw nor db
    np.testing.assert_allclose(dx, rdx, **TOL)
    rmsnorm_forward(x, w, out, rstd, 1e-5)
    np.testing.assert_allclose(out, ref.rmsnorm_fwd(x, w, 1e-5), **TOL)
    dx, dw = f32(3, 8), f32(8)
    rmsnorm_backward(dout, x, w, rstd, dx, dw)
    rdx, rdw = ref.rmsnorm_bwd(dout, x, w, 1e-5)
    np.testing.assert_allclose(dx, rdx, **TOL)
    np.testing.assert_allclose(dw, rdw, **TOL)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_crossentropy_valid_targets(dtype):
    """Targets in [0, V), the ignore value, any integer dtype (converted for the kernel)."""
    logits = r32(5, 10)
    targets = np.array([0, 9, 3, 9, 1] if dtype == np.uint16 else [0, 9, IGNORE, 3, IGNORE], dtype)
    want_loss, want_lse = ref.crossentropy_fwd(logits, targets.astype(np.int64))
    losses, lse = f32(5), f32(5)
    crossentropy_forward(logits, targets, losses, lse)
    np.testing.assert_allclose(losses, want_loss, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)
    g = logits.copy()
    crossentropy_forward_backward(g, targets, losses, lse, 0.5)
    np.testing.assert_allclose(losses, want_loss, **TOL)
    np.testing.assert_allclose(g, ref.crossentropy_bwd(logits, targets.astype(np.int64), 0.5), **TOL)


def test_crossentropy_all_ignored_and_strided_targets():
    logits = r32(3, 4)
    losses, lse = f32(3), f32(3)
    crossentropy_forward_backward(logits, np.full(3, IGNORE), losses, lse, 1.0)
    assert np.all(losses == 0) and np.all(logits == 0)
    logits = r32(3, 4)
    targets = np.array([[1, 0], [IGNORE, 0], [3, 0]])[:, 0]       # not contiguous: copied
    crossentropy_forward(logits, targets, losses, lse)
    np.testing.assert_allclose(losses, ref.crossentropy_fwd(logits, np.array([1, IGNORE, 3]))[0], **TOL)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_embedding_valid(dtype):
    tokens = np.array([[0, 9, 3], [9, 9, 1]], dtype)
    wte, wpe = r32(10, 4), r32(5, 4, seed=1)                   # wpe rows: exactly pos0 + T
    out = f32(2, 3, 4)
    embedding_forward(tokens, wte, wpe, np.int64(2), out)
    np.testing.assert_allclose(out, ref.embedding_fwd(tokens.astype(np.int64), wte, wpe, 2), **TOL)
    embedding_forward(tokens, wte, f32(0, 4), 0, out)          # no position table
    np.testing.assert_allclose(out, ref.embedding_fwd(tokens.astype(np.int64), wte), **TOL)
    dout = r32(2, 3, 4, seed=2)
    dwte, dwpe = f32(10, 4), f32(5, 4)
    embedding_backward(dout, tokens, dwte, dwpe, 2)
    rwte, rwpe = ref.embedding_bwd(dout, tokens.astype(np.int64), 10, 5, 2)
    np.testing.assert_allclose(dwte, rwte, **TOL)
    np.testing.assert_allclose(dwpe, rwpe, **TOL)
    embedding_backward(dout, tokens, None, dwpe, 2)            # position table only: adds
    np.testing.assert_allclose(dwpe, 2 * rwpe, **TOL)
    before = dout.copy()
    embedding_backward(dout, tokens)                            # nothing trainable
    assert np.array_equal(dout, before)


def test_activations_valid():
    x, dout = r32(3, 5), r32(3, 5, seed=1)
    out = f32(3, 5)
    gelu_forward(x, out)
    np.testing.assert_allclose(out, ref.gelu_fwd(x), **TOL)
    dx = f32(3, 5)
    gelu_backward(dout, x, dx)
    np.testing.assert_allclose(dx, ref.gelu_bwd(dout, x), **TOL)
    up = r32(3, 5, seed=2)
    swiglu_forward(x, up, out)
    np.testing.assert_allclose(out, ref.swiglu_fwd(x, up), **TOL)
    dg, du = f32(3, 5), f32(3, 5)
    swiglu_backward(dout, x, up, dg, du)
    rdg, rdu = ref.swiglu_bwd(dout, x, up)
    np.testing.assert_allclose(dg, rdg, **TOL)
    np.testing.assert_allclose(du, rdu, **TOL)


def test_rope_valid_longer_table():
    """A table longer than T is fine: rows 0 .. T - 1 are used."""
    x = r32(1, 3, 2, 8)
    cos, sin = rope_table(10, 8, 10000.0)
    y = x.copy()
    rope_forward(y, cos, sin)
    np.testing.assert_allclose(y, ref.rope_fwd(x, cos[:3], sin[:3]), **TOL)
    rope_backward(y, cos, sin)
    np.testing.assert_allclose(y, x, **TOL)


def test_attention_valid_cache_offset():
    q, k, v = r32(1, 2, 2, 8), r32(1, 6, 1, 8, seed=1), r32(1, 6, 1, 8, seed=2)
    out, lse = f32(1, 2, 2, 8), f32(1, 2, 2)
    attention_forward(q, k, v, out, lse, np.int32(3))            # numpy integer position
    want, want_lse = ref.attention_fwd(q, k, v, 3)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)
    q, k, v, dout = r32(1, 4, 2, 8), r32(1, 4, 1, 8, seed=1), r32(1, 4, 1, 8, seed=2), r32(1, 4, 2, 8, seed=3)
    out, lse = f32(1, 4, 2, 8), f32(1, 2, 4)
    attention_forward(q, k, v, out, lse, 0)
    dq, dk, dv = f32(1, 4, 2, 8), f32(1, 4, 1, 8), f32(1, 4, 1, 8)
    attention_backward(dout, q, k, v, out, lse, dq, dk, dv)
    for got, want in zip((dq, dk, dv), ref.attention_bwd(dout, q, k, v)):
        np.testing.assert_allclose(got, want, **TOL)


def test_adamw_bias_param_sums_valid():
    p, g, m, v = r32(2, 5), r32(2, 5, seed=1), f32(2, 5), f32(2, 5)
    want = ref.adamw(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1)
    adamw_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1)
    for got, w in zip((p, m, v), want):
        np.testing.assert_allclose(got, w, **TOL)
    y, b = r32(3, 4), r32(4, seed=1)
    want = y.astype(np.float64) + b
    bias_add(y, b)
    np.testing.assert_allclose(y, want, **TOL)
    a, c = r32(3, 4), r32(3, 4, seed=1)
    np.testing.assert_allclose(param_sums(a, c, a, c), ref.param_sums(a, c, a, c), rtol=1e-6)


def test_no_writable_place_for_compiled_kernels_names_numba_cache_dir(monkeypatch):
    """A read-only install and home (a service account, a container): instead of Numba's "no
    locator available" at the first kernel, an error that says what to set."""
    import tempfile
    from kernels import jit

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError, match="set NUMBA_CACHE_DIR to a writable directory"):
        jit._check_cache_location()
