"""Token embedding and LM head, split over the tensor-parallel ranks by vocabulary rows.

Their weights are allocated but not initialised: the checkpoint fills them. Each rank holds rows
[rank * R, (rank + 1) * R) of the vocabulary, R = ceil(vocab / N); the last rank's slice is padded with
zero rows. The two share that layout, so a tied LM head can share the embedding's weight on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.distributed.parallel_state import all_reduce, gather_last_dim, get_tp_rank, get_tp_size
from pagoda.layers.linear import default_weight_loader
from pagoda.quantization.grouped import quantize_int8
from pagoda.quantization.methods import QuantizedWeight, pack_for_device


class VocabEmbedding(nn.Module):
    """Each rank looks up the ids in its vocabulary slice (zeros for the others); an all-reduce sums them."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if self.tp_size == 1:
            default_weight_loader(param, loaded, shard)
            return
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"shape mismatch: parameter ({self.vocab_size}, {param.shape[1]}) split over "
                f"{self.tp_size} ranks, checkpoint {tuple(loaded.shape)}"
            )
        rows = loaded[self.vocab_start : self.vocab_start + self.rows_per_rank]
        default_weight_loader(param.data[: len(rows)], rows, shard)
        param.data[len(rows) :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        hidden = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return all_reduce(hidden.masked_fill_(elsewhere.unsqueeze(-1), 0))


# Rows up to which the 8-bit head beats the float one: reading the weight dominates a step of a few
# sequences (measured on AVX-512, 49152 x 576: 1.8 against 4.2 ms at 1 row, 3.2 against 4.4 ms at 4)
SMALL_BATCH_ROWS = 4


class ParallelLMHead(VocabEmbedding):
    """Hidden states -> logits. Each rank scores its vocabulary slice; rank 0 gathers the full rows."""

    small_batch_weight: QuantizedWeight | None = None

    def quantize_for_small_batches(self) -> None:
        """Also keep the head in 8-bit groups of 32 (Q8_0's recipe, float16 scales: what the CPU's tiled
        kernel takes) for steps of a few sequences. For a model that already runs quantized weights: its
        float head stays for larger batches."""
        head = quantize_int8(self.weight.data, 32, float16_scales=True)
        self.small_batch_weight = pack_for_device(head, self.weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """[M, hidden_size] -> [M, vocab_size] logits on rank 0; None on the other ranks."""
        if self.small_batch_weight is not None and hidden.shape[0] <= SMALL_BATCH_ROWS:
            logits = self.small_batch_weight.matmul(hidden)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        gathered = gather_last_dim(logits)
        return None if gathered is None else gathered[:, : self.vocab_size]
