"""The sandbox contains hostile programs while the harness finishes the rest, unharmed."""
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from cllama.evaluation.sandbox import CLEAN_ENV, Limits, Sandbox, SandboxWarning, describe, is_full

GOOD = "assert sum(range(10)) == 45"
REPO = Path(__file__).resolve().parents[2]
FAKE_NONCE = f"{random.getrandbits(128):032x}"
# What a program might write to claim a pass: the old fd-3 report, bare words, a frame in the
# worker's format with a guessed nonce, a worker reply line.
FAKE_REPORTS = (b"Rpassed", b"passed\n", f"{FAKE_NONCE}passed{FAKE_NONCE}".encode(),
                b'{"id": 0, "result": "passed", "stdout": "", "stderr": "", "seconds": 0}\n')
# A def body that writes every fake report on every descriptor 0-20 (errors ignored).
FORGE = (f"    import os\n    for fd in range(21):\n        for report in {FAKE_REPORTS!r}:\n"
         "            try:\n                os.write(fd, report)\n            except OSError:\n                pass\n")


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
    """A canary in the test's tmp dir and one in /dev/shm (neither is visible in the sandbox)."""
    paths = [tmp_path / "canary.txt"]
    if Path("/dev/shm").is_dir():
        paths.append(Path(f"/dev/shm/cllama-canary-{os.getpid()}"))
    for p in paths:
        p.write_text("alive")
    yield paths
    for p in paths[1:]:
        p.unlink(missing_ok=True)


def test_isolation_is_reported(box):
    iso = box.isolation
    assert iso["user_ns"] and iso["readonly_root"] and iso["minimal_root"] and iso["seccomp"], iso
    assert iso["proc"] == "private"
    assert describe(iso) == "namespaces(user,mount,pid,net) + minimal read-only root + seccomp + rlimits"
    visible = iso["root_paths"]
    assert visible and "/" not in visible and {"/dev/null", "/dev/urandom"} <= set(visible)
    for private in (str(Path.home()), str(REPO), "/etc", "/tmp", "/run", "/var"):
        assert not [p for p in visible if private == p or private.startswith(p + "/")], (private, visible)


@pytest.fixture
def secrets_outside(tmp_path):
    """Secret files in fresh directories in the user's home, in the project and in the test's tmp
    dir (removed afterwards)."""
    token = f"cllama-secret-{random.getrandbits(64):016x}"
    dirs = [Path(tempfile.mkdtemp(prefix=".cllama_sandbox_secret_", dir=d)) for d in (Path.home(), REPO)]
    files = [d / "secret.txt" for d in dirs] + [tmp_path / "secret.txt"]
    for f in files:
        f.write_text(token)
    yield token, files
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_host_files_are_not_visible(box, secrets_outside):
    token, files = secrets_outside
    paths = [str(f) for f in files] + [str(f.parent) for f in files] + [
        "/etc/passwd", "/etc/hostname", "/etc/shadow", str(REPO / "README.md"), str(REPO / "cllama"),
        str(Path(__file__).resolve())]
    probe = (f"import os\npaths = {paths!r}\nseen = [p for p in paths if os.path.exists(p)]\nread = []\n"
             "for p in paths:\n    try:\n        read.append(open(p).read())\n    except OSError:\n        pass\n"
             f"home = os.listdir({str(Path.home())!r}) if os.path.isdir({str(Path.home())!r}) else []\n"
             "print(seen, read, [h for h in home if h.startswith('.cllama_sandbox_secret_')])\n"
             "assert not seen and not read and not [h for h in home if h.startswith('.cllama_sandbox_secret_')]")
    r = box.run([probe], progress=False)[0]
    assert r.passed, (r.result, r.stdout)
    assert token not in r.stdout + r.stderr


def test_python_runs_in_the_minimal_root(box):
    """HumanEval's standard-library imports (and lazily loaded extension modules) work, /dev works."""
    prog = ("import math, re, string, collections, itertools, hashlib, heapq, functools, bisect, random, typing\n"
            "import fractions, statistics, decimal, datetime, json, copy, operator, zlib, bz2, lzma, sqlite3\n"
            "assert hashlib.md5(b'x').hexdigest() == '9dd4e461268c8034f5c8564e155c67a6'\n"
            "assert lzma.decompress(lzma.compress(b'x')) == b'x' and math.gcd(12, 18) == 6\n"
            "open('/dev/null', 'w').write('x')\nassert len(open('/dev/urandom', 'rb').read(8)) == 8\n"
            "assert open('/dev/zero', 'rb').read(2) == bytes(2) and len(os.urandom(4)) == 4\n"
            "assert not {'etc', 'home', 'run', 'var', 'mnt'} & set(os.listdir('/')), os.listdir('/')")
    r = box.run(["import os\n" + prog], progress=False)[0]
    assert r.passed, r.result


def test_no_descriptor_can_claim_a_pass(box):
    """A fake report on any descriptor 0-20, then a status-0 exit before the tests: failed."""
    programs = [f"import os\ntry:\n    os.write({fd}, {report!r})\nexcept OSError:\n    pass\n{leave}\n"
                "assert False, 'the tests ran'"
                for fd in range(21) for report in FAKE_REPORTS
                for leave in ("os._exit(0)", "os.close(1)\nos._exit(0)", "pass")]
    results = box.run(programs, progress=False)
    failed = [r.result for r in results if not r.result.startswith("failed:")]
    assert not failed, failed
    assert all(r.result == "failed: the tests ran" for r in results[2::3])


EARLY_EXITS = {
    "os._exit": "os._exit(0)",
    "sys.exit": "sys.exit(0)",
    "sys.exit()": "sys.exit()",
    "raise SystemExit": "raise SystemExit",
    "exit()": "exit()",
    "quit()": "quit()",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "SIGKILL itself": "os.kill(os.getpid(), 9)",
    "SIGTERM itself": "os.kill(os.getpid(), 15)",
    "abort": "os.abort()",
    "close stdout": "os.close(1)\nos.close(2)\nos._exit(0)",
    "close all": "os.closerange(0, 100)\nos._exit(0)",
    "stdout to /dev/null": "os.dup2(os.open('/dev/null', os.O_WRONLY), 1)",  # the wrapper's frame is lost
    "exception __str__": "class E(Exception):\n    def __str__(self):\n        forge()\n        os._exit(0)\nraise E()",
    "exception __str__ says passed": "class E(Exception):\n    def __str__(self):\n        return 'passed'\nraise E()",
    "flush at exit": "class Out:\n    def write(self, s):\n        return len(s)\n    def flush(self):\n"
                     "        forge()\n        os._exit(0)\nsys.stdout = Out()\nraise AssertionError",
    "thread": "import threading, time\nthreading.Thread(target=lambda: (forge(), os._exit(0))).start()\ntime.sleep(5)",
    "signal handler": "import signal, time\nsignal.signal(signal.SIGALRM, lambda *a: (forge(), os._exit(0)))\n"
                      "signal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(5)",
    "atexit": "import atexit\natexit.register(lambda: (forge(), os._exit(0)))\nraise AssertionError",
}


def test_early_exits_and_forged_reports_fail(box):
    """Each program forges a report on every descriptor, then leaves before its failing tests."""
    names = list(EARLY_EXITS)
    programs = [f"import os, sys\ndef forge():\n{FORGE}forge()\n{EARLY_EXITS[n]}\nassert False, 'the tests ran'"
                for n in names]
    results = box.run(programs + [GOOD], progress=False)
    outcome = {n: r.result for n, r in zip(names, results)}
    assert all(r.startswith("failed:") for r in outcome.values()), outcome
    assert outcome["SIGKILL itself"] == "failed: killed by SIGKILL"
    assert outcome["exception __str__ says passed"] == "failed: passed"
    assert results[-1].passed


def test_printed_frames_do_not_count(box):
    """Text shaped like the worker's frame (with a guessed nonce) is the program's output, nothing more."""
    fake = f"{FAKE_NONCE}passed{FAKE_NONCE}"
    keep = box.limits.output_bytes
    programs = [f"import os\nprint({fake!r}, end='')\nos._exit(0)",
                f"import sys\nsys.stdout.write({fake!r})\nsys.stdout.flush()\nassert False",
                f"print({fake!r}, end='')\nraise SystemExit(0)",
                "import os\nprint('passed')\nos._exit(0)",
                f"print({fake!r}, end='')",  # really passes; its output is exactly what it printed
                "print('hello')",
                f"print('x' * {keep - 10}, end='')",  # the frame starts inside the kept output
                f"print('x' * {keep - 10}, end='')\nassert False, 'no'"]
    results = box.run(programs, progress=False)
    assert all(r.result.startswith("failed:") for r in results[:4]), [r.result for r in results]
    assert results[4].passed and results[4].stdout == fake
    assert results[5].passed and results[5].stdout == "hello\n"
    assert results[6].passed and results[6].stdout == "x" * (keep - 10)
    assert results[7].result == "failed: no" and results[7].stdout == "x" * (keep - 10)


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


# Run in a subprocess: a seccomp filter makes one syscall (argv[1]) fail, then both modes start.
UNAVAILABLE = """import ctypes, json, struct, sys, warnings
from cllama.evaluation import sandbox_worker as w
from cllama.evaluation.sandbox import Sandbox, SandboxWarning, describe

prog = b"".join([w._bpf(w.LD_W_ABS, 0), w._bpf(w.JEQ, int(sys.argv[1]), 0, 1), w._bpf(w.RET, w.RET_ERRNO | 1),
                 w._bpf(w.RET, w.RET_ALLOW)])  # this syscall fails with EPERM, in this process and its children
buf = ctypes.create_string_buffer(prog, len(prog))
fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(buf)), 16)
assert w.libc.prctl(w.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 and w.libc.prctl(w.PR_SET_SECCOMP, 2, fprog, 0, 0) == 0
out = {}
try:
    Sandbox(workers=1, isolation="namespaces").start()
except ValueError as err:
    out["refused"] = str(err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    box = Sandbox(workers=1).start()
out["warnings"] = [str(c.message) for c in caught if issubclass(c.category, SandboxWarning)]
out["describe"] = describe(box.isolation)
out["results"] = [r.result for r in box.run(["assert 1", "import os\\nos._exit(0)"], progress=False)]
box.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("syscall", ["unshare", "pivot_root"])
def test_missing_isolation_is_loud_and_namespaces_mode_refuses(syscall):
    """Where the kernel refuses namespaces (unshare) or the minimal root (pivot_root) -- simulated
    by a seccomp filter on this test's subprocess -- 'auto' warns loudly, 'namespaces' refuses."""
    numbers = {"x86_64": {"unshare": 272, "pivot_root": 155}, "aarch64": {"unshare": 97, "pivot_root": 41}}
    if platform.machine() not in numbers:
        pytest.skip("syscall numbers known for x86_64 and aarch64 only")
    proc = subprocess.run([sys.executable, "-c", UNAVAILABLE, str(numbers[platform.machine()][syscall])],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "isolation='namespaces' is unavailable" in out["refused"], out
    assert len(out["warnings"]) == 1 and "NOT fully isolated" in out["warnings"][0], out
    assert out["results"] == ["passed", "failed: exited with status 0 before finishing its tests"], out
    if syscall == "unshare":
        assert out["describe"] == "seccomp + rlimits" and "WRITE your files" in out["warnings"][0], out
    else:
        assert out["describe"] == "namespaces(user,mount,pid,net) + read-only root + seccomp + rlimits", out
        assert "Missing: minimal_root ([Errno 1] pivot_root" in out["warnings"][0], out
        assert "READ every file" in out["warnings"][0] and "pivot_root" in out["refused"], out


def test_bad_arguments():
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(limits=Limits(timeout=0))
