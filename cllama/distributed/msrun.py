"""msrun, MindSpore's launcher: command lines and the environment its workers need (shared by
training and distributed generation)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from cllama.runtime import REPO_ROOT


def msrun_command(script_args: list[str], worker_num: int, local_worker_num: int | None = None,
                  master_addr: str = "127.0.0.1", master_port: int = 8118, node_rank: int | None = None,
                  log_dir: str = "msrun_log", join: bool = True, cluster_time_out: int = 600,
                  rank_table_file: str | None = None) -> list[str]:
    """An msrun command line (argv list). `script_args` is the worker command, e.g.
    ["python", "-m", "cllama", "train", "--config", "run.yaml"]. `rank_table_file`: an HCCL rank
    table (Ascend) for msrun's static networking."""
    local = worker_num if local_worker_num is None else local_worker_num
    if worker_num < 1 or not 1 <= local <= worker_num or worker_num % local:
        raise ValueError(f"msrun: worker_num={worker_num} must be a positive multiple of "
                         f"local_worker_num={local}")
    cmd = ["msrun", f"--worker_num={worker_num}", f"--local_worker_num={local}",
           f"--master_addr={master_addr}", f"--master_port={master_port}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    cmd += [f"--log_dir={log_dir}", f"--join={join}", f"--cluster_time_out={cluster_time_out}"]
    if rank_table_file:
        cmd.append(f"--rank_table_file={rank_table_file}")
    return cmd + list(script_args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_env() -> dict:
    """The environment for msrun and its workers: this interpreter's folder first on PATH (msrun
    itself), the repository importable, MindSpore's logs at warnings and above unless set."""
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env
