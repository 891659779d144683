import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from mindspore.train import serialization

from cllama.checkpoint import ckpt_file as ckpt_io
from cllama.checkpoint.ckpt_file import CkptFile, CkptWriter
from cllama.checkpoint.safetensors_file import (
    SafetensorsFile,
    SafetensorsWriter,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
)


@pytest.fixture
def arrays(rng):
    return {"model.a": rng.normal(0, 1, (7, 300)).astype(np.float32),
            "model.b": rng.normal(0, 1, (300,)).astype(np.float32),
            "model.c": rng.normal(0, 1, (3, 5, 40)).astype(np.float32)}


def _write_both(tmp_path, arrays):
    dtypes = {"model.a": "bfloat16", "model.b": "float32", "model.c": "float16"}
    ms_types = {"bfloat16": ms.bfloat16, "float32": ms.float32, "float16": ms.float16}
    ms.save_checkpoint([{"name": n, "data": Tensor(a, ms_types[dtypes[n]])} for n, a in arrays.items()],
                       str(tmp_path / "theirs.ckpt"))
    storage = {"bfloat16": float32_to_bf16_bits, "float32": lambda a: a, "float16": lambda a: a.astype(np.float16)}
    with CkptWriter(tmp_path / "ours.ckpt") as w:
        for name, a in arrays.items():
            data = storage[dtypes[name]](a)
            w.begin(name, a.shape, dtypes[name])
            for piece in np.array_split(data.reshape(-1), 5):  # any chunking gives the same file
                w.write(piece)
    return (tmp_path / "theirs.ckpt").read_bytes(), (tmp_path / "ours.ckpt").read_bytes()


def test_writer_matches_save_checkpoint_bytes(tmp_path, arrays):
    theirs, ours = _write_both(tmp_path, arrays)
    assert ours == theirs
    assert not list(tmp_path.glob("*.partial"))


def test_writer_splits_big_tensors_like_save_checkpoint(tmp_path, arrays, monkeypatch):
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KiB: every tensor spans several values
    monkeypatch.setattr(ckpt_io, "SLICE_BYTES", 1024)
    theirs, ours = _write_both(tmp_path, arrays)
    assert ours == theirs
    f = CkptFile(tmp_path / "ours.ckpt")
    assert len(f.entries["model.b"]["slices"]) == 2  # 1200 bytes
    assert np.array_equal(f.get("model.b"), arrays["model.b"])
    assert np.array_equal(bf16_bits_to_float32(f.get("model.a")),
                          ms.load_checkpoint(str(tmp_path / "ours.ckpt"))["model.a"].astype(ms.float32).asnumpy())


def test_reader_reads_save_checkpoint_files_lazily(tmp_path, arrays):
    path = tmp_path / "m.ckpt"
    ms.save_checkpoint([{"name": n, "data": Tensor(a)} for n, a in arrays.items()], str(path), crc_check=True)
    f = CkptFile(path)  # the crc footer is recognised
    assert f.keys() == list(arrays)
    assert f.shape("model.c") == (3, 5, 40) and f.dtype("model.c") == "float32"
    pieces = [p.copy() for p in f.chunks("model.a", 1000)]
    assert [p.size for p in pieces] == [250] * 8 + [100]
    assert np.array_equal(np.concatenate(pieces), arrays["model.a"].reshape(-1))


def test_truncated_checkpoint_names_the_file(tmp_path, arrays):
    path = tmp_path / "model.ckpt"
    ms.save_checkpoint([{"name": n, "data": Tensor(a)} for n, a in arrays.items()], str(path))
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.ckpt: truncated"):
        CkptFile(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.ckpt: .*not a complete unencrypted MindSpore checkpoint"):
        CkptFile(path)


def test_writer_failure_leaves_no_file(tmp_path, arrays):
    with pytest.raises(RuntimeError):
        with CkptWriter(tmp_path / "model.ckpt") as w:
            w.add("model.a", arrays["model.a"], "float32")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="missing"):
        with CkptWriter(tmp_path / "model.ckpt") as w:
            w.begin("model.a", (7, 300), "float32")
            w.write(arrays["model.a"][:3])
    assert list(tmp_path.iterdir()) == []


def test_safetensors_writer_round_trip(tmp_path, arrays):
    from safetensors.numpy import load_file

    specs = [("a", "BF16", (7, 300)), ("b", "F32", (300,)), ("c", "F16", (3, 5, 40))]
    data = {"a": float32_to_bf16_bits(arrays["model.a"]), "b": arrays["model.b"],
            "c": arrays["model.c"].astype(np.float16)}
    with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        for name, _, _ in specs:
            w.begin(name)
            for piece in np.array_split(data[name].reshape(-1), 3):
                w.write(piece)
    loaded = load_file(str(tmp_path / "x.safetensors"))  # the reference reader (no bfloat16 in numpy)
    assert np.array_equal(loaded["b"], data["b"]) and np.array_equal(loaded["c"], data["c"])
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt"} and st.data_start % 8 == 0
    assert np.array_equal(np.concatenate([p.copy() for p in st.chunks("a", 512)]), data["a"].reshape(-1))
