"""Helpers for tests/test_gguf.py: small GGUF files written with gguf.GGUFWriter, llama.cpp's
q/k permutation, reference dequantizers written from ggml-quants.c, and a walker that finds the
integer fields of a GGUF header (for targeted mutation).

Everything here is independent of engine/io/gguf.py, so the tests compare two implementations.
"""
from __future__ import annotations

import math
import struct

import numpy as np

import gguf
import gguf.quants  # noqa: E402

Q = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType


# --------------------------------------------------------------------------------------------
# Writing files

def _add_kv(w, key, val):
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        w.add_uint32(key, val)
    elif isinstance(val, float):
        w.add_float32(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    elif isinstance(val, np.ndarray):
        sub = {np.dtype("int32"): VT.INT32, np.dtype("float32"): VT.FLOAT32,
               np.dtype("uint32"): VT.UINT32}[val.dtype]
        w.add_key_value(key, [x.item() for x in val], VT.ARRAY, sub_type=sub)
    elif isinstance(val, tuple):  # (value, GGUFValueType): an explicit type
        w.add_key_value(key, val[0], val[1])
    else:
        w.add_array(key, list(val))


_PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}


def write_gguf(path, arch: str, metadata: dict, tensors: dict) -> str:
    """tensors: name -> float array (written as F32), or (array, quant type): the array is
    quantized with gguf.quants.quantize unless it is already uint8 blocks."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in metadata.items():
        _add_kv(w, k, v)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            a, qt = t
            if qt in _PLAIN:  # the writer infers the type from the numpy dtype
                a = a.astype(_PLAIN[qt])
            elif a.dtype != np.uint8:
                a = gguf.quants.quantize(np.asarray(a, np.float32), qt)
            w.add_tensor(name, a, raw_dtype=qt if a.dtype == np.uint8 else None)
        else:
            w.add_tensor(name, np.asarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q (n_head) and k
    (n_head_kv) rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


TINY = dict(V=96, C=64, H=4, Hkv=2, D=16, F=128, L=2, T=256)


def tiny_llama_params(seed=0, tied=True, s=TINY) -> dict:
    """Random engine params (engine names, rotate_half layout) of a tiny llama."""
    rng = np.random.default_rng(seed)
    V, C, H, Hkv, D, F = s["V"], s["C"], s["H"], s["Hkv"], s["D"], s["F"]
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    p = {"wte.weight": r(V, C), "ln_f.weight": 1 + 0.1 * r(C)}
    if not tied:
        p["lm_head.weight"] = r(V, C)
    for i in range(s["L"]):
        b = f"blocks.{i}."
        p.update({b + "ln1.weight": 1 + 0.1 * r(C), b + "ln2.weight": 1 + 0.1 * r(C),
                  b + "attn.q.weight": r(H * D, C), b + "attn.k.weight": r(Hkv * D, C),
                  b + "attn.v.weight": r(Hkv * D, C), b + "attn.o.weight": r(C, H * D),
                  b + "mlp.gate.weight": r(F, C), b + "mlp.up.weight": r(F, C),
                  b + "mlp.down.weight": r(C, F)})
    return p


def tiny_llama_metadata(s=TINY, **extra) -> dict:
    m = {"llama.block_count": s["L"], "llama.context_length": s["T"],
         "llama.embedding_length": s["C"], "llama.feed_forward_length": s["F"],
         "llama.attention.head_count": s["H"], "llama.attention.head_count_kv": s["Hkv"],
         "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
         "llama.rope.dimension_count": s["D"],
         "tokenizer.ggml.tokens": [f"t{i}" for i in range(s["V"])]}
    m.update(extra)
    return m


_GGUF_NAMES = {"ln1": "attn_norm", "ln2": "ffn_norm", "attn.q": "attn_q", "attn.k": "attn_k",
               "attn.v": "attn_v", "attn.o": "attn_output", "mlp.gate": "ffn_gate",
               "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def llama_gguf_tensors(p: dict, s=TINY, qtype=None) -> dict:
    """Engine params -> GGUF tensors as llama.cpp's converter writes them (q/k permuted).
    With qtype, 2-D weights are quantized to it."""
    out = {}

    def wrap(a):
        return (a, qtype) if qtype is not None and a.ndim == 2 else a

    glob = {"wte.weight": "token_embd.weight", "ln_f.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    for e, a in p.items():
        if e in glob:
            out[glob[e]] = wrap(a)
            continue
        _, i, *rest = e.split(".")
        layer, kind = ".".join(rest[:-1]), rest[-1]
        if layer == "attn.q":
            a = llamacpp_permute(a, s["H"], s["H"])
        elif layer == "attn.k":
            a = llamacpp_permute(a, s["H"], s["Hkv"])
        out[f"blk.{i}.{_GGUF_NAMES[layer]}.{kind}"] = wrap(a)
    return out


def write_tiny_llama(path, seed=0, tied=True, qtype=None, metadata=None, drop=(), extra=None,
                     s=TINY, arch="llama"):
    """Write a tiny llama GGUF as llama.cpp would; returns the engine params it holds."""
    p = tiny_llama_params(seed, tied, s)
    t = llama_gguf_tensors(p, s, qtype=qtype)
    for name in drop:
        del t[name]
    t.update(extra or {})
    write_gguf(path, arch, {**tiny_llama_metadata(s), **(metadata or {})}, t)
    return p


# --------------------------------------------------------------------------------------------
# Reference dequantization, written from ggml-quants.c (dequantize_row_*); vectorized over
# blocks, loops over positions as the C code does. Input: (n_blocks, block_bytes) uint8.

def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)


def ref_q8_0(b):
    d = _f16(b[:, :2])
    return d * b[:, 2:].view(np.int8).astype(np.float32)


def ref_q4_0(b):
    d, qs = _f16(b[:, :2]), b[:, 2:18]
    return np.concatenate([((qs & 0xF).astype(np.float32) - 8) * d,
                           ((qs >> 4).astype(np.float32) - 8) * d], axis=1)


def ref_q4_1(b):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:20]
    return np.concatenate([(qs & 0xF) * d + m, (qs >> 4) * d + m], axis=1)


def _q5_high(qh: np.ndarray):
    """qh (n, 4) bytes as a u32 -> fifth bits (n, 16) of elements j and j + 16, as 0 or 16."""
    h = np.ascontiguousarray(qh).view("<u4").astype(np.int64)  # (n, 1)
    j = np.arange(16)
    return ((h >> j) << 4) & 0x10, (h >> (j + 12)) & 0x10


def ref_q5_0(b):
    d, qs = _f16(b[:, :2]), b[:, 6:22].astype(np.int64)
    h0, h1 = _q5_high(b[:, 2:6])
    return np.concatenate([((qs & 0xF) | h0) - 16, ((qs >> 4) | h1) - 16], axis=1) * d


def ref_q5_1(b):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 8:24].astype(np.int64)
    h0, h1 = _q5_high(b[:, 4:8])
    return np.concatenate([(qs & 0xF) | h0, (qs >> 4) | h1], axis=1) * d + m


def _scale_min_k4(j, q):
    """get_scale_min_k4: 6-bit scale and min number j of 8, packed in 12 bytes."""
    q = q.astype(np.int64)
    if j < 4:
        return q[:, j] & 63, q[:, j + 4] & 63
    return ((q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4),
            (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4))


def ref_q2_k(b):
    """16 groups of 16: a 4-bit scale and a 4-bit min each, 2-bit values."""
    sc, qs = b[:, :16].astype(np.int64), b[:, 16:80].astype(np.int64)
    d, dmin = _f16(b[:, 80:82])[:, 0], _f16(b[:, 82:84])[:, 0]
    y = np.empty((len(b), 256), np.float32)
    i = 0
    for n in range(2):
        q = qs[:, 32 * n:32 * n + 32]
        for shift in (0, 2, 4, 6):
            for half in (q[:, :16], q[:, 16:]):
                s = sc[:, i // 16]
                y[:, i:i + 16] = ((d * (s & 0xF))[:, None] * ((half >> shift) & 3)
                                  - (dmin * (s >> 4))[:, None])
                i += 16
    return y


def ref_q3_k(b):
    """16 groups of 16: 6-bit scales packed in 12 bytes (offset by 32), 2-bit values plus a
    high bit from hmask (clear: minus 4)."""
    hm, qs = b[:, :32].astype(np.int64), b[:, 32:96].astype(np.int64)
    aux = np.ascontiguousarray(b[:, 96:108]).view("<u4").astype(np.int64)   # (n, 3) words
    d = _f16(b[:, 108:110])[:, 0]
    k1, k2 = 0x03030303, 0x0F0F0F0F
    a0, a1, tmp = aux[:, 0], aux[:, 1], aux[:, 2]
    words = [(a0 & k2) | ((tmp & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4),
             ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
             ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
    scales = np.stack(words, 1).astype("<u4").view(np.int8).astype(np.float32)  # (n, 16)
    y = np.empty((len(b), 256), np.float32)
    i, m = 0, 1
    for n in range(2):
        q = qs[:, 32 * n:32 * n + 32]
        for shift in (0, 2, 4, 6):
            for lo in (0, 16):
                v = ((q[:, lo:lo + 16] >> shift) & 3) - np.where(hm[:, lo:lo + 16] & m, 0, 4)
                y[:, i:i + 16] = (d * (scales[:, i // 16] - 32))[:, None] * v
                i += 16
            m <<= 1
    return y


# kvalues_iq4nl: the 16 levels of the non-linear 4-bit types
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      np.float32)


def ref_iq4_nl(b):
    d, qs = _f16(b[:, :2]), b[:, 2:18]
    return np.concatenate([d * IQ4_LEVELS[qs & 0xF], d * IQ4_LEVELS[qs >> 4]], axis=1)


def ref_iq4_xs(b):
    """8 groups of 32: a 6-bit scale (4 low bits in scales_l, 2 high in scales_h, offset by
    32), values from the 16 levels."""
    d = _f16(b[:, :2])[:, 0]
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2")[:, 0].astype(np.int64)
    sl, qs = b[:, 4:8].astype(np.int64), b[:, 8:136]
    y = np.empty((len(b), 256), np.float32)
    for ib in range(8):
        ls = ((sl[:, ib // 2] >> 4 * (ib % 2)) & 0xF) | (((sh >> 2 * ib) & 3) << 4)
        dl = (d * (ls - 32))[:, None]
        q = qs[:, 16 * ib:16 * ib + 16]
        y[:, 32 * ib:32 * ib + 16] = dl * IQ4_LEVELS[q & 0xF]
        y[:, 32 * ib + 16:32 * ib + 32] = dl * IQ4_LEVELS[q >> 4]
    return y


def ref_q4_k(b):
    d, dmin, scales, qs = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:16], b[:, 16:144]
    y = np.empty((len(b), 256), np.float32)
    for k, j in enumerate(range(0, 256, 64)):
        sc1, m1 = _scale_min_k4(2 * k, scales)
        sc2, m2 = _scale_min_k4(2 * k + 1, scales)
        q = qs[:, 32 * k:32 * k + 32]
        y[:, j:j + 32] = (d * sc1)[:, None] * (q & 0xF) - (dmin * m1)[:, None]
        y[:, j + 32:j + 64] = (d * sc2)[:, None] * (q >> 4) - (dmin * m2)[:, None]
    return y


def ref_q5_k(b):
    d, dmin, scales = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:16]
    qh, ql = b[:, 16:48], b[:, 48:176]
    y = np.empty((len(b), 256), np.float32)
    u1, u2 = 1, 2
    for k, j in enumerate(range(0, 256, 64)):
        sc1, m1 = _scale_min_k4(2 * k, scales)
        sc2, m2 = _scale_min_k4(2 * k + 1, scales)
        q = ql[:, 32 * k:32 * k + 32]
        y[:, j:j + 32] = ((d * sc1)[:, None] * ((q & 0xF) + np.where(qh & u1, 16, 0))
                          - (dmin * m1)[:, None])
        y[:, j + 32:j + 64] = ((d * sc2)[:, None] * ((q >> 4) + np.where(qh & u2, 16, 0))
                               - (dmin * m2)[:, None])
        u1, u2 = u1 << 2, u2 << 2
    return y


def ref_q6_k(b):
    ql, qh = b[:, :128].astype(np.int64), b[:, 128:192].astype(np.int64)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])[:, 0]
    y = np.empty((len(b), 256), np.float32)
    for n in range(2):
        l_, h_, s_, y0 = ql[:, 64 * n:], qh[:, 32 * n:], sc[:, 8 * n:], 128 * n
        for l in range(32):  # noqa: E741
            is_ = l // 16
            q1 = ((l_[:, l] & 0xF) | (((h_[:, l] >> 0) & 3) << 4)) - 32
            q2 = ((l_[:, l + 32] & 0xF) | (((h_[:, l] >> 2) & 3) << 4)) - 32
            q3 = ((l_[:, l] >> 4) | (((h_[:, l] >> 4) & 3) << 4)) - 32
            q4 = ((l_[:, l + 32] >> 4) | (((h_[:, l] >> 6) & 3) << 4)) - 32
            y[:, y0 + l] = d * s_[:, is_] * q1
            y[:, y0 + l + 32] = d * s_[:, is_ + 2] * q2
            y[:, y0 + l + 64] = d * s_[:, is_ + 4] * q3
            y[:, y0 + l + 96] = d * s_[:, is_ + 6] * q4
    return y


REFERENCE = {Q.Q8_0: ref_q8_0, Q.Q4_0: ref_q4_0, Q.Q4_1: ref_q4_1, Q.Q5_0: ref_q5_0,
             Q.Q5_1: ref_q5_1, Q.Q2_K: ref_q2_k, Q.Q3_K: ref_q3_k, Q.Q4_K: ref_q4_k,
             Q.Q5_K: ref_q5_k, Q.Q6_K: ref_q6_k, Q.IQ4_NL: ref_iq4_nl, Q.IQ4_XS: ref_iq4_xs}

# Byte positions of the float16 scales in each block type: random bytes elsewhere, small finite
# values here (a random f16 may be inf or NaN).
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
              Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """(n_blocks, block_bytes) uint8: random bits, valid finite float16 scales."""
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.1, 0.1, size=n_blocks).astype(np.float16)
        b[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return b


# --------------------------------------------------------------------------------------------
# Header walker: where the integer fields of a valid GGUF file are.

_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_fields(data: bytes) -> tuple[list[tuple[int, int, str]], int]:
    """(offset, size, kind) of every count, length, type id, dimension and data offset in a
    valid GGUF v3 header; and the header's end."""
    fields = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos, kind):
        fields.append((pos, 8, kind))
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n

    def value(pos, vt):
        if vt in _SCALAR_SIZE:
            return pos + _SCALAR_SIZE[vt]
        if vt == 8:
            return string(pos, "string_len")
        fields.append((pos, 4, "array_type"))
        fields.append((pos + 4, 8, "array_len"))
        et, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(n):
            pos = value(pos, et)
        return pos

    for _ in range(n_kv):
        pos = string(pos, "key_len")
        fields.append((pos, 4, "value_type"))
        (vt,) = struct.unpack_from("<I", data, pos)
        pos = value(pos + 4, vt)
    for _ in range(n_t):
        pos = string(pos, "tensor_name_len")
        fields.append((pos, 4, "n_dims"))
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for _ in range(nd):
            fields.append((pos, 8, "dim"))
            pos += 8
        fields.append((pos, 4, "tensor_type"))
        fields.append((pos + 4, 8, "data_offset"))
        pos += 12
    return fields, pos


def converter_rope_factors(head_dim, theta, factor, low=1.0, high=4.0, old=8192):
    """rope_freqs.weight as llama.cpp's converter writes it for a Llama 3.1 config.json."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)
