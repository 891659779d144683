"""LoRA as MindFormers configures and names it (`pet_config`, REFERENCE.md section 8) and as Hugging
Face PEFT names it, as pure functions (no MindSpore import): the configuration and its checks, the
linears a `target_modules` regex picks, adapter parameter names and shapes, the PEFT name map, and
adapter directories' `adapter_config.json`.

An adapter on linear `P` (e.g. `model.layers.0.attention.wq`, weight (out, in)) is
`P.mindpet_delta_lora_a` (rank, in) and `P.mindpet_delta_lora_b` (out, rank); the layer computes
y = x W^T + (alpha / rank) * dropout(x) A^T B^T and merging gives W + (alpha / rank) * B A.
`target_modules` is matched with `re.match` against each linear's path, as MindFormers does.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cllama.checkpoint.names import ms_to_hf_name, param_shapes
from cllama.config import ModelConfig

LORA_A, LORA_B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"
DEFAULT_TARGETS = r".*wq|.*wk|.*wv|.*wo"  # MindFormers' Llama LoRA default
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
OTHER_PET_TYPES = ("prefixtuning", "ptuning2", "adapter", "slora")  # MindFormers knows, cllama does not
PET_KEYS = ("pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "param_init_type",
            "compute_dtype", "freeze_include", "freeze_exclude")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMATS = {"ckpt": "adapter.ckpt", "safetensors": "adapter.safetensors"}
ADAPTER_FILES = tuple(ADAPTER_FORMATS.values())
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_ADAPTER_NAME = re.compile(rf"^(model\.layers\.\d+\.[\w.]+)\.({LORA_A}|{LORA_B})$")  # not adam_m.* etc.
_PEFT_NAME = re.compile(r"^base_model\.model\.(.*)\.lora_(A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraConfig:
    """MindFormers' pet_config for LoRA: rank, alpha, dropout on the adapter input, and the regex of
    linear paths that get adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_pet_config(self) -> dict:
        return {"pet_type": "lora", "lora_rank": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": self.target_modules}

    @classmethod
    def from_pet_config(cls, block: Mapping, source: str = "pet_config") -> LoraConfig:
        """Check a YAML/JSON pet_config block (MindFormers keys); one error naming the key and the fix."""
        if not isinstance(block, Mapping):
            raise ValueError(f"{source}: must be a mapping with pet_type: lora, lora_rank, lora_alpha, "
                             f"lora_dropout, target_modules (got {block!r})")
        kind = str(block.get("pet_type", "")).lower()
        if kind != "lora":
            known = "MindFormers' other pet types (" + ", ".join(OTHER_PET_TYPES) + ") are not supported"
            raise ValueError(f"{source}.pet_type: {block.get('pet_type')!r} is not supported; set pet_type: lora "
                             f"({known})")
        unknown = sorted(set(block) - set(PET_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {list(PET_KEYS)}")
        rank = block.get("lora_rank", cls.rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{source}.lora_rank: must be a positive integer (got {rank!r}); e.g. lora_rank: 8")
        alpha = _number(block.get("lora_alpha", cls.alpha), f"{source}.lora_alpha")
        if alpha <= 0:
            raise ValueError(f"{source}.lora_alpha: must be > 0 (got {alpha}); e.g. lora_alpha: {2 * rank}")
        dropout = _number(block.get("lora_dropout", cls.dropout), f"{source}.lora_dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{source}.lora_dropout: must be in [0, 1) (got {dropout})")
        targets = block.get("target_modules", DEFAULT_TARGETS)
        if not isinstance(targets, str) or not targets:
            raise ValueError(f"{source}.target_modules: must be a regex string such as '{DEFAULT_TARGETS}' "
                             f"(got {targets!r})")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{source}.target_modules: {targets!r} is not a valid regex ({e})") from None
        return cls(rank, alpha, dropout, targets)

    def targets(self, config: ModelConfig, source: str = "pet_config") -> list[str]:
        """The linear paths (model order) the regex selects; an error when it selects none."""
        paths = [f"model.layers.{i}.{linear}" for i in range(config.num_layers) for linear in LINEARS]
        picked = [p for p in paths if re.match(self.target_modules, p)]
        if not picked:
            raise ValueError(f"{source}.target_modules: {self.target_modules!r} matches none of the model's "
                             f"linears (e.g. {paths[0]}, {paths[-1]}); use '{DEFAULT_TARGETS}' for attention "
                             r"or add '|.*w1|.*w2|.*w3' for the MLP")
        return picked


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number (got {value!r})")
    return float(value)


def adapter_shapes(config: ModelConfig, lora: LoraConfig, source: str = "pet_config") -> dict[str, tuple]:
    """Every adapter parameter's MindFormers name and shape, in model order."""
    weights = param_shapes(config)
    shapes = {}
    for path in lora.targets(config, source):
        out_dim, in_dim = weights[f"{path}.weight"]
        shapes[f"{path}.{LORA_A}"] = (lora.rank, in_dim)
        shapes[f"{path}.{LORA_B}"] = (out_dim, lora.rank)
    return shapes


def is_adapter_name(name: str) -> bool:
    return _ADAPTER_NAME.match(name) is not None


def ms_to_peft_name(name: str) -> str:
    """`model.layers.0.attention.wq.mindpet_delta_lora_a` -> `base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight`."""
    m = _ADAPTER_NAME.match(name)
    hf = ms_to_hf_name(f"{m.group(1)}.weight") if m else None
    if hf is None:
        raise ValueError(f"{name}: not a LoRA adapter parameter of a Code Llama linear")
    return PEFT_PREFIX + hf[:-len(".weight")] + (".lora_A.weight" if m.group(2) == LORA_A else ".lora_B.weight")


def peft_to_ms_name(name: str, source: str) -> str:
    """The inverse of ms_to_peft_name (PEFT's adapter-name infix, e.g. `.default`, is accepted)."""
    m = _PEFT_NAME.match(name)
    from cllama.checkpoint.names import hf_to_ms_name

    ms = hf_to_ms_name(f"{m.group(1)}.weight") if m else None
    if ms is None or not any(ms.endswith(f".{linear}.weight") for linear in LINEARS):
        raise ValueError(f"{source}: {name} is not a LoRA weight of a Llama q_proj/k_proj/v_proj/o_proj/"
                         "gate_proj/up_proj/down_proj; only LoRA adapters on those linears can be imported")
    return ms[:-len("weight")] + (LORA_A if m.group(2) == "A" else LORA_B)


def targets_regex(paths: list[str], config: ModelConfig) -> str:
    """A target_modules regex selecting exactly `paths`: MindFormers' short form (`.*wq|.*wv`) when
    every layer has the same linears, else the escaped paths."""
    kinds = [k for k in (linear.rsplit(".", 1)[1] for linear in LINEARS) if any(p.endswith(f".{k}") for p in paths)]
    every = [f"model.layers.{i}.{linear}" for i in range(config.num_layers) for linear in LINEARS
             if linear.rsplit(".", 1)[1] in kinds]
    if sorted(every) == sorted(paths):
        return "|".join(f".*{k}" for k in kinds)
    return "|".join(re.escape(p) + "$" for p in paths)


def peft_target_modules(paths: list[str], config: ModelConfig) -> list[str] | str:
    """PEFT's target_modules for the same linears: module suffixes (q_proj, ...) when every layer has
    the same ones, else a full-match regex over the Hugging Face module names."""
    hf = [ms_to_hf_name(f"{p}.weight")[:-len(".weight")] for p in paths]
    short = sorted({h.rsplit(".", 1)[1] for h in hf})
    every = [ms_to_hf_name(f"model.layers.{i}.{linear}.weight")[:-len(".weight")]
             for i in range(config.num_layers) for linear in LINEARS]
    if sorted(h for h in every if h.rsplit(".", 1)[1] in short) == sorted(hf):
        return short
    return "(" + "|".join(re.escape(h) for h in hf) + ")"


def adapter_dir_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of an adapter directory, checked: {"pet_config": ..., "base_model": {...}}."""
    from cllama.fileio import read_json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: adapter directory not found; give the directory `cllama train` wrote "
                                "for a LoRA run (checkpoints/step_N) or `cllama lora import-peft` made")
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        hint = " (this is a Hugging Face PEFT adapter: run `cllama lora import-peft` first)" \
            if (path / PEFT_WEIGHTS).is_file() else ""
        raise FileNotFoundError(f"{file}: missing; an adapter directory holds adapter_config.json (pet_config and "
                                f"base_model) beside adapter.ckpt or adapter.safetensors{hint}")
    doc = read_json(file, ADAPTER_CONFIG)
    if not isinstance(doc, dict) or not isinstance(doc.get("pet_config"), dict) \
            or not isinstance(doc.get("base_model"), dict):
        raise ValueError(f"{file}: needs a 'pet_config' mapping and a 'base_model' mapping (the base's "
                         "config.json); rewrite it with `cllama lora import-peft` or a LoRA training run")
    LoraConfig.from_pet_config(doc["pet_config"], f"{file}: pet_config")
    return doc


def adapter_file(path: str | os.PathLike) -> Path:
    """The adapter weights of an adapter directory (adapter.ckpt or adapter.safetensors)."""
    path = Path(path)
    found = [path / name for name in ADAPTER_FILES if (path / name).is_file()]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise FileNotFoundError(f"{path}: holds {what} of {' and '.join(ADAPTER_FILES)}; an adapter directory "
                                "holds exactly one")
    return found[0]
