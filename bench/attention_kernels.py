"""GPU microbenchmark: Triton paged attention vs torch SDPA on contiguous K/V of the same shapes.

Decode: one query per sequence over `context` cached tokens; prefill: `context` new tokens per
sequence, causal. The paged cache's blocks are shuffled, as after a while of serving. Prints the
time of each and the ratio paged / contiguous (below 1: the paged kernel is faster). Needs CUDA.

    python bench/attention_kernels.py --mode decode --batch 1 8 64 --context 512 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing

from pagoda.attention.metadata import AttentionMetadata
from pagoda.attention.triton_backend import paged_attention

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["decode", "prefill", "both"], default="both")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    return p.parse_args()


def paged_copy(
    k: torch.Tensor, v: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter contiguous [batch, context, Hkv, D] K/V into a paged cache with shuffled blocks."""
    batch, context, num_kv_heads, head_dim = k.shape
    per_seq = math.ceil(context / block_size)
    padded = per_seq * block_size
    block_tables = torch.randperm(batch * per_seq, device=k.device).view(batch, per_seq).to(torch.int32)
    k_cache = torch.empty(batch * per_seq, block_size, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
    v_cache = torch.empty_like(k_cache)
    pad = (0, 0, 0, 0, 0, padded - context)
    k_cache[block_tables.long()] = F.pad(k, pad).view(batch, per_seq, block_size, num_kv_heads, head_dim)
    v_cache[block_tables.long()] = F.pad(v, pad).view(batch, per_seq, block_size, num_kv_heads, head_dim)
    return k_cache, v_cache, block_tables


def metadata(batch: int, query_len: int, context: int, block_tables: torch.Tensor) -> AttentionMetadata:
    device = block_tables.device
    return AttentionMetadata(
        slot_mapping=torch.zeros(batch * query_len, dtype=torch.int64, device=device),  # unused here
        query_start_loc=torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=query_len,
        max_seq_len=context,
        query_lens_cpu=[query_len] * batch,
        seq_lens_cpu=[context] * batch,
    )


def bench_case(args: argparse.Namespace, mode: str, batch: int, context: int) -> None:
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    query_len = 1 if mode == "decode" else context
    scale = d**-0.5
    q = torch.randn(batch, query_len, h, d, dtype=dtype, device=device)
    k = torch.randn(batch, context, hkv, d, dtype=dtype, device=device)
    v = torch.randn(batch, context, hkv, d, dtype=dtype, device=device)
    k_cache, v_cache, block_tables = paged_copy(k, v, args.block_size)
    md = metadata(batch, query_len, context, block_tables)
    flat_q = q.flatten(0, 1)

    def run_paged() -> torch.Tensor:
        return paged_attention(flat_q, k_cache, v_cache, md, scale, None, None)

    # SDPA layout [batch, heads, tokens, D]; a decode query sees the whole context, so no mask.
    sq, sk, sv = (t.transpose(1, 2) for t in (q, k, v))

    def run_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            sq, sk, sv, is_causal=mode == "prefill", scale=scale, enable_gqa=True
        )

    err = (run_paged().view(batch, query_len, h, d).float() - run_sdpa().transpose(1, 2).float()).abs().max()
    paged_ms = triton.testing.do_bench(run_paged)
    sdpa_ms = triton.testing.do_bench(run_sdpa)
    print(
        f"{mode:8s} {batch:6d} {context:8d} {paged_ms:11.4f} {sdpa_ms:11.4f} {paged_ms / sdpa_ms:7.2f} "
        f"{err.item():9.2e}"
    )


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    print(
        f"# {torch.cuda.get_device_name()}  {args.dtype}  heads {args.num_heads}/{args.num_kv_heads}  "
        f"head_dim {args.head_dim}  block_size {args.block_size}"
    )
    columns = ("batch", 6), ("context", 8), ("paged ms", 11), ("sdpa ms", 11), ("ratio", 7), ("max err", 9)
    print(f"{'mode':8s} " + " ".join(f"{name:>{width}s}" for name, width in columns))
    modes = ["decode", "prefill"] if args.mode == "both" else [args.mode]
    for mode in modes:
        for batch in args.batch:
            for context in args.context:
                try:
                    bench_case(args, mode, batch, context)
                except torch.OutOfMemoryError:
                    print(f"{mode:8s} {batch:6d} {context:8d}  out of memory")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
