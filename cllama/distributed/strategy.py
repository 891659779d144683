"""Parallel strategy files: each parameter's device matrix and tensor map for a dp/mp/pp layout.

The layouts are the ones MindSpore's semi-auto parallel derives from MindFormers' Llama shard
calls (MatMul and Gather operator rules, repeated calculation appended on the right of the device
matrix), written in MindSpore's `node_strategy.proto` format so `mindspore.transform_checkpoints`
reads them like a cluster's own files:

  wq wk wv w1 w3   MatMul ((dp, 1), (mp, 1)), transpose_b   dev [dp, 1, mp]  map [0, 1]  rows / mp
  wo w2            MatMul ((dp, mp), (1, mp)), transpose_b  dev [dp, mp, 1]  map [0, 1]  cols / mp
  lm_head          like wq when vocab_emb_dp is False, else ((dp, 1), (1, 1)): replicated
  tok_embeddings   Gather ((mp, 1), (dp, 1)) when vocab_emb_dp is False (rows / mp), else ((1, 1), (dp, 1))
  norms            Mul ((dp, 1, 1), (1,)): replicated

Pipeline stages: embedding on stage 0, layer i on stage i // (num_layers / pipeline_stage),
norm_out and lm_head on the last stage. Each stage's file lists its own parameters; a merged file
(what `mindspore.merge_pipeline_strategys` writes) names them `<stage>-<name>`.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllama.checkpoint.names import param_shapes
from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig
from cllama.fileio import atomic_path

_COLUMN = re.compile(r"^model\.layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight$")
_ROW = re.compile(r"^model\.layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$")
_NORM = re.compile(r"^model\.layers\.\d+\.(attention_norm|ffn_norm)\.weight$|^model\.norm_out\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EMBEDDING, _LM_HEAD = "model.tok_embeddings.embedding_weight", "lm_head.weight"


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter lives: its pipeline stage and how its stage's devices split it."""

    name: str
    shape: tuple[int, ...]        # global shape (empty when read from a strategy file)
    stage: int
    dev_matrix: tuple[int, ...]   # devices of one stage; rank order is row-major over this matrix
    tensor_map: tuple[int, ...]   # per tensor dim: device-matrix index counted from the right, -1 none
    op: str = ""                  # the operator whose strategy fixes the layout
    strategy: tuple[tuple[int, ...], ...] = ()
    opt_shard_size: int = 0       # optimizer-parallel split of dim 0 (cluster training files)

    @property
    def stage_devices(self) -> int:
        return math.prod(self.dev_matrix)

    @property
    def splits(self) -> tuple[int, ...]:
        """Number of slices along each tensor dim."""
        n = len(self.dev_matrix)
        out = [1 if m == -1 else self.dev_matrix[n - 1 - m] for m in self.tensor_map]
        if self.opt_shard_size > 0 and out:
            out[0] *= self.opt_shard_size
        return tuple(out)

    def shard_shape(self, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        shape = tuple(shape or self.shape)
        return tuple(d // s for d, s in zip(shape, self.splits))

    def shard_index(self, local_rank: int) -> tuple[int, ...]:
        """Which slice along each dim the stage-local rank holds (MindSpore's rank order)."""
        coord = np.unravel_index(local_rank, self.dev_matrix)
        n = len(self.dev_matrix)
        return tuple(0 if m == -1 else int(coord[n - 1 - m]) for m in self.tensor_map)

    def shard_of(self, full: np.ndarray, local_rank: int) -> np.ndarray:
        """The slice of the full tensor a stage-local rank holds (numpy; no optimizer sharding)."""
        index = tuple(slice(i * (size // parts), (i + 1) * (size // parts))
                      for size, parts, i in zip(full.shape, self.splits, self.shard_index(local_rank)))
        return full[index]


def make_parallel(data_parallel: int = 1, model_parallel: int = 1, pipeline_stage: int = 1,
                  vocab_emb_dp: bool = True) -> ParallelConfig:
    """A ParallelConfig for a checkpoint layout (micro_batch_num only matters for training)."""
    return ParallelConfig(data_parallel=data_parallel, model_parallel=model_parallel,
                          pipeline_stage=pipeline_stage, micro_batch_num=max(1, pipeline_stage),
                          vocab_emb_dp=vocab_emb_dp)


def _matmul(name, shape, stage, a, b, dp, mp) -> ParamLayout:
    """MatMul(x, w.T): dev matrix [a0, a1, b0], weight map [0, 1]; repeats appended on the right."""
    dev, tmap = [a[0], a[1], b[0]], [0, 1]
    return _with_repeats(ParamLayout(name, shape, stage, tuple(dev), tuple(tmap), "MatMul", (a, b)), dp * mp)


def _with_repeats(layout: ParamLayout, stage_devices: int) -> ParamLayout:
    repeats = stage_devices // layout.stage_devices
    if repeats == 1:
        return layout
    tmap = tuple(m if m == -1 else m + 1 for m in layout.tensor_map)
    return ParamLayout(layout.name, layout.shape, layout.stage, layout.dev_matrix + (repeats,), tmap,
                       layout.op, layout.strategy)


def _gather(name, shape, stage, dp, mp, split_vocab) -> ParamLayout:
    """Gather(table, ids (B, S), 0) under MindSpore's Gather modes."""
    if not split_vocab or mp == 1:  # normal mode: dev = ids strategy + table strategy
        strategy = ((1, 1), (dp, 1))
        layout = ParamLayout(name, shape, stage, (dp, 1, 1, 1), (1, 0), "Gather", strategy)
        return _with_repeats(layout, dp * mp)
    strategy = ((mp, 1), (dp, 1))
    if dp > 1:  # shard batch and axis
        return ParamLayout(name, shape, stage, (dp, mp), (0, -1), "Gather", strategy)
    return ParamLayout(name, shape, stage, (mp, 1), (1, 0), "Gather", strategy)  # shard axis 0


def param_layouts(config: ModelConfig, parallel: ParallelConfig,
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, ParamLayout]:
    """Every parameter's layout for `parallel`; `shapes` defaults to the config's (no allocation)."""
    parallel.validate_for(config)
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    shapes = param_shapes(config) if shapes is None else shapes
    per_stage = config.num_layers // pp
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        m = _LAYER.match(name)
        stage = int(m.group(1)) // per_stage if m else (0 if name == _EMBEDDING else pp - 1)
        if _COLUMN.match(name):
            out[name] = _matmul(name, shape, stage, (dp, 1), (mp, 1), dp, mp)
        elif _ROW.match(name):
            out[name] = _matmul(name, shape, stage, (dp, mp), (1, mp), dp, mp)
        elif name == _LM_HEAD:
            b = (1, 1) if parallel.vocab_emb_dp else (mp, 1)
            out[name] = _matmul(name, shape, stage, (dp, 1), b, dp, mp)
        elif name == _EMBEDDING:
            out[name] = _gather(name, shape, stage, dp, mp, not parallel.vocab_emb_dp)
        elif _NORM.match(name):
            layout = ParamLayout(name, shape, stage, (dp, 1, 1), (0,), "Mul", ((dp, 1, 1), (1,)))
            out[name] = _with_repeats(layout, dp * mp)
        else:
            raise ValueError(f"param_layouts: parameter {name!r} is not a Code Llama parameter "
                             "(MindFormers names, REFERENCE.md section 4); drop it or rename it")
    return out


# ---- node_strategy.proto ------------------------------------------------------------------------
def _stage_proto(layouts: list[ParamLayout], stage: int):
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    smap = ParallelStrategyMap()
    smap.current_stage = stage
    for lay in layouts:
        item = smap.parallel_strategy_item.add()
        item.node_name = f"{lay.op}_{lay.name}"
        item.parallel_strategys.stage = stage
        for dims in lay.strategy:
            item.parallel_strategys.parallel_strategy.add().dim.extend(dims)
    for lay in layouts:
        entry = smap.parallel_layout_item.add()
        entry.param_name = lay.name
        pl = entry.parallel_layouts
        pl.dev_matrix.add().dim.extend(lay.dev_matrix)
        pl.tensor_map.add().dim.extend(lay.tensor_map)
        pl.param_split_shape.add()  # empty: no manual split (MindSpore writes one empty entry)
        pl.indices_offset.add()
        pl.field = 0
        pl.opt_weight_shard_step = 0
        pl.opt_weight_shard_size = 0
    return smap


def write_strategy(layouts: Mapping[str, ParamLayout], path: str | os.PathLike,
                   stage_dir: str | os.PathLike | None = None) -> Path:
    """Write the strategy file transform_checkpoints reads. With pipeline stages, one file per
    stage (named like a cluster's `ckpt_strategy_rank_<first rank of stage>.ckpt`) is merged by
    `mindspore.merge_pipeline_strategys`; `stage_dir` keeps those per-stage files."""
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stages = sorted({lay.stage for lay in layouts.values()})
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=".strategy.work-") as work:
        if stages == [0]:
            tmp.write_bytes(_stage_proto(list(layouts.values()), 0).SerializeToString())
        else:
            for stage in stages:
                group = [lay for lay in layouts.values() if lay.stage == stage]
                first_rank = stage * group[0].stage_devices
                data = _stage_proto(group, stage).SerializeToString()
                (Path(work) / f"ckpt_strategy_rank_{first_rank}.ckpt").write_bytes(data)
            ms.merge_pipeline_strategys(work, str(tmp))
            if stage_dir is not None:
                shutil.copytree(work, stage_dir, dirs_exist_ok=True)
    return path


def merge_stage_files(src_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Merge a cluster's per-rank strategy files (all stages) with mindspore.merge_pipeline_strategys."""
    import mindspore as ms

    src_dir, path = Path(src_dir), Path(path)
    if not any(src_dir.glob("*.ckpt")) and not any(src_dir.glob("*.json")):
        raise FileNotFoundError(f"{src_dir}: no strategy files (*.ckpt or *.json); point at the folder "
                                "holding every stage's strategy files")
    with atomic_path(path) as tmp:
        ms.merge_pipeline_strategys(str(src_dir), str(tmp))
    return path


def read_strategy(path: str | os.PathLike) -> dict[str, ParamLayout]:
    """Layouts from a strategy file (one stage, or merged `<stage>-<name>` entries), or from a
    folder of per-stage files (merged first). Global shapes are not stored in these files."""
    path = Path(path)
    if path.is_dir():
        with tempfile.TemporaryDirectory() as work:
            return read_strategy(merge_stage_files(path, Path(work) / "merged.ckpt"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: strategy file not found")
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    smap = ParallelStrategyMap()
    try:
        smap.ParseFromString(path.read_bytes())
    except Exception:
        raise ValueError(f"{path}: not a node_strategy.proto strategy file") from None
    if not smap.parallel_layout_item:
        raise ValueError(f"{path}: strategy file has no parameter layouts")
    file_stage = smap.parallel_strategy_item[0].parallel_strategys.stage if smap.parallel_strategy_item else 0
    out = {}
    for entry in smap.parallel_layout_item:
        name, stage = entry.param_name, file_stage
        prefix, dash, rest = name.partition("-")
        if dash and prefix.isdigit():
            stage, name = int(prefix), rest
        pl = entry.parallel_layouts
        if len(pl.tensor_map) > 1 and any(len(t.dim) for t in pl.tensor_map[1:]):
            raise ValueError(f"{path}: {name}: multi-axis tensor maps are not supported by cllama's reader")
        out[name] = ParamLayout(name, (), stage, tuple(pl.dev_matrix[0].dim), tuple(pl.tensor_map[0].dim),
                                opt_shard_size=max(int(pl.opt_weight_shard_size), 0))
    return out


def check_strategy(layouts: Mapping[str, ParamLayout], shapes: Mapping[str, tuple[int, ...]],
                   source: str) -> None:
    """Every checkpoint parameter needs a layout whose splits divide its shape."""
    missing = sorted(set(shapes) - set(layouts))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: no layout for {missing[:5]}{more}; use the strategy written for this "
                         "model, and for pipeline runs the folder with every stage's strategy files")
    for name, shape in shapes.items():
        splits = layouts[name].splits
        if len(splits) != len(shape) or any(d % s for d, s in zip(shape, splits)):
            raise ValueError(f"{source}: {name} of shape {tuple(shape)} cannot be split {splits}; "
                             "the strategy belongs to a different model")


# ---- what each rank holds -----------------------------------------------------------------------
def device_count(layouts: Mapping[str, ParamLayout]) -> int:
    first = next(iter(layouts.values()))
    return first.stage_devices * (max(lay.stage for lay in layouts.values()) + 1)


def shard_table(layouts: Mapping[str, ParamLayout], itemsize: int = 4) -> list[dict]:
    """One row per parameter: name, stage, global shape, shard shape, bytes each holding rank keeps."""
    rows = []
    for lay in layouts.values():
        shard = lay.shard_shape()
        rows.append({"name": lay.name, "stage": lay.stage, "global_shape": lay.shape, "shard_shape": shard,
                     "splits": lay.splits, "bytes_per_rank": math.prod(shard) * itemsize})
    return rows


def memory_per_rank(layouts: Mapping[str, ParamLayout], itemsize: int = 4) -> list[int]:
    """Bytes of weights on each global rank (rank = stage * stage_devices + local rank)."""
    n = device_count(layouts)
    per_stage = n // (max(lay.stage for lay in layouts.values()) + 1)
    out = [0] * n
    for lay in layouts.values():
        size = math.prod(lay.shard_shape()) * itemsize
        for local in range(per_stage):
            out[lay.stage * per_stage + local] += size
    return out
