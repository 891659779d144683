"""LoRA adapters on a CodeLlama and on disk (names and checks: cllama.checkpoint.lora).

An adapter directory holds `adapter.ckpt` or `adapter.safetensors` (MindFormers names
`<linear>.mindpet_delta_lora_a/b`, float32, exactly what `mindspore.save_checkpoint` writes) and
`adapter_config.json`: {"pet_config": MindFormers' pet_config, "base_model": {"config": the base's
config.json, "path": where it was}}. A LoRA training step directory is one (plus optimizer state).

`add_lora` gives a model adapters and freezes its base; `load_adapter` reads an adapter onto a model;
`merge_into` folds adapters into the base weights (W + alpha/rank * B A) in place; `export_peft` and
`import_peft` translate to and from Hugging Face PEFT (`adapter_model.safetensors` + its config).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from cllama.checkpoint.files import check_format, check_model_dir, check_weights, file_format
from cllama.checkpoint.lora import (
    ADAPTER_CONFIG,
    ADAPTER_FORMATS,
    LORA_A,
    LORA_B,
    PEFT_WEIGHTS,
    LoraConfig,
    adapter_dir_config,
    adapter_file,
    adapter_shapes,
    is_adapter_name,
    ms_to_peft_name,
    peft_target_modules,
    peft_to_ms_name,
    targets_regex,
)
from cllama.checkpoint.names import check_names
from cllama.config import ModelConfig
from cllama.fileio import atomic_path, read_json, write_json

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "ffn_hidden_size", "vocab_size")


def add_lora(model, lora: LoraConfig, seed: int = 0, source: str = "pet_config") -> list[str]:
    """Give every linear `lora.target_modules` selects an adapter (A kaiming-uniform with a=sqrt(5),
    i.e. U(-1/sqrt(in), 1/sqrt(in)) as PEFT and MindFormers draw it, from `seed`; B zero) and freeze
    everything else: `model.trainable_params()` is then the adapters only. Call before the model is
    compiled. Returns the adapted linears' paths."""
    paths = lora.targets(model.config, source)
    rng = np.random.default_rng(seed)
    for path in paths:
        cell = model.at(path)
        bound = 1.0 / np.sqrt(cell.in_dim)
        cell.add_lora(path, rng.uniform(-bound, bound, (lora.rank, cell.in_dim)).astype(np.float32),
                      lora.scaling, lora.dropout)
    for param in model.get_parameters():
        param.requires_grad = is_adapter_name(param.name)
    model.lora = lora
    return paths


def lora_of(model) -> Optional[LoraConfig]:
    return getattr(model, "lora", None)


def adapter_params(model) -> dict[str, Parameter]:
    """The model's adapter parameters by MindFormers name, in model order."""
    return {p.name: p for p in model.get_parameters() if is_adapter_name(p.name)}


def trained_params(model) -> dict[str, Parameter]:
    """What training changes and checkpoints hold: the adapters of a LoRA model, else every weight."""
    from cllama.checkpoint.model_dir import state_dict

    return adapter_params(model) if lora_of(model) else state_dict(model)


def base_record(config: ModelConfig, base_dir: str | os.PathLike | None) -> dict:
    return {"config": config.to_dict(), "path": str(Path(base_dir).resolve()) if base_dir else None}


def write_adapter_files(model, folder: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                        fmt: str = "ckpt") -> Path:
    """adapter.ckpt/.safetensors + adapter_config.json of `model`'s adapters into `folder`."""
    from cllama.checkpoint.model_dir import save_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(adapter_params(model), folder / ADAPTER_FORMATS[check_format(fmt)])
    write_adapter_config(model, folder, base_dir)
    return folder


def write_adapter_config(model, folder: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """adapter_config.json: the model's pet_config and its base (config, path)."""
    return write_json(Path(folder) / ADAPTER_CONFIG, {"pet_config": lora_of(model).to_pet_config(),
                                                      "base_model": base_record(model.config, base_dir)})


def check_base(doc: dict, config: ModelConfig, source: str) -> None:
    """The adapter's base model must have `config`'s shapes."""
    base = doc["base_model"].get("config") or {}
    wrong = [f"{k}: adapter's base {base.get(k)}, model {getattr(config, k)}" for k in SHAPE_KEYS
             if k in base and base[k] != getattr(config, k)]
    if wrong:
        raise ValueError(f"{source}: the adapter belongs to another base model ({'; '.join(wrong)}); use the base "
                         f"it was trained on ({doc['base_model'].get('path') or 'see its adapter_config.json'})")


def read_adapter(path: str | os.PathLike, config: ModelConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """An adapter directory's LoraConfig and float32 arrays, checked against the base `config`."""
    path = Path(path)
    doc = adapter_dir_config(path)
    check_base(doc, config, str(path / ADAPTER_CONFIG))
    lora = LoraConfig.from_pet_config(doc["pet_config"], f"{path / ADAPTER_CONFIG}: pet_config")
    file = adapter_file(path)
    try:
        loaded = ms.load_checkpoint(str(check_weights(file)), format=file_format(file))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{file}: not a readable MindSpore checkpoint ({err})") from None
    arrays = {n: _float32(p) for n, p in loaded.items() if is_adapter_name(n)}
    check_names(adapter_shapes(config, lora, f"{path / ADAPTER_CONFIG}: pet_config"),
                {n: a.shape for n, a in arrays.items()}, str(file))
    return lora, arrays


def _float32(value) -> np.ndarray:
    if value.dtype == ms.bfloat16:
        value = value.astype(ms.float32)
    return value.asnumpy().astype(np.float32, copy=False)


def load_adapter(model, path: str | os.PathLike) -> LoraConfig:
    """Add the adapter directory's adapters to `model` (not yet compiled) and load their values."""
    lora, arrays = read_adapter(path, model.config)
    add_lora(model, lora, source=f"{Path(path) / ADAPTER_CONFIG}: pet_config")
    for name, param in adapter_params(model).items():
        param.set_data(Tensor(arrays[name], param.dtype))
    return lora


def merge_into(model, lora: LoraConfig, arrays: dict[str, np.ndarray]) -> None:
    """W <- W + (alpha / rank) * B A for every adapted linear of a plain (adapter-free) model, in float32
    and cast back to the weight's dtype."""
    from cllama.checkpoint.model_dir import to_numpy

    params = dict(model.parameters_and_names())
    for a_name in (n for n in arrays if n.endswith(LORA_A)):
        path = a_name[:-len(LORA_A) - 1]
        weight = params[f"{path}.weight"]
        merged = to_numpy(weight).astype(np.float32) + lora.scaling * (arrays[f"{path}.{LORA_B}"] @ arrays[a_name])
        weight.set_data(Tensor(merged, weight.dtype))


def model_with_adapter(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None, **overrides):
    """load_model_dir(model_dir) with the adapter (if any) merged into its weights in memory: the
    adapted model at the base model's speed."""
    from cllama.checkpoint.model_dir import load_model_dir

    model = load_model_dir(model_dir, **overrides)
    if adapter_dir:
        merge_into(model, *read_adapter(adapter_dir, model.config))
    return model


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, dst: str | os.PathLike,
                  fmt: Optional[str] = None) -> Path:
    """`cllama lora merge`: an ordinary model directory (base weights with the adapter folded in, the
    base's tokenizer) at `dst`, written atomically; `fmt` defaults to the base's weights format."""
    from cllama.checkpoint.files import weights_file
    from cllama.checkpoint.model_dir import save_model_dir, tokenizer_of

    check_model_dir(base_dir, "--base: ")
    fmt = fmt or file_format(weights_file(base_dir))
    model = model_with_adapter(base_dir, adapter_dir)
    with atomic_path(dst) as tmp:
        save_model_dir(model, tmp, tokenizer_of(base_dir), fmt)
    return Path(dst)


def model_dir_of(checkpoint: str | os.PathLike, base_dir: str | os.PathLike, merged_dir: str | os.PathLike) -> Path:
    """The model directory a training checkpoint stands for: the checkpoint itself, or for a LoRA run's
    adapter directory, its base with the adapter merged in, written to `merged_dir`."""
    if (Path(checkpoint) / ADAPTER_CONFIG).is_file():
        return merge_adapter(base_dir, checkpoint, merged_dir)
    return Path(checkpoint)


# ---- Hugging Face PEFT ------------------------------------------------------------------------
def export_peft(adapter_dir: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """`cllama lora export-peft`: adapter_model.safetensors + adapter_config.json that
    `peft.PeftModel.from_pretrained` loads onto the base converted with `cllama convert ms2hf`."""
    from cllama.checkpoint.safetensors_file import SafetensorsWriter

    adapter_dir = Path(adapter_dir)
    doc = adapter_dir_config(adapter_dir)
    config = ModelConfig.from_dict(doc["base_model"]["config"], f"{adapter_dir / ADAPTER_CONFIG}: base_model.config")
    lora, arrays = read_adapter(adapter_dir, config)
    names = {n: ms_to_peft_name(n) for n in arrays}
    paths = sorted({n[:-len(LORA_A) - 1] for n in arrays if n.endswith(LORA_A)})
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        with SafetensorsWriter(tmp / PEFT_WEIGHTS, [(names[n], "F32", arrays[n].shape) for n in arrays]) as out:
            for name, array in arrays.items():
                out.begin(names[name])
                out.write(array)
        write_json(tmp / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": peft_target_modules(paths, config), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": doc["base_model"].get("path")})
    return Path(dst)


def import_peft(src: str | os.PathLike, base_dir: str | os.PathLike, dst: str | os.PathLike,
                fmt: str = "ckpt") -> Path:
    """`cllama lora import-peft`: a PEFT LoRA adapter for a Llama base (q/k/v/o/gate/up/down_proj) as an
    adapter directory with MindFormers names, checked against the base model directory."""
    from cllama.checkpoint.safetensors_file import SafetensorsFile

    src, base_dir = Path(src), check_model_dir(base_dir, "--base: ")
    config_file, weights = src / ADAPTER_CONFIG, src / PEFT_WEIGHTS
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a PEFT adapter directory holds {ADAPTER_CONFIG} and {PEFT_WEIGHTS} "
                                    "(save it with PeftModel.save_pretrained(..., safe_serialization=True))")
    peft = read_json(config_file, ADAPTER_CONFIG)
    _check_peft_config(peft, config_file)
    config = ModelConfig.load(base_dir)
    st = SafetensorsFile(weights)
    arrays = {peft_to_ms_name(n, str(weights)): st.get(n).astype(np.float32) for n in st.keys()}
    paths = sorted({n[:-len(LORA_A) - 1] for n in arrays if n.endswith(LORA_A)})
    ranks = {arrays[f"{p}.{LORA_A}"].shape[0] for p in paths if f"{p}.{LORA_A}" in arrays}
    if ranks != {peft["r"]}:
        raise ValueError(f"{weights}: lora_A ranks {sorted(ranks)} do not match r={peft['r']} in {config_file}")
    lora = LoraConfig(int(peft["r"]), float(peft["lora_alpha"]), float(peft.get("lora_dropout") or 0.0),
                      targets_regex(paths, config))
    check_names(adapter_shapes(config, lora), {n: a.shape for n, a in arrays.items()},
                f"{weights} (for the base {base_dir})")
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        ms.save_checkpoint([{"name": n, "data": Tensor(a)} for n, a in arrays.items()],
                           str(tmp / ADAPTER_FORMATS[check_format(fmt)]), format=check_format(fmt))
        write_json(tmp / ADAPTER_CONFIG, {"pet_config": lora.to_pet_config(),
                                          "base_model": base_record(config, base_dir)})
    return Path(dst)


def _check_peft_config(peft, source: Path) -> None:
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {peft.get('peft_type') if isinstance(peft, dict) else peft!r}; "
                         "only LoRA adapters (peft_type LORA) can be imported")
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                               "layers_pattern") if peft.get(k)]
    if peft.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{source}: {unsupported} are set; MindFormers' LoRA has one rank and alpha for every "
                         "linear, no bias and no extra modules: retrain the PEFT adapter without them")
    for key in ("r", "lora_alpha"):
        if isinstance(peft.get(key), bool) or not isinstance(peft.get(key), (int, float)) or peft[key] <= 0:
            raise ValueError(f"{source}: {key} must be a positive number (got {peft.get(key)!r})")

