"""Quant methods: how a linear layer's weight is stored, loaded and multiplied (vLLM's LinearMethodBase).

A Linear asks `get_linear_method()` for its method when it is built; the model runner builds the model
inside `quantized_layers(config.quantization)`, so every linear layer of that model gets the configured
method and everything else (embeddings, the LM head, norms) stays in full precision. The method creates
the layer's weight parameter (its loader included), turns the loaded weight into its stored form in
`process_weights_after_loading`, and computes the layer's product in `apply`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.config import QUANTIZATIONS
from pagoda.distributed.parallel_state import get_tp_size
from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.loader.dequant import dequantize
from pagoda.quantization.cpu_kernels import CpuQuantizedWeight
from pagoda.quantization.gguf_blocks import group_quantized_from_blocks, is_supported
from pagoda.quantization.grouped import GroupQuantized, quantize_per_channel_int8, stack_rows

QUANTIZATION_METHODS = tuple(q for q in QUANTIZATIONS if q != "none")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


class QuantizedWeight(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]: ...


@runtime_checkable
class WeightsAfterLoading(Protocol):
    """A layer that quantizes weights of its own after loading (not through a `Linear`'s quant method)."""

    def process_weights_after_loading(self) -> None: ...

    def quantized_tensors(self) -> list[torch.Tensor]: ...


def pack_for_device(
    weight: GroupQuantized, device: torch.device, dense_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """The kernel-ready form of `weight` on `device`: the Triton layout on GPUs, torch's packed CPU one
    (plus, with `dense_dtype`, a dense copy for steps of many rows)."""
    if device.type == "cuda":
        from pagoda.quantization.triton_kernels import TritonQuantizedWeight  # triton only where it runs

        moved = GroupQuantized(
            weight.q.to(device),
            weight.scale.to(device),
            None if weight.offset is None else weight.offset.to(device),
            weight.bits,
        )
        return TritonQuantizedWeight(moved)
    return CpuQuantizedWeight(weight, dense_dtype)


class LinearMethod:
    """Full precision: the weight is a plain parameter and the product is F.linear."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded weight into the stored form (nothing to do in full precision)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def weight_tensors(self, layer: nn.Module) -> list[torch.Tensor]:
        """What holds the layer's weight in memory, for accounting."""
        return [layer.weight]

    def quantize_weight(self, weight: torch.Tensor) -> QuantizedWeight | None:
        """A float weight [N, K] in this format, for layers that hold many (the experts of an MoE layer);
        None keeps it in float (full precision; GGUF's weights arrive quantized from the file instead)."""
        return None


class _PackedLinearMethod(LinearMethod):
    """Common ground of the integer formats: the layer's `quantized` weight does the product."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.quantized is None:  # a weight left in float (a format or shape without a kernel)
            return super().apply(layer, x, bias)
        if x.dim() == 2:  # the flat batch, as the models pass it: no reshapes (~120 calls a step)
            out = layer.quantized.matmul(x)
        else:
            out = layer.quantized.matmul(x.reshape(-1, x.shape[-1]))
            out = out.view(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias

    def weight_tensors(self, layer: nn.Module) -> list[torch.Tensor]:
        return super().weight_tensors(layer) if layer.quantized is None else layer.quantized.tensors()


class Int8LinearMethod(_PackedLinearMethod):
    """W8A16: per-output-channel symmetric int8, quantized at load from the full-precision weight."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.quantized = self.quantize_weight(layer.weight.data)
        layer.register_parameter("weight", None)

    def quantize_weight(self, weight: torch.Tensor) -> QuantizedWeight:
        return pack_for_device(quantize_per_channel_int8(weight), weight.device)


class Fp8Weight:
    """e4m3 weights with one float32 scale per output row. On GPUs with fp8 tensor cores (compute
    capability 8.9+) activations are quantized per row on the fly and multiplied by torch._scaled_mm;
    elsewhere the weight is dequantized inside the product."""

    def __init__(self, weight: torch.Tensor) -> None:
        weight = weight.float()
        self.scale = (weight.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        self.weight = (weight / self.scale[:, None]).to(FP8_DTYPE)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if _has_fp8_matmul(x, self.weight):
            return _scaled_fp8_matmul(x, self.weight, self.scale, None)
        weight = _e4m3_as_scaled_half(self.weight).to(x.dtype)
        return F.linear(x, weight) * (self.scale * _E4M3_IN_HALF_FACTOR).to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scale]


class Fp8LinearMethod(_PackedLinearMethod):
    """fp8 e4m3 weights quantized at load (`Fp8Weight`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.quantized = self.quantize_weight(layer.weight.data)
        layer.register_parameter("weight", None)

    def quantize_weight(self, weight: torch.Tensor) -> QuantizedWeight:
        return Fp8Weight(weight)


# e4m3's bits moved into a float16 stand for the same number times 2**-8, subnormals included:
# the exponent biases differ by 8 (15 - 7) and the mantissa just gains zero bits
_E4M3_IN_HALF_FACTOR = 256.0


def _e4m3_as_scaled_half(weight: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 -> float16 holding value / 256, by moving bits: on the CPU a plain fp8 -> float cast
    runs ~40x slower than a float matmul of the same weight; these three integer ops ~5x."""
    bits = weight.view(torch.uint8).to(torch.int16)
    return (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).view(torch.float16)


def _has_fp8_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # cuBLASLt's row-wise scaled fp8 GEMM: sm89+, bfloat16 output, dimensions in multiples of 16
    return (
        x.is_cuda
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
        and x.dtype == torch.bfloat16
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 16 == 0
    )


def _scaled_fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    x_fp8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return torch._scaled_mm(
        x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], bias=bias, out_dtype=x.dtype
    )


class GGUFLinearMethod(_PackedLinearMethod):
    """GGUF block-quantized weights kept in their integers and scales, multiplied by the fused kernels.

    The checkpoint hands each linear weight over as `QuantizedBlocks`; fused projections (q/k/v,
    gate/up) collect one part per shard and stack them after loading, whatever mix of formats they hold.
    A weight in a format without a kernel (or a float one) is kept in float, whole layer.
    With `dense_dtype` (CPU only), a dense copy of each quantized weight serves steps of many rows.
    """

    def __init__(self, dense_dtype: torch.dtype | None = None) -> None:
        self.dense_dtype = dense_dtype

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        if get_tp_size() > 1:
            raise NotImplementedError("quantization='gguf' does not support tensor parallelism yet")
        # a placeholder the loader never copies into: it records the parts, on the model's device
        layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        layer.weight.weight_loader = self._weight_loader(layer)
        layer.gguf_parts = {}
        layer.input_size, layer.output_size = input_size, output_size
        layer.params_dtype = torch.get_default_dtype()

    @staticmethod
    def _weight_loader(layer: nn.Module) -> Callable[..., None]:
        def load(
            param: nn.Parameter, loaded: torch.Tensor | QuantizedBlocks, shard: int | None = None
        ) -> None:
            rows = layer.output_size if shard is None else layer.output_sizes[shard]
            if tuple(loaded.shape) != (rows, layer.input_size):
                expected = (rows, layer.input_size)
                raise ValueError(f"shape mismatch: parameter {expected}, checkpoint {tuple(loaded.shape)}")
            if isinstance(loaded, QuantizedBlocks) and is_supported(loaded.ggml_type):
                layer.gguf_parts[shard] = group_quantized_from_blocks(loaded)
            elif isinstance(loaded, QuantizedBlocks):
                flat = loaded.data.contiguous().view(-1)
                layer.gguf_parts[shard] = dequantize(flat, loaded.ggml_type, loaded.shape)
            else:
                layer.gguf_parts[shard] = loaded

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # one whole tensor (shard None), or the parts of a fused projection in shard order
        parts = [layer.gguf_parts[shard] for shard in sorted(layer.gguf_parts, key=lambda s: s or 0)]
        device = layer.weight.device
        del layer.gguf_parts
        if all(isinstance(p, GroupQuantized) for p in parts):
            layer.quantized = pack_for_device(stack_rows(parts), device, self.dense_dtype)
            layer.register_parameter("weight", None)
            return
        full = [p.dequantize() if isinstance(p, GroupQuantized) else p for p in parts]
        weight = torch.cat(full).to(device=device, dtype=layer.params_dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.quantized = None


def linear_method(quantization: str | None, dense_dtype: torch.dtype | None = None) -> LinearMethod:
    """The method for `quantization`; `dense_dtype`: GGUF weights also keep a dense copy in that dtype."""
    methods: dict[str | None, type[LinearMethod]] = {
        None: LinearMethod,
        "int8": Int8LinearMethod,
        "fp8": Fp8LinearMethod,
        "gguf": GGUFLinearMethod,
    }
    if quantization not in methods:
        raise ValueError(
            f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATION_METHODS)}"
        )
    return GGUFLinearMethod(dense_dtype) if quantization == "gguf" else methods[quantization]()


_current_method: LinearMethod = LinearMethod()


def get_linear_method() -> LinearMethod:
    """The method for a linear layer being built now (full precision outside `quantized_layers`)."""
    return _current_method


@contextmanager
def quantized_layers(quantization: str | None, dense_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Build a model inside this to give its linear layers the `quantization` method."""
    global _current_method
    _current_method = linear_method(quantization, dense_dtype)
    try:
        yield
    finally:
        _current_method = LinearMethod()


_MAX_PACK_THREADS = 8


def process_weights_after_loading(model: nn.Module, *more: Callable[[], None]) -> None:
    """After `load_weights`: each linear layer turns its loaded weight into its method's stored form
    (and `more`, other such jobs, run beside them).

    On the CPU the layers are repacked in parallel, one per core, each by a thread whose torch ops run
    single-threaded, as the loader dequantizes (pagoda.loader.dequant): a layer's packing is dozens of
    small ops, and torch's own OpenMP threads spin-wait at every one of them, which on a busy or
    CPU-limited host made this 3-5x slower than one thread (and a second of `pagoda serve`'s start-up).
    """
    found = (_job(module) for module in model.modules())
    jobs: list[Callable[[], None]] = [job for job in found if job is not None] + list(more)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    workers = min(_MAX_PACK_THREADS, len(os.sched_getaffinity(0)))
    if not on_cpu or workers == 1:
        for job in jobs:
            job()
        return
    # torch.set_num_threads also sets the count every thread that has not run a parallel op yet starts
    # with (the engine thread, say): put it back once the workers are done
    threads = torch.get_num_threads()
    single_threaded = {"initializer": torch.set_num_threads, "initargs": (1,)}
    try:
        with ThreadPoolExecutor(workers, "pack-weights", **single_threaded) as pool:
            for done in [pool.submit(job) for job in jobs]:
                done.result()  # raises what the job raised
    finally:
        torch.set_num_threads(threads)


def _job(module: nn.Module) -> Callable[[], None] | None:
    method = getattr(module, "quant_method", None)
    if isinstance(method, LinearMethod):
        return lambda: method.process_weights_after_loading(module)
    if isinstance(module, WeightsAfterLoading):  # the experts of an MoE layer
        return module.process_weights_after_loading
    return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory, quantized layers counted in their stored form."""
    tensors: dict[int, torch.Tensor] = {}  # by address: a tied weight counts once
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        held = list(module.parameters(recurse=False))
        if isinstance(method, LinearMethod):
            held = [p for p in held if p is not getattr(module, "weight", None)] + method.weight_tensors(
                module
            )
        elif isinstance(module, WeightsAfterLoading):
            held = held + module.quantized_tensors()
        tensors.update((t.data_ptr(), t) for t in held)
    return sum(t.numel() * t.element_size() for t in tensors.values())
