"""The compute ceiling of this machine: fp32 GEMMs at the model's own shapes.

A decode step of a dense decoder multiplies each token's activations by every weight matrix once:
2 x parameters FLOPs per token (the embedding table counts once, as the tied lm_head). Timing the
whole chain of the model's matmuls at batch M gives the FLOP/s a perfect engine could reach there;
the best of them, divided by 2 x parameters, is the roofline in tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of one layer: fused QKV, O, fused gate-up, down."""
        kv = 2 * self.num_kv_heads * self.head_dim
        return [
            (self.hidden + kv, self.hidden),
            (self.hidden, self.hidden),
            (2 * self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]

    @property
    def matmul_params(self) -> int:
        per_layer = sum(o * i for o, i in self.layer_matrices())
        return self.num_layers * per_layer + self.vocab * self.hidden


def shape_from_gguf(path: Path) -> DecoderShape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    arch = bytes(arch).decode() if not isinstance(arch, str) else arch

    def value(key: str) -> int:
        return int(_field(reader, f"{arch}.{key}")[0])

    return DecoderShape(
        hidden=value("embedding_length"),
        intermediate=value("feed_forward_length"),
        num_layers=value("block_count"),
        num_heads=value("attention.head_count"),
        num_kv_heads=value("attention.head_count_kv"),
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
    )


def _field(reader: Any, key: str) -> Any:
    field = reader.fields[key]
    return field.parts[field.data[0]]


def _time_best(fn: Any, seconds: float) -> float:
    """Best time of one call over repeated calls for about `seconds` (after one warm-up call)."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            return best


def model_chain_flops(shape: DecoderShape, batch_sizes: list[int], seconds: float) -> list[dict[str, float]]:
    """FLOP/s of the model's full matmul chain (distinct weights per layer, as in memory) at each M."""
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for _ in range(shape.num_layers) for o, i in shape.layer_matrices()]
    lm_head = torch.randn(shape.vocab, shape.hidden) * 0.02
    rows = []
    for m in batch_sizes:
        x_hidden = torch.randn(m, shape.hidden)
        x_inter = torch.randn(m, shape.intermediate)

        def chain(x_hidden: torch.Tensor = x_hidden, x_inter: torch.Tensor = x_inter) -> None:
            with torch.inference_mode():
                for w in weights:
                    F.linear(x_inter if w.shape[1] == shape.intermediate else x_hidden, w)
                F.linear(x_hidden, lm_head)

        seconds_per_chain = _time_best(chain, seconds)
        flops = 2 * m * shape.matmul_params
        rows.append({"batch": m, "seconds": seconds_per_chain, "gflops": flops / seconds_per_chain / 1e9})
    return rows


def square_gemm_gflops(n: int, seconds: float) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = _time_best(lambda: torch.mm(a, b), seconds)
    return 2 * n**3 / best / 1e9


def run(gguf: Path, batch_sizes: list[int], seconds: float = 1.0) -> dict[str, Any]:
    shape = shape_from_gguf(gguf)
    chain = model_chain_flops(shape, batch_sizes, seconds)
    best = max(row["gflops"] for row in chain)
    flops_per_token = 2 * shape.matmul_params
    return {
        "shape": asdict(shape),
        "matmul_params": shape.matmul_params,
        "flops_per_token": flops_per_token,
        "torch_threads": torch.get_num_threads(),
        "model_chain": chain,
        "square_1024_gflops": square_gemm_gflops(1024, seconds),
        "achievable_gflops": best,
        "roofline_tokens_per_s": best * 1e9 / flops_per_token,
    }
