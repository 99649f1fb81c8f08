"""Frozen-prefix activation cache: the input of the lowest trainable block, per example.

While every block below `start` is frozen, that block's input for an example never changes, so
it is computed once (the first time the example is drawn) and read back on every later epoch;
a step then costs only the trainable tail. Entries are keyed by a hash of the prefix's weights
(embeddings and blocks below `start`), the data and the sequence length: a cache for another
prefix is never read. When a schedule unfreezes a block below `start`, the cache is dropped and
rebuilt at the new lowest trainable block; when it freezes the lowest ones (FreezeOut,
AutoFreeze), the old rows are carried up through the newly frozen blocks into a cache at the
new lowest block.

Storage is in memory, or a memory-mapped file, in float32 (same weights as without the cache, to
float32 rounding) or float16 (half the memory; hidden states rounded to 11 significant bits).
A file whose prefix holds only pretrained weights survives the run: a later run on the same base
model and data reuses it. The training loop deletes the files of prefixes that hold weights the
run trained (no later run can reproduce those).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import time

try:
    import fcntl
except ImportError:   # Windows: a file another process has mapped cannot be removed anyway
    fcntl = None

import numpy as np

from .errors import InputError
from .model import EMBEDDINGS, block_of


def in_prefix(name: str, start: int) -> bool:
    """Whether parameter `name` is part of the prefix below block `start` (an embedding, or a
    lower block's)."""
    b = block_of(name)
    return name.startswith(EMBEDDINGS) if b is None else b < start


def prefix_hash(model, start: int) -> str:
    """Hash of everything below block `start`: config and the weights there (not what the
    prefix does not compute with: a classifier's labels, the init scale)."""
    arch = {k: v for k, v in model.config.architecture().items() if k not in ("labels", "init_std")}
    h = hashlib.sha256(repr(sorted(arch.items())).encode())
    h.update(str(start).encode())
    for n in sorted(model.params):
        if in_prefix(n, start):
            h.update(n.encode())
            h.update(np.ascontiguousarray(model.params[n]).data)
    return h.hexdigest()[:24]


def _prefix_version(model, start: int) -> tuple:
    """What prefix_hash would see change, without hashing the weights on every read."""
    return model._weights_now([n for n in model.params if in_prefix(n, start)])


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


MAX_ENV = "TAILTUNE_PREFIX_CACHE_GIB"   # cap on what disk caches of earlier runs keep
MAX_DEFAULT_GIB = 20.0


def _max_kept() -> int:
    v = os.environ.get(MAX_ENV, "")
    try:
        gib = float(v) if v.strip() else MAX_DEFAULT_GIB
    except ValueError:
        gib = -1.0
    if not 0 <= gib < float("inf"):
        raise InputError(f"{MAX_ENV}={v!r}: must be a number of GiB >= 0 (the most the disk "
                         f"prefix caches of earlier runs may keep; default {MAX_DEFAULT_GIB:g})")
    return int(gib * 2**30)


def _on_disk(path: str) -> int:
    st = os.stat(path)   # a file filled in part is sparse: count what it holds
    return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size


def _hold(path: str) -> int | None:
    """A shared lock on an open cache's file, so that no run (this one or another) evicts it
    while it is in use: a removed file frees no room while it is mapped, and is lost to later
    runs. None where there is no flock (the file system or the platform)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_unused(npy: str, files: list) -> bool:
    """Remove a cache's files unless a run has it open (its shared lock); True when gone."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(npy, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            pass
        except OSError:   # held by a run, or no flock here: leave it
            if fd is not None:
                os.close(fd)
            return False
    try:
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        return True
    except OSError:       # mapped by a run (Windows): leave it
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _kept_caches(directory: str) -> dict:
    """key -> (last use (mtime), bytes on disk, files) of each cache in the directory."""
    kept: dict = {}
    for name in os.listdir(directory):
        key = name[:-len(".filled.npy")] if name.endswith(".filled.npy") else (
            name[:-len(".npy")] if name.endswith(".npy") else None)
        if key is None:
            continue
        path = os.path.join(directory, name)
        try:
            mtime, size = os.stat(path).st_mtime, _on_disk(path)
        except OSError:   # removed by another run meanwhile
            continue
        last, total, files = kept.get(key, (0.0, 0, ()))
        kept[key] = (max(last, mtime), total + size, (*files, path))
    return kept


def _evict(directory: str, key: str, need: int, room) -> None:
    """Remove the least recently used caches of earlier runs (never `key`'s, never one a run
    has open) while they hold more than the cap, or the disk lacks room for this one;
    room() gives the free bytes now."""
    cap = _max_kept()
    kept = {k: v for k, v in _kept_caches(directory).items() if k != key}
    total = sum(v[1] for v in kept.values())
    if need > 0.9 * (room() + total):   # removing them all would not make room: keep them
        return
    for other, (mtime, size, files) in sorted(kept.items(), key=lambda kv: kv[1][0]):
        short = need > 0.9 * room()
        if total <= cap and not short:
            break
        if not _remove_unused(os.path.join(directory, other + ".npy"), list(files)):
            continue
        total -= size
        why = (f"to make room for this run's ({_size(need)})" if short else
               f"to keep the caches of earlier runs under {_size(cap)} ({MAX_ENV})")
        print(f"note: prefix cache: removed {other} ({_size(size)}, last used "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(mtime))}) {why}", file=sys.stderr)


def _check_room(need: int, n: int, directory: str | None, key: str) -> None:
    """Refuse a cache that would not fit, before allocating it: in memory numpy would fail with
    a raw MemoryError (or the machine swap); on disk, writes into a memory-mapped file on a full
    disk kill the process (SIGBUS) mid-epoch, with no checkpoint. On disk, the caches that
    earlier runs left are kept under a cap, least recently used removed first."""
    fix = "use --prefix-dtype float16 (half), less data, or --prefix-cache off"
    if directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise InputError(f"--prefix-cache disk: cannot create {directory} ({e.strerror or e}); "
                             "set TAILTUNE_CACHE to a writable directory, or use --prefix-cache "
                             "memory") from None
        existing = os.path.join(directory, key + ".npy")

        def room():   # free now, and what a reused file of this key holds already
            have = shutil.disk_usage(directory).free
            return have + (_on_disk(existing) if os.path.exists(existing) else 0)
        _evict(directory, key, need, room)
        have = room()
        if need > 0.9 * have:
            raise InputError(f"--prefix-cache disk needs {_size(need)} in {directory} for the "
                             f"prefixes of {n} examples, and {_size(have)} is free: {fix}")
        return
    have = _available_memory()
    if have is not None and need > 0.7 * have:
        raise InputError(f"--prefix-cache memory needs {_size(need)} for the prefixes of {n} "
                         f"examples, and {_size(have)} of memory is available: use "
                         "--prefix-cache disk, --prefix-dtype float16 (half), less data, or "
                         "--prefix-cache off")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _linux_fallocate():
    """fallocate(2) from the C library, or None (not Linux). Not os.posix_fallocate: where a
    filesystem cannot allocate (NFSv3, some FUSE), glibc imitates it by writing a zero into
    every block that reads as zero, which races with another run filling a shared cache file."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _linux_fallocate()


def _reserve(files, fresh: bool) -> None:
    """Allocate the files' blocks now. A memory-mapped file is sparse, and a store into a hole
    on a full disk is a SIGBUS that kills the run mid-epoch with no checkpoint; here it is an
    error before training. fresh: the files were just created (removed again on failure).
    Elsewhere than Linux, or on a filesystem that cannot allocate, the room check is all."""
    if _FALLOCATE is None:
        return
    for path in files:
        fd = os.open(path, os.O_RDWR)
        try:
            err = ctypes.get_errno() if _FALLOCATE(fd, 0, 0, os.fstat(fd).st_size) else 0
        finally:
            os.close(fd)
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if fresh:
                for f in files:
                    with contextlib.suppress(OSError):
                        os.remove(f)
            raise InputError(f"--prefix-cache disk: no room for {path} ({os.strerror(err)}); use "
                             "--prefix-dtype float16 (half), less data, or --prefix-cache "
                             "memory or off")


_HALF_MAX = float(np.finfo(np.float16).max)


def _npy_problem(path: str, shape: tuple, dtype: np.dtype) -> str | None:
    """Why the .npy file at path cannot be reused as an array of shape and dtype, or None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"file {path} has .npy version {version}"
            if got_shape != shape or got_dtype != dtype or fortran:
                return f"file {path} holds {got_dtype} {got_shape}, this data needs {dtype} {shape}"
            size, want = os.path.getsize(path), f.tell() + int(np.prod(shape)) * dtype.itemsize
            if size != want:
                return f"file {path} has {size} bytes, a whole one has {want} (truncated or corrupt)"
            if dtype == np.bool_ and (np.fromfile(f, np.uint8) > 1).any():
                return f"file {path} holds bytes other than 0 and 1 (corrupt)"
    except (OSError, ValueError) as e:
        return f"file {path} is unreadable ({e})"
    return None


def _tokens_hash(examples) -> str:
    """Hash of the token ids an Examples set serves (when the caller gives no data key)."""
    h = hashlib.sha256()
    for i in range(len(examples)):
        ids = np.ascontiguousarray(examples.get(i)[0], np.int64)
        h.update(np.int64(len(ids)).tobytes())
        h.update(ids.data)
    return h.hexdigest()[:24]


class RowFiles:
    """A disk cache's two memory-mapped .npy files in `directory`, named by `key`: `store`, the
    rows (shape, dtype), and `filled`, which of the n examples hold theirs. Files an earlier run
    left whole, of this shape and dtype, are reused (their rows are computed already); others
    are made anew, their blocks allocated. A shared lock is held while open (eviction skips it)."""

    def __init__(self, directory: str, key: str, shape: tuple, n: int, dtype: np.dtype):
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, key)
        self.files = (base + ".npy", base + ".filled.npy")
        mode = "w+"
        if all(os.path.exists(f) for f in self.files):
            # r+ pads a short file with zeros, which `filled` would then pass off as computed
            # rows: reuse the files only when both are whole and of this shape and dtype
            bad = (_npy_problem(self.files[0], shape, dtype)
                   or _npy_problem(self.files[1], (n,), np.dtype(np.bool_)))
            if bad:
                print(f"note: prefix cache {bad}; rebuilding it", file=sys.stderr)
            else:
                mode = "r+"
                for f in self.files:   # used now: the last to be evicted
                    with contextlib.suppress(OSError):
                        os.utime(f)
        self.store = np.lib.format.open_memmap(self.files[0], mode=mode, dtype=dtype, shape=shape)
        self.filled = np.lib.format.open_memmap(self.files[1], mode=mode, dtype=np.bool_, shape=(n,))
        try:
            _reserve(self.files, fresh=mode == "w+")
        except InputError:
            self.store = self.filled = None
            raise
        self._lock = _hold(self.files[0])

    def close(self, delete: bool = False):
        """Unmapped and unlocked; delete: the files removed (a prefix no run can reuse)."""
        self.store = self.filled = None
        if self._lock is not None:
            os.close(self._lock)   # closing the descriptor releases the lock
            self._lock = None
        for f in self.files if delete else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)


def check_half(h: np.ndarray, start: int) -> None:
    """Refuse a float16 cache of hidden states beyond float16's range: inf in the cache is a NaN
    loss that looks like divergence."""
    top = float(np.abs(h).max()) if h.size else 0.0
    if not top <= _HALF_MAX:
        raise InputError(f"the frozen prefix's output (the input of block {start}) reaches "
                         f"{top:.4g}, beyond float16's range ({_HALF_MAX:.0f}): use "
                         "--prefix-dtype float32")


class PrefixCache:
    """Hidden states at the input of block `start` for the examples of an Examples set."""

    def __init__(self, model, examples, start: int, dtype="float32", directory: str | None = None,
                 data_key: str | None = None, disposable: bool = False, rows=None):
        """rows: the examples the cache will serve (default all); the others take no room."""
        if dtype not in ("float32", "float16"):
            raise InputError(f"prefix cache dtype must be float32 or float16, got {dtype!r}")
        low = model.lowest_trainable_block()
        if low < start:
            raise InputError(f"cannot cache the prefix below block {start}: block {max(low, 0)} "
                             "(or an embedding) is trainable")
        self.model, self.examples, self.start = model, examples, start
        self.disposable = disposable     # close() deletes the files (a prefix no run can reuse)
        self.dtype = np.dtype(dtype)
        n = len(examples)
        serve = np.ones(n, bool) if rows is None else np.zeros(n, bool)
        if rows is not None:
            serve[np.asarray(rows, np.int64)] = True
        lengths = np.array([max(0, len(examples.get(i)[0]) - 1) if serve[i] else 0
                            for i in range(n)], np.int64)
        self.serve = serve
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        C = model.config.d_model
        if not data_key:   # the data's own key, else the tokens: never another dataset's rows
            data_key = getattr(getattr(examples, "data", None), "key", "") or _tokens_hash(examples)
        subset = "" if serve.all() else "-" + hashlib.sha256(serve.tobytes()).hexdigest()[:12]
        self.key = f"{prefix_hash(model, start)}-{data_key}{subset}-{examples.T}-{dtype}"
        self.version = _prefix_version(model, start)
        shape = (int(self.offsets[-1]), C)
        _check_room(shape[0] * C * self.dtype.itemsize, int(serve.sum()), directory, self.key)
        self.file = RowFiles(directory, self.key, shape, n, self.dtype) if directory else None
        if self.file is not None:
            self.store, self.filled = self.file.store, self.file.filled
        else:
            self.store = np.empty(shape, self.dtype)
            self.filled = np.zeros(n, np.bool_)
        self.nbytes = int(self.store.nbytes)
        self.compute_s = self.read_s = 0.0
        self.computed = self.read = 0
        self.hits = 0      # rows served that were in the cache already (read counts every row served)
        # the first forward in a process loads the compiled kernels (~1 s): not a recompute's cost
        model.prefix(np.zeros((1, 1), np.int64), min(start, 1))

    @property
    def files(self) -> tuple:
        return () if self.file is None else self.file.files

    def valid_for(self, model) -> bool:
        """Still the input of the tail: nothing at or below the cached prefix is trainable, nor
        was trained (or replaced) since the cache was made."""
        return (model is self.model and model.lowest_trainable_block() >= self.start
                and _prefix_version(model, self.start) == self.version)

    def hidden(self, idx, tokens) -> np.ndarray:
        """(B, T', d_model) for the examples idx whose padded token batch is `tokens`; rows past
        an example's length are zeros (padding: causal attention never lets them reach a real
        position, and their targets are ignored)."""
        if not self.serve[np.asarray(idx)].all():
            raise InputError("prefix cache: asked for an example it was not made to serve")
        if not self.valid_for(self.model):
            raise InputError(f"prefix cache: the blocks below {self.start} (or the embeddings) are "
                             "trainable, or trained since the cache was made: its rows are not "
                             "their output any more; make a new cache")
        missing = [r for r, i in enumerate(idx) if not self.filled[i]]
        self.hits += len(idx) - len(missing)
        if missing:
            self._compute(np.asarray(idx)[missing], tokens[missing])
        t0 = time.perf_counter()
        out = self._rows(idx, tokens.shape)
        self.read_s += time.perf_counter() - t0
        self.read += len(idx)
        return out

    def _rows(self, idx, shape) -> np.ndarray:
        """The stored rows of examples idx (all filled) as a zero-padded (B, T', d_model) batch."""
        out = np.zeros((*shape, self.model.config.d_model), np.float32)
        for r, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[r, :b - a] = self.store[a:b]
        return out

    def _compute(self, idx, tokens, below: "PrefixCache | None" = None):
        """Fill the rows of examples idx (padded batch `tokens`): from the embeddings, or from
        the rows of a cache `below` at a lower block, through the blocks in between."""
        t0 = time.perf_counter()
        if below is None:
            h = self.model.prefix(tokens, self.start)                 # (len(idx), T, C)
        else:
            # below's rows feed the carry; they are not reads of a training step
            h = self.model.prefix(tokens, self.start, below._rows(idx, tokens.shape), below.start)
        if self.dtype == np.float16:
            check_half(h, self.start)
        for i, hr in zip(idx, h):
            a, b = self.offsets[i], self.offsets[i + 1]
            self.store[a:b] = hr[:b - a]
            self.filled[i] = True
        self.compute_s += time.perf_counter() - t0
        self.computed += len(idx)

    def fill_from(self, below: "PrefixCache", batch_size: int, pad_id: int):
        """Every row `below` (same examples, a lower block, still frozen) holds, carried up
        through the blocks in between: when a schedule freezes the lowest trainable blocks the
        cache moves up without running the whole prefix again."""
        if not (below.examples is self.examples and below.start < self.start and below.valid_for(self.model)):
            raise InputError(f"fill_from needs a cache of the same examples below block {self.start}, "
                             "whose prefix is still frozen")
        from .data import eval_batches
        for x, _, idx in eval_batches(self.examples, np.flatnonzero(below.filled & ~self.filled & self.serve),
                                      batch_size, pad_id):
            self._compute(idx, x, below)

    def close(self):
        """Let the rows go (the counters stay for report()); a disposable cache's files too. A
        run keeps every cache it made for its report: nothing per example may stay (a schedule
        that moves the cache every few steps made RSS climb ~11 MiB per 1000 steps)."""
        self.store = self.filled = self.offsets = self.serve = self.version = None
        if self.file is not None:
            self.file.close(delete=self.disposable)

    def report(self) -> dict:
        """Measured cost of computing a prefix against reading it back, per example."""
        per_compute = self.compute_s / self.computed if self.computed else float("nan")
        per_read = self.read_s / self.read if self.read else float("nan")
        return {"start_block": self.start, "examples_computed": self.computed,
                "reads": self.read, "hits": self.hits, "compute_ms_per_example": 1e3 * per_compute,
                "read_ms_per_example": 1e3 * per_read,
                "bytes": self.nbytes, "dtype": str(self.dtype)}
