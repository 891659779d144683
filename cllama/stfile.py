"""A small safetensors reader: header + memory-mapped tensors, bfloat16 included, one at a time."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype -> numpy dtype of the stored bytes (bfloat16 is read as uint16 bits)
NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}


class SafetensorsFile:
    """Read tensors lazily from one .safetensors file; errors name the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: safetensors file not found") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{self.path}: truncated or not a safetensors file "
                                 f"(header of {n} bytes in a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise ValueError(f"{self.path}: truncated safetensors file: tensors need "
                             f"{self.data_start + end} bytes, the file has {size}; download it again")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """safetensors dtype code, e.g. 'F32', 'BF16'."""
        return self.entries[name]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        """The stored array, memory-mapped (bfloat16 as uint16 bits)."""
        entry = self.entries[name]
        if entry["dtype"] not in NP_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        dtype = np.dtype(NP_DTYPES[entry["dtype"]])
        count = (end - start) // dtype.itemsize
        arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=(count,))
        return arr.reshape(entry["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array; bfloat16 widened exactly to float32."""
        arr = self.raw(name)
        if self.dtype(name) == "BF16":
            return bf16_bits_to_float32(arr)
        return np.asarray(arr)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.entries:
            yield name, self.get(name)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (as torch and MindSpore do)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    bits = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits
