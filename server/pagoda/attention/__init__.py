"""Attention backends: paged KV-cache writes and attention over a flat, mixed prefill/decode batch.

Both backends expose the same two functions, `write_kv` and `paged_attention`; the torch backend is the
CPU path and the reference the Triton kernels are tested against.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def get_backend(device: torch.device) -> ModuleType:
    """The backend module for tensors on `device` (Triton is imported only when a GPU is used)."""
    if device.type == "cuda":
        return importlib.import_module("pagoda.attention.triton_backend")
    return importlib.import_module("pagoda.attention.torch_backend")
