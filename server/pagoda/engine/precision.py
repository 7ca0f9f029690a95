"""What the engine computes in: the dtype and the weight quantization an engine option resolves to for a
checkpoint on a device."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from pagoda.config import DTYPES
from pagoda.loader import Checkpoint

TORCH_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
assert set(TORCH_DTYPES) == set(DTYPES) - {"auto"}, "EngineConfig's dtype choices and these must agree"


def resolve_dtype(name: str, checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    """dtype="auto": the checkpoint's half type (a block-quantized GGUF file, which has no float type of
    its own, counts as bfloat16) where the device computes in it fast; float32 checkpoints stay float32
    on the CPU, so they match transformers exactly, and run in bfloat16 on a GPU, as vLLM does."""
    if name != "auto":
        return TORCH_DTYPES[name]
    half = checkpoint.torch_dtype if checkpoint.torch_dtype in (torch.float16, torch.bfloat16) else None
    if checkpoint.is_block_quantized:
        half = torch.bfloat16
    if device.type == "cpu":
        # bfloat16 doubles float32's matmul rate where the CPU multiplies it natively; elsewhere half
        # precision (and float16 anywhere) runs slower than float32
        return torch.bfloat16 if half is not None and cpu_has_native_bfloat16() else torch.float32
    return half or torch.bfloat16


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_quantization(name: str | None, checkpoint: Checkpoint, tensor_parallel_size: int) -> str | None:
    """quantization=None: a block-quantized GGUF file is served from its blocks (as llama.cpp and vLLM
    do: a quarter of the memory traffic), except under tensor parallelism, which the GGUF kernels lack;
    anything else runs unquantized. "none" always expands a GGUF file to floats."""
    if name is None:
        return "gguf" if checkpoint.is_block_quantized and tensor_parallel_size == 1 else None
    return None if name == "none" else name


# the largest GGUF file whose linear weights also get a dense copy by default: the copy takes ~4x a 4-bit
# file (2 GiB here, a ~1B-parameter model); above it the memory goes to the KV cache instead
DENSE_COPY_MAX_FILE_BYTES = 512 * 2**20


def resolve_dense_copy(option: bool | None, checkpoint: Checkpoint, device: torch.device) -> bool:
    """dense_weights_for_batches=None: on the CPU, keep dense copies of a small GGUF file's weights (prefill
    and batches of 16+ rows run 2-3x faster on them than on the int4 kernel, issue 14's measurements)."""
    if device.type != "cpu":
        return False
    if option is not None:
        return option
    path = checkpoint.path
    return path.is_file() and path.stat().st_size <= DENSE_COPY_MAX_FILE_BYTES
