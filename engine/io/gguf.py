"""GGUF (llama.cpp) checkpoints: a validating header parser, dequantization, Llama, Qwen2,
Qwen3, SmolLM3 and GPT-2 -> engine.

Format (v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count;
the key/value pairs (string key, u32 value type, value); one info record per tensor (string name,
u32 n_dims, u64 dims in ggml order (fastest first), u32 type, u64 offset); padding to
`general.alignment`; then the tensor data, each tensor at its offset from the data start.

Model files are untrusted input. The header is parsed here with bounded reads over a memmap:
every count, length, dimension and offset is checked against the bytes left in the file before
anything is allocated or read, so a mutated header can cost neither a huge allocation nor a long
loop. (gguf.GGUFReader does not validate its header: mutated counts make it fail with IndexError
or ValueError from inside numpy, and it builds Python objects for every array element.) The
`gguf` package is used only for what it does well: the type tables and gguf.quants.dequantize.
"""
from __future__ import annotations

import os
import reprlib
import stat
import struct

import numpy as np

from ..config import Config, every_fourth
from ..errors import CheckpointError, ConfigError, optional_import
from .safetensors import bf16_to_f32

MAGIC = b"GGUF"


def is_gguf(path: str, error: type = CheckpointError) -> bool:
    """Whether the file starts with the GGUF magic, whatever its name; an unreadable file raises
    `error` (the model and tokenizer loaders each name their own)."""
    try:
        # O_NONBLOCK, then a regular file only: opening a FIFO would wait for a writer, and
        # reading a device may never end
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{path}: not a regular file (a FIFO, device or socket); a model "
                            "file must be a regular file")
            return f.read(len(MAGIC)) == MAGIC
    except OSError as e:
        raise error(f"{path}: cannot read: {e}") from None


VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS: llama.cpp rejects tensors with more
MAX_ARRAY_NESTING = 4   # the spec allows arrays of arrays; a deep chain would exhaust the stack
# Elements of one metadata array of strings or arrays: each becomes a Python object of ~50+
# bytes (8x a short string's bytes in the file), so a crafted multi-GB token list would exhaust
# memory. Real vocabularies stay under a million tokens.
MAX_OBJECT_ARRAY = 1 << 24
DEQUANT_CHUNK = 1 << 20  # elements dequantized per step: bounds gguf's float32 temporaries
# Longest context_length accepted: the model may size rotary tables by it, and a mutated
# header must not turn into a huge allocation there.
MAX_CONTEXT = 1 << 24

# GGUF metadata value types: id -> numpy dtype of one element (8 = string, 9 = array).
_SCALAR = {0: np.dtype("u1"), 1: np.dtype("i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
           4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("u1"),
           10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8")}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U64 = struct.Struct("<Q")

# Types float32() reads. Plain floats are converted here; block-quantized types go through
# gguf.quants.dequantize. Every one of them is round-tripped in tests/test_gguf.py.
_PLAIN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
          "F64": np.dtype("<f8")}
_QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "IQ4_XS")
SUPPORTED_TYPES = tuple(_PLAIN) + _QUANTIZED


def _gguf():
    """The optional `gguf` package, or a CheckpointError that says how to install it."""
    return optional_import("gguf", "gguf.quants", error=CheckpointError, what="reading GGUF files")


class _Cursor:
    """Sequential little-endian reads over a byte buffer; each read first checks that the bytes
    are there, so a count or length read from the file can never run past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file: {what} needs {n} "
                                  f"bytes at offset {self.pos}, only {self.left()} remain")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        pos = self.pos
        self.need(8, what)
        (n,) = _U64.unpack_from(self.buf, pos)
        self.pos = pos = pos + 8
        self.need(n, what)
        self.pos = pos + n
        try:
            return str(self.buf[pos:pos + n], "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at offset {self.pos - n} is not valid "
                                  "UTF-8 (corrupt GGUF file)") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: string() inlined, since token lists hold 10^5 of them."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        try:
            for _ in range(count):
                if pos + 8 > size:
                    break
                (n,) = _U64.unpack_from(buf, pos)
                if n > size - pos - 8:
                    break
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at offset {pos + 8} is not valid UTF-8 "
                                  "(corrupt GGUF file)") from None
        self.pos = pos
        if len(out) < count:
            self.string(what)  # raises the truncation error for the element that does not fit
        return out

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        n = count * dtype.itemsize
        self.need(n, what)
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += n
        return a


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR:
        v = cur.array(_SCALAR[vtype], 1, f"value of {key!r}")[0]
        return bool(v) if vtype == _BOOL else v.item()
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    if vtype != _ARRAY:
        raise CheckpointError(f"{cur.path}: metadata key {key!r} has unknown value type {vtype} "
                              "(corrupt GGUF file)")
    if depth >= MAX_ARRAY_NESTING:
        raise CheckpointError(f"{cur.path}: metadata key {key!r} nests arrays deeper than "
                              f"{MAX_ARRAY_NESTING} levels")
    etype, count = cur.unpack("<IQ", f"array header of {key!r}")
    if etype in _SCALAR:
        a = cur.array(_SCALAR[etype], count, f"array {key!r} ({count} elements)")
        return a.astype(bool) if etype == _BOOL else a
    # Strings and arrays take at least 8 / 12 bytes each: a count the file cannot hold is
    # refused before the loop starts.
    cur.need(count * (8 if etype == _STRING else 12), f"array {key!r} ({count} elements)")
    if count > MAX_OBJECT_ARRAY:
        raise CheckpointError(f"{cur.path}: metadata array {key!r} has {count} elements, more "
                              f"than the {MAX_OBJECT_ARRAY} any model needs (each would take "
                              "memory many times its size in the file)")
    if etype == _STRING:
        return cur.strings(count, f"element of {key!r}")
    return [_read_value(cur, etype, key, depth + 1) for _ in range(count)]


class TensorInfo:
    """Where one tensor lives and what it holds. `shape` is in numpy (row-major) order."""

    __slots__ = ("name", "shape", "type_id", "type_name", "offset", "nbytes")

    def __init__(self, name, shape, type_id, type_name, offset, nbytes):
        self.name, self.shape, self.type_id = name, shape, type_id
        self.type_name, self.offset, self.nbytes = type_name, offset, nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self):
        return f"TensorInfo({self.name!r}, shape={self.shape}, type={self.type_name})"


class GGUFFile:
    """A validated GGUF file. The header is parsed on open; tensor data stays on disk (memmap)
    and is dequantized one tensor at a time by float32()."""

    def __init__(self, path):
        self.path = str(path)
        self._gguf = _gguf()
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such GGUF file")
        size = os.path.getsize(self.path)
        if size < 24:
            raise CheckpointError(f"{self.path}: truncated GGUF file ({size} bytes, no header)")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")  # (size,)
        cur = _Cursor(memoryview(self._mm), self.path)  # memoryview slices fast; memmap's don't
        self.version, n_tensors, n_kv = self._read_preamble(cur)
        self.metadata = self._read_metadata(cur, n_kv)
        infos = self._read_tensor_infos(cur, n_tensors)
        align = self._alignment()
        self.data_start = -(-cur.pos // align) * align
        self._tensors = self._check_tensors(infos, size - self.data_start, align)

    def _read_preamble(self, cur):
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (starts with {magic!r}, "
                                  f"expected {MAGIC!r})")
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported{hint}; "
                                  f"tailtune reads versions {VERSIONS}")
        n_tensors, n_kv = cur.unpack("<QQ", "tensor and key/value counts")
        # Smallest records: a key/value is an empty key (8) + type (4) + one byte; a tensor info
        # an empty name (8) + n_dims (4) + type (4) + offset (8).
        if n_kv * 13 + n_tensors * 24 > cur.left():
            raise CheckpointError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} "
                                  f"metadata keys, more than a file of {cur.size} bytes can hold "
                                  "(truncated or corrupt GGUF file)")
        return version, n_tensors, n_kv

    def _read_metadata(self, cur, n_kv) -> dict:
        meta = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in meta:
                raise CheckpointError(f"{self.path}: metadata key {key!r} appears twice")
            vtype = cur.unpack("<I", f"type of {key!r}")
            meta[key] = _read_value(cur, vtype, key)
        return meta

    def _read_tensor_infos(self, cur, n_tensors) -> list:
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions "
                                      f"(GGUF allows at most {MAX_DIMS})")
            dims = cur.unpack(f"<{n_dims}Q", f"dims of tensor {name!r}") if n_dims else ()
            dims = (dims,) if isinstance(dims, int) else dims
            type_id, offset = cur.unpack("<IQ", f"type and offset of tensor {name!r}")
            infos.append((name, tuple(reversed(dims)), type_id, offset))  # numpy order
        return infos

    def _alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(align, int) or isinstance(align, bool) or align <= 0
                or align & (align - 1)):
            raise CheckpointError(f"{self.path}: general.alignment={align!r} is not a power of two")
        return align

    def _check_tensors(self, infos, data_len, align) -> dict:
        sizes = self._gguf.GGML_QUANT_SIZES
        types = self._gguf.GGMLQuantizationType
        out = {}
        for name, shape, type_id, offset in infos:
            where = f"{self.path}: tensor {name!r}"
            if name in out:
                raise CheckpointError(f"{where} appears twice")
            try:
                qtype = types(type_id)
                block, block_bytes = sizes[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"{where} has unknown type id {type_id}") from None
            info = TensorInfo(name, shape, type_id, qtype.name, offset, 0)
            if 0 in shape:
                # No model holds an empty tensor, and numpy refuses some empty shapes (a zero
                # next to a dimension of 2^62), so a zero is treated as corruption.
                raise CheckpointError(f"{where} has an empty dimension: shape {shape}")
            row = shape[-1] if shape else 1
            if row % block:
                raise CheckpointError(f"{where}: rows of {row} elements are not a whole number "
                                      f"of {qtype.name} blocks of {block}")
            info.nbytes = info.n_elements // block * block_bytes
            if offset % align:
                raise CheckpointError(f"{where}: data offset {offset} is not a multiple of the "
                                      f"alignment {align}")
            if offset + info.nbytes > data_len:
                raise CheckpointError(f"{where}: {shape} of {qtype.name} needs {info.nbytes} bytes "
                                      f"at data offset {offset}, but the file holds only "
                                      f"{max(data_len, 0)} bytes of data (truncated file)")
            out[name] = info
        return out

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._tensors[name]

    def float32(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new, writable float32 array in numpy (row-major) order."""
        info = self.tensor_info(name)
        begin = self.data_start + info.offset
        raw = self._mm[begin:begin + info.nbytes]  # (nbytes,) uint8, still on disk
        t = info.type_name
        if t in _PLAIN:
            a = raw.view(_PLAIN[t])
            a = bf16_to_f32(a) if t == "BF16" else a.astype(np.float32)  # both copy
            return a.reshape(info.shape)
        if t not in _QUANTIZED:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {t}, which tailtune "
                                  f"cannot read (supported: {', '.join(SUPPORTED_TYPES)})")
        return self._dequantize(info, raw)

    def _dequantize(self, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        """Blocks are independent, so the data is fed to gguf as one flat run of blocks per chunk:
        one vectorized call per 2^20 elements rather than gguf's per-16-rows calls."""
        qtype = self._gguf.GGMLQuantizationType(info.type_id)
        block, block_bytes = self._gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty(info.n_elements, dtype=np.float32)  # (n,) in storage order
        raw = raw.view(np.ndarray)  # plain view: memmap slicing costs a finalizer call per slice
        n_blocks, step = info.n_elements // block, max(1, DEQUANT_CHUNK // block)
        with np.errstate(all="ignore"):  # corrupt scales give NaN; load_gguf reports them
            for b0 in range(0, n_blocks, step):
                b1 = min(b0 + step, n_blocks)
                out[b0 * block:b1 * block] = self._gguf.quants.dequantize(
                    raw[b0 * block_bytes:b1 * block_bytes], qtype)
        return out.reshape(info.shape)


def read_metadata(path) -> dict:
    """The metadata of a GGUF file: key -> int / float / bool / str, numeric arrays as numpy
    arrays, string arrays as list[str]. Reads the header only."""
    return GGUFFile(path).metadata


# GGUF llama (and qwen2, qwen3, smollm3) tensor name -> engine name; {i} is the block index.
_GLOBAL_NAMES = {"token_embd.weight": "wte.weight", "output_norm.weight": "ln_f.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "ln1", "ffn_norm": "ln2",
                "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
                "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
_QK_NORM_NAMES = {"attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}   # qwen3
# llama.cpp's GPT-2 architecture: every norm and projection has a bias, and q, k, v are one
# tensor (attn_qkv: their rows one after the other), as Hugging Face's c_attn is.
_GPT2_GLOBAL = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
                "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
                "output.weight": "lm_head.weight"}
_GPT2_BLOCK = {"attn_norm": ("ln1",), "attn_qkv": ("attn.q", "attn.k", "attn.v"),
               "attn_output": ("attn.o",), "ffn_norm": ("ln2",), "ffn_up": ("mlp.up",),
               "ffn_down": ("mlp.down",)}


# general.architecture values read
_ARCHITECTURES = ("llama", "phi3", "qwen2", "qwen3", "smollm3", "gpt2")
# llama.cpp's phi3: q, k, v in one tensor, the MLP's gate and up in one (gate first)
_PHI3_BLOCK = {"attn_norm": ("ln1",), "attn_qkv": ("attn.q", "attn.k", "attn.v"),
               "attn_output": ("attn.o",), "ffn_norm": ("ln2",), "ffn_up": ("mlp.gate", "mlp.up"),
               "ffn_down": ("mlp.down",)}


def load_gguf(path) -> tuple[Config, dict[str, np.ndarray]]:
    """A Llama, Phi-3, Qwen2, Qwen3, SmolLM3 or GPT-2 GGUF file -> (Config, engine params as
    float32 arrays, weights (out, in)).

    Llama's q and k are un-permuted from llama.cpp's interleaved rotary layout to the
    rotate_half layout the engine (and Hugging Face) use; GPT-2's and Phi-3's fused qkv (and
    Phi-3's gate + up) are split. Names and
    shapes are all checked from the header before the first tensor is dequantized; tensors are
    then read one at a time."""
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    names = _name_map(cfg)
    for g, e in names.items():
        if g not in f._tensors:
            if g.endswith(".bias") and cfg.model_type != "gpt2":
                # the config switches biases per kind, not per projection
                kind = ("attention (q, k and v)" if ".attn_" in g and "attn_output" not in g
                        else "attention output" if ".attn_" in g else "MLP (gate, up, down)")
                raise CheckpointError(f"{f.path}: some {kind} projections have biases and "
                                      f"{g!r} has none: tailtune's blocks have either all of "
                                      "them or none")
            raise CheckpointError(f"{f.path}: missing tensor {g!r} (needed for "
                                  f"{' + '.join(e)})")
        shape, want = f._tensors[g].shape, gguf_shape(cfg, e)
        if shape != want:
            raise CheckpointError(f"{f.path}: tensor {g!r} has shape {shape}, expected {want} "
                                  f"for {' + '.join(e)} from the model's metadata")
    params = {}
    for g, e in names.items():
        a = f.float32(g)
        if not np.isfinite(a).all():
            # A NaN or inf weight makes every loss NaN later, far from the cause: name it here.
            raise CheckpointError(f"{f.path}: tensor {g!r} holds NaN or infinite values "
                                  "(corrupt file)")
        parts = np.split(a, np.cumsum([_expected_shape(cfg, n)[0] for n in e])[:-1])
        for n, part in zip(e, parts):
            params[n] = from_gguf_layout(cfg, n, np.ascontiguousarray(part),
                                         f.metadata["general.architecture"])
    return cfg, params


def _rope_heads(cfg: Config, name: str, arch: str) -> int | None:
    """Heads of the q / k rows llama.cpp's converter permutes in `arch` files (llama's and
    smollm3's); None for other tensors and architectures (qwen2's and qwen3's are not
    permuted: llama.cpp runs their rotary embedding in the NeoX layout)."""
    if arch not in ("llama", "smollm3"):
        return None
    if name.endswith(("attn.q.weight", "attn.q.bias")):
        return cfg.n_head
    if name.endswith(("attn.k.weight", "attn.k.bias")):
        return cfg.n_kv_head
    return None


def from_gguf_layout(cfg: Config, name: str, a: np.ndarray, arch: str) -> np.ndarray:
    """One engine parameter from its rows in an `arch` file: llama's q / k rows un-permuted.
    (The file's architecture decides, not the config's family: a llama file may hold Qwen2's
    layout.)"""
    heads = _rope_heads(cfg, name, arch)
    return a if heads is None else unpermute_rope(a, heads)


def to_gguf_layout(cfg: Config, name: str, a: np.ndarray, arch: str) -> np.ndarray:
    """The inverse of from_gguf_layout."""
    heads = _rope_heads(cfg, name, arch)
    return a if heads is None else permute_rope(a, heads)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of q / k rows: within each head it interleaves the
    two rotary halves (rows j and j + D/2 become rows 2j and 2j + 1); this puts them back."""
    rows = w.shape[0]  # n_heads * D
    d2 = rows // n_heads // 2
    v = w.reshape(n_heads, d2, 2, *w.shape[1:])  # (H, D/2, 2, ...)
    return np.ascontiguousarray(v.swapaxes(1, 2)).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (inverse of unpermute_rope); used to write test files."""
    rows = w.shape[0]
    d2 = rows // n_heads // 2
    v = w.reshape(n_heads, 2, d2, *w.shape[1:])  # (H, 2, D/2, ...)
    return np.ascontiguousarray(v.swapaxes(1, 2)).reshape(w.shape)


# Families whose blocks llama.cpp names by a table of fused tensors: (global names, block
# names, kinds each block tensor has); llama.cpp's phi3 has no biases.
_FUSED = {"gpt2": (_GPT2_GLOBAL, _GPT2_BLOCK, ("weight", "bias")),
          "phi3": (_GLOBAL_NAMES, _PHI3_BLOCK, ("weight",))}


def _name_map(cfg: Config) -> dict[str, tuple[str, ...]]:
    """GGUF name -> the engine names whose rows it holds, in order, for every tensor the config
    needs."""
    tied = {"output.weight"} if cfg.tie_embeddings else set()
    if cfg.model_type in _FUSED:
        names, block, kinds = _FUSED[cfg.model_type]
        m = {g: (e,) for g, e in names.items() if g not in tied}
        for i in range(cfg.n_layer):
            for g, es in block.items():
                for kind in kinds:
                    m[f"blk.{i}.{g}.{kind}"] = tuple(f"blocks.{i}.{e}.{kind}" for e in es)
        return m
    m = {g: (e,) for g, e in _GLOBAL_NAMES.items() if g not in tied}
    block = {**_BLOCK_NAMES, **_QK_NORM_NAMES} if cfg.qk_norm else _BLOCK_NAMES
    for i in range(cfg.n_layer):
        for g, e in block.items():
            m[f"blk.{i}.{g}.weight"] = (f"blocks.{i}.{e}.weight",)
            if (g == "attn_output" and cfg.attn_out_bias
                    or cfg.attn_bias and g in ("attn_q", "attn_k", "attn_v")
                    or cfg.mlp_bias and g.startswith("ffn_") and g != "ffn_norm"):
                m[f"blk.{i}.{g}.bias"] = (f"blocks.{i}.{e}.bias",)
    return m


def gguf_shape(cfg: Config, names: tuple[str, ...]) -> tuple:
    """Shape of the GGUF tensor that holds these engine parameters' rows."""
    shapes = [_expected_shape(cfg, n) for n in names]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _expected_shape(cfg: Config, name: str) -> tuple:
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    Q, KV = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"wte": (V, C), "wpe": (cfg.max_seq_len, C), "lm_head": (V, C), "ln_f": (C,),
              "ln1": (C,), "ln2": (C,),
              "q": (Q, C), "k": (KV, C), "v": (KV, C), "o": (C, Q),
              "gate": (F, C), "up": (F, C), "down": (C, F),
              "q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    parts = name.split(".")
    shape = shapes[parts[-2]]
    return shape[:1] if parts[-1] == "bias" else shape


def config_from_gguf(f: GGUFFile) -> Config:
    """Config.llama / qwen2 / qwen3 / smollm3 / gpt2 from the `<architecture>.*` metadata;
    refuses what the engine cannot represent. Every refusal names the file (Config's own
    checks do not)."""
    try:
        return _config_from_gguf(f)
    except ConfigError as e:
        if str(e).startswith(f"{f.path}:"):
            raise
        raise ConfigError(f"{f.path}: {e}") from None


def _config_from_gguf(f: GGUFFile) -> Config:
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ConfigError(f"{f.path}: GGUF architecture {arch!r} is not supported; tailtune "
                          f"reads {', '.join(map(repr, _ARCHITECTURES))} GGUF files")
    get = _MetaGetter(f)
    if arch == "gpt2":
        return _gpt2_config(f, get)
    if get.integer(f"{arch}.expert_count", 0) > 0:
        raise ConfigError(f"{f.path}: mixture-of-experts {arch} models are not supported")
    n_layer, max_seq, n_head, d_model = _sizes(
        f, get, arch, len(_PHI3_BLOCK if arch == "phi3" else _BLOCK_NAMES))
    head_dim = get.integer(f"{arch}.attention.key_length", d_model // n_head)
    if get.integer(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{f.path}: different key and value head widths are not supported")
    if get.integer(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(f"{f.path}: partial rotary embeddings (rope.dimension_count "
                          f"{meta[f'{arch}.rope.dimension_count']} != head width {head_dim}) "
                          "are not supported")
    theta = get.number(f"{arch}.rope.freq_base", 10000.0)
    if not 1 <= theta <= float(np.finfo(np.float32).max):
        raise ConfigError(f"{f.path}: rope.freq_base {theta} is not a number from 1 to float32's "
                          "largest")
    vocab = _vocab_size(f, get, arch)
    names = f._tensors
    rope_scaling = _rope_scaling(f, get, arch, head_dim, theta)

    def has_bias(*kinds):   # blk.{i}.{kind}.bias (other names are refused as unknown later)
        return any(len(p) == 4 and p[0] == "blk" and p[2] in kinds and p[3] == "bias"
                   for p in (n.split(".") for n in names))
    attn_bias, attn_out_bias = has_bias("attn_q", "attn_k", "attn_v"), has_bias("attn_output")
    mlp_bias = has_bias("ffn_gate", "ffn_up", "ffn_down")
    # the Hugging Face family the layout is (what Model.save writes): llama.cpp runs q/k/v-only
    # biases in llama files and no biases in qwen2 ones, which are qwen2's and llama's layouts
    family = arch
    if arch in ("llama", "qwen2") and not mlp_bias:
        family = "qwen2" if attn_bias and not attn_out_bias else "llama"
    cfg = getattr(Config, family)(vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                n_kv_head=get.integer(f"{arch}.attention.head_count_kv", n_head),
                                d_model=d_model, head_dim=head_dim,
                                d_ff=get.integer(f"{arch}.feed_forward_length"),
                                max_seq_len=max_seq,
                                norm_eps=get.number(f"{arch}.attention.layer_norm_rms_epsilon"),
                                rope_theta=theta,
                                attn_bias=attn_bias, attn_out_bias=attn_out_bias,
                                mlp_bias=mlp_bias,
                                tie_embeddings="output.weight" not in names,
                                rope_scaling=rope_scaling, **_token_ids(get),
                                # llama.cpp's smollm3 leaves out every 4th block's rotary
                                **({"no_rope_blocks": every_fourth(n_layer)}
                                   if family == "smollm3" else {}),
                                # phi3's window (0: none), which llama.cpp does not apply
                                **({"sliding_window": _window(f, get)}
                                   if family == "phi3" else {}))
    _reject_unknown_tensors(f, cfg)
    return cfg


def _window(f: GGUFFile, get) -> int | None:
    """phi3.attention.sliding_window: 0 (or absent) for none; llama.cpp reads it as a uint32."""
    w = get.integer("phi3.attention.sliding_window", 0)
    if not 0 <= w < 1 << 32:
        raise ConfigError(f"{f.path}: phi3.attention.sliding_window {w} is not a window")
    return w or None


# Llama 3.1 / 3.2 / 3.3's rope scaling, as their config.json files give it
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama3_rope_factors(head_dim: int, theta: float, sc: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it from a "llama3" rope_scaling: per
    frequency, what llama.cpp divides it by."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                         / np.float32(head_dim)))
    old, low, high = (sc["original_max_position_embeddings"], sc["low_freq_factor"],
                      sc["high_freq_factor"])
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * np.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(sc["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    return np.array(out, np.float32)


def _rope_scaling(f: GGUFFile, get, arch: str, head_dim: int, theta: float) -> dict | None:
    """Config.rope_scaling from the file: linear from rope.scaling.*, "llama3" from the
    per-frequency factors of rope_freqs.weight (Llama 3.1 / 3.2), with constants that give
    those factors."""
    # as llama.cpp reads them: no type means linear; the factor is rope.scaling.factor, or
    # the older rope.scale_linear when that key is absent; 0 means 1; type "none" never scales
    kind = get.text(f"{arch}.rope.scaling.type", "linear")
    if get.number(f"{arch}.rope.scaling.attn_factor", 1.0) != 1.0:   # llama.cpp scales by it
        raise ConfigError(f"{f.path}: rope.scaling.attn_factor "
                          f"{f.metadata[f'{arch}.rope.scaling.attn_factor']} is not supported")
    if kind not in ("none", "linear"):
        raise ConfigError(f"{f.path}: rope scaling {kind!r} is not supported (only linear "
                          "and Llama 3's)")
    key = f"{arch}.rope.scaling.factor"
    factor = get.number(key if key in f.metadata else f"{arch}.rope.scale_linear", 0.0) or 1.0
    if not 0 < factor < float("inf"):
        raise ConfigError(f"{f.path}: rope scaling factor {factor} is not a positive number")
    linear = ({"rope_type": "linear", "factor": factor}
              if kind == "linear" and factor != 1.0 else None)
    if "rope_freqs.weight" not in f._tensors:
        return linear
    if arch != "llama" or linear:
        raise ConfigError(f"{f.path}: rope_freqs.weight in a {arch} file"
                          f"{' with linear scaling' if linear else ''} is not supported")
    info = f._tensors["rope_freqs.weight"]
    if info.shape != (head_dim // 2,):
        raise CheckpointError(f"{f.path}: rope_freqs.weight has shape {info.shape}, expected "
                              f"({head_dim // 2},) (half the head width)")
    got = f.float32("rope_freqs.weight")
    if not np.isfinite(got).all() or (got <= 0).any():
        raise CheckpointError(f"{f.path}: rope_freqs.weight holds values that are not positive "
                              "numbers")
    if (got == 1).all():
        return None
    for sc in _llama3_candidates(got, head_dim, theta):
        if np.allclose(llama3_rope_factors(head_dim, theta, sc), got, rtol=1e-5, atol=0):
            return sc
    raise ConfigError(f"{f.path}: rope_freqs.weight does not hold factors of Llama 3's rope "
                      "scaling (1 for high frequencies, a factor for low ones, smoothed between); "
                      "other per-frequency factors are not supported")


def _llama3_candidates(got: np.ndarray, head_dim: int, theta: float):
    """"llama3" rope_scaling dicts that may have produced these factors: Llama 3's own
    constants first, then ones solved from the factors. Only the factors at the heads'
    frequencies matter, so any constants that reproduce them give the same model; the caller
    keeps the first that does. low_freq_factor is taken as 1 (every Llama 3 has it)."""
    top = float(got.max())
    yield {"rope_type": "llama3", "factor": top, **LLAMA3_ROPE}
    if top <= 1:
        return
    wavelen = 2 * np.pi * float(theta) ** (np.arange(0, head_dim, 2) / head_dim)
    plateau = (got >= top * (1 - 1e-6)).sum() >= 2
    # without two frequencies at the top, the factor may lie beyond every one of them
    for factor in [top] if plateau else [top] + [f for f in (8.0, 32.0, 16.0, 4.0, 2.0, 64.0)
                                                   if f > top]:
        yield from _llama3_solved(got, wavelen, factor)
    medium = got > 1 + 1e-6
    if not plateau and medium.sum() >= 2 and np.ptp(wavelen[medium]) > 0:
        # every frequency past the kept ones smoothed: any whole context fixes the factor
        c1, c0 = np.polyfit(1 / wavelen[medium], 1 / got[medium].astype(np.float64), 1)
        for old in (2 ** k for k in range(10, 18)):
            inv_f = c1 / old + c0
            if 0 < inv_f < 1 / top and c1 > 0:
                yield from _llama3(1 / inv_f, 1.0, 1 + (1 - inv_f) / (inv_f - c0), old)


def _llama3_solved(got, wavelen, factor):
    low = 1.0
    medium = (got > 1 + 1e-6) & (got < factor * (1 - 1e-6))
    kept, scaled = wavelen[got <= 1 + 1e-6], wavelen[got >= factor * (1 - 1e-6)]
    if medium.sum() >= 2 and np.ptp(wavelen[medium]) > 0:
        # there 1 / got = 1/f + (1 - 1/f) s, s = (old / wavelen - 1) / (high - 1): a line in
        # 1 / wavelen, c0 + c1 / wavelen, whose two coefficients give high and old
        c1, c0 = np.polyfit(1 / wavelen[medium], 1 / got[medium].astype(np.float64), 1)
        if 1 / factor > c0 and c1 > 0:
            yield from _llama3(factor, low, 1 + (1 - 1 / factor) / (1 / factor - c0),
                          c1 / (1 / factor - c0))
    elif medium.sum() == 1:   # any whole context between the bands, and the high factor from it
        s = (1 / float(got[medium][0]) - 1 / factor) / (1 - 1 / factor)
        wm = wavelen[medium][0]
        above = scaled.min() if len(scaled) else 64 * wm
        from_high = {round(wm * (low + s * (h - low))) for h in (4.0, 2.0, 3.0, 8.0, 16.0)}
        for old in sorted({*(2 ** k for k in range(10, 18)), *from_high, int(wm) + 1}):
            if wm < old < above:
                yield from _llama3(factor, low, low + (old / wm - low) / s, old)
    elif len(scaled):   # a context between the bands: above the kept ones' x high, below the rest
        old = np.floor(scaled.min()) - 1
        high = old / kept.max() * 0.999 if len(kept) else 4.0
        if high > low:
            yield from _llama3(factor, low, high, old)


def _llama3(factor, low, high, old):
    """Candidates for constants solved with low = 1: (old t, low t, high t) gives the same
    factors for any t, so old is made a whole number by t; first with the others rounded to
    short decimals (what config files hold), then exactly."""
    if not (np.isfinite([factor, high, old]).all() and old >= 1 and high > low):
        return
    whole = max(1, round(old))
    t = whole / old
    short = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"),
             "low_freq_factor": float(f"{low * t:.6g}"),
             "high_freq_factor": float(f"{high * t:.6g}"),
             "original_max_position_embeddings": whole}
    yield short
    yield {**short, "factor": float(factor), "low_freq_factor": float(low * t),
           "high_freq_factor": float(high * t)}


def _sizes(f: GGUFFile, get, arch: str, per_block: int) -> tuple[int, int, int, int]:
    """(block_count, context_length, head_count, embedding_length), each checked."""
    n_layer = get.integer(f"{arch}.block_count")
    if n_layer * per_block > len(f._tensors):
        # Checked before the name map is built: a mutated count must not cost a huge loop.
        raise CheckpointError(f"{f.path}: block_count {n_layer} needs {per_block} tensors per "
                              f"block, the file holds {len(f._tensors)} tensors")
    max_seq = get.integer(f"{arch}.context_length")
    if max_seq > MAX_CONTEXT:
        raise ConfigError(f"{f.path}: context_length {max_seq} is beyond {MAX_CONTEXT}")
    n_head = get.integer(f"{arch}.attention.head_count")
    d_model = get.integer(f"{arch}.embedding_length")
    if n_head <= 0 or d_model % n_head:
        raise ConfigError(f"{f.path}: embedding_length {d_model} is not a multiple of "
                          f"head_count {n_head}")
    return n_layer, max_seq, n_head, d_model


def _gpt2_config(f: GGUFFile, get) -> Config:
    n_layer, max_seq, n_head, d_model = _sizes(f, get, "gpt2", 2 * len(_GPT2_BLOCK))
    if get.integer("gpt2.attention.head_count_kv", n_head) != n_head:
        raise ConfigError(f"{f.path}: grouped-query attention in a gpt2 GGUF is not supported")
    cfg = Config.gpt2(vocab_size=_vocab_size(f, get, "gpt2"), n_layer=n_layer, n_head=n_head,
                      d_model=d_model, d_ff=get.integer("gpt2.feed_forward_length"),
                      max_seq_len=max_seq,
                      norm_eps=get.number("gpt2.attention.layer_norm_epsilon"),
                      tie_embeddings="output.weight" not in f._tensors, **_token_ids(get))
    _reject_unknown_tensors(f, cfg)
    return cfg


def _token_ids(get) -> dict:
    """bos / eos / pad ids for the saved config.json. End of turn and end of message (Llama 3's
    eot, eom) end generation as eos does, so they join it as a list."""
    ids = {k: get.integer(f"tokenizer.ggml.{k}_token_id", None)
           for k in ("bos", "eos", "eot", "eom", "padding")}
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None))
    return {"bos_token_id": ids["bos"], "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
            "pad_token_id": ids["padding"]}


def _vocab_size(f: GGUFFile, get, arch: str) -> int:
    """Rows of the token embedding; the vocab_size key and the token list must agree with it."""
    if "token_embd.weight" not in f._tensors:
        raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    shape = f._tensors["token_embd.weight"].shape
    if len(shape) != 2:
        raise CheckpointError(f"{f.path}: token_embd.weight has shape {shape}, expected 2-D")
    vocab = shape[0]
    declared = get.integer(f"{arch}.vocab_size", vocab)
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else vocab
    if declared != vocab or n_tokens > vocab:
        raise ConfigError(f"{f.path}: token embedding has {vocab} rows but {arch}.vocab_size is "
                          f"{declared} and the tokenizer lists {n_tokens} tokens")
    return vocab


def _reject_unknown_tensors(f: GGUFFile, cfg: Config) -> None:
    """A tensor the engine has no place for means a model it would run wrongly: refuse it."""
    # rope_freqs.weight is not a parameter: it became the config's rope_scaling
    rope = {"rope_freqs.weight"} if cfg.positions == "rope" else set()
    extra = sorted(set(f._tensors) - set(_name_map(cfg)) - rope)
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise CheckpointError(f"{f.path}: tensors the {cfg.model_type} model has no place "
                              f"for: {shown}")


class _MetaGetter:
    """Typed metadata lookups: a missing required key or a value of the wrong type is an error
    that names the key. A per-layer array whose values are all equal counts as one value."""

    _MISSING = object()

    def __init__(self, f: GGUFFile):
        self.f = f

    def _get(self, key, default, types, kind):
        v = self.f.metadata.get(key, self._MISSING)
        if v is self._MISSING:
            if default is self._MISSING:
                raise ConfigError(f"{self.f.path}: metadata key {key!r} is missing")
            return default
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and (v == v[0]).all():
            v = v[0].item()
        if not isinstance(v, types) or isinstance(v, bool):
            raise ConfigError(f"{self.f.path}: metadata {key!r}={reprlib.repr(v)} is not a "
                              f"single {kind} (per-layer values that differ are not supported)")
        return v

    def integer(self, key, default=_MISSING) -> int:
        return self._get(key, default, int, "integer")

    def number(self, key, default=_MISSING) -> float:
        return float(self._get(key, default, (int, float), "number"))

    def text(self, key, default=_MISSING) -> str:
        return self._get(key, default, str, "string")
