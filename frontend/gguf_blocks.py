"""Read a GGUF's block-quantized tensors as plain numpy arrays: integer codes, per-block scales and offsets.

Every supported block format is affine per block of 32 along the input dimension (ggml's layout, rows are
output features):

    Q4_0: w = d * (q - 8)      q in 0..15
    Q4_1: w = d * q + m        q in 0..15
    Q8_0: w = d * (q - 128)    q = int8 + 128 in 0..255

so a tensor becomes `codes` (uint8, [rows, cols]), `scales` and `offsets` (float32, [rows, cols / 32]) and a
`zero_point` (the integer subtracted from every code). `dequantize()` reproduces gguf-py's own dequantization
bit for bit (same float32 operations), which is what transformers loads, and what the exported graph holds.
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
    qtype: str  # "Q4_0" | "Q4_1" | "Q8_0"
    bits: int
    codes: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols // BLOCK]
    offsets: np.ndarray | None  # float32 [rows, cols // BLOCK] (Q4_1's m), else None
    zero_point: int

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], with gguf-py's arithmetic: d * q + m, or d * (q - z) computed as float."""
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)
        d = self.scales[..., None]
        if self.offsets is not None:
            w = d * q + self.offsets[..., None]
        else:
            w = (q - np.float32(self.zero_point)) * d
        return w.reshape(rows, cols)


def _split(blocks: np.ndarray, head_bytes: int) -> tuple[np.ndarray, ...]:
    """Per-block fp16 header fields (as float32) and the payload bytes."""
    heads = [blocks[:, 2 * i:2 * i + 2].copy().view(np.float16).astype(np.float32)[:, 0]
             for i in range(head_bytes // 2)]
    return (*heads, blocks[:, head_bytes:])


def decode_blocks(name: str, qtype: str, raw: np.ndarray, rows: int, cols: int) -> QuantizedTensor:
    blocks = raw.reshape(rows * cols // BLOCK, -1)
    if qtype == "Q8_0":
        d, payload = _split(blocks, 2)
        codes = (payload.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        offsets, zero, bits = None, 128, 8
    elif qtype in ("Q4_0", "Q4_1"):
        if qtype == "Q4_1":
            d, m, payload = _split(blocks, 4)
            offsets, zero = m.reshape(rows, -1), 0
        else:
            d, payload = _split(blocks, 2)
            offsets, zero = None, 8
        # byte j holds element j (low nibble) and element j + 16 (high nibble)
        codes = np.concatenate([payload & 0x0F, payload >> 4], axis=1)
        bits = 4
    else:
        raise OnnxlmError(f"GGUF tensor {name} has block type {qtype}, which onnxlm cannot import exactly")
    return QuantizedTensor(name, qtype, bits, codes.reshape(rows, cols), d.reshape(rows, -1), offsets, zero)


SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")


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
