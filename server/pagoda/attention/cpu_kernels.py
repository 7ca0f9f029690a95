"""The CPU attention kernel written in C++ (`csrc/paged_decode.cpp`): attention that reads the paged cache
in place, for steps whose sequences bring at most MAX_QUERY_LEN new tokens each (decodes, speculative
verification). `python -m pagoda.attention.cpu_kernels` compiles it once against the installed torch
(`make install` runs it; it needs g++); the engine loads it when it is there and otherwise keeps the torch
backend's gather + SDPA, which computes the same thing.

The library's name carries a hash of the source and of the torch version, so a checkout whose kernel
changed, or a new torch, never loads a stale build: it falls back until the build runs again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

import torch

from pagoda.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
# The kernel computes each query row's scores one key at a time; a longer prefill chunk is a matrix product
# that SDPA (on the torch path) runs far faster.
MAX_QUERY_LEN = 8


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return SOURCE.parent.parent / f"_paged_decode_cpu_{digest}.so"


def build(march: str = "native") -> Path:
    """Compile the kernel for this machine (`march`: g++'s -march; x86-64-v3 for an image that runs on
    any AVX2 host); a no-op when the current source is already built."""
    target = library_path()
    if target.is_file():
        return target
    if shutil.which("g++") is None:
        raise SystemExit("building the C++ CPU attention kernel needs g++ (Debian: apt-get install g++)")
    torch_dir = Path(torch.__file__).parent
    command = [
        "g++", "-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
        "-lmvec",  # glibc's vector math: see the source
        "-o", str(target.with_suffix(".tmp")),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    target.with_suffix(".tmp").rename(target)  # whole or absent, never half-written
    for stale in target.parent.glob("_paged_decode_cpu_*.so"):
        if stale != target:
            stale.unlink()
    return target


@functools.cache
def available() -> bool:
    """Whether the built kernel is there (and now loaded)."""
    path = library_path()
    if not path.is_file():
        logger.info("the C++ CPU attention kernel is not built (python -m pagoda.attention.cpu_kernels)")
        return False
    torch.ops.load_library(str(path))
    return True


def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Write this step's key/value [N, Hkv, D] into the cache, then attend: query [N, H, D], each
    sequence's new tokens causally over its context -> [N, H, D]. Needs `available()`."""
    return torch.ops.pagoda.paged_decode_attention(
        query, key, value, k_cache, v_cache, md.slot_mapping, md.query_start_loc, md.block_tables,
        md.seq_lens, scale, sliding_window or 0, softcap or 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the C++ CPU attention kernel for this torch.")
    parser.add_argument("--march", default="native", help="g++ -march (default: %(default)s)")
    print(build(parser.parse_args().march))


if __name__ == "__main__":
    main()
