"""Pagoda's C++ CPU operators (`csrc/*.cpp`, registered as `torch.ops.pagoda.*`): one library compiled once
against the installed torch by `python -m pagoda.cpu_extension` (`make install` runs it; it needs g++).
The engine loads it when it is there; every operator in it has a torch path that computes the same thing,
which runs when it is not.

The library's name carries a hash of the sources and of the torch version, so a checkout whose sources
changed, or a new torch, never loads a stale build: it falls back until the build runs again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cpp"))


def library_path() -> Path:
    digest = hashlib.sha256(torch.__version__.encode())
    for source in sources():
        digest.update(source.name.encode() + source.read_bytes())
    return SOURCE_DIR.parent / f"_pagoda_cpu_{digest.hexdigest()[:12]}.so"


def build(march: str = "native", target: Path | None = None) -> Path:
    """Compile the operators for this machine (`march`: g++'s -march; x86-64-v3 for an image that runs on
    any AVX2 host) into `target` (default: `library_path()`, replacing older builds there); a no-op when
    the target is already built."""
    default = target is None
    target = target or library_path()
    if target.is_file():
        return target
    if shutil.which("g++") is None:
        raise SystemExit("building Pagoda's C++ CPU operators needs g++ (Debian: apt-get install g++)")
    torch_dir = Path(torch.__file__).parent
    compile_flags = [
        "-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-fPIC", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in sources()]
        # one g++ per source, side by side (the attention kernel alone takes most of a minute)
        compiles = [
            subprocess.Popen(["g++", *compile_flags, "-c", str(source), "-o", obj])
            for source, obj in zip(sources(), objects, strict=True)
        ]
        if any([process.wait() for process in compiles]):
            raise SystemExit("compiling Pagoda's C++ CPU operators failed (g++'s errors above)")
        link = [
            "g++", "-shared", "-fopenmp", *objects,
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
            "-lmvec",  # glibc's vector math (expf in the attention kernel's softmax)
            "-o", str(target.with_suffix(".tmp")),
        ]  # fmt: skip
        subprocess.run(link, check=True)
    target.with_suffix(".tmp").rename(target)  # whole or absent, never half-written
    for stale in target.parent.glob("_pagoda_cpu_*.so") if default else ():
        if stale != target:
            stale.unlink()
    return target


@functools.cache
def available() -> bool:
    """Whether the built library is there (and now loaded)."""
    path = library_path()
    if not path.is_file():
        logger.info("Pagoda's C++ CPU operators are not built (python -m pagoda.cpu_extension)")
        return False
    torch.ops.load_library(str(path))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="Build Pagoda's C++ CPU operators for this torch.")
    parser.add_argument("--march", default="native", help="g++ -march (default: %(default)s)")
    print(build(parser.parse_args().march))


if __name__ == "__main__":
    main()
