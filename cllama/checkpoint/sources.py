"""Tensors of a checkpoint on disk as streams, under MindFormers names, never all in memory.

Each reader returns `TensorSource`s: name, shape, stored dtype and a `chunks(max_bytes)` generator
of the flat contents (row-major; bfloat16 as uint16 bits). Hugging Face safetensors and MindSpore
.ckpt files are read with plain file reads; torch files (`pytorch_model*.bin`, Meta's
`consolidated.NN.pth`) are memory-mapped and their pages released after each tensor.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cllama.checkpoint.ckpt_file import ITEMSIZE, CkptFile
from cllama.checkpoint.files import file_format, is_model_dir, weights_file
from cllama.checkpoint.names import HF_IGNORED, META_IGNORED, hf_to_ms_name, is_training_state, meta_to_ms_name
from cllama.checkpoint.safetensors_file import SafetensorsFile
from cllama.config import ModelConfig, check_kinds
from cllama.fileio import read_json

ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class TensorSource:
    """One tensor to convert: MindFormers name, shape, stored dtype, where it is read from."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "bfloat16"
    file: str
    chunks: Callable[[int], Iterator[np.ndarray]]  # max_bytes -> flat pieces, storage form

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


# ---- Hugging Face ---------------------------------------------------------------------------
def hf_weight_files(src: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, in transformers' order of preference:
    model.safetensors, its sharded index, pytorch_model.bin, its sharded index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).exists():
            return [src / single]
        if (src / index).exists():
            return _index_files(src / index)
        shards = sorted(src.glob(single.replace(".", "-*-of-*.", 1)))
        if shards:
            raise FileNotFoundError(f"{src / index}: missing; the shards {shards[0].name}... need "
                                    "their index file (download it with the shards)")
    hint = ""
    if list(src.glob("consolidated.*.pth")):
        hint = "; it holds Meta consolidated.NN.pth files: use `cllama convert meta2ms`"
    elif is_model_dir(src):
        hint = "; it is a cllama model directory: use `cllama convert ms2hf`"
    raise FileNotFoundError(f"{src}: no model.safetensors, model.safetensors.index.json, "
                            f"pytorch_model.bin or pytorch_model.bin.index.json{hint}")


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = read_json(index, "sharded-checkpoint index")["weight_map"]
    except (KeyError, TypeError):
        raise ValueError(f"{index}: not a sharded-checkpoint index (needs a `weight_map`)") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing; download it again")
    return files


def hf_sources(src: Path) -> list[TensorSource]:
    """Every weight of a Hugging Face Llama folder, as MindFormers-named streams."""
    sources, unmapped = [], []
    for path in hf_weight_files(src):
        named = _safetensors_tensors(path) if path.suffix == ".safetensors" else _torch_tensors(path)
        for hf_name, source in named:
            if HF_IGNORED.match(hf_name):
                continue
            ms_name = hf_to_ms_name(hf_name)
            if ms_name is None:
                unmapped.append(f"{hf_name} ({path.name})")
                continue
            source.name = ms_name
            sources.append(source)
    if unmapped:
        raise ValueError(f"{src}: weights with no Code Llama counterpart: {sorted(unmapped)}")
    return sources


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, TensorSource]]:
    st = SafetensorsFile(path)
    for name in st.keys():
        if st.dtype(name) not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} is {st.dtype(name)}; weights must be F32, F16 or BF16")
        yield name, TensorSource(name, st.shape(name), ST_DTYPES[st.dtype(name)], str(path),
                                 lambda max_bytes, n=name: st.chunks(n, max_bytes))


# ---- torch files (.bin, Meta .pth) -----------------------------------------------------------
def torch_load(path: Path) -> tuple[dict, bool]:
    """(state dict, memory-mapped?) of a torch file, with `weights_only=True`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as err:
        if "zip" not in str(err).lower() and "mmap" not in str(err).lower():
            raise ValueError(f"{path}: not a readable torch checkpoint ({err}); download it again") from None
    try:  # legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err}); download it again") from None


def _torch_tensors(path: Path) -> Iterator[tuple[str, TensorSource]]:
    state, mapped = torch_load(path)
    for name, t in state.items():
        dtype = torch_dtype_name(t, path, name)
        yield name, TensorSource(name, tuple(t.shape), dtype, str(path),
                                 lambda max_bytes, t=t: _torch_chunks([t], mapped, max_bytes))


def torch_dtype_name(t, path: Path, name: str) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in ITEMSIZE:
        raise ValueError(f"{path}: tensor {name!r} is {t.dtype}; weights must be float32, float16 or bfloat16")
    return dtype


def torch_numpy(t) -> np.ndarray:
    """Zero-copy numpy view of a CPU torch tensor; bfloat16 as uint16 bits."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _torch_chunks(tensors: list, mapped: bool, max_bytes: int) -> Iterator[np.ndarray]:
    """Flat pieces of each tensor in turn; memory-mapped pages are released after each."""
    for t in tensors:
        flat = np.ascontiguousarray(torch_numpy(t)).reshape(-1)
        step = max(1, max_bytes // flat.itemsize)
        for i in range(0, flat.size, step):
            yield flat[i:i + step]
        release_pages(t, mapped)


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_pages(t, mapped: bool) -> None:
    """Drop the resident pages of a tensor memory-mapped from a file (torch.load(mmap=True) maps
    files private and read-only in use, so the kernel re-reads them if touched again). Without this
    every page read stays counted in the process' RSS until the whole file is closed. Only pages
    lying wholly inside the tensor's storage are dropped; a no-op off Linux or for unmapped data."""
    if not mapped or not sys.platform.startswith("linux"):
        return
    storage = t.untyped_storage()
    start = -(-storage.data_ptr() // _PAGE) * _PAGE
    end = (storage.data_ptr() + storage.nbytes()) // _PAGE * _PAGE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


# ---- MindSpore -------------------------------------------------------------------------------
def ms_sources(path: Path) -> list[TensorSource]:
    """Model weights of a MindSpore .ckpt or safetensors file, MindFormers names (training-state
    entries skipped); a model directory's weights file when given the directory."""
    path = weights_file(path) if Path(path).is_dir() else Path(path)
    if file_format(path) == "safetensors":
        return [s for name, s in _safetensors_tensors(path) if not is_training_state(name)]
    f = CkptFile(path)
    return [TensorSource(n, f.shape(n), f.dtype(n), str(path),
                         lambda max_bytes, n=n: f.chunks(n, max_bytes))
            for n in f.keys() if not is_training_state(n)]


# ---- Meta consolidated.NN.pth ------------------------------------------------------------------
def meta_shard_files(src: Path) -> list[Path]:
    """consolidated.00.pth ... in order; a gap in the numbering names the missing file."""
    files = sorted(src.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{src}: no consolidated.NN.pth files (a Meta checkpoint folder holds "
                                "consolidated.00.pth ... and params.json)")
    numbers = sorted(int(f.name.split(".")[1]) for f in files)
    for i in range(numbers[-1] + 1):
        if i not in numbers:
            raise FileNotFoundError(f"{src / f'consolidated.{i:02d}.pth'}: model-parallel shard missing "
                                    f"(found {[f.name for f in files]}); download it again")
    return [src / f"consolidated.{i:02d}.pth" for i in numbers]


# Types of the params.json fields meta_config reads (cllama.config.kind_error); absent ones take defaults.
META_KINDS = {"dim": "int", "n_layers": "int", "n_heads": "int", "n_kv_heads": "int?", "vocab_size": "int?",
              "multiple_of": "int", "ffn_dim_multiplier": "float?", "norm_eps": "float", "rope_theta": "float"}


def read_params(src: Path) -> dict:
    """Meta's params.json, checked for the fields a ModelConfig needs."""
    path = src / "params.json"
    params = read_json(path, "Meta params.json", "a Meta checkpoint folder holds consolidated.NN.pth + params.json")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: must be a JSON object (Meta's params: dim, n_layers, n_heads, ...; "
                         f"got {type(params).__name__})")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    check_kinds(params, META_KINDS, str(path))
    return params


def meta_config(params: dict, vocab_rows: int, source: str, **overrides) -> ModelConfig:
    """ModelConfig from Meta's params (vocab_size -1 means: the embedding's row count)."""
    vocab = params.get("vocab_size", -1)
    values = dict(hidden_size=params["dim"], num_layers=params["n_layers"], num_heads=params["n_heads"],
                  n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                  vocab_size=vocab if vocab and vocab > 0 else vocab_rows,
                  multiple_of=params.get("multiple_of", 256),
                  ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                  rms_norm_eps=params.get("norm_eps", 1e-5), theta=params.get("rope_theta", 10000.0))
    return ModelConfig.from_dict({**values, **overrides}, source=source)


def meta_sources(src: Path, **config_overrides) -> tuple[list[TensorSource], ModelConfig]:
    """Every weight of a Meta checkpoint, shards concatenated and wq/wk permuted to rotate-half,
    with the ModelConfig of its params.json."""
    params = read_params(src)
    files = meta_shard_files(src)
    shards = [torch_load(f) for f in files]
    names = [n for n in shards[0][0] if n not in META_IGNORED]
    for f, (state, _) in zip(files[1:], shards[1:]):
        if [n for n in state if n not in META_IGNORED] != names:
            raise ValueError(f"{f}: holds other tensors than {files[0].name}; the shards come from "
                             "different checkpoints")
    plan = []
    for name in names:
        target = meta_to_ms_name(name)
        if target is None:
            raise ValueError(f"{files[0]}: tensor {name!r} has no Code Llama counterpart")
        plan.append((*target, [s[0][name] for s in shards], name))
    embedding = next((p for p in plan if p[0] == "model.tok_embeddings.embedding_weight"), None)
    vocab_rows = embedding[2][0].shape[0] if embedding else 0
    config = meta_config(params, vocab_rows, str(src / "params.json"), **config_overrides)
    mapped = all(m for _, m in shards)
    sources = []
    for ms_name, dim, parts, meta_name in plan:
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        dtype = torch_dtype_name(parts[0], files[0], meta_name)
        heads = {"wq": config.num_heads, "wk": config.n_kv_heads}.get(ms_name.split(".")[-2])
        if heads is not None and shape[0] != heads * config.head_dim:
            heads = None  # wrong shape: let the shape check report it
        chunks = _meta_chunks(parts, dim, heads and config.head_dim, mapped)
        sources.append(TensorSource(ms_name, tuple(shape), dtype, str(files[0]), chunks))
    return sources, config


def _meta_chunks(parts: list, dim: int | None, head_dim: int | None, mapped: bool):
    """chunks() of one Meta tensor: concatenated across shards on `dim`, rows of wq/wk permuted
    per head from interleaved (x0, x1), (x2, x3)... to rotate-half (x0, x2, ..., x1, x3, ...)."""

    def chunks(max_bytes: int) -> Iterator[np.ndarray]:
        if dim is None or len(parts) == 1 and head_dim is None:
            yield from _torch_chunks(parts[:1], mapped, max_bytes)
            return
        arrays = [torch_numpy(p) for p in parts]
        if dim == 1:  # blocks of whole rows, each the concatenation of the shards' rows
            row_bytes = sum(a.shape[1] for a in arrays) * arrays[0].itemsize
            step = max(1, max_bytes // row_bytes)
            for r in range(0, arrays[0].shape[0], step):
                yield np.concatenate([a[r:r + step] for a in arrays], axis=1).reshape(-1)
        elif head_dim is None:
            yield from _torch_chunks(parts, mapped, max_bytes)
            return
        else:
            for a in arrays:
                heads, dim_in = a.shape[0] // head_dim, a.shape[1]
                view = a.reshape(heads, head_dim // 2, 2, dim_in).transpose(0, 2, 1, 3)
                step = max(1, max_bytes // (head_dim * dim_in * a.itemsize))
                for h in range(0, heads, step):
                    yield np.ascontiguousarray(view[h:h + step]).reshape(-1)
        for p in parts:
            release_pages(p, mapped)

    return chunks
