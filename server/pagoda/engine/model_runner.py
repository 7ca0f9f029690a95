"""Loads the model, owns the KV cache tensors, and runs one flat forward + sampling per step.

Under tensor parallelism every rank has a ModelRunner over its shard of the model and of the KV pool;
rank 0's turns the scheduler's batch into `StepInputs` (`step_inputs`), has its workers run them too, and
samples.
"""

from __future__ import annotations

import logging
import math
from itertools import accumulate

import numpy as np
import torch

from pagoda.attention.metadata import AttentionMetadata, attention_metadata
from pagoda.config import EngineConfig
from pagoda.distributed.parallel_state import all_reduce_min, model_shard
from pagoda.distributed.workers import TensorParallelWorkers
from pagoda.engine.cpu_threads import fit_torch_threads
from pagoda.engine.cuda_graphs import DecodeGraphs
from pagoda.engine.precision import resolve_dense_copy, resolve_dtype, resolve_quantization
from pagoda.engine.run_ahead import RunAhead, SampledStep
from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.spec_decode.rejection_sampler import Emitted, verify
from pagoda.engine.step_inputs import PromptScoring, StepInputs, build_step_inputs, padded_tables
from pagoda.layers.attention import Attention
from pagoda.layers.sampler import Sampler
from pagoda.loader import Checkpoint
from pagoda.loader.dummy import fill_random_weights
from pagoda.models.registry import build_model
from pagoda.models.spec import ModelSpec
from pagoda.quantization import kv_cache_dtype, process_weights_after_loading, quantized_layers

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 4 << 30  # vLLM's default CPU KV-cache space
_NUMPY_INTS = {torch.long: np.int64, torch.int32: np.int32}


def host_tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of a list of ints, converted by numpy: 3-4x faster than `torch.tensor(values)`, which
    checks every element on its own (a quarter of a microsecond each, thousands of them per step)."""
    return torch.from_numpy(np.array(values, dtype=_NUMPY_INTS[dtype]))


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        checkpoint: Checkpoint,
        max_model_len: int,
        workers: TensorParallelWorkers | None = None,
    ) -> None:
        """`workers` (rank 0 of a tensor-parallel group only): the other ranks, which run each step too."""
        self.config = config
        self.workers = workers
        self.device = config.torch_device
        if self.device.type == "cpu":
            fit_torch_threads()
        self.dtype = resolve_dtype(config.dtype, checkpoint, self.device)
        self.quantization = resolve_quantization(config.quantization, checkpoint, config.tensor_parallel_size)
        self.spec = ModelSpec.from_hf_config(checkpoint.config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        torch.manual_seed(config.seed)
        self.kv_cache_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        # a dense copy of the GGUF weights for steps of many rows: on the CPU, where the int4 kernel serves
        keep_dense = resolve_dense_copy(config.dense_weights_for_batches, checkpoint, self.device)
        dense = self.dtype if keep_dense else None
        with model_shard(config.tensor_parallel_size), quantized_layers(self.quantization, dense):
            self.model = build_model(checkpoint.config, self.dtype, self.device)
        gguf = self.quantization == "gguf"
        if config.load_format == "dummy":
            fill_random_weights(self.model)
        else:
            self.model.load_weights(checkpoint.quantized_weights() if gguf else checkpoint.weights())
        head_jobs = []
        if gguf and self.device.type == "cpu" and config.tensor_parallel_size == 1:
            # a quantized model on the CPU: single streams are bound by reading weights, the head's most
            head_jobs.append(self.model.lm_head.quantize_for_small_batches)
        process_weights_after_loading(self.model, *head_jobs)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache(self.num_blocks)
        self.graphs = self._capture_decode_graphs()
        self.sampler = Sampler(checkpoint.eos_token_ids)
        self.run_ahead = RunAhead(self._forward_and_pick, self.block_size) if self._runs_ahead() else None
        if workers is not None:
            workers.wait_until_ready()

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        rows = [1 if a.values_in_keys else 2 for a in self.attention_layers]  # MLA: one latent row
        per_token = sum(n * a.num_kv_heads * a.head_dim for n, a in zip(rows, self.attention_layers))
        return per_token * self.block_size * self.kv_cache_dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        # never more than every sequence at full length could use: the rest would sit idle
        useful = self.config.max_num_seqs * ((self.max_model_len + self.block_size - 1) // self.block_size)
        if self.device.type == "cpu":
            budget = self.config.kv_cache_memory or CPU_DEFAULT_KV_CACHE_BYTES
        else:
            budget = self._profile_free_gpu_memory()
        num_blocks = max(1, min(useful, budget // self.block_bytes))
        if self.config.tensor_parallel_size > 1 and self.device.type == "cuda":
            # every rank must hold the same block tables; profiled free memory differs between GPUs
            num_blocks = all_reduce_min(num_blocks, self.device)
        return num_blocks

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        # Only on one GPU (no collectives inside a graph) and with a cache the Triton kernels use: an fp8
        # cache goes through the torch backend, which reads values back to the host.
        if (
            self.device.type != "cuda"
            or self.config.enforce_eager
            or self.config.tensor_parallel_size > 1
            or self.kv_cache_dtype == torch.float8_e4m3fn
            or not getattr(self.model, "supports_cuda_graphs", True)
        ):
            return None
        graphs = DecodeGraphs(
            self.model, self.config.max_num_seqs, self.max_model_len, self.block_size, self.device
        )
        graphs.capture()
        return graphs

    def _runs_ahead(self) -> bool:
        """Asynchronous scheduling: by default where decode steps replay CUDA graphs, where the GPU would
        otherwise wait for the host between them. Never with other ranks or proposals to verify."""
        if self.workers is not None or self.config.speculative_config is not None:
            return False
        chosen = self.config.async_scheduling
        return chosen if chosen is not None else self.graphs is not None

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
            layer.k_cache = self._zeros(shape)
            layer.v_cache = layer.k_cache if layer.values_in_keys else self._zeros(shape)
            layer.kv_scales = None  # an fp8 cache calibrates its scales on the first batch it stores

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed KV tensor. Zeros, not garbage: attention multiplies the masked padding of a block by a
        zero weight, and 0 * NaN would poison it. On the CPU the zeros come from calloc (numpy), i.e. from
        pages the kernel maps on first touch: the pool costs memory and start-up time only as it fills."""
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        num_bytes = math.prod(shape) * self.kv_cache_dtype.itemsize
        return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(self.kv_cache_dtype).view(shape)

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

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = host_tensor(values, dtype)
        if self.device.type == "cpu":
            return tensor
        return self._host_to_device(tensor)

    def _host_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _metadata(
        self, slots: list[int], query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]]
    ) -> AttentionMetadata:
        tables = torch.from_numpy(padded_tables(block_tables, np.int32))
        return AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.long),
            query_start_loc=self._to_device(list(accumulate(query_lens, initial=0)), torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            block_tables=tables if self.device.type == "cpu" else self._host_to_device(tables),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> list[Emitted]:
        """Forward the batch's new tokens; for each sequence whose whole context is now computed, the
        tokens it emits: one sample, or with proposals to verify, the accepted ones and one more."""
        ahead = self.run_ahead
        sampled = ahead.take(batch) if ahead is not None else None
        guess_rows = ahead.rows_to_guess(batch) if ahead is not None else None
        if sampled is None:
            inputs, scorings = build_step_inputs(batch, self.block_size)
            logits = self.run(inputs) if self.workers is None else self.workers.run_step(self.run, inputs)
            num_scored = self._record_prompt_logprobs(scorings, logits)
            sampling = [item for item in batch if item.samples]
            if not sampling:
                return []
            if any(item.num_spec_tokens for item in sampling):
                return verify(self.sampler, logits[num_scored:], sampling)
            seqs = [item.seq for item in sampling]
            if guess_rows is None:
                out = self.sampler.sample(logits[num_scored:], seqs)
                return [([t], [logprobs]) for t, logprobs in zip(out.token_ids, out.logprobs, strict=True)]
            sampled = SampledStep.start(seqs, self.sampler.pick(logits[num_scored:], seqs))
        if ahead is not None and guess_rows is not None:
            ahead.launch_next(batch, sampled, guess_rows)  # before this step's tokens reach the host
        return sampled.emitted()

    def _forward_and_pick(
        self, inputs: StepInputs, input_ids: torch.Tensor, seqs: list[Sequence]
    ) -> torch.Tensor:
        logits = self.run(inputs, input_ids)
        assert logits is not None  # a decode step samples every row
        return self.sampler.pick(logits, seqs)

    @torch.inference_mode()
    def run(self, inputs: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward every rank runs. Returns the logits of `inputs.logit_rows` on rank 0 (None when there
        are none), None on the other ranks. `input_ids` (on the device) stand for `inputs.input_ids`."""
        if self.graphs is not None and self.graphs.fits(inputs.query_lens, inputs.block_tables):
            hidden = self.graphs.forward(inputs, input_ids)
        else:
            md = self._metadata(inputs.slots, inputs.query_lens, inputs.seq_lens, inputs.block_tables)
            with attention_metadata(md):
                if input_ids is None:
                    input_ids = self._to_device(inputs.input_ids, torch.long)
                hidden = self.model(input_ids, self._to_device(inputs.positions, torch.long))
        rows = inputs.logit_rows
        if not rows:
            return None
        if len(rows) == hidden.shape[0] and rows == list(range(len(rows))):  # a decode step: every row
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[self._to_device(rows, torch.long)])

    @staticmethod
    def _record_prompt_logprobs(scorings: list[PromptScoring], logits: torch.Tensor | None) -> int:
        """Append each scoring's prompt logprobs from its leading rows of `logits`; returns the rows used."""
        row = 0
        for scoring in scorings:
            seq, lo, hi = scoring.seq, scoring.lo, scoring.hi
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # the first token has no context to score it
            if hi > lo and logits is not None:  # logits exist whenever some scoring has rows
                entries = Sampler.prompt_logprobs(
                    logits[row : row + hi - lo], seq.token_ids[lo + 1 : hi + 1], seq.params.prompt_logprobs
                )
                seq.prompt_logprobs.extend(entries)
                row += hi - lo
        return row

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        if self.workers is not None:
            self.workers.close()
