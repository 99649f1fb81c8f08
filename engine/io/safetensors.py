"""safetensors read/write in NumPy, validating the header against the file before reading.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
Files are untrusted input: every size and offset is checked against the file size before
anything is allocated or read.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct

import numpy as np

from ..errors import CheckpointError, InputError, is_int

MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header

# What `write` (and so Model.save) can store: safetensors name -> config.json's torch_dtype.
WRITE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 by to_float32
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


class SafetensorsFile:
    """Lazy reader: parses and validates the header; tensors are read on request."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such safetensors file")
        size = os.path.getsize(self.path)
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: header length {n} does not fit in a file of "
                                      f"{size} bytes (truncated or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            # ValueError: also a number past int()'s 4300 digits; RecursionError: deep nesting
            raise CheckpointError(f"{self.path}: header is not valid JSON "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, str, tuple, int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e, data_len)

    def _check_entry(self, name, e, data_len):
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: entry is not an object")
        dt = e.get("dtype")
        if not isinstance(dt, str) or dt not in _DTYPES:   # a list or dict is not hashable
            raise CheckpointError(f"{where}: unsupported dtype {dt!r}")
        shape = e.get("shape")
        offs = e.get("data_offsets")
        if (not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(is_int(o) and o >= 0 for o in offs)):   # is_int: not bool
            raise CheckpointError(f"{where}: malformed shape {shape!r} or data_offsets {offs!r}")
        span = 1
        for s in shape:
            span *= max(s, 1)
        if span * _DTYPES[dt].itemsize >= 2**63:
            # numpy refuses such a shape even when a zero makes it empty (a zero next to 2^62);
            # an empty tensor itself is fine (transformers saves some, unused)
            raise CheckpointError(f"{where}: shape {shape} is beyond any array")
        begin, end = offs
        count = 1
        for s in shape:
            count *= s
        nbytes = count * _DTYPES[dt].itemsize
        if end < begin or end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offs} hold {end - begin} bytes but shape "
                                  f"{shape} of {dt} needs {nbytes}")
        if end > data_len:
            raise CheckpointError(f"{where}: data ends at byte {end} but the file holds only "
                                  f"{data_len} bytes of data (truncated file)")
        return _DTYPES[dt], dt, tuple(shape), begin, end

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16 bits), read from disk into a new array."""
        dtype, _, shape, begin, end = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            buf = f.read(end - begin)
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file shorter than its header says")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor widened to a writable float32 array."""
        _, dt, _, _, _ = self.entries[name]
        a = self.raw(name)
        if dt == "BF16":
            return bf16_to_f32(a)
        if dt not in ("F32", "F16", "F64"):
            raise CheckpointError(f"{self.path}: tensor {name!r} is {dt}, not a float tensor")
        return a.astype(np.float32)  # copies, so the result is writable and owns its memory


def write(path: str, tensors: dict, metadata: dict | None = None, dtype: str = "F32") -> None:
    """Write tensors (name -> ndarray) atomically: a temporary file renamed into place."""
    if dtype not in WRITE_DTYPES:
        raise InputError(f"cannot write dtype {dtype!r}; choose one of {', '.join(WRITE_DTYPES)}")
    header, arrays, offset = {}, [], 0
    for name in sorted(tensors):
        src = np.asarray(tensors[name])
        if dtype == "F32":
            a = np.ascontiguousarray(src, dtype="<f4")
        elif dtype == "F16":
            with np.errstate(over="ignore"):  # checked below, with the tensor's name
                a = np.ascontiguousarray(src, dtype="<f2")
        else:
            a = f32_to_bf16(src)
        if dtype != "F32":
            _check_in_range(name, src, a, dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    # one tensor's bytes at a time, not a second copy of the whole model
    write_atomic(path, itertools.chain([struct.pack("<Q", len(raw)), raw],
                                       (a.tobytes() for a in arrays)))


def _check_in_range(name: str, src: np.ndarray, half: np.ndarray, dtype: str) -> None:
    """Values past the half type's range would be stored as inf, and the loader refuses
    non-finite weights: refuse them here, before anything is written."""
    widened = half.astype(np.float32) if dtype == "F16" else bf16_to_f32(half)
    overflow = np.isinf(widened) & np.isfinite(src)
    if overflow.any():
        top = float(np.abs(src[overflow]).max())
        limit, better = {"F16": ("65504", "'BF16' or 'F32'"), "BF16": ("3.39e38", "'F32'")}[dtype]
        raise InputError(f"tensor {name!r}: max |value| {top:.6g} is beyond the {dtype} range "
                         f"(±{limit}) and would be stored as inf; save with dtype={better}")


def write_atomic(path: str, chunks) -> None:
    """Write the byte chunks to `path` through atomic_file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a temporary path to write `path`'s new contents to; when the block ends, the file
    is synced to disk and renamed into place, so `path` is whole or untouched. On failure the
    temporary is removed and an OSError becomes a CheckpointError that names the path. A link
    at `path` keeps pointing where it did: its target is what is replaced."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    # beside the target (one file system: the rename is atomic), short whatever its name's length
    tag = hashlib.sha1(os.path.basename(path).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    tmp = os.path.join(os.path.dirname(path), f".tailtune-{os.getpid()}-{tag}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)   # Windows' fsync needs a handle that may write
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write: {e.strerror or e}") from None
        raise
