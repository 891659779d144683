"""Distributed checkpoints: split a full checkpoint into `rank_X/` shards, merge shards back, and
re-shard between layouts, all through MindSpore's own engine (`mindspore.transform_checkpoints`,
`transform_checkpoint_by_rank`), with a round-trip verification by checksums.

A sharded checkpoint folder:  rank_0/checkpoint_0.ckpt ... rank_N/checkpoint_N.ckpt (or .safetensors),
strategy.ckpt (the merged strategy of the layout) and, when known, config.json and tokenizer.model;
a training step of a sharded run (checkpoints/step_N/) is one (a LoRA run's step holds adapter slices
and adapter_config.json, and merges into an adapter directory). A full checkpoint: a model directory
(config.json + model.ckpt or model.safetensors) or one `.ckpt` / `.safetensors` file. Outputs are
written in the source's format unless `fmt` says otherwise.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from cllama.checkpoint.files import (
    FORMATS,
    SUFFIXES,
    check_weights,
    file_format,
    is_model_dir,
    shard_file,
    weights_file,
)
from cllama.checkpoint.lora import ADAPTER_CONFIG, ADAPTER_FORMATS
from cllama.distributed.strategy import (
    ParamLayout,
    check_strategy,
    describe_layout,
    device_count,
    memory_per_rank,
    read_strategy,
    write_strategy,
)
from cllama.fileio import install, remove_stale, temp_path, with_final_names, work_prefix
from cllama.tokenizer import check_tokenizer

PREFIX = "checkpoint_"  # MindFormers' shard file prefix: rank_X/checkpoint_X.ckpt
STRATEGY_FILE = "strategy.ckpt"
StrategyArg = Union[str, os.PathLike, Mapping[str, ParamLayout], None]


@dataclass
class Source:
    """What a checkpoint path holds."""

    path: Path                 # the model dir, the weights file's folder, or the sharded folder
    ckpt: Path | None          # the full weights file, or None when sharded
    strategy: StrategyArg      # the sharded folder's strategy (file, per-stage folder or layouts)

    @property
    def sharded(self) -> bool:
        return self.ckpt is None

    @property
    def fmt(self) -> str:
        """'ckpt' or 'safetensors'."""
        files = shard_files(self.path) if self.sharded else {0: self.ckpt}
        return file_format(next(iter(files.values()))) if files else "ckpt"


def find_source(src: str | os.PathLike, strategy: StrategyArg = None) -> Source:
    """Classify `src`: a weights file, a model directory or a `rank_X/` folder."""
    src = Path(src)
    if src.is_file():
        if src.suffix not in SUFFIXES:
            raise ValueError(f"{src}: expected a `.ckpt` or `.safetensors` file, a model directory or a folder of "
                             "rank_X/")
        full = src
    elif is_model_dir(src):
        full = weights_file(src)
    elif src.is_dir() and any(p.is_dir() and p.name[5:].isdigit() for p in src.glob("rank_*")):
        strategy = strategy or (src / STRATEGY_FILE if (src / STRATEGY_FILE).exists() else None)
        if strategy is None:
            raise ValueError(f"{src}: sharded checkpoint without {STRATEGY_FILE}; pass --src-strategy "
                             "(the training job's strategy file, or the folder of its per-stage files)")
        for shard in shard_files(src).values():
            check_weights(shard)  # headers against the file: a damaged shard is one clear error
        return Source(src, None, strategy)
    else:
        raise FileNotFoundError(f"{src}: no checkpoint (expected a .ckpt or .safetensors file, a model directory, "
                                "or a folder with rank_X/ subfolders)")
    if strategy is not None:
        raise ValueError(f"{src}: a full checkpoint has no source strategy; drop --src-strategy")
    check_weights(full)  # headers against the file: a damaged one is one clear error
    if (full.parent / "tokenizer.model").is_file():  # copied beside the result: refuse a damaged one first
        check_tokenizer(full.parent / "tokenizer.model")
    return Source(full.parent, full, None)


# ---- checksums ------------------------------------------------------------------------------------
def checksums(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every tensor (dtype, shape and bytes) in one weights file (.ckpt or .safetensors)."""
    import mindspore as ms

    return tensor_checksums(ms.load_checkpoint(str(path), format=file_format(path)))


def tensor_checksums(params: Mapping) -> dict[str, str]:
    """sha256 of each loaded tensor's dtype, shape and bytes."""
    from cllama.checkpoint.model_dir import to_numpy

    out = {}
    for name, param in params.items():
        arr = np.ascontiguousarray(to_numpy(param))
        h = hashlib.sha256(f"{param.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
        out[name] = h.hexdigest()
    return out


def fingerprint(sums: Mapping[str, str]) -> str:
    """One sha256 over a checkpoint's per-tensor checksums (order independent)."""
    return hashlib.sha256("".join(f"{k}={sums[k]};" for k in sorted(sums)).encode()).hexdigest()


def shard_files(folder: str | os.PathLike) -> dict[int, Path]:
    """rank -> weights file of a sharded folder (cllama.checkpoint.files.shard_file of each rank_X/)."""
    out = {}
    for d in Path(folder).glob("rank_*"):
        if d.is_dir() and d.name[5:].isdigit() and shard_file(d) is not None:
            out[int(d.name[5:])] = shard_file(d)
    return dict(sorted(out.items()))


def rank_memory(layouts: Mapping[str, ParamLayout], shards_dir: str | os.PathLike, itemsize: int = 4) -> list[dict]:
    """Per rank: its pipeline stage, the weight bytes the layout gives it and the size of its shard
    file in `shards_dir` (a split's output)."""
    computed, files = memory_per_rank(layouts, itemsize), shard_files(shards_dir)
    per_stage = len(computed) // (max(lay.stage for lay in layouts.values()) + 1)
    return [{"rank": rank, "stage": rank // per_stage, "layout_bytes": size,
             "file_bytes": files[rank].stat().st_size if rank in files else 0} for rank, size in enumerate(computed)]


def _compare(expected: Mapping[str, str], got: Mapping[str, str], what: str) -> None:
    bad = sorted(n for n in set(expected) | set(got) if expected.get(n) != got.get(n))
    if bad:
        raise ValueError(f"verification failed: {what} differs in {len(bad)} tensors, e.g. {bad[:3]}; "
                         "the output was not written")


# ---- the engine ------------------------------------------------------------------------------------
def _strategy_file(strategy: StrategyArg, work: Path, name: str) -> str | None:
    """A strategy file path for MindSpore: files as they are, folders merged, layouts written."""
    if strategy is None:
        return None
    if isinstance(strategy, Mapping):
        return str(write_strategy(strategy, work / f"{name}.ckpt"))
    path = Path(strategy)
    if path.is_dir():
        from cllama.distributed.strategy import merge_stage_files

        return str(merge_stage_files(path, work / f"{name}.ckpt"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: strategy file not found")
    return str(path.resolve())


def _staged(source: Source, work: Path) -> str:
    """A folder MindSpore reads as rank_X/checkpoint_X.ckpt holding only the weights (links; a
    safetensors file converted): a full checkpoint becomes rank_0, a sharded one each rank's weights
    (not its optimizer state)."""
    from cllama.checkpoint.convert import write_weights
    from cllama.checkpoint.sources import ms_sources

    files = shard_files(source.path) if source.sharded else {0: source.ckpt}
    root = work / f"staged-{len(list(work.glob('staged-*')))}"
    for rank, path in files.items():
        (root / f"rank_{rank}").mkdir(parents=True)
        target = root / f"rank_{rank}" / f"{PREFIX}{rank}.ckpt"
        if path.suffix == ".safetensors":
            write_weights(ms_sources(path), target, progress=False)
            continue
        try:
            os.symlink(path.resolve(), target)
        except OSError:
            shutil.copyfile(path, target)
    return str(root)


def _run(src_dir: str, out: Path, src_file: str | None, dst_file: str | None, fmt: str) -> None:
    """mindspore.transform_checkpoints in .ckpt, its outputs converted to `fmt` (MindSpore 2.10's own
    safetensors output mis-slices column-split weights: wo and w2 shards differ from its .ckpt ones)."""
    import mindspore as ms

    from cllama.checkpoint.convert import write_weights
    from cllama.checkpoint.model_dir import mindspore_logs_off
    from cllama.checkpoint.sources import ms_sources

    with mindspore_logs_off():  # its CRITICAL lines name work files; the error raised says it all
        ms.transform_checkpoints(src_dir, str(out), PREFIX, src_file, dst_file, output_format="ckpt")
    for path in out.glob("rank_*/*.ckpt") if fmt == "safetensors" else ():
        write_weights(ms_sources(path), path.with_suffix(".safetensors"), progress=False)
        path.unlink()


def _merged_file(out: Path, fmt: str) -> Path:
    """The full checkpoint a merge (no destination strategy) wrote into `out`."""
    return out / "rank_0" / f"{PREFIX}0{'.ckpt' if fmt == 'ckpt' else '.safetensors'}"


def _check_ranks(source: Source, src_file: str) -> None:
    need = device_count(read_strategy(src_file))
    have = shard_files(source.path)
    missing = [r for r in range(need) if r not in have]
    if missing:
        raise ValueError(f"{source.path}: the strategy has {need} ranks but rank folders {missing[:8]} hold "
                         "no weights; copy every rank's checkpoint into <folder>/rank_X/")
    if len(have) > need:
        raise ValueError(f"{source.path}: {len(have)} rank folders but the source strategy covers {need} ranks; "
                         "for a pipeline job pass the strategy of every stage (the folder of their files)")


def _full_sums(source: Source, src_file: str | None, work: Path) -> dict[str, str]:
    """Checksums of the full model a source represents (shards are merged first)."""
    if not source.sharded:
        return checksums(source.ckpt)
    merged = work / "merged_src"
    _run(_staged(source, work), merged, src_file, None, source.fmt)
    return checksums(_merged_file(merged, source.fmt))


def _copy_side_files(source: Source, out: Path) -> None:
    for name in ("config.json", "tokenizer.model", ADAPTER_CONFIG):
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)


def _full_name(folder: Path, fmt: str) -> str:
    """What a merged checkpoint is called: model.ckpt/.safetensors, or adapter.* for a LoRA run's step."""
    return (ADAPTER_FORMATS if (folder / ADAPTER_CONFIG).is_file() else FORMATS)[fmt]


def transform(src: str | os.PathLike, dst: str | os.PathLike, src_strategy: StrategyArg = None,
              dst_strategy: StrategyArg = None, verify: bool = True, overwrite: bool = False,
              progress: bool = True, fmt: str | None = None) -> dict:
    """Split (full -> dst_strategy shards), merge (shards -> full model dir) or re-shard (A -> B).

    `src_strategy`/`dst_strategy`: a strategy file, a folder of per-stage files, or layouts from
    `cllama.distributed.strategy.param_layouts`. A sharded `src` defaults to its own strategy.ckpt.
    `fmt`: the output's format, ckpt or safetensors (default: the source's). With `verify`, the
    output is turned back the other way and compared by per-tensor checksums before it is renamed
    into place. Returns a report (kind, ranks, tensors, fingerprint, format, seconds).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    dst = Path(dst).resolve()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists; choose a new --dst or pass --overwrite")
    source = find_source(src, src_strategy)
    if not source.sharded and dst_strategy is None:
        raise ValueError(f"{src}: already a full checkpoint; give --dst-strategy (or --dp/--mp/--pp) to split it")
    kind = "split" if not source.sharded else ("merge" if dst_strategy is None else "reshard")
    fmt = fmt or source.fmt
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {list(FORMATS)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)  # a killed earlier transform's DST.partial-PID and DST.work-PID-*
    tmp = temp_path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=work_prefix(dst)) as work_dir:
        work = Path(work_dir)
        src_file = _strategy_file(source.strategy, work, "src_strategy")
        dst_file = _strategy_file(dst_strategy, work, "dst_strategy")
        src_sums = None
        if source.sharded:
            _check_ranks(source, src_file)
        else:  # a split: every tensor needs a layout that divides it
            import mindspore as ms

            params = ms.load_checkpoint(str(source.ckpt), format=source.fmt)
            label = "destination layout" if isinstance(dst_strategy, Mapping) else str(dst_strategy)
            check_strategy(read_strategy(dst_file), {n: tuple(p.shape) for n, p in params.items()}, label)
            src_sums = tensor_checksums(params) if verify else None
            del params
        steps = tqdm(total=2 if verify else 1, desc=f"ckpt {kind}", disable=not progress)
        try:
            _run(_staged(source, work), tmp, src_file, dst_file, fmt)
            steps.update(1)
            _copy_side_files(source, tmp)
            if dst_file is None:
                shutil.move(str(_merged_file(tmp, fmt)), tmp / _full_name(tmp, fmt))
                shutil.rmtree(tmp / "rank_0")
            else:
                shutil.copyfile(dst_file, tmp / STRATEGY_FILE)
            report = {"kind": kind, "src": str(Path(src)), "dst": str(dst),
                      "ranks": len(shard_files(tmp)) if dst_file else 1, "format": fmt}
            if verify:
                report.update(_verify(source, tmp, src_file, dst_file, src_sums, work, fmt))
                steps.update(1)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            named = with_final_names(err, _user_names(work, tmp, dst), dst) if isinstance(err, Exception) else None
            if named is None:
                raise
            raise named.with_traceback(err.__traceback__) from None
        finally:
            steps.close()
    install(tmp, dst)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _verify(source: Source, out: Path, src_file: str | None, dst_file: str | None,
            src_sums: dict | None, work: Path, fmt: str) -> dict:
    """Turn the output back the other way and compare checksums with the input."""
    if dst_file is not None:  # sharded output: merge it and compare with the full input
        merged = work / "merged_dst"
        _run(_staged(Source(out, None, dst_file), work), merged, dst_file, None, fmt)
        got = checksums(_merged_file(merged, fmt))
        expected = src_sums if src_sums is not None else _full_sums(source, src_file, work)
        _compare(expected, got, "the merged output")
        return {"verified": True, "tensors": len(got), "fingerprint": fingerprint(got)}
    # full output: split it again with the source layout and compare every rank's shards
    merged = out / _full_name(out, fmt)
    sums = checksums(merged)
    if (out / "config.json").is_file():  # every parameter of the model (or every adapter) must be there
        import mindspore as ms

        from cllama.checkpoint.lora import LoraConfig, adapter_dir_config, adapter_shapes
        from cllama.checkpoint.names import check_names, param_shapes
        from cllama.config import ModelConfig

        config = ModelConfig.load(out)
        expected = param_shapes(config)
        if (out / ADAPTER_CONFIG).is_file():
            expected = adapter_shapes(config, LoraConfig.from_pet_config(adapter_dir_config(out)["pet_config"]))
        shapes = {n: tuple(p.shape) for n, p in ms.load_checkpoint(str(merged), format=fmt).items()}
        check_names(expected, shapes, f"merged {source.path}")
    resplit = work / "resplit"
    _run(_staged(Source(out, merged, None), work), resplit, None, src_file, source.fmt)
    again, original = shard_files(resplit), shard_files(source.path)
    if sorted(again) != sorted(original):
        raise ValueError(f"verification failed: {source.path} has ranks {sorted(original)} but its strategy "
                         f"gives {sorted(again)}; pass the strategy of every pipeline stage (their folder)")
    for rank, path in original.items():
        _compare(checksums(path), checksums(again[rank]), f"rank {rank}'s shards")
    return {"verified": True, "tensors": len(sums), "fingerprint": fingerprint(sums)}


def merge(step_dir: str | os.PathLike, dst: str | os.PathLike, strategy: StrategyArg = None, overwrite: bool = False,
          progress: bool = True, fmt: str | None = None) -> dict:
    """A sharded checkpoint (a sharded run's checkpoints/step_N/: rank_K/ shards + the strategy file
    MindSpore wrote) merged into a model directory, verified. `strategy` defaults to the folder's."""
    return transform(step_dir, dst, src_strategy=strategy, overwrite=overwrite, progress=progress, fmt=fmt)


def _user_names(work: Path, tmp: Path, dst: Path) -> dict[Path, Path]:
    """{temporary path: the user's path} for error messages: the output's temporary name -> `dst`, each
    staged link -> the shard it links."""
    names = {tmp: dst}
    for link in work.glob("staged-*/rank_*/*"):
        if link.is_symlink():
            names[link] = Path(os.readlink(link))
    return names


def check_rank(rank: int, dst_file: str | None, dst_strategy: StrategyArg) -> int:
    """`rank` if the destination layout has it (dp*mp*pp devices; one, a full checkpoint, without a
    strategy); else one error naming the layout and its ranks."""
    if dst_file is None:
        layout, count = "a full checkpoint (no --dst-strategy or --dp/--mp/--pp)", 1
    else:
        layouts = read_strategy(dst_file)
        count = device_count(layouts)
        layout = describe_layout(layouts)
        if not isinstance(dst_strategy, Mapping):
            layout = f"{dst_strategy} ({layout})"
    if not 0 <= rank < count:
        ranks = f"ranks 0-{count - 1}" if count > 1 else "only rank 0"
        raise ValueError(f"--rank {rank}: the destination layout {layout} has {ranks}; give one of them")
    return rank


def transform_rank(src: str | os.PathLike, rank: int, dst: str | os.PathLike,
                   src_strategy: StrategyArg = None, dst_strategy: StrategyArg = None) -> Path:
    """One destination rank's shard via `mindspore.transform_checkpoint_by_rank` (what a cluster
    node runs for its own ranks): reads only the source ranks `rank_list_for_transform` names.
    Writes `dst/rank_<rank>/checkpoint_<rank>.ckpt` atomically and returns it; on an error nothing
    is written (the work folder beside `dst` is removed)."""
    import mindspore as ms

    source = find_source(src, src_strategy)
    dst = Path(dst)
    out = dst / f"rank_{rank}" / f"{PREFIX}{rank}.ckpt"
    if source.fmt != "ckpt":
        raise ValueError(f"{src}: transform_checkpoint_by_rank reads .ckpt shards; merge safetensors ones with "
                         "`cllama ckpt transform` (all ranks) instead")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)  # a killed earlier run's DST.work-PID-*
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=work_prefix(dst)) as work_dir:
        work = Path(work_dir)
        src_file = _strategy_file(source.strategy, work, "src_strategy")
        dst_file = _strategy_file(dst_strategy, work, "dst_strategy")
        check_rank(rank, dst_file, dst_strategy)
        files = {r: str(p) for r, p in shard_files(source.path).items()} if source.sharded else {0: str(source.ckpt)}
        needed = ms.rank_list_for_transform(rank, src_file, dst_file)
        missing = [r for r in needed if r not in files]
        if missing:
            raise ValueError(f"{source.path}: rank {rank} needs source ranks {missing}, which are missing")
        tmp = work / f"{PREFIX}{rank}.ckpt"
        try:
            ms.transform_checkpoint_by_rank(rank, {r: files[r] for r in needed}, str(tmp), src_file, dst_file)
        except Exception as err:
            named = with_final_names(err, {tmp: out}, out)
            if named is None:
                raise
            raise named.with_traceback(err.__traceback__) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out
