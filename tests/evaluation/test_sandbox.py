"""The sandbox contains hostile programs while the harness finishes the rest, unharmed."""
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from cllama.evaluation.sandbox import CLEAN_ENV, Limits, Sandbox, SandboxWarning, describe, is_full

GOOD = "assert sum(range(10)) == 45"


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is pid (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, limits=Limits(timeout=2.0)) as sandbox:
        if not is_full(sandbox.isolation):
            pytest.skip(f"full isolation unavailable here: {describe(sandbox.isolation)}")
        yield sandbox


@pytest.fixture
def canaries(tmp_path):
    """A canary in the test's tmp dir and one in /dev/shm (which the sandbox sees, read-only)."""
    paths = [tmp_path / "canary.txt"]
    if Path("/dev/shm").is_dir():
        paths.append(Path(f"/dev/shm/cllama-canary-{os.getpid()}"))
    for p in paths:
        p.write_text("alive")
    yield paths
    for p in paths[1:]:
        p.unlink(missing_ok=True)


def test_isolation_is_reported(box):
    assert box.isolation["user_ns"] and box.isolation["readonly_root"] and box.isolation["seccomp"]
    assert describe(box.isolation) == "namespaces(user,mount,pid,net) + read-only root + seccomp + rlimits"


def test_hostile_programs_fail_and_harm_nothing(box, canaries, monkeypatch):
    monkeypatch.setenv("CLLAMA_TEST_SECRET", "hunter2")  # set before the programs run
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port, me = listener.getsockname()[1], os.getpid()
    hostile = {
        "loop": "while True:\n    pass",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
        "alloc_50gb": "x = bytearray(50 * 2**30)",
        "write_10gb": "f = open('big.bin', 'wb')\nfor _ in range(10 * 1024):\n    f.write(b'x' * 2**20)",
        "fill_tmp": "import os\nfor i in range(1000):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 2**20)",
        "env_secret": "import os\nassert os.environ['CLLAMA_TEST_SECRET'] != 'hunter2'",
        "proc_secret": f"assert b'hunter2' not in open('/proc/{me}/environ', 'rb').read()",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "unix_socket": "import socket\nsocket.socket(socket.AF_UNIX).connect('/run/x.sock')",
        "kill_parent": "import os\nos.kill(os.getppid(), 9)",
        "kill_all": "import os\nos.kill(-1, 9)",
        "kill_harness": f"import os\nos.kill({me}, 9)",
        "kill_group": "import os, signal\nos.killpg(os.getpgid(0) + 1, 9)",
        "remount_rw": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0, ctypes.get_errno()",
    }
    for i, path in enumerate(canaries):
        hostile[f"delete_canary_{i}"] = f"import os\nos.remove({str(path)!r})"
    names = list(hostile)
    programs = [p for name in names for p in (hostile[name], GOOD)]  # a good program after each
    results = box.run(programs, progress=False)
    bad, good = results[0::2], results[1::2]
    outcome = {name: r.result for name, r in zip(names, bad)}
    for name, r in outcome.items():
        assert r == "timed out" or r.startswith("failed:"), (name, r)
    assert outcome["loop"] == "timed out"
    assert "File too large" in outcome["write_10gb"], outcome["write_10gb"]  # the file-size limit, not the clock
    for name in ("env_secret", "proc_secret"):  # failed for want of access, not because the secret was there
        assert "AssertionError" not in outcome[name], (name, outcome[name])
    assert all(r.passed for r in good)
    assert all(p.read_text() == "alive" for p in canaries)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()
    assert box.run([GOOD], progress=False)[0].passed  # the pool survived


def test_output_is_captured_truncated_and_env_is_clean(box):
    prog = ("import os, sys\nprint('x' * 100000)\nprint('oops', file=sys.stderr)\n"
            "print(sorted(os.environ), file=sys.stderr)\nprint(os.getcwd(), os.listdir('.'), file=sys.stderr)")
    r = box.run([prog], progress=False)[0]
    assert r.passed and len(r.stdout) == box.limits.output_bytes and set(r.stdout) == {"x"}
    lines = r.stderr.splitlines()
    assert lines[0] == "oops"
    assert set(eval(lines[1])) <= set(CLEAN_ENV) | {"LC_CTYPE"}  # Python may add LC_CTYPE
    assert lines[2] == "/tmp []"  # a fresh, empty working directory


def test_workdir_is_fresh_per_program(box):
    write = "open('left.txt', 'w').write('x')\nimport os\nassert os.listdir('/tmp') == ['left.txt']"
    assert [r.result for r in box.run([write, write, write], progress=False)] == ["passed"] * 3


def test_namespaces_alone_clean_up_a_fork_bomb(canaries):
    """Without seccomp the pid namespace still ends a fork bomb, capabilities are gone (no
    re-mount), the file system is read-only and there is no network."""
    with pytest.warns(SandboxWarning, match="Missing: seccomp"):
        box = Sandbox(workers=1, limits=Limits(timeout=1.0, seccomp=False)).start()
    with box:
        if not box.isolation["pid_ns"]:
            pytest.skip("no namespaces here")
        assert not box.isolation["seccomp"]
        programs = ["import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                    "import ctypes\nassert ctypes.CDLL(None).mount(None, b'/', None, 32 | 4096, None) == 0",
                    f"import os\nos.remove({str(canaries[-1])!r})",
                    "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
                    GOOD]
        results = [r.result for r in box.run(programs, progress=False)]
        assert results[0] == "timed out" and results[4] == "passed", results
        assert all(r.startswith("failed:") for r in results[1:4]), results
        assert all(p.read_text() == "alive" for p in canaries)
        workers = [w.proc.pid for w in box.workers]
        # only the worker's own namespace init is left under it: the bomb's processes are gone
        assert all(len(children_of(w)) == 1 and children_of(children_of(w)[0]) == [] for w in workers)
    assert not set(workers) & set(children_of(os.getpid()))  # closed: the workers are gone


def test_a_dead_worker_is_replaced(box):
    programs = ["import time\ntime.sleep(30)"] + [GOOD] * 4
    victim = box.workers[0]
    timer = threading.Timer(0.5, lambda: os.killpg(victim.proc.pid, signal.SIGKILL))
    timer.start()
    try:
        results = box.run(programs, timeout=20.0, progress=False)
    finally:
        timer.cancel()
    assert results[0].result == "failed: sandbox worker died"
    assert all(r.passed for r in results[1:])
    assert victim not in box.workers and len(box.workers) == 2


def test_without_namespaces_warns_loudly_and_still_limits():
    with pytest.warns(SandboxWarning, match="NOT fully isolated"):
        box = Sandbox(workers=1, limits=Limits(timeout=1.0), isolation="none").start()
    try:
        assert describe(box.isolation) == "seccomp + rlimits"
        results = box.run(["while True:\n    pass", "import os\nos.fork()", "x = bytearray(50 * 2**30)", GOOD],
                          progress=False)
        assert [r.result for r in results] == ["timed out", "failed: [Errno 1] Operation not permitted",
                                               "failed: ", "passed"]
    finally:
        box.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(limits=Limits(timeout=0))
