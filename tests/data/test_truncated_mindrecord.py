"""A truncated MindRecord data file (MindSpore's FileWriter output cut short) is one ValueError naming
it when a dataset is opened, not a failure deep in MindSpore's reader while iterating."""
import numpy as np
import pytest

from cllama.data.mindrecord import load_dataset, read_mindrecord, read_sample, write_mindrecord


def _rows(n: int):
    rng = np.random.default_rng(n)
    for _ in range(n):
        yield {"input_ids": rng.integers(0, 32000, 33).astype(np.int32)}


def _truncate(path, nbytes: int = 100) -> None:
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:-nbytes])


def test_a_truncated_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "train.mindrecord"
    write_mindrecord(path, _rows(50))
    assert read_mindrecord(path)["input_ids"].shape == (50, 33)
    _truncate(path)
    message = rf"^{path}: truncated MindRecord file: .* bytes in all, the file has \d+; rewrite the dataset"
    for read in (read_mindrecord, read_sample, lambda p: load_dataset(p, batch_size=2)):
        with pytest.raises(ValueError, match=message):
            read(path)


def test_a_truncated_shard_is_named(tmp_path):
    path = tmp_path / "train.mindrecord"
    files = write_mindrecord(path, _rows(30), shards=3)
    assert [f.name for f in files] == ["train.mindrecord0", "train.mindrecord1", "train.mindrecord2"]
    _truncate(files[1], 4096)
    with pytest.raises(ValueError, match=rf"^{files[1]}: truncated MindRecord file"):
        read_mindrecord(path)
