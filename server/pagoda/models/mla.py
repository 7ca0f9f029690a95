"""DeepSeek V2/V3 self-attention: multi-head latent attention (MLA) with the latent in the KV cache.

Each token is compressed to a latent c (kv_lora_rank R, normalised) plus one rope key k_pe (Dr) shared
by all heads; head h's key is [W_UK[h] c, k_pe] and its value W_UV[h] c, with W_UK / W_UV the two halves
of kv_b_proj. The cache stores only [c, k_pe]. Instead of expanding keys and values for every cached
token, the up-projections are absorbed (as in DeepSeek's and vLLM's MLA): the query becomes
[q_nope[h] W_UK[h], q_pe[h]], so q . k = q_nope . (W_UK c) + q_pe . k_pe, and the attention's mix of
latents is expanded once per query by W_UV[h]. Module names follow the checkpoints.

Tensor parallelism splits the heads (q_b_proj / q_proj and kv_b_proj by output rows, o_proj by input
columns); the latent projection is replicated, so every rank caches the same latent.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.distributed.parallel_state import get_tp_rank, get_tp_size
from pagoda.layers.attention import LatentAttention
from pagoda.layers.linear import Linear, MergedColumnParallelLinear, RowParallelLinear, default_weight_loader
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.spec import ModelSpec


class MultiLatentAttention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        mla = spec.mla
        assert mla is not None
        self.mla = mla
        # kept now: the weights load outside the sharding context
        self.tp_rank, tp_size = get_tp_rank(), get_tp_size()
        self.num_heads = spec.num_heads // tp_size
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.num_heads * qk_head_dim])
        else:
            self.q_a_proj = Linear(spec.hidden_size, mla.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, spec.rms_norm_eps)
            self.q_b_proj = MergedColumnParallelLinear(mla.q_lora_rank, [spec.num_heads * qk_head_dim])
        latent = mla.kv_lora_rank + mla.qk_rope_head_dim
        self.kv_a_proj_with_mqa = Linear(spec.hidden_size, latent, bias=spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, spec.rms_norm_eps)
        # absorbed into the query and the output, so kept as a plain weight: this rank's heads' rows
        per_head = mla.qk_nope_head_dim + mla.v_head_dim
        self.kv_b_proj = nn.Module()
        self.kv_b_proj.weight = nn.Parameter(
            torch.empty(self.num_heads * per_head, mla.kv_lora_rank), requires_grad=False
        )
        self.kv_b_proj.weight.weight_loader = self._load_kv_b
        self.o_proj = RowParallelLinear(spec.num_heads * mla.v_head_dim, spec.hidden_size, bias=spec.o_bias)
        self.rotary_emb = rotary_emb
        self.attn = LatentAttention(self.num_heads, latent, mla.kv_lora_rank, mla.scale)

    def _load_kv_b(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        rows = param.shape[0]
        default_weight_loader(param, loaded.narrow(0, self.tp_rank * rows, rows), shard)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        mla, heads = self.mla, self.num_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(-1, heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1
        )
        c, k_pe = self.kv_a_proj_with_mqa(hidden).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        # q's and k's rope parts rotated in one go; adjacent pairs first regrouped into halves (the same
        # permutation for q and k leaves their dot products unchanged)
        pe = torch.cat((q_pe, k_pe[:, None, :]), dim=1)
        if mla.rope_interleave:
            pe = torch.cat((pe[..., 0::2], pe[..., 1::2]), dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, pe).split([heads, 1], dim=1)

        w_kv = self.kv_b_proj.weight.view(heads, -1, mla.kv_lora_rank)
        w_uk, w_uv = w_kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        q_latent = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)
        query = torch.cat((q_latent, q_pe), dim=-1)
        mixed = self.attn(query, torch.cat((c, k_pe[:, 0]), dim=-1))  # [N, H, R]
        out = torch.einsum("nhr,hvr->nhv", mixed, w_uv)
        return self.o_proj(out.reshape(-1, heads * mla.v_head_dim))
