"""Where weights live on disk (pure, no MindSpore import): a model directory holds `config.json` and
its weights as `model.ckpt` (a MindSpore checkpoint) or `model.safetensors` (what
`mindspore.save_checkpoint(..., format="safetensors")` writes, MindFormers names), and optionally
`tokenizer.model`; a rank shard is a `rank_K/` folder's `.ckpt` or `.safetensors` file."""
from __future__ import annotations

import os
from pathlib import Path

FORMATS = {"ckpt": "model.ckpt", "safetensors": "model.safetensors"}  # weights file per format
SUFFIXES = {".ckpt": "ckpt", ".safetensors": "safetensors"}
STATE_FILES = ("optimizer.ckpt", "optimizer.safetensors")  # training state beside the weights, never weights


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {list(FORMATS)} (MindSpore .ckpt or safetensors)")
    return fmt


def file_format(path: str | os.PathLike) -> str:
    """'ckpt' or 'safetensors', from a weights file's suffix."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: not a weights file; expected a .ckpt or .safetensors file")
    return SUFFIXES[path.suffix]


def weights_file(model_dir: str | os.PathLike) -> Path:
    """The weights file of a model directory: model.ckpt or model.safetensors (one clear error when it
    has neither, or both)."""
    model_dir = Path(model_dir)
    found = [model_dir / name for name in FORMATS.values() if (model_dir / name).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{model_dir}: holds both model.ckpt and model.safetensors; keep the one to use")
    raise FileNotFoundError(f"{model_dir}: no model.ckpt or model.safetensors; a model directory holds config.json "
                            "and its weights (convert them with `cllama convert hf2ms`, or `cllama model init`)")


def is_model_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in FORMATS.values())


def shard_name(rank: int, fmt: str = "ckpt") -> str:
    """Rank K's weights file in MindFormers' layout: `checkpoint_K.ckpt` (or `.safetensors`)."""
    return f"checkpoint_{rank}{Path(FORMATS[check_format(fmt)]).suffix}"


def shard_file(rank_dir: str | os.PathLike) -> Path | None:
    """The weights file of a `rank_K/` folder (optimizer state beside it is skipped); the last by name
    when there are several; None when it holds none."""
    files = sorted(p for p in Path(rank_dir).iterdir() if p.suffix in SUFFIXES and p.name not in STATE_FILES)
    return files[-1] if files else None


def check_weights(path: str | os.PathLike) -> Path:
    """`path` after its headers were checked against the file by cllama's own readers (ckpt_file,
    safetensors_file: lengths and offsets inside the file, known dtypes, sizes matching shapes): a
    damaged or truncated file is one ValueError naming it, before MindSpore reads it."""
    path = Path(path)
    if file_format(path) == "ckpt":
        from cllama.checkpoint.ckpt_file import CkptFile

        CkptFile(path)
    else:
        from cllama.checkpoint.safetensors_file import SafetensorsFile

        SafetensorsFile(path)
    return path


def check_model_dir(path: str | os.PathLike, where: str = "") -> Path:
    """`path` if it is a whole model directory: config.json (a valid ModelConfig), weights whose headers
    agree with the file, and tokenizer.model (when present) a SentencePiece model; else one clear error
    (prefixed with `where`, the setting that named it, when the directory itself is missing). Reads
    headers only: cheap, and before MindSpore touches the weights."""
    from cllama.config import ModelConfig
    from cllama.tokenizer import check_tokenizer

    path = Path(path)
    missing = FileNotFoundError(f"{where}{path} is not a model directory: a model directory holds config.json and "
                                "model.ckpt (or model.safetensors); convert weights with `cllama convert hf2ms` or "
                                "make one with `cllama model init`")
    if not (path / "config.json").is_file():
        raise missing
    ModelConfig.load(path)  # a damaged config.json is named before missing weights
    if not is_model_dir(path):
        raise missing
    check_weights(weights_file(path))
    if (path / "tokenizer.model").exists():
        check_tokenizer(path / "tokenizer.model")
    return path
