"""Small safetensors reader and streaming writer: tensors one at a time, bfloat16 included."""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cllama.fileio import AtomicWriter

# safetensors dtype -> numpy dtype of the stored bytes (bfloat16 is read as uint16 bits)
NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}


# bytes per element of every safetensors dtype (what a header may name)
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
DAMAGED = "the file is damaged or not a safetensors file; download it again or convert it again"


class SafetensorsFile:
    """Read tensors lazily from one .safetensors file; errors name the file. The header is checked
    against the file when opening: one JSON object, known dtypes, non-negative shapes, every tensor's
    data_offsets inside the file, of its shape's size, no two overlapping."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: safetensors file not found") from None
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path}: a folder, not a safetensors file")
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise self._bad(f"truncated safetensors file: the header length says {n} bytes but only "
                                f"{size - 8} follow it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise self._bad(f"the {n}-byte header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._bad(f"the header is not a JSON object (a {type(header).__name__})")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise self._bad("__metadata__ is not a JSON object")
        self.metadata = metadata or {}
        self.entries = header
        self.data_start = 8 + n
        self._check_entries(size - self.data_start)

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: {why}; {DAMAGED}")

    def _check_entries(self, data_bytes: int) -> None:
        """Every entry against the `data_bytes` after the header."""
        spans = []
        for name, entry in self.entries.items():
            if not isinstance(entry, dict):
                raise self._bad(f"tensor {name!r}: its header entry is not a JSON object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if dtype not in ITEMSIZES:
                raise self._bad(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(ITEMSIZES)})")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise self._bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1]):
                raise self._bad(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with "
                                "0 <= begin <= end")
            begin, end = offsets
            if end > data_bytes:
                raise self._bad(f"truncated safetensors file: tensor {name!r}: data_offsets [{begin}, {end}] reach "
                                f"outside the file ({self.data_start + data_bytes} bytes, {data_bytes} after the "
                                "header)")
            need = math.prod(shape) * ITEMSIZES[dtype]
            if end - begin != need:
                raise self._bad(f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                                f"{dtype} of shape {shape} needs {need}")
            spans.append((begin, end, name))
        spans = sorted(s for s in spans if s[0] < s[1])  # empty tensors occupy no bytes
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensor {n1!r}: data_offsets [{b1}, {e1}] overlap those of tensor {n0!r} "
                                f"[{b0}, {e0}]")

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

    def chunks(self, name: str, max_bytes: int) -> Iterator[np.ndarray]:
        """The stored tensor's flat contents (bfloat16 as uint16 bits) read with plain file reads
        (not mmap, so pages do not stay in this process), at most `max_bytes` per piece; each
        piece is overwritten by the next."""
        entry = self.entries[name]
        if entry["dtype"] not in NP_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        with open(self.path, "rb", buffering=0) as f:
            yield from iter_file_chunks(f, self.data_start + start, end - start,
                                        np.dtype(NP_DTYPES[entry["dtype"]]), max_bytes)


def iter_file_chunks(f: BinaryIO, offset: int, nbytes: int, dtype: np.dtype,
                     max_bytes: int) -> Iterator[np.ndarray]:
    """Read `nbytes` at `offset` of an open file as `dtype` arrays of at most `max_bytes` (rounded
    down to whole items), reusing one buffer; a short read is a ValueError naming the file."""
    step = max(dtype.itemsize, min(max_bytes, nbytes) // dtype.itemsize * dtype.itemsize)
    buf = np.empty(step // dtype.itemsize, dtype)
    f.seek(offset)
    done = 0
    while done < nbytes:
        n = min(step, nbytes - done)
        view = memoryview(buf).cast("B")[:n]
        got = f.readinto(view)
        while got and got < n:  # readinto may return less than asked
            more = f.readinto(view[got:])
            got += more or 0
            if not more:
                break
        if got != n:
            raise ValueError(f"{getattr(f, 'name', 'file')}: truncated: wanted {nbytes} bytes at offset "
                             f"{offset}, the file ends after {done + (got or 0)}")
        done += n
        yield buf[: n // dtype.itemsize]


class SafetensorsWriter(AtomicWriter):
    """Write one .safetensors file tensor by tensor: the header (all names, dtypes and shapes,
    known up front) first, then each tensor's bytes in the given order, any chunking. Written under
    a temporary name; `close()` renames it. As a context manager an exception removes the file."""

    def __init__(self, path: str | os.PathLike, tensors: Sequence[tuple[str, str, tuple[int, ...]]],
                 metadata: dict | None = None) -> None:
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.order, self.sizes, offset = [], {}, 0
        for name, code, shape in tensors:
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(NP_DTYPES[code]).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append(name)
            self.sizes[name] = size
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors does
        super().__init__(path)
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self._left = 0

    def _check_complete(self) -> None:
        if self._left or self._next != len(self.order):
            raise ValueError(f"{self.path}: closed before every tensor was written")

    def begin(self, name: str) -> None:
        """Start the next tensor; names must come in the order given to the constructor."""
        if self._left:
            raise ValueError(f"{self.path}: tensor {self.order[self._next - 1]!r} is missing {self._left} bytes")
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise ValueError(f"{self.path}: expected tensor {self.order[self._next:self._next + 1]}, got {name!r}")
        self._next += 1
        self._left = self.sizes[name]

    def write(self, data: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        if len(view) > self._left:
            raise ValueError(f"{self.path}: tensor {self.order[self._next - 1]!r} got too many bytes")
        self.file.write(view)
        self._left -= len(view)


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
