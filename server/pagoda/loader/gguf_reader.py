"""Reading a GGUF file: its metadata and a zero-copy view of each tensor's bytes.

A small parser of our own rather than `gguf.GGUFReader`: that one builds a numpy view per array
element, which takes ~2 s on SmolLM2's 49k-token vocabulary; walking the same bytes with `struct`
takes tens of milliseconds. Tensor data is never read here, only mapped.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): fixed-size scalars as struct formats.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, columns); GGUF lists the fastest-moving dimension first
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """Metadata (`dict` of key -> value) and tensor table of one GGUF file, with its data memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            # Copy-on-write: torch wants a writable buffer, and nothing we do ever writes to it.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if self._map[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        self._pos = 4
        version, tensor_count, kv_count = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only v2 and v3)")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._read_string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._read_value(value_type)
        raw_infos = [self._read_tensor_info() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in raw_infos:
            block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
            nbytes = prod(shape) // block_elements * block_bytes
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
            if data_start + offset + nbytes > len(self._map):
                raise ValueError(
                    f"{self.path}: tensor {name} lies past the end of the file (truncated download?)"
                )

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def raw_bytes(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The tensor's stored bytes as a flat uint8 tensor sharing memory with the file map."""
        return torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _read_string(self) -> str:
        (length,) = self._unpack("<Q")
        start = self._pos
        self._pos += length
        # A few vocabularies hold byte sequences that are not valid UTF-8; keep them loadable.
        return self._map[start : self._pos].decode("utf-8", errors="replace")

    def _read_value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self._unpack("<" + _SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self._read_string()
        if value_type == _ARRAY:
            element_type, count = self._unpack("<IQ")
            if element_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[element_type]).newbyteorder("<")
                values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos += count * dtype.itemsize
                return values
            return [self._read_value(element_type) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {value_type}")

    def _read_tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._read_string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        ggml_type_id, offset = self._unpack("<IQ")
        try:
            ggml_type = GGMLQuantizationType(ggml_type_id)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {name} has unknown ggml type {ggml_type_id}") from None
        return name, tuple(int(d) for d in reversed(dims)), ggml_type, offset
