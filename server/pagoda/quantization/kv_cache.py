"""The fp8 KV cache: e4m3 keys and values with one scale per layer for each.

A layer's scales are calibrated on the first batch it writes (amax / 448, times two for headroom: later
tokens may run larger, and anything past the range saturates rather than overflowing). e4m3 keeps about
two significant digits across the whole range, so the scale matters only at the extremes.
"""

from __future__ import annotations

import torch

from pagoda.config import KV_CACHE_DTYPES

FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)
_HEADROOM = 2.0


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype: the model's for "auto", float8_e4m3fn for "fp8" (vLLM's spelling)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; supported: {', '.join(KV_CACHE_DTYPES)}")
    return model_dtype if name == "auto" else FP8_KV_DTYPE


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def calibrate_scale(values: torch.Tensor) -> float:
    """The scale that maps this batch's largest magnitude to half of e4m3's range."""
    amax = float(values.detach().abs().max()) if values.numel() else 0.0
    return max(amax * _HEADROOM / _FP8_MAX, torch.finfo(torch.float32).tiny)
