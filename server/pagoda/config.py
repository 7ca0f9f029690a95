"""Engine configuration: one strict dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from pagoda.engine.spec_decode.config import SpeculativeConfig


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's context length
    kv_cache_memory: int | None = None  # bytes of KV pool on CPU (like VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # tests: force a tiny pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    skip_tokenizer_init: bool = False
    seed: int = 0
    tensor_parallel_size: int = 1
    # None (auto: a quantized GGUF file keeps its blocks, anything else full precision) | none | int8 | fp8 |
    # gguf; see docs/quantization.md
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (e4m3, a scale per layer)
    enforce_eager: bool = False
    # vLLM's dict (or its JSON): {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...}
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        spec = self.speculative_config
        if spec is not None and spec.method == "draft_model" and self.tensor_parallel_size > 1:
            raise ValueError("speculative_config: draft_model does not support tensor_parallel_size > 1")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.quantization not in (None, "none", "int8", "fp8", "gguf"):
            raise ValueError(f"unknown quantization {self.quantization!r}: expected none, int8, fp8 or gguf")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: expected auto or fp8")

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
