"""A snapshot of engine state for metrics and autoscaling."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences waiting for admission (including preempted ones)
    kv_cache_usage: float  # used blocks / total blocks, 0..1 (cached-but-free blocks count as free)
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int  # cumulative, in tokens
    num_total_blocks: int
    # speculative decoding, cumulative (vLLM's vllm:spec_decode_* counters)
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    # [k]: how often the draft token at position j was accepted
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
