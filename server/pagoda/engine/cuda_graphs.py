"""CUDA graphs of the decode forward: one per padded batch size, replayed instead of launching ~10 kernels
per layer from Python (nano-vllm's approach).

A decode step of n sequences runs the graph of the smallest captured size >= n. The graphs read their
inputs from static buffers that each step overwrites; rows past n are padding: their slot is -1 (the
KV write skips it) and their context one token long (the attention reads a cached block and the row is
dropped). Only the model's forward is captured; the LM head and sampling stay eager, on the real rows.
The Triton attention kernel reads context lengths and block tables from the device and picks its
launch shape from the batch size alone, so a graph captured once serves every context length.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from pagoda.attention.metadata import AttentionMetadata, attention_metadata
from pagoda.engine.step_inputs import StepInputs, padded_tables

logger = logging.getLogger(__name__)

MAX_CAPTURED_BATCH = 512


def captured_batch_sizes(max_num_seqs: int) -> list[int]:
    largest = min(max_num_seqs, MAX_CAPTURED_BATCH)
    return sorted({s for s in [1, 2, 4, 8, *range(16, largest + 1, 16)] if s <= largest} | {largest})


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.sizes = captured_batch_sizes(max_num_seqs)
        largest = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # the largest first: the others fit in its memory pool
            md = AttentionMetadata(
                slot_mapping=self.slot_mapping[:size],
                query_start_loc=self.query_start_loc[: size + 1],
                seq_lens=self.seq_lens[:size],
                block_tables=self.block_tables[:size],
                max_query_len=1,
                max_seq_len=self.max_model_len,
                query_lens_cpu=[1] * size,
                seq_lens_cpu=[1] * size,
            )
            graph = torch.cuda.CUDAGraph()
            with attention_metadata(md):
                self.model(self.input_ids[:size], self.positions[:size])  # compiles the kernels
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(self.input_ids[:size], self.positions[:size])
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info(
            "captured CUDA graphs for decode batches of %s in %.1f s",
            ", ".join(map(str, self.sizes)), time.perf_counter() - start,
        )

    def fits(self, query_lens: list[int], block_tables: list[list[int]]) -> bool:
        return (
            len(query_lens) <= self.sizes[-1]
            and max(query_lens) == 1  # every sequence decodes (none has fewer than one new token)
            and max(map(len, block_tables)) <= self.max_blocks
        )

    def forward(self, inputs: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step of n sequences; `input_ids` on the device, if given,
        replace `inputs.input_ids` (asynchronous scheduling feeds a step the last one's samples)."""
        n = len(inputs.positions)
        size = next(s for s in self.sizes if s >= n)
        # every input in one host array and one copy to the device (numpy fills it without torch.tensor's
        # per-element checks); the buffers then take their slices, cast on the device
        tables = padded_tables(inputs.block_tables, np.int64)
        width = tables.shape[1]
        staged: np.ndarray = np.empty(4 * n + n * width, dtype=np.int64)
        for i, values in enumerate((inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens)):
            staged[i * n : (i + 1) * n] = values
        staged[4 * n :] = tables.reshape(-1)
        on_device = torch.from_numpy(staged).pin_memory().to(self.input_ids.device, non_blocking=True)
        self.input_ids[:n].copy_(on_device[:n] if input_ids is None else input_ids)
        self.positions[:n].copy_(on_device[n : 2 * n])
        self.slot_mapping[:n].copy_(on_device[2 * n : 3 * n])
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(on_device[3 * n : 4 * n])
        self.seq_lens[n:size].fill_(1)
        self.block_tables[:n, :width].copy_(on_device[4 * n :].view(n, width))
        graph, hidden = self.graphs[size]
        graph.replay()
        self.replays += 1
        return hidden[:n]
