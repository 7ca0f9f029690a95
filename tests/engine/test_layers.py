"""The layers' numerics against transformers' own modules, bit for bit, in every dtype the CPU serves:
the decode step's shortcuts (fewer ops, no casts) must compute the very same floats."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pagoda.layers.norm import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def norms_with_one_weight(
    dim: int, dtype: torch.dtype, unit_offset: bool, gen: torch.Generator
) -> tuple[nn.Module, RMSNorm]:
    """transformers' RMSNorm of the flavour (Llama's, Gemma's 1 + w) and ours, with the same random weight."""
    reference = (Gemma2RMSNorm if unit_offset else LlamaRMSNorm)(dim, eps=1e-6).to(dtype)
    ours = RMSNorm(dim, 1e-6, unit_offset).to(dtype)
    weight = torch.rand(dim, generator=gen) * 2 - 0.5
    with torch.no_grad():
        reference.weight.copy_(weight)
        ours.weight.copy_(weight)
    return reference, ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (5, 3, 64)], ids=["one-row", "rows", "heads"])
def test_rms_norm_matches_transformers_bit_for_bit(
    dtype: torch.dtype, unit_offset: bool, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(len(shape) + unit_offset)
    reference, ours = norms_with_one_weight(shape[-1], dtype, unit_offset, gen)
    for scale in (1e-2, 1.0, 30.0):
        x = (torch.randn(shape, generator=gen) * scale).to(dtype)
        expected = reference(x)
        got = ours(x)
        assert got.dtype == expected.dtype == dtype
        assert torch.equal(got, expected), f"{dtype}, scale {scale}: max diff {(got - expected).abs().max()}"
