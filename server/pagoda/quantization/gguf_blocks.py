"""GGUF (ggml) block formats -> `GroupQuantized`, exactly: the same integers, scales and minimums.

ggml stores each run of 32 (or 256, for the k-quants) weights of a row as one block: packed integers
plus an fp16 scale and, for the `_1` and k-quant formats, an fp16 minimum. Here those become one integer
per weight (0..15 for 4-bit formats, int8 otherwise) and a float32 scale/offset per group of 32 weights
(16 for Q6_K, whose sub-blocks are that small). The decoders are the loader's (pagoda.loader.dequant),
which multiplies the same parts out when it expands a tensor to floats: the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.loader.dequant import BLOCK_FORMATS
from pagoda.quantization.grouped import GroupQuantized


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
