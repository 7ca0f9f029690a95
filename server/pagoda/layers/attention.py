"""The attention layer: writes this step's K/V into its paged cache, then attends over the cache."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagoda.attention import cpu_kernels, get_backend, torch_backend
from pagoda.attention.metadata import get_attention_metadata
from pagoda.layers import cpu_ops
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.quantization.kv_cache import calibrate_scale, is_fp8


class Attention(nn.Module):
    """q [N, H*D] or [N, H, D], k/v [N, Hkv*D] or [N, Hkv, D] -> [N, H*D], for the flat batch described by
    the attention metadata.

    `k_cache` / `v_cache` ([num_blocks, block_size, Hkv, D]) are plain attributes the model runner
    assigns once it has sized the KV pool. The whole batch's K/V is written before anyone attends, so
    sequences in one step can share freshly written prefix blocks. An fp8 cache stores K/V divided by
    `kv_scales` (one per tensor, calibrated on the first batch) and runs on the torch backend.
    Attention sinks (gpt-oss: one learned logit per head that joins every softmax and attends to nothing)
    run on the torch backend too.
    """

    values_in_keys = False  # True: one cache holds what both keys and values are read from (MLA)

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.k_cache = torch.tensor([])
        self.v_cache = torch.tensor([])
        self.kv_scales: tuple[float, float] | None = None  # fp8 caches only
        self._backend: ModuleType | None = None
        self._fused_cache: torch.Tensor | None = None  # the cache `rope_attention` last found it may serve

    def rope_attention(
        self, qkv: torch.Tensor, rotary_emb: RotaryEmbedding, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """A CPU decode step's attention from the fused projection's output qkv [N, (H + 2 Hkv) * D]: q and
        k rotated in place, k and v written into the cache, attention -> [N, H * D], in one C++ call that
        chains the ops `rotary_emb.rotate_` and `forward` call, without the views between them; on CUDA, the
        rotation and the cache writes in one Triton launch, then the attention. None where that does not
        apply (CPU prefill chunks, partial rotary, an fp8 cache, no built library): the caller takes the
        general path. No attention sinks here (the caller knows)."""
        if qkv.is_cuda:
            return self._rope_attention_triton(qkv, rotary_emb, positions)
        if not self._fused_serves(qkv):
            return None
        md = get_attention_metadata()
        if not cpu_kernels.serves(md.max_query_len, self.head_dim):
            return None
        cos, signed_sin = rotary_emb.cos_sin(positions, qkv.dtype)
        return torch.ops.pagoda.rope_paged_decode_attention(
            qkv, cos, signed_sin, self.k_cache, self.v_cache, md.slot_mapping, md.query_start_loc,
            md.block_tables, md.seq_lens, self.num_heads, self.scale, self.sliding_window or 0,
            self.softcap or 0.0,
        )  # fmt: skip

    def _rope_attention_triton(
        self, qkv: torch.Tensor, rotary_emb: RotaryEmbedding, positions: torch.Tensor
    ) -> torch.Tensor | None:
        if is_fp8(self.k_cache) or rotary_emb.rotary_dim != self.head_dim:
            return None
        if self._backend is None:
            self._backend = get_backend(qkv.device)
        if self._backend is torch_backend:
            return None
        from pagoda.layers import triton_ops

        md = get_attention_metadata()
        cos, signed_sin = rotary_emb.cos_sin(positions, qkv.dtype)
        qk = triton_ops.rotate_and_write_kv(
            qkv, self.num_heads, cos, signed_sin, self.k_cache, self.v_cache, md.slot_mapping
        )
        if qk is None:
            return None
        query, key = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        value = qkv[:, (self.num_heads + self.num_kv_heads) * self.head_dim :].view(-1, self.num_kv_heads,
                                                                                   self.head_dim)
        out = self._backend.paged_attention(
            query, self.k_cache, self.v_cache, md, self.scale, self.sliding_window, self.softcap,
            new_kv=(key, value),
        )
        return out.view(-1, self.num_heads * self.head_dim)

    def _fused_serves(self, qkv: torch.Tensor) -> bool:
        # the cache's properties are checked once per cache (the runner assigns it once), qkv's each step
        if self._fused_cache is not self.k_cache:
            cache = self.k_cache
            if not (cache.is_cpu and cache.numel() and not is_fp8(cache) and cpu_ops.available()):
                return False
            self._fused_cache = cache
        return qkv.dtype == self.k_cache.dtype and qkv.dim() == 2 and qkv.stride(1) == 1

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.k_cache.numel() == 0:
            raise RuntimeError("the KV cache of this attention layer has not been assigned")
        md = get_attention_metadata()
        # views wherever the layout allows (q and k may be head slices of one rotated tensor)
        query = q.reshape(-1, self.num_heads, self.head_dim)
        key = k.reshape(-1, self.num_kv_heads, self.head_dim)
        value = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if is_fp8(self.k_cache):
            return self._forward_fp8_cache(query, key, value, sinks).view(-1, self.num_heads * self.head_dim)
        if sinks is not None:
            torch_backend.write_kv(key, value, self.k_cache, self.v_cache, md.slot_mapping)
            out = torch_backend.paged_attention(
                query, self.k_cache, self.v_cache, md, self.scale, self.sliding_window, self.softcap,
                sinks=sinks,
            )
            return out.view(-1, self.num_heads * self.head_dim)
        if self._backend is None:
            self._backend = get_backend(q.device)
        if self._backend is not torch_backend:  # Triton reads this step's keys where the projection left them
            self._backend.write_kv(key, value, self.k_cache, self.v_cache, md.slot_mapping)
            out = self._backend.paged_attention(
                query, self.k_cache, self.v_cache, md, self.scale, self.sliding_window, self.softcap,
                new_kv=(key, value),
            )
        elif cpu_kernels.serves(md.max_query_len, self.head_dim):
            # the C++ kernel writes the new K/V and reads every context in place, without gathering it
            out = cpu_kernels.paged_decode_attention(
                query, key, value, self.k_cache, self.v_cache, md, self.scale, self.sliding_window,
                self.softcap,
            )
        else:
            torch_backend.write_kv(key, value, self.k_cache, self.v_cache, md.slot_mapping)
            out = torch_backend.paged_attention(
                query, self.k_cache, self.v_cache, md, self.scale, self.sliding_window, self.softcap
            )
        return out.view(-1, self.num_heads * self.head_dim)

    def _forward_fp8_cache(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: torch.Tensor | None
    ) -> torch.Tensor:
        md = get_attention_metadata()
        if self.kv_scales is None:
            self.kv_scales = (calibrate_scale(key), calibrate_scale(value))
        k_scale, v_scale = self.kv_scales
        torch_backend.write_kv(key, value, self.k_cache, self.v_cache, md.slot_mapping, k_scale, v_scale)
        return torch_backend.paged_attention(
            query, self.k_cache, self.v_cache, md, self.scale, self.sliding_window, self.softcap,
            k_scale, v_scale, sinks,
        )


class LatentAttention(Attention):
    """Multi-head latent attention (DeepSeek V2/V3) over a cache of compressed latents.

    Every token stores one latent row, [normalised KV latent | rotated shared rope key] (R + Dr values),
    for all heads: keys and values are both expanded from it, so the cache holds no separate values
    (`values_in_keys`: the model runner allocates one cache and counts one row per token). With the
    key and value up-projections absorbed into the query and the output (`MultiLatentAttention`), this
    is multi-query attention whose single KV head is the latent itself, and whose output is the first R
    values of each head's mix of latents. Runs on the torch backend.
    """

    values_in_keys = True

    def __init__(self, num_heads: int, latent_dim: int, value_dim: int, scale: float) -> None:
        super().__init__(num_heads, 1, latent_dim, scale)
        self.value_dim = value_dim

    def forward(  # type: ignore[override]
        self, q: torch.Tensor, latent: torch.Tensor, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [N, H, R + Dr] (absorbed queries), latent [N, R + Dr] -> [N, H, R] mixed latents."""
        if self.k_cache.numel() == 0:
            raise RuntimeError("the KV cache of this attention layer has not been assigned")
        if is_fp8(self.k_cache):
            raise ValueError("multi-head latent attention does not support an fp8 KV cache")
        md = get_attention_metadata()
        key = latent.view(-1, 1, self.head_dim)
        torch_backend.write_kv(key, key, self.k_cache, self.k_cache, md.slot_mapping)
        out = torch_backend.paged_attention(q, self.k_cache, self.k_cache, md, self.scale)
        return out[..., : self.value_dim]
