"""The synchronous engine: requests in, one scheduler step + forward per `step()`, outputs out.

Not thread-safe: the offline `LLM` drives it directly; the server's `AsyncLLM` drives it from one
background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property
from pathlib import Path

from pagoda.config import EngineConfig
from pagoda.distributed.workers import TensorParallelWorkers, WorkerFailedError, start_workers
from pagoda.engine.block_manager import BlockManager
from pagoda.engine.interface import StepError
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.request import Request
from pagoda.engine.scheduler import ScheduledSequence, Scheduler
from pagoda.engine.sequence import Sequence
from pagoda.engine.spec_decode.decoder import SpecDecoder
from pagoda.engine.stats import EngineStats
from pagoda.loader import open_checkpoint, open_tokenizer
from pagoda.models.spec import ModelSpec
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.structured_outputs.backend import GrammarCompiler

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        checkpoint = open_checkpoint(config.model, config.load_format)
        own_tokenizer = not config.skip_tokenizer_init and not config.tokenizer
        if own_tokenizer:
            checkpoint.prefetch_tokenizer()  # built while the weights load
        self.eos_token_ids = list(checkpoint.eos_token_ids)
        self.model_name = Path(config.model).name if config.model else "SmolLM2-135M-Instruct"
        spec = ModelSpec.from_hf_config(checkpoint.config)
        self.vocab_size = spec.vocab_size
        if config.max_model_len is not None and config.max_model_len > spec.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context length "
                f"{spec.max_position_embeddings}"
            )
        self.max_model_len = config.max_model_len or spec.max_position_embeddings
        workers = start_workers(config, spec, self.max_model_len)  # None unless tensor-parallel
        try:
            self.runner = ModelRunner(config, checkpoint, self.max_model_len, workers)
        except BaseException:
            if workers is not None:
                workers.close()
            raise
        self.tokenizer = None
        if config.tokenizer and not config.skip_tokenizer_init:
            self.tokenizer = open_tokenizer(config.tokenizer)
        elif own_tokenizer:
            self.tokenizer = checkpoint.tokenizer
        self.spec_decoder = self._spec_decoder()
        self.load_seconds = time.perf_counter() - start
        self._reset_scheduler()
        self.requests: dict[str, Request] = {}
        logger.info(
            "loaded %s in %.2f s: %d KV blocks of %d tokens (%.1f MiB)",
            self.model_name, self.load_seconds, self.runner.num_blocks, config.block_size,
            self.runner.num_blocks * self.runner.block_bytes / 2**20,
        )

    def _spec_decoder(self) -> SpecDecoder | None:
        spec = self.config.speculative_config
        if spec is None:
            return None
        assert not isinstance(spec, dict | str)  # EngineConfig parsed it
        if spec.method == "ngram":
            from pagoda.engine.spec_decode.ngram import NgramProposer

            return SpecDecoder(spec, NgramProposer(spec.prompt_lookup_min or 1, spec.prompt_lookup_max or 1))
        from pagoda.engine.spec_decode.draft_model import DraftModelProposer

        assert spec.model is not None
        proposer = DraftModelProposer(
            self.config, spec.model, self.runner.num_blocks, self.max_model_len, self.vocab_size
        )
        return SpecDecoder(spec, proposer)

    def _reset_scheduler(self) -> None:
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        lookahead = self.spec_decoder.lookahead if self.spec_decoder is not None else None
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens, lookahead,
            reserve_next_slot=self.runner.run_ahead is not None,
        )

    @property
    def workers(self) -> TensorParallelWorkers | None:
        return self.runner.workers

    @property
    def kv_cache_tokens(self) -> int:
        return self.runner.num_blocks * self.config.block_size

    @cached_property
    def grammar_compiler(self) -> GrammarCompiler:
        """Structured outputs' grammars for this model's tokenizer, built on first use."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer")
        return GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass token ids with skip_tokenizer_init")
        return list(self.tokenizer.encode(prompt))

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ValueError, with a message fit for the client, if it can never run.

        `arrival_time` is a `time.monotonic()` reading (default: now).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.bad_words:
            words = self._bad_words_token_ids(params.bad_words)
            params = dataclasses.replace(params, bad_words_token_ids=words)
        if any(not 0 <= t < self.vocab_size for t in params.token_ids):
            raise ValueError(f"token ids in the sampling parameters must be in [0, {self.vocab_size})")
        max_tokens = params.max_tokens or self.max_model_len - len(token_ids)
        total = len(token_ids) + max_tokens
        if max_tokens < 1 or total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(token_ids)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or of the completion."
            )
        if total > self.kv_cache_tokens:
            raise ValueError(
                f"the request needs {total} tokens of KV cache but the whole cache holds "
                f"{self.kv_cache_tokens}; give the engine more KV-cache memory"
            )
        params = dataclasses.replace(params, max_tokens=max_tokens)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(token_ids, params, self.config.block_size, request_id, i, arrival_time)
            for i in range(params.n)
        ]
        if params.structured_outputs is not None:  # an invalid spec raises GrammarError (a ValueError)
            for seq in seqs:
                seq.matcher = self.grammar_compiler.matcher(params.structured_outputs)
        text = prompt if isinstance(prompt, str) else None
        request = Request(request_id, text, seqs, self.tokenizer, self.eos_token_ids, arrival_time)
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as tokens, alone and after a space (how it appears mid-text), like vLLM."""
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer")
        variants = {tuple(self.tokenizer.encode(text, add_special_tokens=False))
                    for word in words for text in (word, " " + word.lstrip())}
        return [list(ids) for ids in sorted(variants) if ids]

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            return self._run(batch)
        except WorkerFailedError:
            raise  # the tensor-parallel group is broken for good: no single request's fault
        except Exception as error:
            raise StepError(sorted({item.seq.request_id for item in batch}), error) from error

    def _run(self, batch: list[ScheduledSequence]) -> list[RequestOutput]:
        if self.spec_decoder is not None:
            self.spec_decoder.propose(batch)
        emitted = iter(self.runner.execute(batch))
        now = time.monotonic()
        requests = self.requests
        updated: dict[str, Request] = {}  # the requests whose output this step's tokens may make
        for seq, num_new_tokens, samples, num_spec_tokens in batch:  # every running sequence: kept lean
            request = requests[seq.request_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            seq.num_computed_tokens += num_new_tokens - num_spec_tokens
            if not samples:
                continue
            token_ids, logprobs = next(emitted)
            if len(token_ids) == 1:
                finish_reason = request.append_token(seq, token_ids[0], logprobs[0], now)
            else:
                finish_reason = None
                for token_id, token_logprobs in zip(token_ids, logprobs, strict=True):
                    # several accepted tokens: a stop among them ends the sequence there
                    finish_reason = request.append_token(seq, token_id, token_logprobs, now)
                    if finish_reason is not None:
                        break
            if num_spec_tokens:
                self._settle_proposals(seq, num_spec_tokens, len(token_ids) - 1, finish_reason is not None)
            if finish_reason is not None:
                self.scheduler.finish(seq, finish_reason)
                updated[request.request_id] = request
            elif request.streams:  # a FINAL_ONLY request has output only once a sequence finishes
                updated[request.request_id] = request
        outputs = [request.output() for request in updated.values() if request.wants_output]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def _settle_proposals(
        self, seq: Sequence, num_spec_tokens: int, num_accepted: int, finished: bool
    ) -> None:
        """Keep the K/V of the accepted proposals (the target computed them from the same tokens) and
        roll back the rest: the next step overwrites their slots; blocks held only for them go back."""
        assert self.spec_decoder is not None
        self.spec_decoder.record(seq, num_spec_tokens, num_accepted)
        if not finished:
            seq.num_computed_tokens += num_accepted
            self.block_manager.free_tail(seq)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes now (garbage collection or exit would, later)."""
        self.runner.close()

    def get_stats(self) -> EngineStats:
        bm, spec = self.block_manager, self.spec_decoder
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_total_blocks=bm.num_blocks,
            spec_decode_num_drafts=spec.num_drafts if spec else 0,
            spec_decode_num_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_decode_num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_decode_num_accepted_tokens_per_pos=list(spec.num_accepted_per_pos) if spec else [],
        )

    def warmup(self) -> None:
        """Real forward passes (a prefill and decodes at a full batch), then a clean slate."""
        batch = min(self.config.max_num_seqs, 8)
        prompt_len = min(self.config.block_size, self.max_model_len - 2)
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        for i in range(batch):
            self.add_request(f"warmup-{i}", [(i + j) % self.vocab_size for j in range(prompt_len)], params)
        while self.has_unfinished_requests():
            self.step()
        if self.spec_decoder is not None:  # counters start from zero
            self.spec_decoder = SpecDecoder(self.spec_decoder.config, self.spec_decoder.proposer)
        self._reset_scheduler()
