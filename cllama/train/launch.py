"""Launching training: msrun command lines (one node or a cluster), data-parallel workers on this
machine through msrun, and the one entry point notebooks and the CLI use (`train_or_launch`)."""
from __future__ import annotations

import copy
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from cllama.distributed.msrun import free_port, msrun_command, msrun_env
from cllama.distributed.parallel import parallel_mode_name
from cllama.train.loop import MetricsCallback, TrainResult, summarize, train
from cllama.train.metrics import read_metrics
from cllama.train.runconfig import RunConfig, parse_run_config, save_run_config, set_key


def cluster_commands(nodes: int, devices_per_node: int, master_addr: str, script_args: list[str],
                     master_port: int = 8118, log_dir: str = "output/msrun_log",
                     rank_table_file: str | None = None) -> list[str]:
    """One shell line per node for a cluster of `nodes` x `devices_per_node` (run node i's line on
    node i; the master address is node 0's IP)."""
    if nodes < 1 or devices_per_node < 1:
        raise ValueError(f"cluster shape: nodes and devices_per_node must be >= 1 (got {nodes}, {devices_per_node})")
    return [shlex.join(msrun_command(script_args, nodes * devices_per_node, devices_per_node, master_addr,
                                     master_port, node_rank=i, log_dir=log_dir, rank_table_file=rank_table_file))
            for i in range(nodes)]


def worker_command(config_path: str | os.PathLike, resume: bool = False) -> list[str]:
    """What each msrun worker runs."""
    return ["python", "-m", "cllama", "train", "--config", str(config_path)] + (["--resume"] if resume else [])


def data_parallel_run(run: RunConfig, workers: int) -> RunConfig:
    """The same run as `workers` data-parallel ranks (use_parallel, parallel_mode 0, dp = workers)."""
    doc = copy.deepcopy(run.doc)
    for key, value in (("use_parallel", True), ("parallel.parallel_mode", 0),
                       ("parallel_config.data_parallel", workers), ("parallel_config.model_parallel", 1),
                       ("parallel_config.pipeline_stage", 1)):
        set_key(doc, key, value)
    return parse_run_config(doc, run.source)


def launch(run: RunConfig, workers: int, resume: Optional[bool] = None, on_metrics: Optional[MetricsCallback] = None,
           poll_s: float = 2.0, timeout_s: Optional[float] = None, nodes: int = 1, master_addr: str = "127.0.0.1",
           master_port: Optional[int] = None, rank_table: Optional[str] = None) -> TrainResult:
    """Run `workers` workers on this machine through msrun (a subprocess) and wait; `on_metrics(records)`
    sees metrics.jsonl as it grows. Worker logs: <output_dir>/msrun_log/. A data-parallel YAML runs
    data parallel over all workers; a semi-auto parallel one (Ascend) keeps its layout, which must fit
    workers x nodes devices. With nodes > 1 this is node 0 (it writes the outputs): start the other
    nodes with `cluster_commands(...)`' lines. `rank_table`: msrun --rank_table_file (Ascend)."""
    devices = workers * nodes
    if workers < 1 or devices < 2:
        raise ValueError(f"launch: workers x nodes must be >= 2 (got {workers} x {nodes}); call train() for one worker")
    semi_auto = run.use_parallel and parallel_mode_name(run.parallel.get("parallel_mode", 0)) != "data_parallel"
    if semi_auto:
        run.parallel_settings("Ascend", devices)  # the layout must fit the devices and the model
    else:
        run = data_parallel_run(run, devices)
    out = Path(run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = save_run_config(run, out / "run_config.msrun.yaml")
    resume = run.resume_training if resume is None else resume
    msrun = Path(sys.executable).with_name("msrun")
    port = master_port or (free_port() if nodes == 1 else 8118)
    cmd = msrun_command(worker_command(config, resume), devices, workers, master_addr=master_addr, master_port=port,
                        node_rank=0 if nodes > 1 else None, log_dir=str(out / "msrun_log"),
                        rank_table_file=rank_table)
    cmd[0] = str(msrun) if msrun.exists() else "msrun"
    env = msrun_env()
    log_path = out / "msrun.log"
    seen = -1
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"msrun: no result after {timeout_s:.0f} s; see {out / 'msrun_log'}")
                seen = _report(out, on_metrics, seen)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    _report(out, on_metrics, seen)
    if proc.returncode != 0:
        tail = _tail(out / "msrun_log" / "worker_0.log") or _tail(log_path)
        raise RuntimeError(f"msrun exited with code {proc.returncode}; worker logs in {out / 'msrun_log'}:\n{tail}")
    return summarize(out)


def train_or_launch(run: RunConfig, workers: int = 1, nodes: int = 1, master_addr: str = "127.0.0.1",
                    rank_table: Optional[str] = None, resume: Optional[bool] = None,
                    on_metrics: Optional[MetricsCallback] = None, metrics_every: int = 10) -> Optional[TrainResult]:
    """One device: `train` in this process. More (workers x nodes): `launch` through msrun; with
    nodes > 1 this first prints the msrun lines of the other nodes (same output_dir on a shared
    file system)."""
    if workers * nodes == 1:
        return train(run, resume=resume, on_metrics=on_metrics, metrics_every=metrics_every)
    if nodes > 1:
        config = Path(run.output_dir).resolve() / "run_config.msrun.yaml"
        resumed = run.resume_training if resume is None else resume
        lines = cluster_commands(nodes, workers, master_addr, worker_command(config, resumed),
                                 rank_table_file=rank_table)
        print("Start the other nodes with:\n" + "\n".join(lines[1:]))
    return launch(run, workers, resume=resume, on_metrics=on_metrics, nodes=nodes, master_addr=master_addr,
                  rank_table=rank_table)


def launch_plan(run: RunConfig, config_path: str | os.PathLike, devices_per_node: int = 8,
                master_addr: str = "127.0.0.1", rank_table: Optional[str] = None) -> dict:
    """What a run would do, checked without training: parameters, device count, the
    `set_auto_parallel_context` settings (validated against the model), one msrun line per node, and
    on Ascend/GPU the per-rank memory plan of its layout."""
    devices = run.parallel_config.device_num if run.use_parallel else 1
    per_node = min(devices, devices_per_node)
    plan = {"config": str(config_path), "params": run.model.num_params(), "device": run.device, "device_num": devices,
            "auto_parallel_context": run.parallel_settings(run.device, devices),
            "msrun": cluster_commands(-(-devices // per_node), per_node, master_addr, worker_command(config_path),
                                      rank_table_file=rank_table)}
    if run.lora is not None:
        from cllama.checkpoint.lora import adapter_shapes

        trainable = sum(math.prod(s) for s in adapter_shapes(run.model, run.lora).values())
        plan["peft"] = {**run.lora.to_pet_config(), "trainable_params": trainable,
                        "trainable_fraction": round(trainable / run.model.num_params(), 6)}
    if run.device != "CPU":  # per-rank memory of the layout (cllama.distributed.planner)
        from cllama.distributed.planner import GB, plan_run, plan_table

        memory = plan_run(run, devices)
        plan["memory_plan_gb"] = {**plan_table(memory)[0], "usable": round(memory["usable_bytes"] / GB, 2)}
    return plan


def _report(out: Path, on_metrics: Optional[MetricsCallback], seen: int) -> int:
    if on_metrics is None:
        return seen
    records = read_metrics(out / "metrics.jsonl")
    if len(records) != seen and records:
        on_metrics(records)
    return len(records)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    text = [line for line in path.read_text(errors="replace").splitlines()
            if "[INFO]" not in line and "[WARNING]" not in line]
    return "\n".join(text[-lines:])
