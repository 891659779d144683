"""The host and MindSpore's context: where cllama runs from, memory, device detection and graph mode
(set up by entry points, never at import)."""
from __future__ import annotations

import contextlib
import ctypes.util
import io
import os
from pathlib import Path

# The checkout cllama runs from (configs/, notebooks/ beside the package); relative config and
# notebook paths are also tried from here.
REPO_ROOT = Path(__file__).resolve().parents[1]


def memory_gib() -> dict[str, float]:
    """Total and available memory (GiB) from /proc/meminfo."""
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(value.split()[0]) / 2**20
    except OSError:
        pass
    return {"total": round(info.get("MemTotal", 0.0), 2), "available": round(info.get("MemAvailable", 0.0), 2)}


def quiet_mindspore_logs() -> None:
    """MindSpore logs warnings to stderr through glog; keep only errors (before importing it)."""
    os.environ.setdefault("GLOG_v", "3")


def detect_device() -> str:
    """'Ascend' when an NPU is usable, else 'CPU'."""
    import mindspore as ms

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            if ms.hal.is_available("Ascend") and ms.hal.device_count("Ascend") > 0:
                return "Ascend"
        except (RuntimeError, ValueError):
            pass
    return "CPU"


DEVICES = ("CPU", "Ascend", "GPU")  # MindSpore's device targets


def device_problem(device: str) -> str | None:
    """Why MindSpore cannot use `device` on this host (None when it can): its plugin for the device did
    not load (no CANN / CUDA libraries), or no device is visible. Cheap: no device is initialised."""
    import mindspore as ms

    if device == "CPU":
        return None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            if ms.hal.is_available(device):
                return None if ms.hal.device_count(device) > 0 else f"no {device} device is visible"
        except (RuntimeError, ValueError) as err:
            return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:120]}"
    if device == "Ascend":
        home = os.environ.get("ASCEND_HOME_PATH")
        if not Path(home or "/usr/local/Ascend").exists():
            where = f"ASCEND_HOME_PATH={home} does not exist" if home else "no /usr/local/Ascend, no ASCEND_HOME_PATH"
            return f"MindSpore's Ascend plugin did not load: no CANN found, {where}"
        reason = "MindSpore's Ascend plugin did not load: source CANN's set_env.sh from its ascend-toolkit folder"
    elif ctypes.util.find_library("cudart"):
        reason = "MindSpore's GPU plugin did not load: check the CUDA and cuDNN versions this MindSpore needs"
    else:
        reason = "MindSpore's GPU plugin did not load: no CUDA runtime (libcudart) found"
    return reason


def check_device(device: str) -> str:
    """MindSpore's spelling of `device` (case-insensitive: cpu, ascend, gpu) when this host can use it;
    else a ValueError saying why and what to pass instead."""
    name = {d.lower(): d for d in DEVICES}.get(str(device).lower())
    if name is None:
        raise ValueError(f"--device {device}: unknown device; choose one of {', '.join(DEVICES)}, or leave "
                         "--device out to detect")
    problem = device_problem(name)
    if problem:
        raise ValueError(f"--device {name}: not available on this host ({problem}); use --device CPU or "
                         "leave --device out to detect")
    return name


def init_context(device: str | None = None, mode: str = "graph", seed: int | None = None) -> str:
    """Set MindSpore's device and execution mode (graph by default: several times faster on CPU).
    A device this host cannot use is a ValueError (check_device). Returns the device used."""
    quiet_mindspore_logs()
    import mindspore as ms

    if mode not in ("graph", "pynative"):
        raise ValueError(f"init_context: mode must be 'graph' or 'pynative' (got {mode!r})")
    device = check_device(device) if device else detect_device()
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(seed)
    return device
