"""MindSpore `.ckpt` files tensor by tensor: a streaming writer and a lazy reader.

A MindSpore checkpoint is a protobuf `Checkpoint` (mindspore/train/checkpoint.proto):
`repeated Value value = 1`, `Value {required string tag = 1; TensorProto tensor = 2}`,
`TensorProto {repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3}`.
`mindspore.save_checkpoint` writes each parameter as its own serialized one-value `Checkpoint`,
splitting contents above 512 MiB into several values with the same tag and dims (the loader joins
consecutive values with one tag). Concatenated messages parse as one, so the file can be written and
read one tensor at a time; `CkptWriter` writes exactly the bytes `save_checkpoint` writes.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cllama.checkpoint.safetensors_file import iter_file_chunks
from cllama.fileio import AtomicWriter

SLICE_BYTES = 512 * 1024 * 1024  # mindspore.train.serialization: SLICE_SIZE (KiB) * 1024
CRC_FOOTER = b"crc_num"  # save_checkpoint(crc_check=True) appends b"crc_num" + 10 bytes
MS_TYPES = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}
_FROM_MS = {v: k for k, v in MS_TYPES.items()}
_MS_ITEMSIZE = {"Float32": 4, "Float16": 2, "BFloat16": 2, "Float64": 8, "Int8": 1, "UInt8": 1,
                "Int16": 2, "UInt16": 2, "Int32": 4, "UInt32": 4, "Int64": 8, "UInt64": 8, "Bool": 1}
_MS_UNSIZED = ("str", "Int4")  # the other types MindSpore's loader knows (a string; packed 4-bit)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 as bits


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def slice_header(name: str, shape: tuple[int, ...], dtype: str, content_bytes: int) -> bytes:
    """Bytes before the `content_bytes` of tensor content of one checkpoint value."""
    tensor_head = b"".join(_varint(1 << 3) + _varint(d) for d in shape)
    tensor_head += _field(2, MS_TYPES[dtype].encode())
    tensor_head += _varint(3 << 3 | 2) + _varint(content_bytes)
    tensor_len = len(tensor_head) + content_bytes
    value_head = _field(1, name.encode()) + _varint(2 << 3 | 2) + _varint(tensor_len) + tensor_head
    return _varint(1 << 3 | 2) + _varint(len(value_head) + content_bytes) + value_head


class CkptWriter(AtomicWriter):
    """Write a MindSpore checkpoint tensor by tensor, under a temporary name until `close()`.

    Use as a context manager: on an exception the partial file is removed and nothing appears
    under `path`. Per tensor: `begin(name, shape, dtype)`, `write(array)` until the tensor's bytes
    are complete (any chunking), then the next `begin`."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.names: list[str] = []
        self._current: tuple[str, tuple[int, ...], str] | None = None
        self._left = 0  # bytes still due for the current tensor
        self._slice_left = 0  # bytes still due in the current slice

    def _check_complete(self) -> None:
        if self._left:
            raise ValueError(f"{self.path}: tensor {self._current[0]!r} is missing {self._left} bytes")

    def begin(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self._check_complete()
        if name in self.names:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        self.names.append(name)
        self._current = (name, tuple(int(d) for d in shape), dtype)
        self._left = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        self._slice_left = 0
        if self._left == 0:
            self.file.write(slice_header(name, self._current[1], dtype, 0))

    def write(self, data: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        if len(view) > self._left:
            raise ValueError(f"{self.path}: tensor {self._current[0]!r} got {len(view) - self._left} "
                             "bytes too many")
        while len(view):
            if self._slice_left == 0:
                self._slice_left = min(SLICE_BYTES, self._left)
                self.file.write(slice_header(*self._current, self._slice_left))
            n = min(len(view), self._slice_left)
            self.file.write(view[:n])
            view, self._slice_left, self._left = view[n:], self._slice_left - n, self._left - n

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        """Write one whole tensor (`array` in storage form: bfloat16 as uint16 bits)."""
        self.begin(name, array.shape, dtype)
        self.write(array)


class CkptFile:
    """Index of a MindSpore checkpoint (names, shapes, dtypes, content offsets); tensors are read
    on demand, in chunks. Only headers are read when opening; errors name the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: checkpoint not found")
        self.size = self.path.stat().st_size
        self.entries: dict[str, dict] = {}  # name -> {shape, ms_type, slices: [(offset, nbytes)]}
        with open(self.path, "rb") as f:
            self._scan(f)

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: {why}; not a complete unencrypted MindSpore checkpoint (damaged, truncated "
                          "or another kind of file); convert or save it again")

    def _span(self, i: int, n: int, end: int, what: str) -> int:
        """The end of a field of `n` bytes at `i` that must lie within its record ending at `end`."""
        if i + n > end:
            raise self._bad(f"{what} at offset {i} declares {n} bytes but its record ends at offset {end}"
                            + (f" (the file has {self.size} bytes: truncated?)" if i + n > self.size else ""))
        return i + n

    def _scan(self, f) -> None:
        w = _Window(f, self.size, self._bad)
        pos, previous = 0, None
        while pos < self.size:
            if self.size - pos == 17 and w.read(pos, 7) == CRC_FOOTER:
                break
            key, i = w.varint(pos)
            if key != 0x0A:
                raise self._bad(f"unexpected field {key:#x} at offset {pos}")
            length, i = w.varint(i)
            end = i + length
            if end > self.size:
                raise self._bad(f"truncated: an entry at offset {pos} needs {end} bytes, the file has "
                                f"{self.size}")
            name, shape, ms_type, content = self._parse_value(w, i, end)
            entry = self.entries.get(name)
            if entry is None:
                self.entries[name] = {"shape": shape, "ms_type": ms_type, "slices": [content]}
            elif previous == name and entry["shape"] == shape and entry["ms_type"] == ms_type:
                entry["slices"].append(content)
            else:
                raise self._bad(f"tensor {name!r} appears twice")
            previous, pos = name, end
        for name, entry in self.entries.items():
            need = int(np.prod(entry["shape"], dtype=np.int64)) * _MS_ITEMSIZE.get(entry["ms_type"], 0)
            got = sum(n for _, n in entry["slices"])
            if entry["ms_type"] in _MS_ITEMSIZE and need != got:
                raise self._bad(f"tensor {name!r} of shape {entry['shape']} has {got} bytes, needs {need}")

    def _parse_value(self, w: _Window, i: int, end: int):
        start, name, tensor = i, None, None
        while i < end:
            key, i = w.varint(i)
            n, i = w.varint(i) if key & 7 == 2 else (0, i)
            self._span(i, n, end, f"field {key:#x}")
            if key == 0x0A:  # tag
                name = self._text(w.read(i, n), i, "tensor name")
            elif key == 0x12:  # tensor
                tensor = self._parse_tensor(w, i, i + n, name)
            elif key == 0x1A:
                raise self._bad(f"map tensor {name!r} (a MapParameter) is not a model weight")
            else:
                raise self._bad(f"unexpected field {key:#x} at offset {i}")
            i += n
        if i != end or name is None or tensor is None or tensor[1] is None or tensor[2] is None:
            raise self._bad(f"incomplete entry at offset {start}")
        shape, ms_type, content = tensor
        if any(d >= 1 << 63 for d in shape):
            raise self._bad(f"tensor {name!r}: shape {shape} has a negative dimension")
        if ms_type not in _MS_ITEMSIZE and ms_type not in _MS_UNSIZED:
            raise self._bad(f"tensor {name!r}: unknown tensor type {ms_type!r}")
        return name, tuple(shape) if shape != [0] else (), ms_type, content  # [0]: a scalar

    def _text(self, raw: bytes, i: int, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self._bad(f"the {what} at offset {i} is not text") from None

    def _parse_tensor(self, w: _Window, i: int, end: int, name: str | None):
        shape, ms_type, content = [], None, None
        while i < end:
            key, i = w.varint(i)
            if key == 0x08:  # one dim
                d, i = w.varint(i)
                shape.append(d)
                continue
            n, i = w.varint(i)
            stop = self._span(i, n, end, f"tensor {name!r}: field {key:#x}")
            if key == 0x0A:  # packed dims
                while i < stop:
                    d, i = w.varint(i)
                    shape.append(d)
                continue
            if key == 0x12:
                ms_type = self._text(w.read(i, n), i, f"tensor {name!r}'s type")
            elif key == 0x1A:
                content = (i, n)
            else:
                raise self._bad(f"unexpected tensor field {key:#x} at offset {i}")
            i = stop
        if i != end:
            raise self._bad(f"tensor {name!r}: its fields overrun their record (offset {i}, record end {end})")
        return shape, ms_type, content

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]["shape"]

    def dtype(self, name: str) -> str:
        """'float32', 'float16' or 'bfloat16'; a ValueError for other stored types."""
        ms_type = self.entries[name]["ms_type"]
        if ms_type not in _FROM_MS:
            raise ValueError(f"{self.path}: tensor {name!r} is {ms_type}; weights must be Float32, "
                             "Float16 or BFloat16")
        return _FROM_MS[ms_type]

    def nbytes(self, name: str) -> int:
        return sum(n for _, n in self.entries[name]["slices"])

    def chunks(self, name: str, max_bytes: int) -> Iterator[np.ndarray]:
        """The tensor's flat contents in storage form (bfloat16 as uint16), at most `max_bytes`
        per piece; each piece is overwritten by the next."""
        dtype = np.dtype(STORAGE[self.dtype(name)])
        with open(self.path, "rb", buffering=0) as f:
            for offset, nbytes in self.entries[name]["slices"]:
                yield from iter_file_chunks(f, offset, nbytes, dtype, max_bytes)

    def get(self, name: str) -> np.ndarray:
        """The whole tensor in storage form (bfloat16 as uint16 bits)."""
        parts = [c.copy() for c in self.chunks(name, 1 << 62)]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return flat.reshape(self.shape(name))


class _Window:
    """Small reads at absolute offsets through one 4 KiB window (checkpoint headers only)."""

    def __init__(self, f, size: int, bad) -> None:
        self.f, self.size, self.bad = f, size, bad
        self.start, self.buf = 0, b""

    def read(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            if pos + n > self.size:
                raise self.bad(f"truncated at offset {pos}")
            self.f.seek(pos)
            self.buf, self.start = self.f.read(max(n, 4096)), pos
        return self.buf[pos - self.start:pos - self.start + n]

    def varint(self, pos: int) -> tuple[int, int]:
        """(value, position after it)."""
        value, shift = 0, 0
        while True:
            b = self.read(pos, 1)[0]
            value |= (b & 0x7F) << shift
            pos += 1
            if not b & 0x80:
                return value, pos
            shift += 7
