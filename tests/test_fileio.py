"""Files appear whole or not at all; JSON errors name the file and what it should be."""
import os
import subprocess
import sys

import pytest

from cllama.fileio import AtomicWriter, atomic_path, atomic_write, install, read_json, temp_path, write_json
from tests.conftest import ROOT


def test_temp_name_keeps_the_suffix_and_names_the_process(tmp_path):
    assert temp_path(tmp_path / "model.ckpt") == tmp_path / f"model.partial-{os.getpid()}.ckpt"
    assert temp_path(tmp_path / "shards") == tmp_path / f"shards.partial-{os.getpid()}"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.json"]
    write_json(path, {"new": 1})
    assert read_json(path) == {"new": 1} and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_killed_writer_leaves_nothing_under_the_final_name(tmp_path):
    code = ("import os, signal; from cllama.fileio import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'out.txt')!r}) as tmp:\n"
            "    tmp.write_text('half'); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9 and not (tmp_path / "out.txt").exists()


def test_folders_are_replaced_whole(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "stale.txt").write_text("old")
    with atomic_path(tmp_path / "dst") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path / "dst")) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["dst"]
    (tmp_path / "x").mkdir()
    install(tmp_path / "x", tmp_path / "dst")
    assert sorted(os.listdir(tmp_path)) == ["dst"] and not os.listdir(tmp_path / "dst")


class Counted(AtomicWriter):
    def __init__(self, path, n):
        super().__init__(path)
        self.left = n

    def add(self, data: bytes):
        self.file.write(data)
        self.left -= 1

    def _check_complete(self):
        if self.left:
            raise ValueError(f"{self.left} missing")


def test_streaming_writers_rename_only_when_complete(tmp_path):
    with Counted(tmp_path / "f.bin", 2) as w:
        w.add(b"a")
        w.add(b"b")
    assert (tmp_path / "f.bin").read_bytes() == b"ab"
    with pytest.raises(ValueError, match="1 missing"), Counted(tmp_path / "g.bin", 2) as w:
        w.add(b"a")
    with pytest.raises(KeyError), Counted(tmp_path / "h.bin", 1) as w:
        raise KeyError("boom")
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_json_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.json: missing; expected a run ledger; make one"):
        read_json(tmp_path / "nope.json", "run ledger", "make one")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not a valid thing \("):
        read_json(tmp_path / "bad.json", "thing")


def test_writers_remove_dead_processes_leftovers_and_json_is_strict(tmp_path):
    import json

    from cllama.fileio import dumps, remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"model.partial-{dead.pid}.ckpt").touch()
    (tmp_path / f"out.work-{dead.pid}-abc").mkdir()
    (tmp_path / f"out.partial-{dead.pid}").mkdir()
    alive = tmp_path / f"model.partial-{os.getppid()}.ckpt"  # another process, still running
    alive.touch()
    assert sorted(p.name for p in remove_stale(tmp_path / "out")) == [f"out.partial-{dead.pid}",
                                                                      f"out.work-{dead.pid}-abc"]
    write_json(tmp_path / "model.ckpt", {"loss": float("nan"), "x": [float("inf"), 1.5]})
    assert not (tmp_path / f"model.partial-{dead.pid}.ckpt").exists() and alive.exists()  # only dead writers'
    assert json.loads((tmp_path / "model.ckpt").read_text()) == {"loss": None, "x": [None, 1.5]}
    assert dumps({"a": float("-inf")}, indent=None) == '{"a": null}'
