"""Parallel strategy files: each parameter's device matrix and tensor map for a dp/mp/pp layout,
read from the strategies `CodeLlama.shard` puts on the primitives that consume the parameters (the
model is built without allocating its weights), so the model is the one source of truth.

Each layout follows MindSpore's operator rules for the consuming primitive (repeated calculation
appended on the right of the device matrix), and is written in MindSpore's `node_strategy.proto`
format so `mindspore.transform_checkpoints` reads it like a cluster's own file. With MindFormers'
strategies that gives:

  wq wk wv w1 w3   MatMul ((dp, 1), (mp, 1)), transpose_b   dev [dp, 1, mp]  map [0, 1]  rows / mp
  wo w2            MatMul ((dp, mp), (1, mp)), transpose_b  dev [dp, mp, 1]  map [0, 1]  cols / mp
  lm_head          like wq when vocab_emb_dp is False, else ((dp, 1), (1, 1)): replicated
  tok_embeddings   Gather ((mp, 1), (dp, 1)) when vocab_emb_dp is False (rows / mp), else ((1, 1), (dp, 1))
  norms            Mul ((dp, 1, 1), (1,)): replicated

Pipeline stages are the cells' `pipeline_stage`. Each stage's file lists its own parameters; a merged
file (what `mindspore.merge_pipeline_strategys` writes) names them `<stage>-<name>`.
`check_strategies` checks every sharded primitive's strategy against its input shapes.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig
from cllama.fileio import atomic_path, work_prefix


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


def sharded_model(config: ModelConfig, parallel: ParallelConfig, lora=None):
    """A CodeLlama of `config` (with `lora`'s adapters, a LoraConfig) with `parallel`'s strategies, its
    weights never allocated (34B takes half a second and no memory): what layouts and strategy checks read."""
    from mindspore.nn.utils import no_init_parameters

    from cllama.model import CodeLlama

    with no_init_parameters():
        model = CodeLlama(config)
    if lora is not None:
        from cllama.checkpoint.adapter import add_lora

        add_lora(model, lora)
    return model.shard(parallel)


# ---- operator rules: a parameter's layout from the strategy of the primitive consuming it ----------
def _with_repeats(layout: ParamLayout, stage_devices: int) -> ParamLayout:
    repeats = stage_devices // layout.stage_devices
    if repeats == 1:
        return layout
    tmap = tuple(m if m == -1 else m + 1 for m in layout.tensor_map)
    return ParamLayout(layout.name, layout.shape, layout.stage, layout.dev_matrix + (repeats,), tmap,
                       layout.op, layout.strategy)


def _layout(op: str, strategy: tuple, index: int, name: str, shape: tuple, stage: int,
            stage_devices: int) -> ParamLayout:
    if op == "MatMul" and index == 1:  # x (N, in) @ w (out, in)^T: dev [a0, a1, b0], w map [0, 1]
        (a0, a1), (b0, _) = strategy
        layout = ParamLayout(name, shape, stage, (a0, a1, b0), (0, 1), op, strategy)
    elif op == "Gather" and index == 0:  # table (V, H) gathered by ids (B, T) on axis 0
        table, ids = strategy
        if table[0] == 1:  # normal mode: dev = ids strategy + table strategy
            layout = ParamLayout(name, shape, stage, tuple(ids) + tuple(table), (1, 0), op, strategy)
        elif ids[0] > 1:  # rows split, batch split too
            return ParamLayout(name, shape, stage, (ids[0], table[0]), (0, -1), op, strategy)
        else:  # rows split only
            return ParamLayout(name, shape, stage, (table[0], 1), (1, 0), op, strategy)
    elif op == "Mul" and index == 1 and len(strategy[1]) == 1:  # x (..., H) * w (H,): dev = x's strategy
        layout = ParamLayout(name, shape, stage, tuple(strategy[0]), (0,), op, strategy)
    else:
        raise ValueError(f"{name}: no layout rule for input {index} of {op} with strategy {strategy}")
    return _with_repeats(layout, stage_devices)


def _stage(stages: Mapping[str, int], cell_name: str) -> int:
    """The pipeline stage of a cell: its own, else its nearest ancestor's."""
    parts = cell_name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in stages:
            return stages[".".join(parts[:n])]
    return 0


def model_layouts(model) -> dict[str, ParamLayout]:
    """Every parameter's layout, read from the strategies on the primitives that consume them (each
    cell's `param_ops`) and the cells' pipeline stages, for a model `shard` was called on."""
    parallel = model.parallel
    if parallel is None:
        raise ValueError("model_layouts: call model.shard(parallel_config) first")
    cells = dict(model.cells_and_names())
    stages = {name: cell.pipeline_stage for name, cell in cells.items()
              if getattr(cell, "pipeline_stage", None) is not None}
    stage_devices = parallel.data_parallel * parallel.model_parallel
    out = {}
    for cell_name, cell in cells.items():
        for attr, (prim, index) in (cell.param_ops().items() if hasattr(cell, "param_ops") else ()):
            param = getattr(cell, attr)
            strategy = prim.in_strategy
            if strategy is None:
                raise ValueError(f"{param.name}: {cell_name}.{type(prim).__name__} has no strategy; shard it")
            out[param.name] = _layout(type(prim).__name__, tuple(tuple(s) for s in strategy), index, param.name,
                                      tuple(param.shape), _stage(stages, cell_name), stage_devices)
    return out


def param_layouts(config: ModelConfig, parallel: ParallelConfig, lora=None) -> dict[str, ParamLayout]:
    """Every parameter's layout for `parallel` (a clear error when the layout does not fit the model),
    LoRA adapters included when `lora` (a LoraConfig) is given."""
    return model_layouts(sharded_model(config, parallel, lora))


def check_strategies(model, batch: int, seq_length: int) -> int:
    """Check every sharded primitive's strategy against its input shapes for a global batch of
    `batch` sequences of `seq_length` tokens (`model.shard_shapes`): as many strategy entries as
    dims, each dividing its dim. One error names the primitive, the input, the dim and the split.
    Returns how many primitives were checked."""
    shapes = model.shard_shapes(batch, seq_length)
    for path, inputs in shapes.items():
        strategy = model.at(path).in_strategy
        if strategy is None:
            raise ValueError(f"{path}: no strategy set; CodeLlama.shard must shard it")
        for i, (shape, split) in enumerate(zip(inputs, strategy)):
            if not shape:
                continue  # a scalar
            if len(shape) != len(split):
                raise ValueError(f"{path}: input {i} has shape {shape} but strategy {tuple(split)}")
            for d, (size, parts) in enumerate(zip(shape, split)):
                if size % parts:
                    raise ValueError(f"{path}: input {i} of shape {shape} cannot be split {tuple(split)}: dim {d} "
                                     f"({size}) is not a multiple of {parts}")
    return len(shapes)


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
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=work_prefix(path)) as work:
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


def describe_layout(layouts: Mapping[str, ParamLayout]) -> str:
    """'dp1 mp2 pp1': the layout's pipeline stages, its largest split of one tensor dim (model
    parallel) and the rest of each stage's devices (data parallel)."""
    pp = max(lay.stage for lay in layouts.values()) + 1
    per_stage = device_count(layouts) // pp
    mp = max((max(lay.splits, default=1) // max(lay.opt_shard_size, 1) for lay in layouts.values()), default=1)
    mp = mp if mp and per_stage % mp == 0 else 1
    return f"dp{per_stage // mp} mp{mp} pp{pp}"


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
