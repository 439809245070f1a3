"""Read a GGUF's block-quantized tensors as plain numpy arrays: integer codes, per-block scales and offsets.

Every supported format is affine per block along the input dimension (ggml's layout, rows are output features):

    Q4_0: w = d (q - 8)        q in 0..15    block 32
    Q4_1: w = d q + m          q in 0..15    block 32
    Q5_0: w = d (q - 16)       q in 0..31    block 32
    Q5_1: w = d q + m          q in 0..31    block 32
    Q8_0: w = d (q - 128)      q = int8 + 128  block 32
    Q4_K: w = (d sc) q - (dmin mn)   q in 0..15, 6-bit sc and mn per 32 of a 256 super-block
    Q5_K: the same with q in 0..31
    Q6_K: w = (d sc) (q - 32)  q in 0..63, int8 sc per 16 of a 256 super-block

The K-quants' sub-block scale d sc and offset dmin mn are exact in float32 (an fp16 times a small integer), so a
K-quant is the same affine form with float32 scales per block of 32 (Q6_K: 16). A tensor becomes `codes` (uint8,
[rows, cols]), `scales` and `offsets` (float32, [rows, cols / block]) and a `zero_point` (the integer subtracted
from every code). `dequantize()` reproduces gguf-py's own dequantization bit for bit (the same float32 operations,
checked for every format by the tests), which is what transformers loads and what the exported graph holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError

BLOCK = 32


@dataclasses.dataclass
class QuantizedTensor:
    name: str
    qtype: str  # a key of FORMATS
    bits: int  # the MatMulNBits width that holds the codes exactly: 4, or 8 for 5-, 6- and 8-bit codes
    codes: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols // block]
    offsets: np.ndarray | None  # float32 [rows, cols // block] (the m of Q4_1/Q5_1, -dmin mn of Q4_K/Q5_K)
    zero_point: int  # subtracted from the codes (0 for the formats with offsets)
    block: int = BLOCK
    levels: int = 16  # how many code values the format has (16, 32, 64, 256)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], with gguf-py's arithmetic: d * q + m, or d * (q - z) computed as float."""
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, cols // self.block, self.block).astype(np.float32)
        d = self.scales[..., None]
        if self.offsets is not None:
            w = d * q + self.offsets[..., None]
        else:
            w = (q - np.float32(self.zero_point)) * d
        return w.reshape(rows, cols)


def _f16(field: np.ndarray) -> np.ndarray:
    """An fp16 header field [blocks, 2] as float32 [blocks]."""
    return np.ascontiguousarray(field).view(np.float16).astype(np.float32)[:, 0]


def _nibbles(payload: np.ndarray, groups: int) -> np.ndarray:
    """Bytes [blocks, groups * L] holding element i of a group in the low nibble of byte i and element L + i in the
    high nibble -> codes [blocks, groups * 2L]."""
    p = payload.reshape(payload.shape[0], groups, 1, -1)
    return np.concatenate([p & 0x0F, p >> 4], axis=2).reshape(payload.shape[0], -1)


def _high_bits(qh: np.ndarray, width: int, groups: int) -> np.ndarray:
    """Bytes [blocks, groups * L] holding `width`-bit fields: field j of byte i is element j * L + i of a group."""
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    q = qh.reshape(qh.shape[0], groups, 1, -1) >> shifts
    return (q & ((1 << width) - 1)).reshape(qh.shape[0], -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins: for j < 4, sc = b[j] & 63 and
    mn = b[j + 4] & 63; for j >= 4 the low four bits are in b[j + 4] (sc low nibble, mn high nibble) and the high
    two bits are the top bits of b[j - 4] (sc) and b[j] (mn)."""
    b = packed.astype(np.uint8)
    lo_sc, lo_mn, mixed = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (mixed & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_mn & 63, (mixed >> 4) | ((lo_mn >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _legacy(qtype: str, blocks: np.ndarray):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: codes [n, 32], scale [n, 1], offset [n, 1] or None."""
    d = _f16(blocks[:, 0:2])[:, None]
    if qtype == "Q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, None
    has_m = qtype.endswith("_1")
    m = _f16(blocks[:, 2:4])[:, None] if has_m else None
    start = 4 if has_m else 2
    if qtype.startswith("Q5"):
        high = np.unpackbits(blocks[:, start:start + 4], axis=1, bitorder="little")  # bit j -> element j
        codes = _nibbles(blocks[:, start + 4:], 1) | (high << 4)
    else:
        codes = _nibbles(blocks[:, start:], 1)
    return codes, d, m


def _k_quant(qtype: str, blocks: np.ndarray):
    """Q4_K, Q5_K, Q6_K: codes [n, 256], sub-block scales [n, 8 or 16], offsets [n, 8] or None."""
    if qtype == "Q6_K":
        codes = _nibbles(blocks[:, 0:128], 2) | (_high_bits(blocks[:, 128:192], 2, 2) << 4)
        d = _f16(blocks[:, 208:210])[:, None]
        return codes, d * blocks[:, 192:208].view(np.int8).astype(np.float32), None
    d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
    sc, mn = _k_scales(blocks[:, 4:16])
    if qtype == "Q5_K":
        codes = _nibbles(blocks[:, 48:176], 4) | (_high_bits(blocks[:, 16:48], 1, 1) << 4)
    else:
        codes = _nibbles(blocks[:, 16:144], 4)
    return codes, d * sc, -(dmin * mn)


# qtype -> (elements per stored block, block of one scale, MatMulNBits bits, code levels, zero point or None when
# the format has offsets, decoder)
FORMATS = {
    "Q4_0": (32, 32, 4, 16, 8, _legacy),
    "Q4_1": (32, 32, 4, 16, None, _legacy),
    "Q5_0": (32, 32, 8, 32, 16, _legacy),
    "Q5_1": (32, 32, 8, 32, None, _legacy),
    "Q8_0": (32, 32, 8, 256, 128, _legacy),
    "Q4_K": (256, 32, 4, 16, None, _k_quant),
    "Q5_K": (256, 32, 8, 32, None, _k_quant),
    "Q6_K": (256, 16, 8, 64, 32, _k_quant),
}
SUPPORTED = tuple(FORMATS)


def decode_blocks(name: str, qtype: str, raw: np.ndarray, rows: int, cols: int) -> QuantizedTensor:
    if qtype not in FORMATS:
        raise OnnxlmError(f"GGUF tensor {name} has block type {qtype}, which onnxlm cannot import exactly")
    stored, block, bits, levels, zero, decode = FORMATS[qtype]
    codes, scales, offsets = decode(qtype, np.ascontiguousarray(raw).reshape(rows * cols // stored, -1))
    return QuantizedTensor(name, qtype, bits, codes.astype(np.uint8).reshape(rows, cols),
                           scales.astype(np.float32).reshape(rows, -1),
                           None if offsets is None else offsets.astype(np.float32).reshape(rows, -1),
                           0 if zero is None else zero, block, levels)


def read_quantized_tensors(path: Path) -> dict[str, QuantizedTensor]:
    """Every block-quantized 2-D tensor of a GGUF file whose type is in SUPPORTED, by GGUF tensor name."""
    from onnxlm.frontend.load_gguf import open_gguf

    reader = open_gguf(path)
    out = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED or len(t.shape) != 2:
            continue
        cols, rows = (int(s) for s in t.shape)  # ggml lists the fastest dimension first
        out[t.name] = decode_blocks(t.name, qtype, np.asarray(t.data), rows, cols)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds, e.g. {"Q4_1": 210, "Q8_0": 1, "F32": 61}."""
    import collections

    from onnxlm.frontend.load_gguf import open_gguf

    return dict(collections.Counter(t.tensor_type.name for t in open_gguf(path).tensors))
