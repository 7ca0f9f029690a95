"""GPU microbenchmark: Triton paged attention vs SDPA (FlashAttention) on contiguous K/V of the same shapes.

Decode: one query per sequence over `context` cached tokens; prefill: `context` new tokens per
sequence, causal, with this step's keys passed as the engine passes them (`new_kv`). The paged cache's
blocks are shuffled, as after a while of serving. Prints the time of each and the ratio paged / SDPA
(below 1: the paged kernel is faster); SDPA is pinned to its FlashAttention backend. `--sweep` times
every prefill tile configuration at the first batch and context and prints the fastest. Needs CUDA.

    python bench/attention_kernels.py --mode decode --batch 1 8 64 --context 512 4096 --dtype bfloat16
    python bench/attention_kernels.py --mode prefill --batch 1 --context 4096 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from pagoda.attention.metadata import AttentionMetadata
from pagoda.attention.triton_backend import AttentionLaunch, choose_launch, launch_paged_attention

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
    p.add_argument("--sweep", action="store_true", help="time every prefill tile configuration")
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


def prefill_flops(batch: int, context: int, heads: int, head_dim: int) -> float:
    return 4 * batch * heads * head_dim * context * context / 2  # QK^T and PV, causal half


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
    # a prefill's keys are all this step's: the engine hands them over as the projection wrote them
    new_kv = (k.flatten(0, 1), v.flatten(0, 1)) if mode == "prefill" else None

    def paged(launch: AttentionLaunch) -> Callable[[], torch.Tensor]:
        return lambda: launch_paged_attention(flat_q, k_cache, v_cache, md, scale, None, None, launch, new_kv)

    sdpa, sdpa_name = flash_sdpa(q, k, v, mode == "prefill", scale)
    expected = sdpa().transpose(1, 2).float()
    launches = sweep_launches(d) if args.sweep and mode == "prefill" else []
    launches.insert(0, choose_launch(md, h, hkv, d, device))
    sdpa_ms = triton.testing.do_bench(sdpa)
    sq, sk, sv = (t.transpose(1, 2) for t in (q, k, v))  # and whichever backend SDPA picks by itself
    auto_ms = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(
            sq, sk, sv, is_causal=mode == "prefill", scale=scale, enable_gqa=True
        )
    )
    for i, launch in enumerate(launches):
        try:
            err = (paged(launch)().view(batch, query_len, h, d).float() - expected).abs().max().item()
            paged_ms = triton.testing.do_bench(paged(launch))
        except Exception as e:  # a tile configuration that needs more shared memory than the GPU has
            print(f"  {launch}: {type(e).__name__}: {str(e)[:80]}")
            continue
        tflops = prefill_flops(batch, context, h, d) / paged_ms / 1e9 if mode == "prefill" else 0.0
        tag = "default" if i == 0 else str(launch)
        print(
            f"{mode:8s} {batch:6d} {context:8d} {paged_ms:11.4f} {sdpa_ms:11.4f} {paged_ms / sdpa_ms:7.2f} "
            f"{err:9.2e} {tflops:7.1f} {auto_ms:10.4f}  {sdpa_name} {tag}"
        )


def flash_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA on [batch, heads, tokens, D], pinned to FlashAttention (with GQA if it takes it, else with
    K/V heads repeated: the same arithmetic)."""
    sq, sk, sv = (t.transpose(1, 2) for t in (q, k, v))

    def gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal, scale=scale, enable_gqa=True)

    try:
        gqa()
        return gqa, "flash-gqa"
    except RuntimeError:
        group = q.shape[2] // k.shape[2]
        rk, rv = sk.repeat_interleave(group, 1), sv.repeat_interleave(group, 1)

        def mha() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(sq, rk, rv, is_causal=causal, scale=scale)

        return mha, "flash-mha"


def sweep_launches(head_dim: int) -> list[AttentionLaunch]:
    shapes = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    return [
        AttentionLaunch(block_m=m, tile_n=n, num_segments=1, num_warps=w, num_stages=st)
        for m, n, w, st in shapes
        if not (head_dim > 128 and n > 64)
    ]


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    print(
        f"# {torch.cuda.get_device_name()}  {args.dtype}  heads {args.num_heads}/{args.num_kv_heads}  "
        f"head_dim {args.head_dim}  block_size {args.block_size}"
    )
    columns = (
        ("batch", 6), ("context", 8), ("paged ms", 11), ("sdpa ms", 11), ("ratio", 7), ("max err", 9),
        ("TFLOP/s", 7), ("sdpa-auto", 10),
    )
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
