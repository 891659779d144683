"""Errors name the user's paths, never the temporary names outputs are written under
(`<stem>.partial-<pid>`, `<name>.work-<pid>-*`): a failure while writing under one is raised again
naming the final path, and one that names no file (a full disk) says which output was being written."""
from __future__ import annotations

import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from cllama.checkpoint.safetensors_file import SafetensorsWriter
from cllama.cli import main
from cllama.fileio import atomic_path
from tests.conftest import ROOT

TEMPORARY = (".partial-", ".work-", ".old-")


def test_a_writer_error_names_the_final_file_not_the_temporary_one(tmp_path):
    dst = tmp_path / "hf"
    with pytest.raises(ValueError) as caught:
        with atomic_path(dst) as tmp:
            tmp.mkdir()
            with SafetensorsWriter(tmp / "model.safetensors", [("a", "F32", (2, 3)), ("b", "F32", (4,))]) as w:
                w.begin("a")
                w.write(np.zeros((2, 3), np.float32))
    assert str(caught.value) == f"{dst / 'model.safetensors'}: closed before every tensor was written"
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_names_the_destination(tmp_path):
    """A name the filesystem takes whose temporary name (longer) it refuses: the error names the
    user's path; nothing is left."""
    out = tmp_path / ("m" * 250)
    assert main(["model", "init", "--out", str(out)]) == 1
    with pytest.raises(OSError, match=rf"File name too long: '{out}'$"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
    assert list(tmp_path.iterdir()) == []


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize("argv, written", [
    (["model", "init", "--out", "{tmp}/out"], "{tmp}/out/model.ckpt"),
    (["convert", "ms2hf", "--src", "{model}", "--dst", "{tmp}/out", "--no-progress"], "{tmp}/out"),
    (["ckpt", "transform", "--src", "{model}", "--dst", "{tmp}/out", "--mp", "2"], "{tmp}/out"),
])
def test_a_full_disk_names_what_was_being_written(argv, written, make_model_dir, tmp_path):
    """Files may not grow past 1 MiB (RLIMIT_FSIZE: every write past it fails like a full disk): exit 1,
    one line naming the output, no temporary name anywhere on stderr, nothing left."""
    model = make_model_dir(seed=5, tokenizer=False)
    fill = {"{tmp}": str(tmp_path), "{model}": str(model)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        written = written.replace(key, value)
    proc = subprocess.run([sys.executable, "-m", "cllama", *argv], preexec_fn=_limit_file_size, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(f"[Errno 27] File too large (while writing {written})"), proc.stderr
    assert not any(t in proc.stderr for t in TEMPORARY), proc.stderr
    assert list(tmp_path.iterdir()) == []
