"""The host and MindSpore's context: where cllama runs from, memory, device detection and graph mode
(set up by entry points, never at import)."""
from __future__ import annotations

import contextlib
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


def init_context(device: str | None = None, mode: str = "graph", seed: int | None = None) -> str:
    """Set MindSpore's device and execution mode (graph by default: several times faster on CPU).
    Returns the device used."""
    quiet_mindspore_logs()
    import mindspore as ms

    device = device or detect_device()
    ms.set_device(device)
    if mode not in ("graph", "pynative"):
        raise ValueError(f"init_context: mode must be 'graph' or 'pynative' (got {mode!r})")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(seed)
    return device
