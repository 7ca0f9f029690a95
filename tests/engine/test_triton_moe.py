"""The Triton fused-MoE grouped GEMM under TRITON_INTERPRET=1 (CPU) against the torch expert loop.

The fixture runs a private, interpreted copy of the kernel module (see interpreted_triton.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from interpreted_triton import interpreted

from pagoda.layers.moe import ExpertGroups, FusedMoE, Routing, select_experts


@pytest.fixture(scope="module")
def fused() -> Iterator[ModuleType]:
    with interpreted("pagoda.layers.fused_moe_triton") as module:
        yield module


def random_moe(num_experts: int, hidden: int, intermediate: int, gpt_oss: bool, seed: int) -> FusedMoE:
    torch.manual_seed(seed)
    moe = FusedMoE(num_experts, hidden, intermediate, bias=gpt_oss, swiglu_limit=1.5 if gpt_oss else None)
    for param in moe.parameters():
        param.data.normal_(0.0, 0.3)
    return moe


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "hidden", "intermediate", "gpt_oss"),
    [
        (1, 4, 2, 32, 48, False),  # one decode: most experts idle, blocks mostly padding
        (21, 6, 2, 40, 24, False),  # K and N not multiples of the tiles, an expert past BLOCK_M rows
        (9, 4, 3, 32, 32, True),  # biases and gpt-oss's clamped SwiGLU
    ],
)
def test_grouped_gemm_matches_the_torch_expert_loop(
    fused: ModuleType, num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int,
    gpt_oss: bool,
) -> None:
    moe = random_moe(num_experts, hidden, intermediate, gpt_oss, seed=num_tokens)
    x = torch.randn(num_tokens, hidden)
    logits = torch.randn(num_tokens, num_experts)
    logits[:, 0] += 3.0  # a popular expert, so one run spans several blocks
    weights, ids = select_experts(logits, Routing(top_k))
    groups = ExpertGroups.from_routing(weights, ids, num_experts)
    got = fused.fused_experts(x, moe, groups)
    torch.testing.assert_close(got, moe.experts_torch(x, groups), atol=1e-5, rtol=1e-5)


def test_block_layout_pads_each_expert_to_whole_blocks(fused: ModuleType) -> None:
    ids = torch.tensor([[2, 0], [0, 2], [2, 0]])
    groups = ExpertGroups.from_routing(torch.ones(3, 2), ids, num_experts=4)
    rows, block_expert, padded_pos = fused.block_layout(groups, num_tokens=3, device=torch.device("cpu"))
    block = fused.BLOCK_M
    assert block_expert.tolist() == [0, 2]  # idle experts 1 and 3 get no block
    assert padded_pos.tolist() == [0, 1, 2, block, block + 1, block + 2]
    assert rows.tolist() == [0, 1, 2] + [3] * (block - 3) + [0, 1, 2] + [3] * (block - 3)
