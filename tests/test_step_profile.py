"""bench/step_profile on its smallest case: every part of the step it names is found and timed.

No timing assertions: only that each profiler range it puts around the model's parts fired (a renamed
layer or backend function would leave its row at zero), and that the step ran the model's eager ops.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `bench` is a top-level folder of the repository, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import step_profile  # noqa: E402
from pagoda import LLM  # noqa: E402
from pagoda.attention import cpu_kernels  # noqa: E402


def test_every_part_of_a_decode_step_is_timed() -> None:
    engine = LLM(max_model_len=1024, kv_cache_memory=64 << 20).engine
    result = step_profile.profile_batch(engine, num_seqs=2, repeats=1, profiled_steps=1)
    # decode steps attend through the C++ kernel (make install builds it), not the torch backend's parts, the
    # rotation included (one C++ call from the projection's output to the attention's)
    torch_attention = ("kv_write", "attn_plan", "gather", "sdpa")
    fused = ("rotary", "attn_rest", *torch_attention)
    untimed = ("forward_rest", "host", *(fused if cpu_kernels.available() else ("cpp_attention",)))
    timed_parts = [name for name, _ in step_profile.PARTS if name not in untimed]
    assert all(result["parts"][name] > 0 for name in timed_parts), result["parts"]
    assert result["ops"] > 30 * 4  # SmolLM2's 30 layers, each four matmuls or more
    assert result["matmul"] > 0 and result["step"] > 0
    assert not engine.has_unfinished_requests()  # the profiled requests were aborted
    assert "| LM head |" in step_profile.markdown([result])
