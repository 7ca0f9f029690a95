"""The engine `AsyncLLM` drives from its thread, as a protocol: `LLMEngine`, in one process or as rank 0 of
a tensor-parallel group (then `workers` are the other ranks), or any stand-in with the same methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pagoda.distributed.workers import TensorParallelWorkers
    from pagoda.engine.stats import EngineStats
    from pagoda.outputs import RequestOutput
    from pagoda.sampling_params import SamplingParams


class EngineCore(Protocol):
    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # a transformers tokenizer; None with skip_tokenizer_init

    @property
    def workers(self) -> TensorParallelWorkers | None:
        """The other tensor-parallel ranks, watched for liveness; None for a single-process engine."""

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; raises ValueError, with a message fit for the client, if it can never run."""

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]:
        """One scheduler step and forward; the outputs of the requests it advanced."""

    def get_stats(self) -> EngineStats: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...
