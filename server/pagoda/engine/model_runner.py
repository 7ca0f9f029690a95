"""Loads the model, owns the KV cache tensors, and runs one flat forward + sampling per step."""

from __future__ import annotations

import logging

import torch

from pagoda.attention.metadata import AttentionMetadata, attention_metadata
from pagoda.config import EngineConfig
from pagoda.engine.scheduler import ScheduledSequence
from pagoda.layers.attention import Attention
from pagoda.layers.sampler import Sampler, SamplerOutput
from pagoda.loader import Checkpoint
from pagoda.models.registry import build_model
from pagoda.models.spec import ModelSpec

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 4 << 30  # vLLM's default CPU KV-cache space

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow on most CPUs
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, max_model_len: int) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = resolve_dtype(config.dtype, checkpoint.torch_dtype, self.device)
        self.spec = ModelSpec.from_hf_config(checkpoint.config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        torch.manual_seed(config.seed)
        self.model = build_model(checkpoint.config, self.dtype, self.device)
        self.model.load_weights(checkpoint.weights())
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache(self.num_blocks)
        self.sampler = Sampler(checkpoint.eos_token_ids)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attention_layers)
        return per_token * self.block_size * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        # never more than every sequence at full length could use: the rest would sit idle
        useful = self.config.max_num_seqs * ((self.max_model_len + self.block_size - 1) // self.block_size)
        if self.device.type == "cpu":
            budget = self.config.kv_cache_memory or CPU_DEFAULT_KV_CACHE_BYTES
        else:
            budget = self._profile_free_gpu_memory()
        return max(1, min(useful, budget // self.block_bytes))

    def _profile_free_gpu_memory(self) -> int:
        """Bytes left for the KV cache after weights and the peak activations of the largest step."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        self._allocate_kv_cache((num_tokens + self.block_size - 1) // self.block_size)
        torch.cuda.reset_peak_memory_stats()
        self._forward_dummy_prefill(num_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return max(0, int(total * self.config.gpu_memory_utilization) - peak)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        for layer in self.attention_layers:
            shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def _forward_dummy_prefill(self, num_tokens: int) -> None:
        positions = list(range(num_tokens))
        md = self._metadata(
            slots=positions, query_lens=[num_tokens], seq_lens=[num_tokens],
            block_tables=[list(range((num_tokens + self.block_size - 1) // self.block_size))],
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        with attention_metadata(md):
            hidden = self.model(input_ids, self._to_device(positions, torch.long))
        self.model.compute_logits(hidden[-1:])

    def _to_device(self, values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _metadata(
        self, slots: list[int], query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]]
    ) -> AttentionMetadata:
        query_start_loc = [0]
        for n in query_lens:
            query_start_loc.append(query_start_loc[-1] + n)
        width = max(len(t) for t in block_tables)
        return AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.long),
            query_start_loc=self._to_device(query_start_loc, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            block_tables=self._to_device([t + [0] * (width - len(t)) for t in block_tables], torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1, one contiguous range per block."""
        slots: list[int] = []
        bs = self.block_size
        for b in range(start // bs, (end - 1) // bs + 1):
            lo, hi = max(start, b * bs), min(end, (b + 1) * bs)
            base = block_table[b] * bs - b * bs
            slots.extend(range(base + lo, base + hi))
        return slots

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> SamplerOutput:
        """Forward the batch's new tokens; sample for each sequence whose whole context is now computed."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                logit_rows.append(len(input_ids) - 1)
        md = self._metadata(slots, query_lens, seq_lens, [item.seq.block_table for item in batch])
        with attention_metadata(md):
            hidden = self.model(
                self._to_device(input_ids, torch.long), self._to_device(positions, torch.long)
            )
        self._record_prompt_logprobs(batch, hidden)
        sampling = [item.seq for item in batch if item.samples]
        if not sampling:
            return SamplerOutput(token_ids=[], logprobs=[])
        logits = self.model.compute_logits(hidden[self._to_device(logit_rows, torch.long)])
        return self.sampler.sample(logits, sampling)

    def _record_prompt_logprobs(self, batch: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """For sequences that asked for prompt logprobs, score each prompt token this step computes.

        Position p's logits score token p + 1. A recomputed (preempted) prompt is not scored twice.
        """
        row = 0
        for item in batch:
            seq, k = item.seq, item.seq.params.prompt_logprobs
            start = seq.num_computed_tokens
            if k is not None and start < seq.num_prompt_tokens:
                if not seq.prompt_logprobs:
                    seq.prompt_logprobs.append(None)  # the first token has no context to score it
                lo = max(start, len(seq.prompt_logprobs) - 1)
                hi = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
                if hi > lo:
                    logits = self.model.compute_logits(hidden[row + lo - start : row + hi - start])
                    seq.prompt_logprobs.extend(Sampler.prompt_logprobs(logits, seq.token_ids[lo + 1 : hi + 1], k))
            row += item.num_new_tokens
