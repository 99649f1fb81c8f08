"""Compile every kernel in a child process, once, so that every process runs cached code.

Numba's freshly compiled code and the same code loaded back from its on-disk cache round some
reductions differently (seen here: a cold and a warm process disagreed in the last bits of
attention, cross-entropy and norm gradients). A run started on a cold cache would then not be
reproduced bit for bit by later runs, nor by its own resume. So no process runs fresh code: when
the cache is cold, a child compiles and stores everything by running tiny models through every
path (training, evaluation, generation, every architecture), and the parent then loads it all.
This is also where a first-ever run says that it is compiling instead of looking hung.
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys

from .errors import TailtuneError

_done = False
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout or install


def _stamp() -> str:
    """A file whose existence says: the cache holds every kernel of these sources."""
    import llvmlite
    import numba
    import numpy
    root = _ROOT
    # what the cached code depends on; not the interpreter's path (python, python3 and the
    # console script's python3.11 are one interpreter, and would each compile again)
    versions = (numba.__version__, llvmlite.__version__, numpy.__version__, sys.version)
    h = hashlib.sha256("|".join(versions).encode())
    for pkg in ("kernels", "engine"):
        for path in sorted(glob.glob(os.path.join(root, pkg, "*.py"))):
            with open(path, "rb") as f:
                h.update(f.read())
    cache = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(root, "kernels", "__pycache__")
    # a stamp speaks for one cache: one sent home (below) must not vouch for another, empty one
    h.update(os.path.abspath(cache).encode())
    d = cache
    if not os.access(os.path.dirname(d) if not os.path.exists(d) else d, os.W_OK):
        d = _home_cache()
    return os.path.join(d, f"tailtune-compiled-{h.hexdigest()[:16]}")


def _home_cache() -> str:
    """Where a stamp goes when the install's own folder cannot take it."""
    return os.path.join(os.path.expanduser("~"), ".cache", "tailtune")


def ensure_compiled(quiet: bool = False) -> None:
    """Called before the first kernel runs in a process (Model() does it)."""
    global _done
    if (_done or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
            or os.environ.get("TAILTUNE_WARMUP_CHILD")):
        _done = True
        return
    stamp = _stamp()
    home = os.path.join(_home_cache(), os.path.basename(stamp))   # if its folder refuses it (below)
    if os.path.exists(stamp) or os.path.exists(home):
        _done = True
        return
    if not quiet:
        print("tailtune: compiling kernels (first run after install or upgrade; about a minute)...",
              file=sys.stderr, flush=True)
    # the child must import this same checkout, also when the caller found it through a
    # sys.path insert rather than an install; it runs in _ROOT because `-m` puts the working
    # directory first on sys.path, where a user's own engine/ or kernels/ folder would win
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TAILTUNE_WARMUP_CHILD": "1", "PYTHONPATH": path}
    if env.get("NUMBA_CACHE_DIR"):
        env["NUMBA_CACHE_DIR"] = os.path.abspath(env["NUMBA_CACHE_DIR"])
    r = subprocess.run([sys.executable, "-m", "engine.warmup"], env=env, capture_output=True,
                       text=True, cwd=_ROOT)
    if r.returncode != 0:   # not _done: a caller that frees memory and tries again compiles again
        raise TailtuneError(_failed(r.returncode, r.stdout + r.stderr))
    _done = True
    # a read-only install that os.access called writable (Windows says so of every folder)
    # refuses the stamp: the user's cache takes it, or the next run would compile again
    for place in (stamp, home):
        try:
            os.makedirs(os.path.dirname(place), exist_ok=True)
            with open(place, "w") as f:
                f.write("ok\n")
            break
        except OSError:
            continue
    if not quiet:
        print("tailtune: kernels compiled and cached.", file=sys.stderr, flush=True)


def _failed(returncode: int, output: str) -> str:
    """Why compiling failed, in one message: the child's last lines, or the signal that killed
    it (the out-of-memory killer's SIGKILL leaves no output at all)."""
    if returncode < 0:
        import signal
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = f"the compiling process was killed by {name}" + (
            " (out of memory?)" if -returncode == getattr(signal, "SIGKILL", 9) else "")
    else:
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        why = f"exit status {returncode}" + (": " + " | ".join(lines[-3:]) if lines else "")
    return (f"compiling the kernels failed ({why}); nothing was cached, and the next run "
            "compiles again")


def _exercise() -> None:
    """Run every kernel with the argument types the engine uses."""
    import numpy as np

    from kernels import matmul, stats
    from .config import Config
    from .generate import generate
    from .model import Model
    from .optim import AdamW, SGD, clip_grad_norm
    rng = np.random.default_rng(0)
    for cfg in (Config.gpt2(vocab_size=61, n_layer=2, n_head=2, d_model=16, max_seq_len=16),
                Config.llama(vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                             max_seq_len=16, tie_embeddings=True),
                Config.llama(vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                             max_seq_len=16)):
        m = Model(cfg)
        x = rng.integers(0, 61, (2, 9))
        y = rng.integers(0, 61, (2, 9))
        y[0, :2] = -100
        opt = AdamW(m, lr=1e-3, weight_decay=0.1)
        for pattern in (None, "last"):
            if pattern == "last":
                m.train_last(1)
                m.set_dropout(0.1)
            m.zero_grad()
            m.forward(x, y)
            m.backward()
            clip_grad_norm(m, 1.0)
            opt.step()
        SGD(m, lr=0.1, momentum=0.9).step()
        m.forward(x)
        m.forward(x, y, grad=False)
        generate(m, [1, 2, 3], max_new_tokens=3)
    # an encoder: bidirectional attention over padded rows, the exact GELU, the classifier
    m = Model(Config.bert(vocab_size=61, n_layer=2, n_head=2, d_model=16, d_ff=24,
                          max_seq_len=16, labels=["a", "b"]))
    x = rng.integers(0, 61, (2, 9))
    for pattern in (None, "last"):
        if pattern == "last":
            m.train_last(1)
        m.forward(x, np.array([0, 1]), lengths=np.array([9, 4]))
        m.backward()
    m.forward(x)
    a = rng.standard_normal((5, 7), dtype=np.float32)
    for fn in (matmul.gemm_nt, matmul.gemm_nn, matmul.gemm_tn):
        b = rng.standard_normal((7, 7), dtype=np.float32)
        out = np.zeros((7, 7), np.float32) if fn is matmul.gemm_tn else np.zeros((5, 7), np.float32)
        fn(b if fn is matmul.gemm_tn else a, b, out, backend="numba")
        fn(b if fn is matmul.gemm_tn else a, b, out, accumulate=True, backend="numba")
    stats.param_sums(a, a, a, a)
    stats.param_sums(a, a, a)
    stats.sum_sq(a)


if __name__ == "__main__":
    _exercise()
