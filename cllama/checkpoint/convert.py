"""Weight conversion, streaming: Hugging Face / Meta checkpoints -> a cllama model directory
(MindSpore .ckpt, MindFormers names) and back to Hugging Face safetensors.

Memory stays bounded by one chunk (CHUNK_BYTES) plus its cast, never by the model: every tensor
is read, cast and written piece by piece (sources.py, ckpt_file.py, safetensors_file.py). Outputs are
written under temporary names and renamed when complete. bfloat16 <-> float32 is exact.
"""
from __future__ import annotations

import os
import re
import time
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cllama.checkpoint.ckpt_file import ITEMSIZE, CkptWriter
from cllama.checkpoint.files import FORMATS, check_format, file_format, weights_file
from cllama.checkpoint.names import check_names, model_order, ms_to_hf_name, param_shapes
from cllama.checkpoint.safetensors_file import SafetensorsWriter, bf16_bits_to_float32, float32_to_bf16_bits
from cllama.checkpoint.sources import TensorSource, hf_sources, hf_weight_files, meta_sources, ms_sources
from cllama.config import DTYPES, ModelConfig
from cllama.fileio import atomic_path, check_destination, copy_file, read_json, write_json
from cllama.tokenizer import load_sentencepiece

CHUNK_BYTES = 32 << 20
DEFAULT_SHARD_SIZE = "5GB"
_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")


class VocabularyWarning(UserWarning):
    """The tokenizer and the embedding table disagree on the vocabulary size."""


# ---- casting ----------------------------------------------------------------------------------
def cast(chunk: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast a storage-form array (bfloat16 as uint16 bits) between float32/float16/bfloat16.
    bfloat16 -> float32 is exact; narrowing rounds to nearest even, like torch and MindSpore."""
    if src == dst:
        return chunk
    values = bf16_bits_to_float32(chunk) if src == "bfloat16" else chunk
    if dst == "bfloat16":
        return float32_to_bf16_bits(values.astype(np.float32, copy=False))
    return values.astype(np.float32 if dst == "float32" else np.float16, copy=False)


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, mininterval=0.5)


def _stream(source: TensorSource, dtype: str, bar) -> Iterable[np.ndarray]:
    """The tensor's pieces cast to `dtype`, counted on the progress bar."""
    bar.set_postfix_str(source.name, refresh=False)
    for chunk in source.chunks(CHUNK_BYTES):
        out = cast(chunk, source.dtype, dtype)
        yield out
        bar.update(out.nbytes)


# ---- checks -------------------------------------------------------------------------------------
def check_sources(sources: Sequence[TensorSource], config: ModelConfig, label: str) -> None:
    """One error for duplicate, missing, unexpected or mis-shaped weights against the config."""
    seen: dict[str, str] = {}
    for s in sources:
        if s.name in seen:
            raise ValueError(f"{label}: {s.name} appears twice ({seen[s.name]}, {s.file})")
        seen[s.name] = s.file
    check_names(param_shapes(config), {s.name: s.shape for s in sources}, label)


def tokenizer_size(folder: str | os.PathLike) -> tuple[int, str] | None:
    """(number of token ids, description) of the tokenizer files in a folder: tokenizer.model
    pieces (or tokenizer.json's vocabulary) plus added tokens from tokenizer.json and
    added_tokens.json; None when the folder has no tokenizer."""
    folder = Path(folder)
    base, what, added = 0, "", {}
    if (folder / "tokenizer.model").exists():
        base = load_sentencepiece(folder / "tokenizer.model").get_piece_size()
        what = f"tokenizer.model: {base} pieces"
    if (folder / "tokenizer.json").exists():
        doc = read_json(folder / "tokenizer.json", "tokenizer.json")
        added.update({t["content"]: t["id"] for t in doc.get("added_tokens") or []})
        if not base:
            base = len((doc.get("model") or {}).get("vocab") or {})
            what = f"tokenizer.json: {base} tokens"
    if (folder / "added_tokens.json").exists():
        added.update(read_json(folder / "added_tokens.json", "added_tokens.json"))
    extra = sorted((i, t) for t, i in added.items() if i >= base)
    if extra:
        what += ("; " if what else "") + "added tokens " + ", ".join(f"{t}={i}" for i, t in extra)
    count = max([base] + [i + 1 for i, _ in extra])
    return (count, what) if count else None


def check_vocab(folder: str | os.PathLike, vocab_size: int) -> str | None:
    """Warn (VocabularyWarning) when the folder's tokenizer and the embedding's rows disagree;
    returns the message, or None when they agree or there is no tokenizer."""
    found = tokenizer_size(folder)
    if found is None or found[0] == vocab_size:
        return None
    n, what = found
    if n > vocab_size:
        msg = (f"{folder}: the tokenizer has {n} token ids ({what}) but the embedding has {vocab_size} "
               f"rows: ids {vocab_size}..{n - 1} would index past the embedding, never feed them to "
               "this model (Code Llama 34B and Python models have no infilling tokens)")
    else:
        msg = (f"{folder}: the tokenizer has {n} token ids ({what}) but the embedding has {vocab_size} "
               f"rows: rows {n}..{vocab_size - 1} are never used; for infilling with a 32016-row model "
               "use a 32016-piece tokenizer (`cllama tokenizer extend`)")
    warnings.warn(msg, VocabularyWarning, stacklevel=3)
    return msg


def _distinct(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        raise ValueError(f"--dst {dst}: must differ from --src (the converted config.json would "
                         "replace the source's)")


# ---- writers ------------------------------------------------------------------------------------
def write_weights(sources: Sequence[TensorSource], path: Path, dtype: str | None = None,
                  progress: bool = True, desc: str = "convert") -> Path:
    """Stream the sources into one weights file, a MindSpore .ckpt or (MindSpore's) safetensors by
    `path`'s suffix (`path` appears only when complete)."""
    total = sum(s.nbytes // ITEMSIZE[s.dtype] * ITEMSIZE[dtype or s.dtype] for s in sources)
    if file_format(path) == "ckpt":
        writer = CkptWriter(path)
    else:  # the header MindSpore's save_checkpoint(format="safetensors") writes: metadata {"format": "ms"}
        writer = SafetensorsWriter(path, [(s.name, _ST_CODES[dtype or s.dtype], s.shape) for s in sources],
                                   metadata={"format": "ms"})
    with _progress(total, desc, progress) as bar, writer:
        for s in sources:
            if isinstance(writer, CkptWriter):
                writer.begin(s.name, s.shape, dtype or s.dtype)
            else:
                writer.begin(s.name)
            for piece in _stream(s, dtype or s.dtype, bar):
                writer.write(piece)
    return path


def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '64KiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)(I?)B?", str(size).strip().upper())
    if not m:
        raise ValueError(f"--max-shard-size {size!r}: write e.g. 5GB, 500MB, 2GiB or a byte count")
    value, unit, binary = m.groups()
    return int(float(value) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def write_safetensors(sources: Sequence[TensorSource], dst: Path, dtype: str | None = None,
                      max_shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True,
                      desc: str = "convert") -> list[Path]:
    """Stream the sources (Hugging Face names) into model.safetensors, or shards of at most
    `max_shard_size` plus model.safetensors.index.json. Files appear only when all are complete."""
    limit = parse_size(max_shard_size)
    sizes = [s.nbytes // ITEMSIZE[s.dtype] * ITEMSIZE[dtype or s.dtype] for s in sources]
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    done: list[Path] = []
    try:
        with _progress(sum(sizes), desc, progress) as bar:
            for name, members in zip(names, shards):
                specs = [(sources[i].name, _ST_CODES[dtype or sources[i].dtype], sources[i].shape)
                         for i in members]
                with SafetensorsWriter(dst / name, specs) as writer:
                    for i in members:
                        writer.begin(sources[i].name)
                        for piece in _stream(sources[i], dtype or sources[i].dtype, bar):
                            writer.write(piece)
                    done.append(writer.close(rename=False))
    except BaseException:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        raise
    final = [dst / name for name in names]
    for tmp, path in zip(done, final):
        os.replace(tmp, path)
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {sources[i].name: names[k] for k, members in enumerate(shards) for i in members}}
        write_json(dst / "model.safetensors.index.json", index)
        final.append(dst / "model.safetensors.index.json")
    for stale in {p for pattern in _HF_WEIGHT_FILES for p in dst.glob(pattern)} - set(final):
        stale.unlink()  # left by an earlier conversion with another sharding
    return final


def _copy_tokenizer(src: Path, dst: Path) -> Path | None:
    if not (src / "tokenizer.model").exists():
        return None
    return copy_file(src / "tokenizer.model", dst / "tokenizer.model")


def _summary(dst: Path, files: list[Path], sources: Sequence[TensorSource], dtype: str,
             start: float, warned: list[str | None]) -> dict:
    return {"dst": str(dst), "files": [str(f) for f in files], "tensors": len(sources),
            "parameters": int(sum(np.prod(s.shape, dtype=np.int64) for s in sources)),
            "bytes": int(sum(f.stat().st_size for f in files)), "dtype": dtype,
            "seconds": round(time.perf_counter() - start, 3), "warnings": [w for w in warned if w]}


def _uniform_dtype(sources: Sequence[TensorSource], dtype: str | None) -> str:
    """The output dtype: the one asked for, else the sources' most common one."""
    if dtype:
        return dtype
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.dtype] = counts.get(s.dtype, 0) + s.nbytes
    return max(counts, key=counts.get) if counts else "float32"


# ---- the three conversions ----------------------------------------------------------------------
SOURCE_FORMATS = ("hf", "meta", "ms")  # what `convert` reads: Hugging Face, Meta, a cllama model directory


def _to_model_dir(src: Path, dst: Path, sources: Sequence[TensorSource], config: ModelConfig, dtype: str | None,
                  label: str, progress: bool, desc: str, start: float, fmt: str) -> dict:
    """Check the sources against the config and write the model directory (weights as `fmt`)."""
    check_sources(sources, config, label)
    warned = [check_vocab(src, config.vocab_size)]
    dst.mkdir(parents=True, exist_ok=True)
    ckpt = write_weights(_model_order(sources, config), dst / FORMATS[check_format(fmt)], dtype, progress, desc=desc)
    for stale in set(FORMATS.values()) - {ckpt.name}:
        (dst / stale).unlink(missing_ok=True)
    config.save(dst / "config.json")
    tok = _copy_tokenizer(src, dst)
    return _summary(dst, [ckpt], sources, config.param_init_type, start, warned) | {"tokenizer": tok and str(tok)}


def hf_to_ms(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
             progress: bool = True, fmt: str = "ckpt") -> dict:
    """Hugging Face Llama folder (config.json + safetensors / sharded / pytorch_model*.bin) ->
    cllama model directory (config.json, model.ckpt or with fmt "safetensors" model.safetensors,
    tokenizer.model if present). `dtype` None keeps the stored dtype. Returns a summary dict."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_dtype(dtype)
    _distinct(src, dst)
    hf_config = read_json(src / "config.json", "Hugging Face config.json",
                          "a Hugging Face checkpoint folder ships its config.json next to the weights")
    if not isinstance(hf_config, dict) or "num_hidden_layers" not in hf_config:
        raise ValueError(f"{src / 'config.json'}: not a Hugging Face Llama config (no num_hidden_layers)")
    sources = hf_sources(src)
    config = ModelConfig.from_hf(src / "config.json", param_init_type=_uniform_dtype(sources, dtype))
    files = ", ".join(p.name for p in hf_weight_files(src))
    return _to_model_dir(src, dst, sources, config, dtype, f"{src} ({files} against config.json)", progress,
                         "hf2ms", start, fmt)


def meta_to_ms(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
               seq_length: int = 16384, progress: bool = True, fmt: str = "ckpt") -> dict:
    """Meta checkpoint folder (consolidated.NN.pth + params.json [+ tokenizer.model]) -> cllama
    model directory; shards concatenated, wq/wk permuted to rotate-half RoPE."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_dtype(dtype)
    _distinct(src, dst)
    sources, config = meta_sources(src, seq_length=seq_length)
    config.param_init_type = _uniform_dtype(sources, dtype)
    n = len(list(src.glob("consolidated.*.pth")))
    label = (f"{src} ({n} consolidated.NN.pth shard(s) against params.json; if shapes fall short, a shard "
             "may be missing)")
    return _to_model_dir(src, dst, sources, config, dtype, label, progress, "meta2ms", start, fmt)


def ms_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
             max_shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """cllama model directory -> Hugging Face folder: safetensors (sharded above `max_shard_size`,
    with the index), a config.json transformers' LlamaForCausalLM loads, tokenizer.model."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_dtype(dtype)
    _distinct(src, dst)
    config = ModelConfig.load(src)
    weights = weights_file(src)
    sources = ms_sources(weights)
    check_sources(sources, config, f"{weights} (against config.json)")
    out_dtype = _uniform_dtype(sources, dtype)
    warned = [check_vocab(src, config.vocab_size)]
    ordered = _model_order(sources, config)
    for s in ordered:
        s.name = ms_to_hf_name(s.name)
    dst.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(ordered, dst, dtype, max_shard_size, progress, desc="ms2hf")
    write_json(dst / "config.json", config.to_hf() | {"torch_dtype": out_dtype, "dtype": out_dtype})
    tok = _copy_tokenizer(src, dst)
    return _summary(dst, files, ordered, out_dtype, start, warned) | {"tokenizer": tok and str(tok)}


def convert(source_format: str, src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            max_shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True, fmt: str = "ckpt",
            overwrite: bool = False) -> dict:
    """Convert `src` of `source_format` ('hf' or 'meta' -> a cllama model directory with weights as
    `fmt`, ckpt or safetensors; 'ms', a model directory -> a Hugging Face folder, sharded above
    `max_shard_size`). A non-empty `dst` is refused unless `overwrite`; the result is written beside
    it and replaces it whole when complete. Returns a summary dict."""
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"source format {source_format!r}: choose one of {list(SOURCE_FORMATS)}")
    src, dst = Path(src), check_destination(dst, overwrite)
    _distinct(src, dst)
    with atomic_path(dst) as tmp:
        if source_format == "ms":
            summary = ms_to_hf(src, tmp, dtype, max_shard_size, progress)
        elif source_format == "hf":
            summary = hf_to_ms(src, tmp, dtype, progress, fmt)
        else:
            summary = meta_to_ms(src, tmp, dtype, progress=progress, fmt=fmt)
    moved = {"dst": str(dst), "files": [str(dst / Path(f).name) for f in summary["files"]]}
    if summary.get("tokenizer"):
        moved["tokenizer"] = str(dst / "tokenizer.model")
    return summary | moved


def result_format(source_format: str) -> str:
    """The format a conversion from `source_format` writes."""
    return "hf" if source_format == "ms" else "ms"


def _model_order(sources: Sequence[TensorSource], config: ModelConfig) -> list[TensorSource]:
    by_name = {s.name: s for s in sources}
    return [by_name[n] for n in model_order(by_name, config)]


# ---- verification ---------------------------------------------------------------------------------
def read_sources(path: str | os.PathLike, fmt: str) -> list[TensorSource]:
    """The weights of a folder as MindFormers-named streams; `fmt` 'hf', 'meta' or 'ms'."""
    path = Path(path)
    if fmt == "hf":
        return hf_sources(path)
    if fmt == "meta":
        return meta_sources(path)[0]
    if fmt == "ms":
        return ms_sources(path)
    raise ValueError(f"format {fmt!r}: choose one of {list(SOURCE_FORMATS)}")


def tensor_table(path: str | os.PathLike, fmt: str, dtype: str | None = None, progress: bool = False):
    """pandas DataFrame, one row per weight (MindFormers name, model order): shape, stored dtype,
    crc32 of the values (cast to `dtype` first, as a conversion to it would, then widened to
    float32), mean and std. Equal crc32s across a conversion mean equal tensors."""
    import pandas as pd

    sources = read_sources(path, fmt)
    rows = []
    total = sum(s.nbytes for s in sources)
    with _progress(total, f"checksums {Path(path).name}", progress) as bar:
        for s in sources:
            target = dtype or s.dtype
            crc, total, squares, count = 0, 0.0, 0.0, 0
            for piece in _stream(s, target, bar):
                values = cast(piece, target, "float32")
                crc = zlib.crc32(values.view(np.uint8), crc)
                total += float(values.sum(dtype=np.float64))
                squares += float(np.square(values, dtype=np.float64).sum())
                count += values.size
            mean = total / max(count, 1)
            rows.append({"name": s.name, "shape": tuple(s.shape), "dtype": s.dtype, "crc32": f"{crc:08x}",
                         "mean": mean, "std": max(squares / max(count, 1) - mean * mean, 0.0) ** 0.5})
    table = pd.DataFrame(rows)
    try:
        order = {n: i for i, n in enumerate(param_shapes(_config_for(path, fmt)))}
        table = table.sort_values("name", key=lambda c: c.map(lambda n: order.get(n, len(order))))
    except (ValueError, FileNotFoundError, KeyError):
        pass
    return table.reset_index(drop=True)


def compare_tables(source, result):
    """Join two tensor_table()s on name: shapes and crc32s side by side and a `match` column
    (False also for a tensor present on one side only)."""
    both = source.merge(result, on="name", how="outer", suffixes=("_source", "_result"), indicator=True,
                         sort=False)
    both["match"] = ((both["_merge"] == "both") & (both["shape_source"] == both["shape_result"])
                     & (both["crc32_source"] == both["crc32_result"]))
    return both.drop(columns="_merge")


def save_random_hf(folder: str | os.PathLike, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """A random Hugging Face Llama checkpoint (transformers' save_pretrained) with the shapes of a
    cllama preset: a stand-in for a downloaded checkpoint in demos and tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = ModelConfig.from_name(preset, **overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config.to_hf())).save_pretrained(folder)
    return Path(folder)


def source_or_random_hf(source_dir: str | os.PathLike | None, source_format: str, out_dir: str | os.PathLike,
                        preset: str = "tiny", seed: int = 0, **overrides) -> tuple[Path, str]:
    """(folder, format) to convert: `source_dir` as given, else a random Hugging Face checkpoint built
    in `<out_dir>/random_hf` (save_random_hf) and announced, format "hf"."""
    if source_dir:
        return Path(source_dir), source_format
    folder = save_random_hf(Path(out_dir) / "random_hf", preset, seed, **overrides)
    print(f"No source given: built a RANDOM Hugging Face Llama ({preset}, {overrides or 'preset shapes'}, seed {seed}) "
          f"in {folder} with transformers' save_pretrained, to demonstrate the conversion.")
    return folder, "hf"


def verify_conversion(source_format: str, src: str | os.PathLike, dst: str | os.PathLike, dtype: str,
                      progress: bool = True):
    """Both sides of a conversion read back tensor by tensor (the source cast to the output `dtype`,
    as the conversion does): compare_tables of their tensor_tables, every `match` True when the
    conversion is exact."""
    return compare_tables(tensor_table(src, source_format, dtype=dtype, progress=progress),
                          tensor_table(dst, result_format(source_format), progress=progress))


def _config_for(path: str | os.PathLike, fmt: str) -> ModelConfig:
    path = Path(path)
    if fmt == "hf":
        return ModelConfig.from_hf(path / "config.json")
    if fmt == "meta":
        return meta_sources(path)[1]
    return ModelConfig.load(path if path.is_dir() else path.parent)
