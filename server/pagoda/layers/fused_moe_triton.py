"""The experts of a MoE layer on a GPU: one Triton grouped GEMM per projection over expert-sorted tokens.

As in vLLM's and SGLang's fused MoE: the (token, expert) rows, sorted by expert (`ExpertGroups`), are
padded so each expert's run fills whole blocks of BLOCK_M rows; every block then belongs to one expert,
and one launch multiplies all of them, each program tile reading its expert's weight slice. The first
GEMM gathers its input rows straight from the tokens' hidden states (no copy of x per route); the
activation runs in torch between the two GEMMs; the router weights and the sum back into the tokens are
the caller's (`FusedMoE.forward`), shared with the CPU path. Empty experts cost nothing: no block names
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from pagoda.layers.moe import ExpertGroups, FusedMoE

BLOCK_M = 16  # the smallest tile tl.dot takes; a decode step routes few tokens to each expert
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    rows_ptr,  # [P]: the row of `a` each padded row reads; num_a_rows marks padding
    w_ptr,  # [E, N, K]
    bias_ptr,  # [E, N] (unused without HAS_BIAS)
    c_ptr,  # [P, N]
    block_expert_ptr,  # [P / BLOCK_M]
    num_a_rows,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    a_rows = tl.load(rows_ptr + offs_m).to(tl.int64)
    row_ok = a_rows < num_a_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(  # [BLOCK_K, BLOCK_N]: the expert's weight rows, transposed by the indexing
            w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
            mask=n_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if IEEE:  # float32 models: no TF32 rounding, as torch's matmul on the CPU
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * N + offs_n, mask=n_ok, other=0.0)
        acc += bias[None, :].to(tl.float32)
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=n_ok[None, :])


def grouped_gemm(
    a: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_expert: torch.Tensor,
) -> torch.Tensor:
    """c[p] = a[rows[p]] @ weight[e].T (+ bias[e]) for every padded row p of a block of expert e;
    padding rows (rows[p] == len(a)) get zeros' product. a [M, K], weight [E, N, K] -> c [P, N]."""
    num_padded = rows.shape[0]
    num_experts, n, k = weight.shape
    c = torch.empty(num_padded, n, dtype=a.dtype, device=a.device)
    if num_padded == 0:
        return c
    grid = (num_padded // BLOCK_M, triton.cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        a,
        rows,
        weight,
        weight if bias is None else bias,
        c,
        block_expert,
        a.shape[0],
        n,
        k,
        a.stride(0),
        weight.stride(0),
        weight.stride(1),
        c.stride(0),
        HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return c


def block_layout(groups: ExpertGroups, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Pad each expert's run of sorted rows to whole blocks: (token of each padded row, num_tokens for
    padding), (expert of each block), (padded row of each sorted row)."""
    # sizes from the host-side counts: no synchronisation
    padded_counts = [-(-count // BLOCK_M) * BLOCK_M for count in groups.counts]
    num_rows, num_padded = sum(groups.counts), sum(padded_counts)
    counts = torch.tensor(groups.counts, device=device)
    padded = torch.tensor(padded_counts, device=device)
    experts = torch.arange(len(groups.counts), device=device)
    block_expert = experts.repeat_interleave(padded // BLOCK_M, output_size=num_padded // BLOCK_M)
    # sorted row r of expert e moves from start[e] + j to padded_start[e] + j
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)
    padded_pos = torch.arange(num_rows, device=device) + shift.repeat_interleave(counts, output_size=num_rows)
    rows = torch.full((num_padded,), num_tokens, dtype=torch.int32, device=device)
    rows[padded_pos] = groups.tokens.to(torch.int32)
    return rows, block_expert.to(torch.int32), padded_pos


def fused_experts(x: torch.Tensor, moe: FusedMoE, groups: ExpertGroups) -> torch.Tensor:
    """Like `FusedMoE.experts_torch`: each sorted row's expert output [N * k, H], unweighted."""
    rows, block_expert, padded_pos = block_layout(groups, x.shape[0], x.device)
    gate_up = grouped_gemm(x.contiguous(), rows, moe.w13, moe.w13_bias, block_expert)
    hidden = moe.activate(gate_up).contiguous()
    identity = torch.arange(hidden.shape[0], dtype=torch.int32, device=x.device)
    out = grouped_gemm(hidden, identity, moe.w2, moe.w2_bias, block_expert)
    return out[padded_pos]
