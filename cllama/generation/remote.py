"""Generating with workers in other processes: `RemoteEngine` starts them (msrun for more than one,
cllama.generation.distributed.serve each) and forwards each prefill/decode step to them through
small files in a queue folder, so a Generator, the HumanEval harness, the CLI and the notebooks'
widgets drive a model split over N devices exactly as they drive one in this process.

`open_generator(model_dir, tokenizer, workers)` is the one entry point: workers=1 is the in-process
Generator with its cached engine; more gives Generator(RemoteEngine(...)) (Ascend/GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from cllama.config import ModelConfig
from cllama.fileio import atomic_path, read_json
from cllama.generation.engine import bucket_shapes

STARTUP_TIMEOUT_S = 3600.0  # loading a 34B model's slices can take many minutes


class RemoteSteps:
    """One bucket's prefill/decode, answered by the workers."""

    def __init__(self, engine: RemoteEngine, key: tuple[int, int, int]) -> None:
        self.engine, self.key, self.logits = engine, key, bool(key[2])

    def prefill(self, ids, pads):
        from mindspore import Tensor

        return Tensor(self.engine.ask("prefill", self.key, ids=ids.asnumpy(), pads=pads.asnumpy()))

    def decode(self, tokens, slot, pads):
        from mindspore import Tensor

        return Tensor(self.engine.ask("decode", self.key, tokens=tokens.asnumpy(), slot=slot.asnumpy(),
                                      pads=pads.asnumpy()))


class RemoteEngine:
    """Engine interface (cllama.generation.generator.Generator) over worker processes holding the
    model of `model_dir` (a model directory or a sharded folder), split over `workers` devices.
    `close()` (or leaving a `with` block) stops them; their logs are in `log_dir`."""

    fused = None
    max_batch = None  # any batch size

    def __init__(self, model_dir: str | os.PathLike, workers: int = 1, log_dir: str | os.PathLike | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.config = ModelConfig.load(model_dir)
        self.workers = workers
        self.queue = Path(tempfile.mkdtemp(prefix="cllama-workers-"))
        self.log_dir = Path(log_dir) if log_dir else self.queue / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.seq = 0
        self.proc = self._start(Path(model_dir).resolve())
        self._wait(self.queue / "ready.json", startup_timeout_s, "loading the model")

    def _start(self, model_dir: Path) -> subprocess.Popen:
        from cllama.distributed.msrun import free_port, msrun_command, msrun_env

        worker = [sys.executable, "-m", "cllama.generation.distributed", "--model", str(model_dir),
                  "--queue", str(self.queue), "--workers", str(self.workers)]
        cmd = worker if self.workers == 1 else msrun_command(worker, self.workers, master_port=free_port(),
                                                              log_dir=str(self.log_dir))
        log = open(self.log_dir / "workers.log", "w")
        return subprocess.Popen(cmd, env=msrun_env(), stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, path: Path, timeout_s: float, what: str) -> None:
        start = time.monotonic()
        pause = 0.0005
        while not path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"generation workers stopped while {what}: {self._failure()}")
            if time.monotonic() - start > timeout_s:
                self.close()
                raise TimeoutError(f"generation workers: no answer after {timeout_s:.0f} s while {what}; "
                                   f"logs in {self.log_dir}")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _failure(self) -> str:
        failed = self.queue / "failed.json"
        if failed.exists():
            return read_json(failed)["error"]
        logs = sorted(self.log_dir.glob("*.log"))
        tail = logs[0].read_text(errors="replace").splitlines()[-10:] if logs else []
        return "\n".join(tail) or f"exit code {self.proc.returncode}; logs in {self.log_dir}"

    def ask(self, op: str, key: tuple, **arrays) -> np.ndarray:
        """Send one step to the workers and wait for rank 0's answer."""
        from cllama.generation.distributed import answer_path, request_path

        seq = self.seq
        self.seq += 1
        with atomic_path(request_path(self.queue, seq)) as tmp, open(tmp, "wb") as f:
            np.savez(f, op=np.array(op), key=np.array(key, np.int64), **arrays)
        answer = answer_path(self.queue, seq)
        self._wait(answer, STARTUP_TIMEOUT_S, f"answering a {op} step")
        out = np.load(answer)
        answer.unlink()
        request_path(self.queue, seq).unlink()  # every rank has read it: rank 0 answered after a collective
        return out

    # ---- Engine interface ------------------------------------------------------------------------
    def shapes(self, n: int, longest: int, max_new_tokens: int, max_length: int) -> tuple[int, int, int]:
        return bucket_shapes(n, longest, max_new_tokens, max_length)

    def steps_for(self, batch: int, length: int, logits: bool) -> RemoteSteps:
        return RemoteSteps(self, (batch, length, int(logits)))

    def close(self) -> None:
        """Stop the workers and remove the queue folder."""
        if self.proc.poll() is None:
            from cllama.generation.distributed import request_path

            with atomic_path(request_path(self.queue, self.seq)) as tmp, open(tmp, "wb") as f:
                np.savez(f, op=np.array("close"), key=np.zeros(3, np.int64))
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(30)
        shutil.rmtree(self.queue, ignore_errors=True)

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.close()


def open_generator(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None, workers: int = 1,
                   log_dir: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None):
    """A Generator for a model directory (with a LoRA `adapter` directory merged in memory): in this
    process on one device (workers=1), else over `workers` msrun workers holding the model split
    model_parallel=workers (Ascend/GPU)."""
    from cllama.checkpoint.model_dir import tokenizer_of
    from cllama.generation.distributed import require_devices
    from cllama.generation.generator import Generator
    from cllama.tokenizer import Tokenizer

    require_devices(workers)
    if workers == 1:
        return Generator.from_dir(model_dir, tokenizer, adapter)
    if adapter:
        raise ValueError(f"--adapter {adapter}: with workers above 1 merge it first (`cllama lora merge`), then "
                         "split the merged model with `cllama ckpt transform`")
    path: Optional[Path] = tokenizer_of(model_dir, tokenizer)
    return Generator(RemoteEngine(model_dir, workers, log_dir), Tokenizer(path) if path is not None else None)
