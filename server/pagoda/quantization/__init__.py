"""Quantization: weight formats for the linear layers (int8, fp8, GGUF blocks) and an fp8 KV cache.

    with quantized_layers("int8"):
        model = build_model(...)        # every Linear gets the int8 quant method
    model.load_weights(checkpoint.weights())
    process_weights_after_loading(model)  # full-precision weights -> int8 + scales

See docs/quantization.md for the formats, their kernels and measured memory, speed and quality.
"""

from pagoda.quantization.kv_cache import KV_CACHE_DTYPES, kv_cache_dtype
from pagoda.quantization.methods import (
    QUANTIZATION_METHODS,
    LinearMethod,
    get_linear_method,
    process_weights_after_loading,
    quantized_layers,
    weight_bytes,
)

__all__ = [
    "KV_CACHE_DTYPES",
    "QUANTIZATION_METHODS",
    "LinearMethod",
    "get_linear_method",
    "kv_cache_dtype",
    "process_weights_after_loading",
    "quantized_layers",
    "weight_bytes",
]
