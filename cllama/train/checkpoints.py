"""Training checkpoints: `<output>/checkpoints/step_<N>/` is a model directory (config.json,
model.ckpt or model.safetensors, tokenizer.model when known) plus `optimizer.ckpt` (adam_m.*, adam_v.*, global_step,
scale_sense and the loss-scale counters: MindSpore/MindFormers names) and `trainer_state.json`. It is
written under a temporary name and renamed when complete, so a kill never leaves a partial `step_<N>`.
Runs whose ranks save their own slices write `step_<N>/rank_K/` instead (cllama.train.sharded). A LoRA
run's step holds its adapters (an adapter directory, cllama.checkpoint.adapter), not the frozen base.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor

from cllama.checkpoint.adapter import lora_of, write_adapter_files
from cllama.checkpoint.files import check_weights, file_format
from cllama.checkpoint.model_dir import save_model_dir
from cllama.fileio import dumps, install, read_json
from cllama.model import CodeLlama
from cllama.train.optim import AdamW
from cllama.train.steps import TrainStep

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_CKPT = "optimizer.ckpt"


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
                    state: dict, tokenizer: Optional[str | os.PathLike] = None, keep: int = 0,
                    fmt: str = "ckpt", base_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write `root/step_<state['step']>/` atomically (temp dir, then rename), weights as model.ckpt or
    model.safetensors (`fmt`), or for a LoRA model its adapters (adapter.ckpt/.safetensors +
    adapter_config.json naming `base_dir`); keep the newest `keep` checkpoints (0 keeps all). Returns
    the checkpoint (a model directory, or an adapter directory)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']}"
    tmp = root / f".step_{state['step']}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if lora_of(model):
        write_adapter_files(model, tmp, base_dir, fmt)
    else:
        save_model_dir(model, tmp, tokenizer, fmt)
    entries = [{"name": p.name, "data": p} for p in optimizer.state() + step_cell.state()]
    ms.save_checkpoint(entries, str(tmp / OPTIMIZER_CKPT))
    (tmp / TRAINER_STATE).write_text(dumps(state) + "\n")
    _fsync_dir(tmp)
    install(tmp, final)  # a resumed run saving a step again replaces it
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


def load_state(params: list[Parameter], path: str | os.PathLike) -> None:
    """Set `params` from a checkpoint file (strict: every name present with its shape)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    saved = ms.load_checkpoint(str(check_weights(path)), format=file_format(path))
    missing = [p.name for p in params if p.name not in saved]
    if missing:
        raise ValueError(f"{path}: lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "the checkpoint was written by a different model, optimizer or layout")
    for p in params:
        value = saved[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{path}: {p.name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy(), p.dtype))


def load_checkpoint_state(path: str | os.PathLike, optimizer: AdamW, step_cell: TrainStep) -> dict:
    """Load optimizer and loss-scale state from a checkpoint; returns its trainer_state. Model
    weights are loaded separately (`cllama.checkpoint.model_dir.load_state_dict`)."""
    path = Path(path)
    if not (path / OPTIMIZER_CKPT).is_file():
        raise FileNotFoundError(f"{path / OPTIMIZER_CKPT}: missing; {path} is not a training checkpoint (a model "
                                "directory alone cannot be resumed: start a new run from it instead)")
    load_state(optimizer.state() + step_cell.state(), path / OPTIMIZER_CKPT)
    return read_json(path / TRAINER_STATE, "trainer_state.json")
