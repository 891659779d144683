"""Generation for models that do not fit one device: the model's weights split over N devices
(model_parallel N, semi-auto parallel: Ascend or GPU), run by N msrun workers.

The workers run `FullForwardEngine`: each step is the sharded model's own full causal forward over
the rows so far (right-aligned, so every row keeps positions 0..n-1), reading the logits at each
row's last token. It carries no KV cache, so a step costs a forward over the whole prefix; the
single-device engine (cllama.generation.engine) stays the fast path. Weights come from a model
directory or a sharded folder (rank_K/ + strategy.ckpt, e.g. a training step), loaded into each
rank's slices by `mindspore.load_distributed_checkpoint` against the layout
`Model.infer_predict_layout` reports.

`serve(model_dir, queue, workers)` is a worker: it loads the model and then answers the prefill/decode
requests cllama.generation.remote.RemoteEngine writes into `queue`, in order; every rank runs every
step (the graph's collectives need all of them) and rank 0 writes the answers.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from cllama.checkpoint.files import file_format, is_model_dir, weights_file
from cllama.config import ModelConfig
from cllama.fileio import atomic_path, write_json
from cllama.generation.engine import bucket_shapes
from cllama.model import CodeLlama


class LastLogits(nn.Cell):
    """Full causal forward of (B, L) ids; float32 logits (B, V) at each row's index `last` (B,), or
    their argmax (B,) int32 when `greedy`."""

    def __init__(self, model: CodeLlama, greedy: bool) -> None:
        super().__init__(auto_prefix=False)  # parameter names stay the model's (checkpoint names)
        self.model, self.greedy = model, greedy
        self.pick = ops.BatchMatMul()

    def construct(self, input_ids: Tensor, last: Tensor) -> Tensor:
        b, t = input_ids.shape
        x = self.model._hidden(input_ids, self.model._mask(b, t))
        rows = ops.one_hot(last, t, Tensor(1.0, x.dtype), Tensor(0.0, x.dtype)).reshape(b, 1, t)
        logits = self.model._logits(self.pick(rows, x).reshape(b, -1))
        if self.greedy:
            return ops.argmax(logits, -1).astype(ms.int32)
        return logits


class FullForwardSteps:
    """One (batch, length) bucket: `prefill(ids, pads)` takes the Generator's left-padded prompts,
    `decode(tokens, slot, pads)` appends one token per row; both return the next ids (or logits)."""

    def __init__(self, cell: LastLogits, batch: int, length: int, pad_id: int, logits: bool) -> None:
        self.cell, self.logits, self.pad_id = cell, logits, pad_id
        self.rows = np.full((batch, length), pad_id, np.int32)
        self.lengths = np.zeros(batch, np.int32)

    def prefill(self, ids: Tensor, pads: Tensor) -> Tensor:
        ids, pads = ids.asnumpy(), pads.asnumpy()
        self.rows[:] = self.pad_id
        for i, (row, pad) in enumerate(zip(ids, pads)):
            self.rows[i, :row.size - pad] = row[pad:]
            self.lengths[i] = row.size - pad
        return self._forward()

    def decode(self, tokens: Tensor, slot: Tensor, pads: Tensor) -> Tensor:
        tokens = tokens.asnumpy().reshape(-1)
        self.rows[np.arange(tokens.size), self.lengths] = tokens
        self.lengths += 1
        return self._forward()

    def _forward(self) -> Tensor:
        return self.cell(Tensor(self.rows), Tensor(self.lengths - 1))


class FullForwardEngine:
    """Engine interface of cllama.generation.generator.Generator over full forwards of `model`
    (sharded or not): one compiled graph per (batch, length, greedy or logits)."""

    fused = None
    max_batch = None  # any batch size

    def __init__(self, model: CodeLlama) -> None:
        self.model, self.config = model, model.config
        model.set_train(False)
        self._cells: dict[tuple, LastLogits] = {}

    def shapes(self, n: int, longest: int, max_new_tokens: int, max_length: int) -> tuple[int, int, int]:
        return bucket_shapes(n, longest, max_new_tokens, max_length)

    def steps_for(self, batch: int, length: int, logits: bool) -> FullForwardSteps:
        key = (batch, length, logits)
        if key not in self._cells:
            self._cells[key] = LastLogits(self.model, greedy=not logits)
        return FullForwardSteps(self._cells[key], batch, length, self.config.pad_token_id, logits)


# ---- model parallel ------------------------------------------------------------------------------
def require_devices(workers: int) -> None:
    """Model-parallel inference needs semi-auto parallel, which MindSpore runs on Ascend and GPU only."""
    from cllama.runtime import detect_device

    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    if workers > 1 and detect_device() == "CPU":
        raise ValueError(f"--workers {workers}: model-parallel inference runs under semi-auto parallel, which "
                         "MindSpore runs only on Ascend or GPU (this machine: CPU); use --workers 1")


def checkpoint_files(path: str | os.PathLike, work: Path) -> tuple[list[str], str, str]:
    """(weights files in rank order, the strategy file of their layout, format) for a model directory
    (one file; its one-device layout is written into `work`) or a sharded folder."""
    from cllama.distributed.strategy import make_parallel, param_layouts, write_strategy
    from cllama.distributed.transform import STRATEGY_FILE, shard_files

    path = Path(path)
    if is_model_dir(path):
        weights = weights_file(path)
        strategy = write_strategy(param_layouts(ModelConfig.load(path), make_parallel()), work / "one_device.ckpt")
        return [str(weights)], str(strategy), file_format(weights)
    files = shard_files(path)
    if not files or not (path / STRATEGY_FILE).is_file():
        raise FileNotFoundError(f"{path}: neither a model directory nor a sharded folder (rank_K/ + {STRATEGY_FILE})")
    ordered = [str(files[r]) for r in sorted(files)]
    return ordered, str(path / STRATEGY_FILE), file_format(ordered[0])


def load_model_parallel(path: str | os.PathLike, workers: int) -> CodeLlama:
    """The model of `path` with its weights split over `workers` devices (model_parallel = workers):
    built without materialising weights, sharded, and each rank's slices loaded. Call in a worker
    after `start_model_parallel`."""
    from mindspore.nn.utils import no_init_parameters

    from cllama.distributed.strategy import make_parallel

    config = ModelConfig.load(path)
    with no_init_parameters():
        model = CodeLlama(config)
    model.shard(make_parallel(model_parallel=workers))
    model.set_train(False)
    cell = LastLogits(model, greedy=False)
    example = (Tensor(np.zeros((1, config.seq_length), np.int32)), Tensor(np.zeros(1, np.int32)))
    layout = ms.Model(cell).infer_predict_layout(*example)
    with tempfile.TemporaryDirectory() as work:
        files, strategy, fmt = checkpoint_files(path, Path(work))
        ms.load_distributed_checkpoint(cell, files, layout, strategy, format=fmt)
    return model


def start_model_parallel(workers: int) -> int:
    """In an msrun worker: communication up, semi-auto parallel over `workers` devices (full batch).
    Returns this rank."""
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if get_group_size() != workers:
        raise ValueError(f"--workers {workers} but msrun started {get_group_size()} workers")
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=workers, full_batch=True)
    return get_rank()


# ---- the worker loop -----------------------------------------------------------------------------
def request_path(queue: Path, seq: int) -> Path:
    return queue / f"request_{seq}.npz"


def answer_path(queue: Path, seq: int) -> Path:
    return queue / f"answer_{seq}.npy"


def serve(model_dir: str | os.PathLike, queue: str | os.PathLike, workers: int = 1, poll_s: float = 0.001) -> None:
    """Load the model (split over `workers` devices when > 1), write `queue/ready.json` (rank 0), then
    answer requests request_0.npz, request_1.npz, ... until a `close` request."""
    from cllama.checkpoint.model_dir import load_model_dir
    from cllama.runtime import init_context

    init_context(seed=0)
    queue = Path(queue)
    rank = start_model_parallel(workers) if workers > 1 else 0
    model = load_model_parallel(model_dir, workers) if workers > 1 else load_model_dir(model_dir)
    engine = FullForwardEngine(model)
    steps: dict[tuple, FullForwardSteps] = {}
    if rank == 0:
        write_json(queue / "ready.json", {"workers": workers, "pid": os.getpid()})
    seq = 0
    while True:
        path = request_path(queue, seq)
        while not path.exists():
            time.sleep(poll_s)
        with np.load(path) as request:
            op, key = str(request["op"]), tuple(int(x) for x in request["key"])
            if op == "close":
                return
            bucket = steps.setdefault(key, engine.steps_for(key[0], key[1], bool(key[2])))
            if op == "prefill":
                out = bucket.prefill(Tensor(request["ids"]), Tensor(request["pads"]))
            else:
                out = bucket.decode(Tensor(request["tokens"]), Tensor(request["slot"]), Tensor(request["pads"]))
        result = out.asnumpy()
        if rank == 0:
            with atomic_path(answer_path(queue, seq)) as tmp, open(tmp, "wb") as f:
                np.save(f, result)
        seq += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a generation worker (started by cllama.generation.remote)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        serve(args.model, args.queue, args.workers)
    except BaseException as err:  # the parent reads the reason from here
        (Path(args.queue) / "failed.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        raise


if __name__ == "__main__":
    main()
