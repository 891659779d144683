"""Model directories and weights in and out of a CodeLlama: strict loading, saving, random models.

A model directory holds `config.json` (ModelConfig, MindFormers keys), its weights as `model.ckpt`
(MindSpore checkpoint) or `model.safetensors` (MindSpore's safetensors), MindFormers names, model
parameters only (cllama.checkpoint.files), and optionally `tokenizer.model`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor

from cllama.checkpoint.files import FORMATS, check_format, check_weights, file_format, weights_file
from cllama.checkpoint.names import HF_IGNORED, check_names, hf_to_ms_name, is_training_state, param_shapes
from cllama.config import ModelConfig
from cllama.fileio import atomic_path, copy_file
from cllama.layers import DTYPE
from cllama.model import CodeLlama


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a torch tensor (bfloat16 widened to float32), MindSpore tensor or array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, Tensor):
        if value.dtype == ms.bfloat16:
            value = value.astype(ms.float32)
        return value.asnumpy()
    return np.asarray(value)


def load_state_dict(model: CodeLlama, state: Mapping[str, Any], source: str = "state dict") -> None:
    """Strictly load MindFormers-named arrays into the model (cast to its parameter dtype)."""
    shapes = {name: tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
              for name, value in state.items()}
    check_names(param_shapes(model.config), shapes, source)
    params = dict(model.parameters_and_names())
    for name, value in state.items():
        param = params[name]
        if isinstance(value, Tensor) and value.dtype == param.dtype:
            param.set_data(value)
        else:
            param.set_data(Tensor(to_numpy(value).astype(np.float32, copy=False), param.dtype))


def load_hf_weights(model: CodeLlama, source: Mapping[str, Any] | str | os.PathLike) -> None:
    """Load Hugging Face Llama weights: a state dict (torch/numpy) or a `.safetensors` file."""
    label = "Hugging Face state dict"
    if not isinstance(source, Mapping):
        from cllama.checkpoint.safetensors_file import SafetensorsFile

        st = SafetensorsFile(source)
        label = str(st.path)
        source = {name: st.get(name) for name in st.keys()}
    state, unmapped = {}, []
    for name, value in source.items():
        if HF_IGNORED.match(name):
            continue
        ms_name = hf_to_ms_name(name)
        if ms_name is None:
            unmapped.append(name)
        else:
            state[ms_name] = value
    if unmapped:
        raise ValueError(f"{label}: names with no Code Llama counterpart: {sorted(unmapped)}")
    load_state_dict(model, state, label)


def state_dict(model: CodeLlama) -> dict[str, ms.Parameter]:
    """The model's weights by MindFormers name (no cache buffers)."""
    names = param_shapes(model.config)
    return {name: p for name, p in model.parameters_and_names() if name in names}


@contextlib.contextmanager
def mindspore_logs_off() -> Iterator[None]:
    """MindSpore's Python log lines off for a call whose failure cllama reports itself: its CRITICAL
    "Failed to save the checkpoint file <temporary name>" would name a file the user never sees."""
    from mindspore import log

    logger = log._get_logger() if hasattr(log, "_get_logger") else None
    was = logger.disabled if logger is not None else False
    if logger is not None:
        logger.disabled = True
    try:
        yield
    finally:
        if logger is not None:
            logger.disabled = was


def save_weights(params, path: str | os.PathLike, integrated_save: bool = True) -> Path:
    """Write parameters ({name: Parameter} or a list of them) as a .ckpt or .safetensors file (the
    suffix says which), atomically. integrated_save=False keeps each rank's own slices (sharded runs)."""
    path = Path(path)
    items = params.items() if isinstance(params, dict) else ((p.name, p) for p in params)
    with atomic_path(path) as tmp, mindspore_logs_off():
        ms.save_checkpoint([{"name": n, "data": p} for n, p in items], str(tmp), integrated_save=integrated_save,
                           format=file_format(path))
    return path


def save_model_dir(model: CodeLlama, path: str | os.PathLike, tokenizer_model: str | os.PathLike | None = None,
                   fmt: str = "ckpt") -> Path:
    """Write config.json + model.ckpt or model.safetensors (`fmt`) (+ tokenizer.model); a weights file
    of the other format is removed. Files appear only when complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict(model), path / FORMATS[check_format(fmt)])
    for other in set(FORMATS.values()) - {FORMATS[fmt]}:
        (path / other).unlink(missing_ok=True)
    model.config.save(path / "config.json")
    if tokenizer_model is not None and Path(tokenizer_model).resolve() != (path / "tokenizer.model").resolve():
        copy_file(tokenizer_model, path / "tokenizer.model")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, ms.Parameter]:
    """Model parameters of a .ckpt or .safetensors file; training-state entries are dropped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    check_weights(path)
    try:
        loaded = ms.load_checkpoint(str(path), format=file_format(path))
    except (ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable MindSpore checkpoint ({reason})") from None
    return {n: p for n, p in loaded.items() if not is_training_state(n)}


def load_model_dir(path: str | os.PathLike, compute_dtype=None, **overrides: Any) -> CodeLlama:
    """Build a CodeLlama from a model directory (config.json + model.ckpt or model.safetensors);
    strict on names."""
    path = Path(path)
    config = ModelConfig.load(path)
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides}, source=str(path / "config.json"))
    weights = weights_file(path)
    model = CodeLlama(config, compute_dtype=compute_dtype)
    load_state_dict(model, read_checkpoint(weights), str(weights))
    model.set_train(False)
    return model


def random_model(config: ModelConfig, seed: int = 0) -> CodeLlama:
    """A CodeLlama with reproducible random weights (normal, std 0.02; norms 1)."""
    model = CodeLlama(config)
    rng = np.random.default_rng(seed)
    params = dict(model.parameters_and_names())
    for name, shape in param_shapes(config).items():
        is_norm = len(shape) == 1
        values = np.ones(shape, np.float32) if is_norm else rng.normal(0.0, 0.02, shape).astype(np.float32)
        params[name].set_data(Tensor(values, DTYPE[config.param_init_type]))
    return model


def save_random_model(path: str | os.PathLike, config: ModelConfig | str = "tiny", seed: int = 0,
                      tokenizer_model: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A model directory with random weights (`random_model`) and a tokenizer: the one given, else
    the bundled Llama 2 one, extended to Code Llama's 32016 pieces when the vocabulary has them. A
    non-empty `path` is refused unless `overwrite`; it is replaced whole when the new one is complete."""
    from cllama.fileio import atomic_path, check_destination
    from cllama.tokenizer import bundled_tokenizer_path, check_tokenizer, extend_tokenizer

    config = ModelConfig.from_name(config) if isinstance(config, str) else config
    path = check_destination(path, overwrite)
    if tokenizer_model is not None:
        check_tokenizer(tokenizer_model)  # before anything is written
    with atomic_path(path) as tmp:
        tmp.mkdir()
        if tokenizer_model is None:
            tokenizer_model = bundled_tokenizer_path()
            if config.vocab_size == 32016:
                tokenizer_model = extend_tokenizer(tokenizer_model, tmp / "tokenizer.model")
        save_model_dir(random_model(config, seed), tmp, tokenizer_model)
    return path


def model_or_random(model_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                    config: ModelConfig | str = "tiny", seed: int = 0) -> Path:
    """`model_dir` when given; else a random model directory `<out_dir>/random_model` (preset name or
    ModelConfig `config`), built and announced: the stand-in a stage uses when the user has no
    checkpoint at hand."""
    if model_dir:
        return Path(model_dir)
    path = save_random_model(Path(out_dir) / "random_model", config, seed, overwrite=True)  # the stand-in, rebuilt
    name = config if isinstance(config, str) else f"{ModelConfig.load(path).num_params():,}-parameter"
    print(f"No model given: built a RANDOM {name} model (seed {seed}) in {path}; its outputs are "
          "gibberish, every step of the path is real. Pass a converted or trained model directory for real numbers.")
    return path


def tokenizer_of(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Optional[Path]:
    """The tokenizer to use with a model directory: `tokenizer` when given, else the directory's
    tokenizer.model when present, else None."""
    if tokenizer:
        return Path(tokenizer)
    path = Path(model_dir) / "tokenizer.model"
    return path if path.is_file() else None
