"""Checkpoints of runs whose ranks each hold their own slices (MindFormers' `integrated_save: False`,
the default under semi-auto parallel, where no rank holds the whole model).

A step of such a run, `checkpoints/step_N/`:
    rank_K/checkpoint_K.ckpt   rank K's model slices (`mindspore.save_checkpoint(..., integrated_save=False)`)
    rank_K/optimizer.ckpt      rank K's optimizer slices (adam_m.*, adam_v.*, global_step, loss scale)
    strategy.ckpt              the layout: under semi-auto parallel the strategy file MindSpore itself
                               wrote while compiling (pipeline stages merged with merge_pipeline_strategys),
                               otherwise the one derived from the model's strategies
    config.json, tokenizer.model, trainer_state.json (a LoRA run: the adapters' slices + adapter_config.json)
so `cllama ckpt merge` (or `ckpt transform`) turns it into a model directory. Every rank writes into
one shared `.step_N.partial` folder; rank 0 renames it when all have finished (barriers between).
A full model directory given as `load_checkpoint` to a semi-auto run is first split into the run's
layout under `<output_dir>/transformed_checkpoint/` by rank 0 (MindFormers' auto_trans_ckpt), with the
host memory that needs reported before it starts; every rank then loads its own slice.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from cllama.checkpoint.adapter import lora_of, trained_params, write_adapter_config
from cllama.checkpoint.files import shard_file, shard_name, weights_file
from cllama.checkpoint.model_dir import save_weights
from cllama.distributed.parallel import ParallelConfig, ParallelEnv
from cllama.distributed.strategy import make_parallel, memory_per_rank, param_layouts, read_strategy, write_strategy
from cllama.fileio import copy_file, install, write_json
from cllama.runtime import memory_gib

log = logging.getLogger(__name__)

STRATEGY_FILE = "strategy.ckpt"
OPTIMIZER_CKPT = "optimizer.ckpt"
SEMI_AUTO = ("semi_auto_parallel", "auto_parallel")


_BARRIER = []


def barrier(env: ParallelEnv) -> None:
    """Wait for every rank (nothing to wait for on one): a compiled all-reduce of one number, which
    every backend runs (MindSpore's Barrier op and the eager all_reduce have no CPU kernel)."""
    if env.world > 1:
        import numpy as np
        from mindspore import Tensor, nn, ops

        if not _BARRIER:
            class AllReduceOne(nn.Cell):
                def __init__(self) -> None:
                    super().__init__()
                    self.reduce = ops.AllReduce()

                def construct(self, x):
                    return self.reduce(x)

            _BARRIER.append(AllReduceOne())
        _BARRIER[0](Tensor(np.ones(1, np.float32))).asnumpy()


def strategy_save_config(out: str | os.PathLike, rank: int, trainable_only: bool = True) -> dict:
    """`set_auto_parallel_context(strategy_ckpt_config=...)`: where MindSpore writes this rank's
    strategy file when it compiles (MindFormers' output/strategy/ckpt_strategy_rank_K.ckpt). A LoRA run
    keeps every parameter's layout (`trainable_only` False): its frozen base is split by it too."""
    return {"save_file": str(Path(out) / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt"),
            "only_trainable_params": trainable_only}


def run_strategy(out: str | os.PathLike, env: ParallelEnv, model, parallel: ParallelConfig) -> Path:
    """The strategy file of this run's layout, `<out>/strategy/strategy.ckpt`. Semi-auto parallel:
    call after the train step compiled; rank 0 merges the per-rank files MindSpore wrote (every
    pipeline stage's). Otherwise (one device, data parallel) rank 0 writes the layout derived from
    the model's strategies. Every rank returns once the file exists."""
    folder = Path(out) / "strategy"
    path = folder / STRATEGY_FILE
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if env.mode in SEMI_AUTO:
            if parallel.pipeline_stage > 1:
                from cllama.distributed.strategy import merge_stage_files

                with_stages = folder / "stages"
                with_stages.mkdir(exist_ok=True)
                for f in folder.glob("ckpt_strategy_rank_*.ckpt"):
                    copy_file(f, with_stages / f.name)
                merge_stage_files(with_stages, path)
            else:
                copy_file(strategy_save_config(out, 0)["save_file"], path)
        else:
            write_strategy(param_layouts(model.config, make_parallel(data_parallel=env.world), lora_of(model)), path)
    barrier(env)
    return path


# ---- saving ---------------------------------------------------------------------------------------
def save_sharded(root: str | os.PathLike, env: ParallelEnv, model, optimizer, step_cell, state: dict,
                 strategy: Path, tokenizer: Optional[str | os.PathLike] = None, keep: int = 0,
                 fmt: str = "ckpt", base_dir: Optional[str | os.PathLike] = None) -> Path:
    """Every rank writes its slices into `root/.step_N.partial/rank_K/` (a LoRA model: its adapters'
    slices); rank 0 adds the strategy, config (and adapter_config.json naming `base_dir`), tokenizer
    and trainer state, and renames the folder to `step_N` once all ranks are done. Keeps the newest
    `keep` steps (0: all). Returns the step folder."""
    from cllama.train.checkpoints import TRAINER_STATE, checkpoint_steps

    root = Path(root)
    final = root / f"step_{state['step']}"
    tmp = root / f".step_{state['step']}.partial"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    rank_dir = tmp / f"rank_{env.rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    save_weights(trained_params(model), rank_dir / shard_name(env.rank, fmt), integrated_save=False)
    save_weights(optimizer.state() + step_cell.state(), rank_dir / OPTIMIZER_CKPT, integrated_save=False)
    _fsync(rank_dir)
    if env.is_main:
        copy_file(strategy, tmp / STRATEGY_FILE)
        model.config.save(tmp / "config.json")
        if lora_of(model):
            write_adapter_config(model, tmp, base_dir)
        if tokenizer is not None:
            copy_file(tokenizer, tmp / "tokenizer.model")
        write_json(tmp / TRAINER_STATE, {**state, "sharded": True, "format": fmt})
        _fsync(tmp)
    barrier(env)
    if env.is_main:
        install(tmp, final)
        if keep > 0:
            for _, path in checkpoint_steps(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    barrier(env)
    return final


def _fsync(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def is_sharded_step(step_dir: str | os.PathLike) -> bool:
    """Whether a training step folder holds rank_K/ slices (else it is a model directory)."""
    return (Path(step_dir) / "rank_0").is_dir()


# ---- loading --------------------------------------------------------------------------------------
def load_rank_slices(model, step_dir: str | os.PathLike, env: ParallelEnv, optimizer=None, step_cell=None,
                     params: Optional[dict] = None) -> None:
    """Load this rank's slices of `params` (default: what training checkpoints, `trained_params`) and
    the optimizer state when given from a sharded step folder. Under semi-auto parallel, call after
    the train step compiled (the parameters are sliced then)."""
    from cllama.train.checkpoints import load_state

    rank_dir = Path(step_dir) / f"rank_{env.rank}"
    weights = shard_file(rank_dir)
    if weights is None:
        raise FileNotFoundError(f"{rank_dir}: no checkpoint_{env.rank}.ckpt; {step_dir} was saved by fewer ranks "
                                "than this run has; resume with the layout it was saved with")
    load_state(list((trained_params(model) if params is None else params).values()), weights)
    if optimizer is not None:
        load_state(optimizer.state() + step_cell.state(), rank_dir / OPTIMIZER_CKPT)


def check_resumable(step_dir: Path, state: dict, env: ParallelEnv) -> None:
    """A sharded step resumes only in the layout it was saved with."""
    saved = state.get("world", 1)
    if saved != env.world:
        raise ValueError(f"{step_dir}: saved by {saved} ranks but this run has {env.world}; merge it "
                         f"(cllama ckpt merge --src {step_dir} --dst MODEL_DIR) and start a new run from MODEL_DIR")


def transform_memory(model_dir: str | os.PathLike, strategy: str | os.PathLike) -> dict:
    """Host memory splitting a full model directory into a layout takes (bytes): the full weights
    twice (read, then merged back for the verification) plus the largest rank's slices; and what
    this machine has available (GiB)."""
    weights = weights_file(model_dir)
    size = weights.stat().st_size
    layouts = read_strategy(strategy)
    total = sum(memory_per_rank(layouts, 1)) or 1
    largest = max(memory_per_rank(layouts, 1)) * size / total  # scale element counts to the file's bytes
    return {"weights_bytes": size, "needed_bytes": int(2 * size + largest), "available_gib": memory_gib()["available"]}


def split_for_run(model_dir: str | os.PathLike, strategy: str | os.PathLike, out: str | os.PathLike,
                  env: ParallelEnv, progress: bool = True) -> Path:
    """A full model directory laid out for this run: rank 0 splits it into
    `<out>/transformed_checkpoint/` (rank_K/ + strategy.ckpt; reused when already there for the same
    strategy) after reporting the host memory needed; every rank returns the folder once it exists."""
    from cllama.distributed.transform import transform

    dst = Path(out) / "transformed_checkpoint"
    if env.is_main:
        stamp = {"source": str(Path(model_dir).resolve()), "strategy_bytes": Path(strategy).read_bytes().hex()}
        done = dst / "source.json"
        if not (done.is_file() and json.loads(done.read_text()) == stamp):
            need = transform_memory(model_dir, strategy)
            log.warning("load_checkpoint %s: splitting it into this run's layout (%s) needs about %.2f GiB of host "
                        "memory (weights %.2f GiB; %.1f GiB available)", model_dir, dst, need["needed_bytes"] / 2**30,
                        need["weights_bytes"] / 2**30, need["available_gib"])
            transform(model_dir, dst, dst_strategy=str(strategy), overwrite=True, progress=progress)
            write_json(done, stamp)
    barrier(env)
    return dst
