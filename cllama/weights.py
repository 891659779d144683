"""Weights in and out of the model: the HF <-> MindFormers name map, strict loading, model dirs.

A model directory holds `config.json` (ModelConfig, MindFormers keys), `model.ckpt` (MindSpore
checkpoint, MindFormers names, model parameters only) and optionally `tokenizer.model`.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor

from cllama.config import ModelConfig
from cllama.model import DTYPE, CodeLlama, param_shapes

# (HF regex, MindFormers template); layer index is group 1.
_NAME_MAP = [
    (r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "model.layers.{}.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "model.layers.{}.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "model.layers.{}.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "model.layers.{}.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "model.layers.{}.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "model.layers.{}.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "model.layers.{}.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "model.layers.{}.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "model.layers.{}.ffn_norm.weight"),
    (r"model\.norm\.weight", "model.norm_out.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_HF_TO_MS = [(re.compile(f"^{hf}$"), ms_name) for hf, ms_name in _NAME_MAP]
_MS_TO_HF = [(re.compile("^" + re.escape(ms_name).replace(r"\{\}", r"(\d+)") + "$"),
              hf.replace(r"(\d+)", "{}").replace("\\", "")) for hf, ms_name in _NAME_MAP]

# Non-model entries MindSpore/MindFormers training checkpoints carry; never read as weights.
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "global_step",
                           "learning_rate", "scale_sense", "loss_scale", "current_iterator_step",
                           "epoch_num", "step_num", "last_overflow_iterator_step")

# Files under a HF checkpoint folder that are not weights but belong to the rotary cache.
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_to_ms_name(name: str) -> str | None:
    """MindFormers name for a Hugging Face Llama parameter name, or None if it has none."""
    for pattern, template in _HF_TO_MS:
        m = pattern.match(name)
        if m:
            return template.format(*m.groups())
    return None


def ms_to_hf_name(name: str) -> str | None:
    """Hugging Face name for a MindFormers parameter name, or None if it has none."""
    for pattern, template in _MS_TO_HF:
        m = pattern.match(name)
        if m:
            return template.format(*m.groups())
    return None


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


def check_names(expected: Mapping[str, tuple], found: Mapping[str, tuple], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped parameter."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{n}: expected {tuple(expected[n])}, found {tuple(found[n])}"
                 for n in expected if n in found and tuple(expected[n]) != tuple(found[n])]
    if missing or unexpected or misshaped:
        lines = [f"{source}: weights do not match the model config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items))
        lines.append("  fix: use the config.json that came with these weights, or the right preset")
        raise ValueError("\n".join(lines))


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
        from cllama.stfile import SafetensorsFile

        st = SafetensorsFile(source)
        label = str(st.path)
        source = {name: st.get(name) for name in st.keys()}
    state, unmapped = {}, []
    for name, value in source.items():
        if _HF_IGNORED.match(name):
            continue
        ms_name = hf_to_ms_name(name)
        if ms_name is None:
            unmapped.append(name)
        else:
            state[ms_name] = value
    if unmapped:
        raise ValueError(f"{label}: names with no Code Llama counterpart: {sorted(unmapped)}")
    load_state_dict(model, state, label)


def state_dict(model: CodeLlama) -> dict[str, Tensor]:
    """The model's weights by MindFormers name (no cache buffers)."""
    names = param_shapes(model.config)
    return {name: p for name, p in model.parameters_and_names() if name in names}


def save_model_dir(model: CodeLlama, path: str | os.PathLike,
                   tokenizer_model: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.ckpt (+ tokenizer.model). Files appear only when complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.partial.ckpt"
    ms.save_checkpoint([{"name": n, "data": p} for n, p in state_dict(model).items()], str(tmp))
    os.replace(tmp, path / "model.ckpt")
    model.config.save(path / "config.json")
    if tokenizer_model is not None and Path(tokenizer_model).resolve() != (path / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, path / "tokenizer.model.tmp")
        os.replace(path / "tokenizer.model.tmp", path / "tokenizer.model")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, ms.Parameter]:
    """Model parameters of a MindSpore checkpoint; training-state entries are dropped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        loaded = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable MindSpore checkpoint ({err})") from None
    return {n: p for n, p in loaded.items() if not n.startswith(TRAINING_STATE_PREFIXES)}


def load_model_dir(path: str | os.PathLike, compute_dtype=None, **overrides: Any) -> CodeLlama:
    """Build a CodeLlama from a model directory (config.json + model.ckpt); strict on names."""
    path = Path(path)
    config = ModelConfig.load(path)
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides}, source=str(path / "config.json"))
    model = CodeLlama(config, compute_dtype=compute_dtype)
    ckpt = path / "model.ckpt"
    load_state_dict(model, read_checkpoint(ckpt), str(ckpt))
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
