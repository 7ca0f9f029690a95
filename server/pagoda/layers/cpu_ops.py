"""Whether the decoder layers' C++ CPU operators (`pagoda/csrc/decoder_ops.cpp`) may stand in for their torch
paths: built, and on x86, whose vector widths (AVX-512, AVX2, generic) the operators follow to round as
torch's kernels do. Elsewhere (ARM's NEON/SVE vectors sum in another order) the torch paths run."""

from __future__ import annotations

import functools
import platform

from pagoda import cpu_extension


@functools.cache
def available() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and cpu_extension.available()
