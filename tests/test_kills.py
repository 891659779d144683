"""SIGKILL at any moment leaves under the final names only complete outputs or nothing, and a rerun
of the same command succeeds and leaves no temporaries (`*.partial-*`, `*.work-*`, `*.old-*`).

Each command runs in a subprocess killed at several moments: as soon as its temporary output (or its
final one) appears, and at fixed delays after the start. After every kill the destination is either
absent or loads and matches what a complete run writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from cllama.cli import main
from tests.conftest import ROOT

TEMPORARY = (".partial-", ".work-", ".old-")


def _appeared(watch: Path, pattern: str, pid: int, since: float) -> bool:
    """Whether an entry matching `pattern` ("{pid}" standing for the process's id) was made or changed
    since `since` (not left by an earlier run)."""
    for entry in watch.glob(pattern.replace("{pid}", str(pid))):
        try:
            if entry.stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            pass
    return False


def run_and_kill(argv: list[str], watch: Path, when, timeout: float = 120) -> subprocess.Popen:
    """`python -m cllama *argv`, SIGKILLed at `when`: "start"; a glob (as soon as an entry of `watch`
    matching it is made, "{pid}" standing for the process's id); seconds after the start; or (glob,
    seconds): that long after the glob matched. A run that finishes first is left alone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    since = time.time() - 1  # filesystem timestamps may lag the clock a little
    proc = subprocess.Popen([sys.executable, "-m", "cllama", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pattern, delay = when if isinstance(when, tuple) else (None, when) if isinstance(when, float) else (when, 0.0)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if pattern is None or pattern == "start" or _appeared(watch, pattern, proc.pid, since):
            break
        time.sleep(0.002)
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # a no-op when it has exited
    _, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return proc


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if any(t in p.name for t in TEMPORARY))


def kill_then_rerun(argv: list[str], dst: Path, moments: list[str | float], check) -> None:
    """Kill `argv` at each moment and `check(dst)` after each: a tuple with, per output, None when it is
    absent, else a comparable summary of it (check asserts it is complete). Every run passes
    --overwrite (a killed run may have finished), so a kill may also hit the swap of an old output for
    a new one. Then rerun the command in this process: it succeeds, every output is there and equals
    what any killed run completed, and no temporaries are left beside `dst`."""
    argv = [*argv, "--overwrite"]
    killed = []
    for when in moments:
        run_and_kill(argv, dst.parent, when)
        killed.append(check(dst))
    assert main(argv) == 0
    assert temporaries(dst.parent) == []
    final = check(dst)
    assert None not in final
    for parts in killed:
        assert all(got is None or got == want for got, want in zip(parts, final))


# ---- weights: convert both ways, transform ------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_hf(make_model_dir, tmp_path_factory):
    from cllama.checkpoint.convert import convert

    model = make_model_dir(seed=11, tokenizer=False)
    hf = tmp_path_factory.mktemp("hf") / "hf"
    convert("ms", model, hf, progress=False)
    return model, hf


def _conversion_check(fmt: str, src: Path):
    """A converted folder is complete when every tensor reads back equal to the source's."""
    from cllama.checkpoint.convert import verify_conversion

    def check(dst: Path):
        if not dst.exists():
            return (None,)
        table = verify_conversion(fmt, src, dst, "float32", progress=False)
        assert len(table) == 21 and table["match"].all(), table
        return (tuple(table["crc32_result"]),)
    return check


@pytest.mark.parametrize("direction", ["hf2ms", "ms2hf"])
def test_a_killed_conversion_leaves_all_or_nothing(direction, model_and_hf, tmp_path):
    model, hf = model_and_hf
    src, fmt = (hf, "hf") if direction == "hf2ms" else (model, "ms")
    dst = tmp_path / "out"
    argv = ["convert", direction, "--src", str(src), "--dst", str(dst), "--no-progress"]
    kill_then_rerun(argv, dst, ["start", "out.partial-{pid}", 0.3, "out"], _conversion_check(fmt, src))


def test_a_killed_transform_leaves_all_or_nothing(model_and_hf, tmp_path):
    """Killed while staging (work folder), while writing the shards (partial folder), at fixed delays
    and once finished: a present destination merges back to the source's tensors."""
    from cllama.distributed.transform import checksums, shard_files, transform

    model, _ = model_and_hf
    expected = checksums(model / "model.ckpt")
    merged = tmp_path / "merged"

    def check(dst: Path):
        if not dst.exists():
            return (None,)
        assert sorted(shard_files(dst)) == [0, 1] and (dst / "strategy.ckpt").is_file()
        transform(dst, merged, verify=False, overwrite=True, progress=False)
        assert checksums(merged / "model.ckpt") == expected
        return (tuple(checksums(f) for f in shard_files(dst).values()),)

    dst = tmp_path / "shards"
    argv = ["ckpt", "transform", "--src", str(model), "--dst", str(dst), "--mp", "2"]
    kill_then_rerun(argv, dst, ["shards.work-{pid}-*", "shards.partial-{pid}", ("shards.partial-{pid}", 0.3), 2.8,
                                "shards"], check)


# ---- data ---------------------------------------------------------------------------------------
def test_a_killed_data_preparation_leaves_all_or_nothing(tmp_path):
    """`data code` on 80 stdlib files with a held-out set, killed while tokenizing, when its hidden
    partial folder appears, as the held-out set lands and once done: each dataset present reads whole,
    and equals what a complete run writes."""
    from cllama.data.mindrecord import read_mindrecord

    dst = tmp_path / "data" / "code.mindrecord"
    val = dst.with_name("code.val.mindrecord")

    def check(_):
        out = []
        for path in (dst, val):
            db = Path(f"{path}.db")
            assert path.exists() == db.exists(), sorted(p.name for p in dst.parent.iterdir())
            out.append(read_mindrecord(path)["input_ids"] if path.exists() else None)
        stats = dst.with_name("code.stats.json")
        if stats.exists():  # written last: both datasets are complete and counted
            doc = json.loads(stats.read_text())
            assert [doc["samples"], doc["val"]["samples"]] == [len(out[0]), len(out[1])]
        return tuple(None if rows is None else rows.tobytes() for rows in out)

    stdlib = sysconfig.get_paths()["stdlib"]
    argv = ["data", "code", "--src", stdlib, "--dst", str(dst), "--seq-length", "128", "--max-files", "80",
            "--val-fraction", "0.1", "--workers", "1", "--quiet"]
    moments = [1.5, ".code.mindrecord.partial-{pid}", "code.val.mindrecord", "code.stats.json"]
    kill_then_rerun(argv, dst, moments, check)
    rows = np.frombuffer(check(dst)[0], np.int32)
    assert rows.size % 129 == 0 and rows.size > 0
