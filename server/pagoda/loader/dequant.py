"""ggml block formats, decoded with vectorised numpy: into their integers, scales and offsets, and from
those into float32 values.

Each decoder turns an `(n_blocks, block_bytes)` uint8 array into `BlockParts`: one integer per weight
and a float32 scale (and offset, for the `_1` and k-quant formats) per group of 32 weights (16 for Q6_K),
following the layouts of ggml-quants.c. `dequantize` multiplies them out (bit-exact with gguf-py: the
products of small integers and fp16 scales are exact in float32); the quantized linear layers keep them
(pagoda.quantization.gguf_blocks). numpy rather than torch on purpose: torch's OpenMP threads spin-wait
at every op, and on a busy or CPU-limited host that made loading 20x slower; plain numpy ops release
the GIL, so the loader runs one tensor per core in a thread pool instead (see gguf_weights). Large
tensors go through in chunks, keeping the integer temporaries small. Types without a decoder here fall
back to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType
_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 output per chunk

_PLAIN_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """One fp16 field per block, as an `(n, 1)` float32 column."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """`(..., k)` bytes -> `(..., 2k)`: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate((packed & 0xF, packed >> 4), axis=-1)


def _bits_of_u32(blocks: np.ndarray, start: int) -> np.ndarray:
    """The 32 bits of a little-endian uint32 field, as an `(n, 32)` uint8 array of 0/1."""
    qh = np.ascontiguousarray(blocks[:, start : start + 4]).view("<u4")
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4), as `(n, 8)` floats."""
    low_scales, low_mins, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate((low_scales & 63, (rest & 0xF) | ((low_scales >> 6) << 4)), axis=1)
    mins = np.concatenate((low_mins & 63, (rest >> 4) | ((low_mins >> 6) << 4)), axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 8 sub-blocks of 32: each 32-byte run gives sub-block 2j (low) then 2j+1 (high)."""
    runs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate((runs & 0xF, runs >> 4), axis=2).reshape(-1, 8, 32)


# (integers [n_blocks, block_elements] as int8, scales [n_blocks, groups], offsets or None, bits)
BlockParts = tuple[np.ndarray, np.ndarray, np.ndarray | None, int]


def _q8_0(blocks: np.ndarray) -> BlockParts:
    return blocks[:, 2:34].view(np.int8), _f16(blocks, 0), None, 8


def _q4_0(blocks: np.ndarray) -> BlockParts:
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:18]).view(np.int8), d, -8.0 * d, 4


def _q4_1(blocks: np.ndarray) -> BlockParts:
    return _nibbles(blocks[:, 4:20]).view(np.int8), _f16(blocks, 0), _f16(blocks, 2), 4


def _q5_0(blocks: np.ndarray) -> BlockParts:
    q = (_nibbles(blocks[:, 6:22]) | (_bits_of_u32(blocks, 2) << 4)).view(np.int8) - np.int8(16)
    return q, _f16(blocks, 0), None, 8


def _q5_1(blocks: np.ndarray) -> BlockParts:
    q = _nibbles(blocks[:, 8:24]) | (_bits_of_u32(blocks, 4) << 4)
    return q.view(np.int8), _f16(blocks, 0), _f16(blocks, 2), 8


def _q4_k(blocks: np.ndarray) -> BlockParts:
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:144])
    return q.reshape(len(blocks), -1).view(np.int8), _f16(blocks, 0) * scales, -_f16(blocks, 2) * mins, 4


def _q5_k(blocks: np.ndarray) -> BlockParts:
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    # bit s of qh[l] is the fifth bit of element l of sub-block s
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (_k_low_nibbles(blocks[:, 48:176]) | (high << 4)).reshape(len(blocks), -1)
    return q.view(np.int8), _f16(blocks, 0) * scales, -_f16(blocks, 2) * mins, 8


def _q6_k(blocks: np.ndarray) -> BlockParts:
    n = blocks.shape[0]
    # Per 128-element half, ql is 2 runs of 32 bytes; nibble-major, run-minor gives the output order,
    # and the matching 2-bit field of qh sits at shift 2 * (2 * nibble + run).
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)
    low = np.concatenate((ql & 0xF, ql >> 4), axis=2)
    shifts = np.array([[0, 2], [4, 6]], dtype=np.uint8).reshape(1, 1, 2, 2, 1)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).view(np.int8) - np.int8(32)
    # one scale per 16 elements
    return q.reshape(n, -1), _f16(blocks, 208) * blocks[:, 192:208].view(np.int8), None, 8


BLOCK_FORMATS: dict[GGMLQuantizationType, Callable[[np.ndarray], BlockParts]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def _values(parts: BlockParts) -> np.ndarray:
    """q * scale (+ offset), per group: the float32 weights the parts stand for, `(n, block_elements)`."""
    q, scale, offset, _ = parts
    groups = q.reshape(q.shape[0], scale.shape[1], -1) * scale[..., None]
    if offset is not None:
        groups = groups + offset[..., None]
    return groups.reshape(q.shape[0], -1)


def dequantize(raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes of one tensor -> its values, shaped `shape` (torch order).

    Plain float types come back in their own dtype without a copy (a view of `raw`); block formats come
    back as a new float32 tensor.
    """
    if ggml_type in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[ggml_type]).reshape(shape)
    block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.numpy().reshape(-1, block_bytes)
    decode = BLOCK_FORMATS.get(ggml_type)
    if decode is None:
        values = np.asarray(gguf_dequantize(blocks, ggml_type), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape)
    out = np.empty((blocks.shape[0], block_elements), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_elements)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step]
        out[start : start + step] = _values(decode(chunk))
    return torch.from_numpy(out).reshape(shape)
