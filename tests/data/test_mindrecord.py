"""MindRecord: round trip through MindDataset, file shards and reader shards, atomic writes,
errors naming the file."""
import os

import numpy as np
import pytest

from cllama.data.mindrecord import (
    MindRecordWriter,
    dataset_files,
    load_dataset,
    read_mindrecord,
    shard_indices,
    write_mindrecord,
)

L = 17


def rows(n: int, labels: bool = True):
    """Row i holds i at position 0 (an identity for checking splits) and random ids after."""
    rng = np.random.default_rng(n)
    for i in range(n):
        ids = rng.integers(0, 32000, L).astype(np.int32)
        ids[0] = i
        yield {"input_ids": ids, **({"labels": np.where(ids % 3 == 0, -100, ids).astype(np.int32)} if labels else {})}


def batches(dataset, column="input_ids"):
    return [b[column] for b in dataset.create_dict_iterator(output_numpy=True)]


def test_round_trip(tmp_path):
    path = tmp_path / "train.mindrecord"
    assert write_mindrecord(path, rows(10)) == [path]
    assert sorted(os.listdir(tmp_path)) == ["train.mindrecord", "train.mindrecord.db"]
    want = list(rows(10))
    got = read_mindrecord(path)
    for c in ("input_ids", "labels"):
        assert got[c].dtype == np.int32 and np.array_equal(got[c], np.stack([r[c] for r in want]))
    out = list(load_dataset(str(path), batch_size=4, shuffle=False).create_dict_iterator(output_numpy=True))
    assert len(out) == 2 and list(out[0]) == ["input_ids", "labels"]  # drop_remainder: 10 -> 2 batches
    assert out[0]["input_ids"].shape == (4, L) and out[0]["labels"].dtype == np.int32
    assert np.array_equal(np.concatenate([b["labels"] for b in out]), got["labels"][:8])
    assert len(batches(load_dataset(path, batch_size=4, shuffle=False, drop_remainder=False))) == 3


def test_file_shards_split_records(tmp_path):
    path = tmp_path / "train.mindrecord"
    files = write_mindrecord(path, rows(25, labels=False), shards=3)
    assert [f.name for f in files] == ["train.mindrecord0", "train.mindrecord1", "train.mindrecord2"]
    assert dataset_files(path) == files
    per_file = [read_mindrecord(f)["input_ids"][:, 0].tolist() for f in files]  # one shard file each
    assert all(per_file)  # every shard holds rows
    ids = sorted(i for part in per_file for i in part)
    assert ids == list(range(25))  # none lost, none repeated
    assert sorted(read_mindrecord(path)["input_ids"][:, 0].tolist()) == list(range(25))


@pytest.mark.parametrize("n, k", [(24, 3), (25, 4)])
def test_reader_shards_disjoint_equal_and_seeded(tmp_path, n, k):
    path = tmp_path / "train.mindrecord"
    write_mindrecord(path, rows(n, labels=False), shards=2)
    parts = []
    for shard_id in range(k):
        ds = load_dataset(path, batch_size=1, shuffle=True, seed=5, num_shards=k, shard_id=shard_id)
        parts.append([int(b[0, 0]) for b in batches(ds)])
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // k  # same count on every rank
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) == n - n % k  # disjoint; only the n % k remainder is skipped
    again = [int(b[0, 0]) for b in batches(load_dataset(path, 1, seed=5, num_shards=k, shard_id=0))]
    other = [int(b[0, 0]) for b in batches(load_dataset(path, 1, seed=6, num_shards=k, shard_id=0))]
    assert again == parts[0] and other != parts[0]


def test_repeat_reshuffles_each_epoch(tmp_path):
    path = tmp_path / "train.mindrecord"
    write_mindrecord(path, rows(12, labels=False))
    seen = [int(b[0, 0]) for b in batches(load_dataset(path, batch_size=1, repeat=3, seed=1))]
    epochs = [seen[i * 12:(i + 1) * 12] for i in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs) and epochs[0] != epochs[1]
    assert [e.tolist() for e in shard_indices(12, None, None, False, 0, 2)] == [list(range(12))] * 2
    ordered = [int(b[0, 0]) for b in batches(load_dataset(path, batch_size=1, repeat=2, shuffle=False))]
    assert ordered == list(range(12)) * 2


def test_writer_error_leaves_nothing(tmp_path):
    path = tmp_path / "train.mindrecord"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with MindRecordWriter(path, ["input_ids"], rows_per_write=2) as w:
            for r in rows(7, labels=False):
                w.write(r)  # three batches already went to FileWriter
            raise RuntimeError("disk on fire")
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_old_shards(tmp_path):
    path = tmp_path / "train.mindrecord"
    write_mindrecord(path, rows(9, labels=False), shards=3)
    write_mindrecord(path, rows(4, labels=False))
    assert sorted(os.listdir(tmp_path)) == ["train.mindrecord", "train.mindrecord.db"]
    assert read_mindrecord(path)["input_ids"].shape == (4, L)


def test_reader_errors_name_the_file(tmp_path):
    path = tmp_path / "train.mindrecord"
    with pytest.raises(FileNotFoundError, match="train.mindrecord: no MindRecord dataset"):
        load_dataset(path, batch_size=2)
    write_mindrecord(path, rows(4, labels=False))
    with pytest.raises(ValueError, match=r"train.mindrecord: has columns \['input_ids'\], not \['labels'\]"):
        load_dataset(path, batch_size=2, columns=["input_ids", "labels"])
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        load_dataset(path, batch_size=8)
    with pytest.raises(ValueError, match="num_shards and shard_id together"):
        load_dataset(path, batch_size=1, num_shards=2)
    bad = tmp_path / "bad.mindrecord"
    bad.write_bytes(b"not a mindrecord file at all" * 100)
    with pytest.raises(FileNotFoundError, match=r"bad.mindrecord: MindRecord index bad.mindrecord.db is missing"):
        load_dataset(bad, batch_size=1)
    (tmp_path / "bad.mindrecord.db").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.mindrecord: not a readable MindRecord file"):
        load_dataset([str(path), str(bad)], batch_size=1)
    with pytest.raises(ValueError, match="no samples to write"):
        write_mindrecord(tmp_path / "empty.mindrecord", [])
