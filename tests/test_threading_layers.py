"""tailtune inside programs that fork or use Python threads (kernels/jit.py, kernels/matmul.py).
Each case runs in a fresh process: Numba's threading layer is chosen once per process, and a
fork of the test process itself would copy pytest's and torch's threads."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = r"""
import multiprocessing as mp, sys
import numpy as np
import engine
from kernels import matmul

def train(seed=0):
    m = engine.Model(engine.Config.llama(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2,
                                         d_model=64, d_ff=160, max_seq_len=64), seed=seed)
    m.train_last(2)
    opt = engine.AdamW(m, lr=1e-2)
    tok = np.random.default_rng(seed).integers(0, 97, (4, 33))
    losses = []
    for _ in range(2):
        m.zero_grad(); losses.append(m.forward(tok[:, :-1], tok[:, 1:])); m.backward(); opt.step()
    return losses

def gemm():   # big enough for the engine to split it over its thread pool
    a = np.arange(256 * 256, dtype=np.float32).reshape(256, 256) % 7
    out = np.empty((256, 256), np.float32)
    matmul.gemm_nt(a, a, out)
    return float(out.sum())

def in_child(fn, q):
    try:
        q.put(("ok", fn()))
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))

def forked(fn):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=in_child, args=(fn, q))
    p.start()
    try:
        return q.get(timeout=120)
    except Exception:
        return ("no answer", p.exitcode)
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
"""


def _run(body: str, env=None) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    out = subprocess.run([sys.executable, "-c", COMMON + body], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_fork_after_a_gemm_runs_gemms_in_the_child():
    # the child inherited the GEMM thread pool without its threads: its GEMMs waited forever
    out = _run("print(gemm()); print(*forked(gemm))", env={"NUMBA_NUM_THREADS": "2"})  # a pool
    parent, child = out.split("\n")[:2]
    assert child == f"ok {parent}", out


def test_fork_after_training_trains_or_says_why():
    out = _run("import numba\nprint(train())\nprint(numba.threading_layer())\n"
               "from numba.np.ufunc import omppool\nprint(omppool.openmp_vendor)\n"
               "print(*forked(train), sep='|')")
    parent, layer, vendor, child = out.strip().split("\n")
    status, result = child.split("|", 1)
    if layer == "omp" and vendor == "GNU":   # Numba terminated such a child (SIGTERM, no answer)
        assert status == "error" and "forked" in result and "'spawn'" in result, child
    else:
        assert (status, result) == ("ok", parent), child


def _available_layer(name: str) -> bool:
    out = subprocess.run([sys.executable, "-c", "import numba, numpy as np\n"
                          "f = numba.njit(parallel=True)(lambda a: a + 1)\nf(np.ones(4))\n"
                          "print(numba.threading_layer())"],
                         env={**os.environ, "NUMBA_THREADING_LAYER": name}, capture_output=True,
                         text=True, timeout=300)
    return out.returncode == 0 and out.stdout.strip() == name


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_two_python_threads_train_as_one_would(layer):
    # workqueue aborted the process ("Concurrent access has been detected") when two Python
    # threads launched kernels at once; the engine serializes launches on that layer
    if not _available_layer(layer):
        pytest.fail(f"Numba's {layer} threading layer is not available here")
    out = _run("import concurrent.futures as cf, numba\n"
               "alone = [train(0), train(1)]\n"
               "with cf.ThreadPoolExecutor(2) as ex:\n"
               "    both = list(ex.map(train, [0, 1]))\n"
               "print(numba.threading_layer(), both == alone, alone)",
               env={"NUMBA_THREADING_LAYER": layer})
    got_layer, same, _ = out.split(" ", 2)
    assert got_layer == layer and same == "True", out


def test_a_platform_without_fork_imports_and_trains():
    """Windows has no fork and no os.register_at_fork: `import engine` must not fail there
    (the standard library checks for os.fork before it registers: both go)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    body = ("import os\ndel os.register_at_fork, os.fork\n" + COMMON.replace("import multiprocessing as mp, sys\n", "")
            + "\nl = train()\nassert l[1] < l[0], l\nprint('trained', gemm())\n")
    out = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "trained" in out.stdout, out.stderr[-3000:]


def test_output_to_a_file_in_a_legacy_code_page_does_not_fail(tmp_path):
    """Windows gives a file or pipe its ANSI code page (cp1252): a generated sample with
    characters it lacks is written with escapes instead of failing the command."""
    import engine
    cfg = engine.Config.llama(vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                              max_seq_len=64)
    engine.Model(cfg, seed=0).save(str(tmp_path / "m"))
    engine.ByteTokenizer().save(str(tmp_path / "m"))
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONIOENCODING": "cp1252"}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--model", str(tmp_path / "m"),
                          "--prompt", "日本 → ok", "--max-new-tokens", "40"], env=env,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert b"\\u" in out.stdout or b"\\x" in out.stdout       # escaped, not lost
