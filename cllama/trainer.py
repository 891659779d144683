"""Compiled training steps, training checkpoints and the metrics log.

A training checkpoint `<output>/checkpoints/step_<N>/` is a model directory (config.json, model.ckpt,
tokenizer.model when known) plus `optimizer.ckpt` (adam_m.*, adam_v.*, global_step, scale_sense and
the loss-scale counters: MindSpore/MindFormers names) and `trainer_state.json`. It is written under
a temporary name and renamed when complete, so a kill never leaves a partial `step_<N>`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from cllama.model import CodeLlama
from cllama.optim import AdamW, GlobalNorm
from cllama.weights import save_model_dir

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_CKPT = "optimizer.ckpt"


class LossCell(nn.Cell):
    """model.loss(input_ids, labels) as a cell (gradients are taken of a cell)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.model.loss(input_ids, labels)


class TrainStep(nn.Cell):
    """One optimizer step as one graph: forward, backward, (all-reduce over data-parallel ranks),
    global-norm clipping, AdamW. `construct(input_ids, labels, lr) -> (loss, grad_norm, overflow,
    loss_scale)`.

    Loss scale, gradient accumulation and clipping are folded into the single divisor the fused
    AdamW kernel applies to the gradients, so no pass rewrites the gradients. With a loss scale
    (float16 on Ascend) gradients are taken of loss * scale; a non-finite norm skips the update and
    MindSpore's DynamicLossScaleUpdateCell lowers the scale. With accumulate > 1, AccumulateStep
    adds the first accumulate-1 micro-batches' gradients into `accu_grads.*` buffers.
    """

    def __init__(self, model: CodeLlama, optimizer: AdamW, max_grad_norm: Optional[float] = 1.0,
                 accumulate: int = 1, loss_scale: Optional[dict] = None, world: int = 1) -> None:
        super().__init__(auto_prefix=False)
        self.network = LossCell(model)
        self.optimizer = optimizer
        self.weights = optimizer.params
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.norm = GlobalNorm()
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.accumulate = accumulate
        self.accu = None
        if accumulate > 1:
            self.accu = ms.ParameterTuple([Parameter(initializer("zeros", p.shape, ms.float32),
                                                     name=f"accu_grads.{p.name}", requires_grad=False)
                                           for p in self.weights])
        self.scaling = loss_scale is not None
        scale = float(loss_scale.get("loss_scale_value", 65536)) if self.scaling else 1.0
        self.scale_sense = Parameter(Tensor(scale, ms.float32), name="scale_sense", requires_grad=False)
        if self.scaling:
            self.scale_update = nn.DynamicLossScaleUpdateCell(
                scale, int(loss_scale.get("scale_factor", 2)), int(loss_scale.get("scale_window", 1000)))
        self.world = world
        if world > 1:
            self.reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=world)
            self.allreduce = ops.AllReduce()

    def state(self) -> list[Parameter]:
        """Loss-scale state to checkpoint (scale_sense and the update cell's counters)."""
        if self.scaling:
            return [self.scale_sense, self.scale_update.cur_iter, self.scale_update.last_overflow_iter]
        return [self.scale_sense]

    def construct(self, input_ids: Tensor, labels: Tensor, lr: Tensor):
        scale = self.scale_sense.value()
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale.astype(loss.dtype))
        if self.accumulate > 1:
            summed = ()
            for i in range(len(grads)):
                summed = summed + (grads[i].astype(ms.float32) + self.accu[i],)
            grads = summed
        if self.world > 1:
            grads = self.reducer(grads)
            loss = self.allreduce(loss) / self.world
        raw_norm = self.norm(grads)
        divisor = scale * self.accumulate
        norm = raw_norm / divisor
        if self.max_grad_norm > 0:
            divisor = divisor * ops.maximum((norm + 1e-6) / self.max_grad_norm, 1.0)
        overflow = ops.zeros((), ms.bool_)
        if self.scaling:
            overflow = self.scale_update(self.scale_sense, ops.logical_not(ops.isfinite(raw_norm)))
            if not overflow:
                self.optimizer(grads, lr, divisor)
        else:
            self.optimizer(grads, lr, divisor)
        if self.accumulate > 1:
            for accu in self.accu:
                ops.assign(accu, ops.zeros_like(accu))
        return loss, norm, overflow, scale


class AccumulateStep(nn.Cell):
    """Forward + backward of one micro-batch, gradients added into the TrainStep's accu_grads."""

    def __init__(self, step: TrainStep) -> None:
        super().__init__(auto_prefix=False)
        if step.accu is None:
            raise ValueError("AccumulateStep: the TrainStep was built with accumulate=1")
        self.network, self.weights, self.accu = step.network, step.weights, step.accu
        self.scale_sense = step.scale_sense
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.world = step.world
        if self.world > 1:
            self.allreduce = ops.AllReduce()

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, self.scale_sense.value().astype(loss.dtype))
        for i in range(len(grads)):
            ops.assign_add(self.accu[i], grads[i].astype(ms.float32))
        if self.world > 1:
            loss = self.allreduce(loss) / self.world
        return loss


class EvalStep(nn.Cell):
    """Validation loss of one batch (no gradients)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        self.network = LossCell(model)

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.network(input_ids, labels)


# ---- checkpoints ---------------------------------------------------------------------------------
def checkpoint_steps(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_DIR.match(path.name)
        if m and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete `step_<N>` directory under `root`, or None."""
    steps = checkpoint_steps(root)
    return steps[-1][1] if steps else None


def save_checkpoint(root: str | os.PathLike, model: CodeLlama, optimizer: AdamW, step_cell: TrainStep,
                    state: dict, tokenizer: Optional[str | os.PathLike] = None, keep: int = 0) -> Path:
    """Write `root/step_<state['step']>/` atomically (temp dir, then rename); keep the newest `keep`
    checkpoints (0 keeps all). Returns the checkpoint (a model directory)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']}"
    tmp = root / f".step_{state['step']}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(model, tmp, tokenizer)
    entries = [{"name": p.name, "data": p} for p in optimizer.state() + step_cell.state()]
    ms.save_checkpoint(entries, str(tmp / OPTIMIZER_CKPT))
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # a resumed run saving a step again: replace it
        old = root / f".step_{state['step']}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    if keep > 0:
        for _, path in checkpoint_steps(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def remove_partial_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted saves (`.step_<N>.partial-*`); returns what was removed."""
    root = Path(root)
    removed = [p for p in root.glob(".step_*") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint_state(path: str | os.PathLike, optimizer: AdamW, step_cell: TrainStep) -> dict:
    """Load optimizer and loss-scale state from a checkpoint; returns its trainer_state. Model
    weights are loaded separately (`cllama.weights.load_model_dir`)."""
    path = Path(path)
    ckpt = path / OPTIMIZER_CKPT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: missing; {path} is not a training checkpoint (a model "
                                "directory alone cannot be resumed: start a new run from it instead)")
    saved = ms.load_checkpoint(str(ckpt))
    wanted = optimizer.state() + step_cell.state()
    missing = [p.name for p in wanted if p.name not in saved]
    if missing:
        raise ValueError(f"{ckpt}: optimizer state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "the checkpoint was written by a different model or optimizer config")
    for p in wanted:
        value = saved[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{ckpt}: {p.name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy(), p.dtype))
    return json.loads((path / TRAINER_STATE).read_text())


# ---- metrics -----------------------------------------------------------------------------------------
class MetricsLog:
    """Per-step records appended to a JSONL file and flushed as they come. Opening with
    `after_step=N` first drops records past step N (a resumed run rewrites them)."""

    def __init__(self, path: str | os.PathLike, after_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= after_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif after_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl (a file or its run directory); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

