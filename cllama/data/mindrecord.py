"""MindRecord datasets: an atomic writer around MindSpore's FileWriter and a batch reader.

Files: `train.mindrecord` + `train.mindrecord.db` (one shard), or `train.mindrecord0..K-1` + `.db`
each (K shards; pass the base name `train.mindrecord` to every function here). MindRecord keeps
file names inside its header and index, so a file cannot be renamed: the writer fills a hidden
temporary directory `.train.mindrecord.partial-PID/` with the final names and moves the files out
only when complete (index files first, the data file readers open last).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

COLUMN_ORDER = ("input_ids", "labels")
PAGE_SIZE = 1 << 22


def shard_files(path: str | os.PathLike, shards: int) -> list[Path]:
    """Data file names FileWriter uses for `shards` shards of `path`."""
    path = Path(path)
    return [path] if shards == 1 else [path.with_name(f"{path.name}{i}") for i in range(shards)]


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """The data files of a dataset: `path` itself, or its shards `path0, path1, ...`; each must
    have its `.db` index beside it."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = []
        while path.with_name(f"{path.name}{len(files)}").is_file():
            files.append(path.with_name(f"{path.name}{len(files)}"))
        if not files:
            raise FileNotFoundError(f"{path}: no MindRecord dataset (neither {path.name} nor shards "
                                    f"{path.name}0, ... exist); write one with `cllama data qa|wiki|code`")
    for f in files:
        if not Path(f"{f}.db").is_file():
            raise FileNotFoundError(f"{f}: MindRecord index {f.name}.db is missing beside it; "
                                    "rewrite the dataset (the two files belong together)")
    return files


def existing_files(path: str | os.PathLike) -> list[Path]:
    """The files of dataset `path` that exist: `path`, its shards `path0..`, and their `.db` indexes."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\d*(\.db)?")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def remove_dataset(path: str | os.PathLike) -> None:
    """Delete a dataset's files (`path`, its shards `path0..`, and their `.db` indexes) if present."""
    for old in existing_files(path):
        old.unlink()


class MindRecordWriter:
    """Context manager that writes rows of int32 arrays to `path` (optionally in shards) and
    publishes the files only when the block finishes without an exception.

    with MindRecordWriter("out/train.mindrecord", ["input_ids", "labels"]) as w:
        w.write({"input_ids": ids, "labels": labels})
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], shards: int = 1,
                 rows_per_write: int = 1024) -> None:
        if shards < 1:
            raise ValueError(f"{path}: shards must be >= 1 (got {shards})")
        if not columns:
            raise ValueError(f"{path}: give at least one column")
        self.path, self.columns, self.shards = Path(path), list(columns), shards
        self.rows_per_write = rows_per_write
        self.rows = 0
        self._buffer: list[dict] = []
        self._writer = None
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"

    def __enter__(self) -> MindRecordWriter:
        from mindspore.mindrecord import FileWriter

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
        self.tmp.mkdir()
        self._writer = FileWriter(str(self.tmp / self.path.name), shard_num=self.shards, overwrite=True)
        self._writer.set_page_size(PAGE_SIZE)  # MindRecord's 32 MiB default makes every file >= 48 MiB
        self._writer.set_header_size(PAGE_SIZE)
        self._writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in self.columns}, "cllama")
        return self

    def write(self, row: Mapping[str, np.ndarray]) -> None:
        """Queue one row {column: 1-D int32 array}; rows go to FileWriter in batches."""
        if set(row) != set(self.columns):
            raise ValueError(f"{self.path}: row has columns {sorted(row)}, the schema has {self.columns}")
        self._buffer.append({c: np.asarray(row[c], dtype=np.int32) for c in self.columns})
        self.rows += 1
        if len(self._buffer) >= self.rows_per_write:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_raw_data(self._buffer)
            self._buffer = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final name."""
        self._buffer = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> list[Path]:
        """Finish the files and move them to their final names; returns the data files."""
        if self.rows == 0:
            raise ValueError(f"{self.path}: no samples to write")
        if self.rows < self.shards:
            raise ValueError(f"{self.path}: {self.rows} samples cannot fill {self.shards} shards; "
                             "write more data or fewer shards")
        self._flush()
        self._writer.commit()
        final = shard_files(self.path, self.shards)
        remove_dataset(self.path)  # a previous run's files under this name (maybe more shards)
        for f in final:
            os.replace(self.tmp / f"{f.name}.db", f"{f}.db")
        for f in reversed(final):  # shard 0 (the one readers open first) last
            os.replace(self.tmp / f.name, f)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return final


def write_mindrecord(path: str | os.PathLike, rows: Iterable[Mapping[str, np.ndarray]],
                     columns: Sequence[str] | None = None, shards: int = 1) -> list[Path]:
    """Write rows {column: int32 array} to a MindRecord dataset atomically; returns its data files.
    Columns default to those of the first row."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: no samples to write")
    columns = list(columns or sorted(first, key=lambda c: (c not in COLUMN_ORDER, c)))
    with MindRecordWriter(path, columns, shards) as writer:
        writer.write(first)
        for row in rows:
            writer.write(row)
    return shard_files(path, shards)


def _open(files: Sequence[Path], **kwargs):
    import mindspore.dataset as ds

    return ds.MindDataset([str(f) for f in files], **kwargs)


def check_size(path: Path) -> None:
    """A truncated MindRecord data file is one ValueError naming it (MindSpore would fail only while
    iterating, deep in its reader). The file starts with an 8-byte length and a JSON header whose pages
    (`page_id`, used `page_size`) sit at header_size + page_id * page_size; a header that does not
    parse is left to MindSpore's own check."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= min(size - 8, 1 << 26) else None
            pages, header_size, page_size = header["page"], int(header["header_size"]), int(header["page_size"])
            last = max(pages, key=lambda page: int(page["page_id"]), default=None)
            need = header_size + (int(last["page_id"]) * page_size + int(last["page_size"]) if last else 0)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return
    if size < need:
        raise ValueError(f"{path}: truncated MindRecord file: its header places {len(pages)} pages after "
                         f"{header_size} header bytes, {need} bytes in all, the file has {size}; rewrite the dataset "
                         "with `cllama data ...`")


def _check_files(paths: Sequence[Path], columns: Sequence[str] | None) -> tuple[list[Path], list[str], int]:
    """Resolve every dataset, check each file is whole (check_size), reads and has the columns;
    (files, columns, rows)."""
    files = [f for p in paths for f in dataset_files(p)]
    rows, names = 0, None
    for f in files:
        check_size(f)
        try:
            dataset = _open([f], shuffle=False)
            rows += dataset.get_dataset_size()
            have = dataset.get_col_names()
        except RuntimeError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "Invalid" in line or
                           "ERROR" in line), str(err).strip().splitlines()[-1])
            raise ValueError(f"{f}: not a readable MindRecord file ({reason[:200]}); rewrite it "
                             "with `cllama data ...`") from None
        if names is None:
            names = list(columns) if columns else sorted(have, key=lambda c: (c not in COLUMN_ORDER, c))
        missing = [c for c in names if c not in have]
        if missing:
            raise ValueError(f"{f}: has columns {sorted(have)}, not {missing}; "
                             "pretraining data has only input_ids, qa data also labels")
    return files, names, rows


def read_mindrecord(path: str | os.PathLike | Sequence[str | os.PathLike],
                    columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every row of a dataset in file order, stacked: {column: int32 array (rows, length)}."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files, columns, _ = _check_files([Path(p) for p in paths], columns)
    rows: dict[str, list] = {c: [] for c in columns}
    for item in _open(files, columns_list=columns, shuffle=False).create_dict_iterator(output_numpy=True):
        for c in columns:
            rows[c].append(item[c])
    return {c: np.stack(v) for c, v in rows.items()}


def read_sample(path: str | os.PathLike, index: int = 0) -> dict[str, np.ndarray]:
    """One row of a dataset (in file order) as {column: int32 array}."""
    import mindspore.dataset as ds

    files, columns, rows = _check_files([Path(path)], None)
    if not 0 <= index < rows:
        raise ValueError(f"{path}: sample {index} out of range (the dataset holds {rows})")
    dataset = _open(files, columns_list=columns, sampler=ds.SubsetSampler([index]))
    return next(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))


def shard_indices(rows: int, num_shards: int | None, shard_id: int | None, shuffle: bool,
                  seed: int, repeat: int) -> list[np.ndarray]:
    """Row order one reader sees, one array per epoch: a disjoint block of floor(rows/num_shards)
    rows per shard (of a seeded permutation when shuffling; the rows % num_shards left over are
    skipped so every rank gets the same count), reshuffled every epoch."""
    if (num_shards is None) != (shard_id is None):
        raise ValueError("load_dataset: give num_shards and shard_id together (or neither)")
    num_shards, shard_id = (1, 0) if num_shards is None else (num_shards, shard_id)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"load_dataset: shard_id {shard_id} out of range for num_shards {num_shards}")
    order = np.random.default_rng(seed).permutation(rows) if shuffle else np.arange(rows)
    per = rows // num_shards
    mine = order[shard_id * per:(shard_id + 1) * per]
    if shuffle:
        return [np.random.default_rng([seed, epoch]).permutation(mine) for epoch in range(repeat)]
    return [mine] * repeat


def load_dataset(path: str | list[str], batch_size: int, columns: list[str] | None = None,
                 shuffle: bool = True, seed: int = 0, repeat: int = 1, drop_remainder: bool = True,
                 num_shards: int | None = None, shard_id: int | None = None):
    """Training batches from one or more MindRecord datasets: a `mindspore.dataset.Dataset`
    yielding int32 arrays (batch, seq_length+1) named "input_ids" (and "labels" for qa data).
    Shuffling is seeded here (MindSpore's global seed is not used); epochs are concatenated before
    batching (each reshuffled); num_shards/shard_id give each data-parallel rank a disjoint,
    equally sized part."""
    import mindspore.dataset as ds

    if batch_size < 1 or repeat < 1:
        raise ValueError(f"load_dataset: batch_size and repeat must be >= 1 (got {batch_size}, {repeat})")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("load_dataset: no dataset path given")
    files, columns, rows = _check_files([Path(p) for p in paths], columns)
    epochs = shard_indices(rows, num_shards, shard_id, shuffle, seed, repeat)
    if len(epochs[0]) * repeat < (batch_size if drop_remainder else 1):
        raise ValueError(f"{paths[0]}: {len(epochs[0])} samples for this reader ({rows} in all), fewer than "
                         f"one batch of {batch_size}; lower batch_size or write more data")
    dataset = None
    for order in epochs if shuffle else epochs[:1]:
        part = _open(files, columns_list=columns, sampler=ds.SubsetSampler(order.tolist()))
        dataset = part if dataset is None else dataset + part
    if not shuffle and repeat > 1:
        dataset = dataset.repeat(repeat)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)
