"""Pagoda: a paged-KV, continuous-batching LLM serving engine."""

from pagoda.sampling_params import SamplingParams
from pagoda.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str) -> object:
    # importing torch and the models is slow: the CLI's --help should not pay for it
    if name == "LLM":
        from pagoda.llm import LLM

        return LLM
    raise AttributeError(name)
