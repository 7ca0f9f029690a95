"""Engine configuration: one strict dataclass, validated at construction.

Each field's metadata is the one description of an engine option: `pagoda serve` builds its flag from it
(`max_num_seqs` -> `--max-num-seqs`, with its help, choices and parser), and `__post_init__` checks
values set from Python by the same rules. Fields without help text are not flags. No torch at import
time: `pagoda serve --help` reads this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pagoda.engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("none", "int8", "fp8", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
LOAD_FORMATS = ("auto", "dummy")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
}  # fmt: skip


def memory_size(text: str) -> int:
    """Bytes from '4294967296', '4GiB', '512MiB', '2G' ..."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4GiB, 512MiB, 1073741824)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def positive(value: int) -> None:
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value}")


def power_of_two(value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"must be a positive power of two, got {value}")


def fraction(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")


def option(
    default: Any,
    help: str | None = None,
    *,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[Any], None] | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """An engine option. `help`: the flag's help text (None: not a flag); `parse`: text to value (default:
    the field's type); `check`: raises ValueError for a bad value; `choices`: the values allowed."""
    return field(default=default, metadata={"help": help, "parse": parse, "check": check, "choices": choices})


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = option(
        None, "Tokenizer: a Hugging Face directory or a .gguf file. Default: the model's own."
    )
    dtype: str = option(
        "auto",
        "Weights and activations dtype. auto: the checkpoint's half type (bfloat16 for a quantized GGUF "
        "file) on a GPU and on CPUs with native bfloat16 (AVX512-BF16, AMX); float32 otherwise, and for "
        "float32 checkpoints on the CPU.",
        choices=DTYPES,
    )
    device: str = option("auto", "Where to run. auto: a GPU if there is one.", choices=DEVICES)
    max_model_len: int | None = option(
        None, "Longest prompt + completion in tokens. Default: the model's context length.", check=positive
    )
    block_size: int = option(
        16, "Tokens per KV-cache block (a power of two). Default: %(default)s.", check=power_of_two
    )
    gpu_memory_utilization: float = option(
        0.9,
        "Fraction of GPU memory for weights, activations and the KV cache (GPU). Default: %(default)s.",
        check=fraction,
    )
    kv_cache_memory: int | None = option(  # like VLLM_CPU_KVCACHE_SPACE
        None, "KV-cache size on CPU, in bytes or with a unit (4GiB, 512MiB).", parse=memory_size
    )
    num_gpu_blocks_override: int | None = option(
        None, "Force the number of KV-cache blocks (testing).", check=positive
    )
    max_num_seqs: int = option(256, "Most sequences in one batch. Default: %(default)s.", check=positive)
    max_num_batched_tokens: int = option(
        2048,
        "Token budget of one engine step (prefill chunks + decodes). Default: %(default)s.",
        check=positive,
    )
    enable_prefix_caching: bool = option(True, "Reuse the KV cache of shared prompt prefixes. Default: on.")
    skip_tokenizer_init: bool = False  # offline use with token ids only
    tensor_parallel_size: int = option(
        1, "GPUs to shard the model over. Default: %(default)s.", check=positive
    )
    # see docs/quantization.md
    quantization: str | None = option(
        None,
        "Weight quantization: none (full precision; expands a GGUF file's blocks), int8 (W8A16), fp8 "
        "(e4m3), or gguf (keep a GGUF file's blocks). Default: gguf for a quantized GGUF file (without "
        "tensor parallelism), none otherwise.",
        choices=QUANTIZATIONS,
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV-cache element type (auto: the model's dtype); fp8 (e4m3, a scale per layer) doubles the "
        "tokens that fit. Default: %(default)s.",
        choices=KV_CACHE_DTYPES,
    )
    load_format: str = option(
        "auto",
        "auto: the checkpoint's weights; dummy: random ones, for benchmarks of a model whose weights are not "
        "at hand (reads only the directory's config.json). Default: %(default)s.",
        choices=LOAD_FORMATS,
    )
    enforce_eager: bool = option(False, "Never capture CUDA graphs. Default: off.")
    dense_weights_for_batches: bool | None = option(
        None,
        "CPU, quantized GGUF weights: also keep each linear weight in the model's dtype, for steps of 16 "
        "or more tokens (prefill, large decode batches), where a dense GEMM beats the int4 kernel, whose "
        "cost grows with the rows; 2 more bytes per weight in bfloat16. Default: on for GGUF files of up "
        "to 512 MiB (the copy takes about 4x the file), off above.",
    )
    async_scheduling: bool | None = option(
        None,
        "Launch each decode step on the device before the host has read the last step's tokens, so the GPU "
        "does not wait for sampling, scheduling and detokenizing between steps (vLLM's flag); a guess that "
        "the batch does not change, dropped when it does. Not with speculative decoding or tensor "
        "parallelism. Default: on where decode steps run as CUDA graphs.",
    )
    seed: int = option(0, "Random seed of the engine. Default: %(default)s.")
    # vLLM's dict, or its JSON text
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = option(
        None,
        'Speculative decoding, as JSON (vLLM\'s): {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 4} or {"method": "draft_model", "model": PATH, '
        '"num_speculative_tokens": 4}. Default: off.',
        parse=SpeculativeConfig.parse,
    )

    def __post_init__(self) -> None:
        self.speculative_config = spec = SpeculativeConfig.parse(self.speculative_config)
        if spec is not None and spec.method == "draft_model" and self.tensor_parallel_size > 1:
            raise ValueError("speculative_config: draft_model does not support tensor_parallel_size > 1")
        if self.async_scheduling and (spec is not None or self.tensor_parallel_size > 1):
            raise ValueError("async_scheduling supports neither speculative decoding nor tensor parallelism")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == f.default:
                continue
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}: expected one of {', '.join(choices)}")
            if check is not None:
                try:
                    check(value)
                except ValueError as error:
                    raise ValueError(f"{f.name} {error}") from None

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
