"""GGUF (ggml) block formats -> `GroupQuantized`, exactly: the same integers, scales and minimums.

ggml stores each run of 32 (or 256, for the k-quants) weights of a row as one block: packed integers
plus an fp16 scale and, for the `_1` and k-quant formats, an fp16 minimum. Here those become one integer
per weight (0..15 for 4-bit formats, int8 otherwise) and a float32 scale/offset per group of 32 weights
(16 for Q6_K, whose sub-blocks are that small). The bit layouts follow ggml-quants.c; the helpers that
read them are the loader's (pagoda.loader.dequant), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.loader.dequant import _bits_of_u32, _f16, _k_low_nibbles, _k_scales_and_mins, _nibbles
from pagoda.quantization.grouped import GroupQuantized

Q = GGMLQuantizationType
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
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (_k_low_nibbles(blocks[:, 48:176]) | (high << 4)).reshape(len(blocks), -1)
    return q.view(np.int8), _f16(blocks, 0) * scales, -_f16(blocks, 2) * mins, 8


def _q6_k(blocks: np.ndarray) -> BlockParts:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)
    low = np.concatenate((ql & 0xF, ql >> 4), axis=2)
    shifts = np.array([[0, 2], [4, 6]], dtype=np.uint8).reshape(1, 1, 2, 2, 1)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).view(np.int8) - np.int8(32)
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


def is_supported(ggml_type: int) -> bool:
    return ggml_type in BLOCK_FORMATS


def group_quantized_from_blocks(weight: QuantizedBlocks) -> GroupQuantized:
    """The weight's own integers and scales, one integer per weight; raises for formats without a kernel."""
    ggml_type = GGMLQuantizationType(weight.ggml_type)
    if ggml_type not in BLOCK_FORMATS:
        raise ValueError(f"GGUF type {ggml_type.name} has no quantized kernel")
    rows, cols = weight.shape
    _, block_bytes = GGML_QUANT_SIZES[ggml_type]
    blocks = weight.data.contiguous().numpy().reshape(-1, block_bytes)
    q, scale, offset, bits = BLOCK_FORMATS[ggml_type](blocks)
    return GroupQuantized(
        torch.from_numpy(np.ascontiguousarray(q)).reshape(rows, cols),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(rows, -1),
        None
        if offset is None
        else torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32)).reshape(rows, -1),
        bits,
    )
