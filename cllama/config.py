"""ModelConfig: Code Llama shapes and options under MindFormers' `model_config` key names."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cllama.fileio import read_json, read_yaml, write_json

DTYPES = ("float32", "float16", "bfloat16")
EXTEND_METHODS = ("None", "PI", "NTK")

# Fields cllama keeps but does not act on: (default, what cllama does instead). Logged when a
# model is built with another value (cllama.model.CodeLlama).
STORED_ONLY = {
    "rotary_dtype": ("float32", "stored only: cllama computes RoPE in float32 always (REFERENCE.md section 3)"),
    "use_past": (False, "stored only: cllama's generation always uses its static KV cache"),
    "use_flash_attention": (False, "stored only: cllama computes attention with its math path"),
}

# Keys MindFormers YAMLs carry that we store but that change nothing in CPU numerics.
STORED_KEYS = (
    "pretrain_seqlen", "offset", "checkpoint_name_or_path", "compute_in_2d", "fine_grain_interleave",
    "use_rope_slice", "qkv_concat", "is_dynamic", "use_kvcache_op", "is_flexible_shape",
    "use_paged_attention", "block_size", "num_blocks", "batch_size",
)


@dataclass
class ModelConfig:
    """Code Llama model configuration. Field names are MindFormers' LlamaConfig keys."""

    seq_length: int = 2048
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as num_heads (no grouped-query attention)
    vocab_size: int = 32016
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    intermediate_size: Optional[int] = None  # None: derived from hidden_size (see ffn_hidden_size)
    rms_norm_eps: float = 1e-5
    theta: float = 1000000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100
    compute_dtype: str = "float32"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    use_past: bool = False
    use_flash_attention: bool = False
    extend_method: str = "None"
    scaling_factor: float = 1.0
    repetition_penalty: float = 1.0
    max_decode_length: int = 512
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False
    extra: dict = field(default_factory=dict)  # STORED_KEYS seen in a YAML or JSON, kept verbatim

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """FFN width: intermediate_size if set, else Meta's rule (2/3 of 4*hidden, rounded up)."""
        if self.intermediate_size:
            return self.intermediate_size
        width = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            width = int(self.ffn_dim_multiplier * width)
        return self.multiple_of * math.ceil(width / self.multiple_of)

    @property
    def rope_theta(self) -> float:
        """RoPE base after the extend method: NTK changes the base, PI scales positions instead."""
        if self.extend_method == "NTK":
            d = self.head_dim
            return self.theta * self.scaling_factor ** (d / (d - 2))
        return self.theta

    @property
    def param_itemsize(self) -> int:
        """Bytes per stored parameter (param_init_type)."""
        return 4 if self.param_init_type == "float32" else 2

    def num_params(self) -> int:
        """Parameters of the model (cllama.checkpoint.names.param_shapes lists them one by one)."""
        h, hd, kv = self.hidden_size, self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = 2 * h + h * self.num_heads * hd * 2 + 2 * h * kv + 3 * h * self.ffn_hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def stored_only_notes(self) -> list[str]:
        """One line per key set here that cllama stores without acting on it (see STORED_ONLY)."""
        notes = [f"{key}={getattr(self, key)!r}: {why}" for key, (default, why) in STORED_ONLY.items()
                 if getattr(self, key) != default]
        return notes + [f"{key}={value!r}: stored only (a MindFormers key with no effect in cllama)"
                        for key, value in self.extra.items()]

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name, kind in field_kinds().items():  # types first: the checks below compare values
            why = kind_error(getattr(self, name), kind)
            if why:
                raise bad(name, why)
        for name in ("seq_length", "hidden_size", "num_layers", "num_heads", "n_kv_heads",
                     "vocab_size", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise bad("hidden_size", "hidden_size / num_heads must be even for RoPE")
        if self.num_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise bad("intermediate_size", "must be a positive integer or null")
        for name in ("compute_dtype", "layernorm_compute_type", "softmax_compute_type",
                     "rotary_dtype", "param_init_type"):
            if getattr(self, name) not in DTYPES:
                raise bad(name, f"must be one of {DTYPES}")
        if self.extend_method not in EXTEND_METHODS:
            raise bad("extend_method", f"must be one of {EXTEND_METHODS}")
        if self.scaling_factor <= 0:
            raise bad("scaling_factor", "must be > 0")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "must be > 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise bad(name, f"must be a token id below vocab_size={self.vocab_size}")
        unknown = set(self.extra) - set(STORED_KEYS)
        if unknown:
            raise ValueError(f"ModelConfig.extra: unknown keys {sorted(unknown)}")

    # ---- dict / JSON -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> ModelConfig:
        """Build from MindFormers keys. `type` is ignored; unknown keys are an error, and so is a value
        of the wrong type (`{source}: ModelConfig.num_layers: must be an integer (got 'x')`)."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: must be an object of model_config keys (got {_kind_name(values)}), "
                             "e.g. {\"hidden_size\": 4096, \"num_layers\": 32, ...}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        if values.get("extra") is not None and not isinstance(values["extra"], dict):
            raise ValueError(f"{source}: ModelConfig.extra: must be an object (got {_short(values['extra'])})")
        extra = dict(values.get("extra") or {})
        unknown = []
        for key, value in values.items():
            if key in ("type", "extra"):
                continue
            if key in known:
                kwargs[key] = value
            elif key in STORED_KEYS:
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"{source}: unknown model_config keys {sorted(unknown)}; "
                f"valid keys are {sorted(known)} and the stored-only keys {list(STORED_KEYS)}")
        kwargs = _coerce(kwargs)
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        extra = values.pop("extra")
        values.update(extra)
        return values

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (MindFormers keys), atomically. `path` is a file or a model directory."""
        path = Path(path)
        return write_json(path / "config.json" if path.is_dir() else path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read cllama's JSON (a file or a model directory). Hugging Face configs are refused."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        values = read_json(path, "cllama config.json (ModelConfig, MindFormers keys)",
                           "a model directory holds config.json + model.ckpt (`cllama model init` makes one)")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: must be a JSON object of ModelConfig keys (got {_kind_name(values)}); "
                             "`cllama model init` and `cllama convert` write one")
        if "num_hidden_layers" in values:
            raise ValueError(f"{path}: this is a Hugging Face config.json; read it with "
                             "ModelConfig.from_hf(), or convert the folder with `cllama convert hf2ms`")
        return cls.from_dict(values, source=str(path))

    # ---- MindFormers YAML --------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> ModelConfig:
        """Load the `model: model_config:` block of a MindFormers run YAML (its pet_config, the LoRA
        settings, is the run's: cllama.train.runconfig reads it)."""
        doc = read_yaml(path, "MindFormers run YAML")
        try:
            block = doc["model"]["model_config"]
        except (KeyError, TypeError, IndexError):
            block = None
        if not isinstance(block, dict):
            raise ValueError(f"{path}: no `model: model_config:` block; add one with the model "
                             "keys (see configs/codellama/run_codellama_34b_910b.yaml)")
        block = {k: v for k, v in block.items() if k != "pet_config"}
        return cls.from_dict({**block, **overrides}, source=f"{path}: model.model_config")

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict | str | os.PathLike, **overrides: Any) -> ModelConfig:
        """Read a Hugging Face Llama config (a dict, a config.json path, or its folder)."""
        source = "Hugging Face config"
        if not isinstance(hf, dict):
            path = Path(hf)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            hf = read_json(path, "Hugging Face config.json")
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: must be a JSON object (a Hugging Face LlamaConfig; got {_kind_name(hf)})")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size", "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing Llama fields {missing}")
        check_kinds(hf, HF_KINDS, source)
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        check_kinds(rope, ROPE_KINDS, source, "rope_parameters.")
        check_kinds(scaling, ROPE_KINDS, source, "rope_scaling.")
        for key in ("bos_token_id", "eos_token_id"):
            value = hf.get(key)
            ids = value if isinstance(value, list) else None
            if (kind_error(value, "int?") if ids is None else any(kind_error(i, "int") for i in ids)):
                raise ValueError(f"{source}: {key}: must be a token id, a list of them, or null (got {_short(value)})")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        factor = rope.get("factor", scaling.get("factor", 1.0))
        if kind == "default":
            extend_method, factor = "None", 1.0
        elif kind == "linear":
            extend_method = "PI"
        else:
            raise ValueError(f"{source}: rope scaling type {kind!r} is not supported "
                             "(use 'linear', or fold an NTK base change into rope_theta)")
        if hf.get("tie_word_embeddings"):
            raise ValueError(f"{source}: tie_word_embeddings=true; Code Llama has an untied lm_head")
        values = dict(
            seq_length=hf.get("max_position_embeddings", 4096),
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            theta=float(theta),
            extend_method=extend_method,
            scaling_factor=float(factor if factor is not None else 1.0),
            bos_token_id=_first_id(hf.get("bos_token_id"), 1),
            eos_token_id=_first_id(hf.get("eos_token_id"), 2),
        )
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype in DTYPES:
            values["param_init_type"] = dtype
        values.update(overrides)
        config = cls.from_dict(values, source=source)
        if config.intermediate_size == dataclasses.replace(config, intermediate_size=None).ffn_hidden_size:
            config.intermediate_size = None  # derivable from hidden_size: keep the MindFormers form
        return config

    def to_hf(self) -> dict:
        """A Hugging Face LlamaConfig dict that transformers' LlamaForCausalLM loads."""
        theta, scaling = self.theta, None
        if self.extend_method == "NTK":
            theta = self.rope_theta  # static NTK is exactly a base change
        elif self.extend_method == "PI":
            scaling = {"type": "linear", "rope_type": "linear", "factor": self.scaling_factor}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.seq_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": theta,
            "rope_scaling": scaling,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_init_type,
        }

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see PRESETS), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"ModelConfig.from_name: unknown preset {name!r}; "
                             f"choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


# Types of the Hugging Face config.json fields from_hf reads (see kind_error); absent fields take defaults.
HF_KINDS = {"hidden_size": "int", "num_hidden_layers": "int", "num_attention_heads": "int", "vocab_size": "int",
            "intermediate_size": "int", "num_key_value_heads": "int?", "max_position_embeddings": "int",
            "rms_norm_eps": "float", "rope_theta": "float", "rope_scaling": "dict?", "rope_parameters": "dict?",
            "tie_word_embeddings": "bool?"}
ROPE_KINDS = {"rope_type": "str?", "type": "str?", "factor": "float?", "rope_theta": "float"}
_KIND_TYPES = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool, "dict": dict}
_KIND_WORDS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true/false",
               "dict": "an object"}


def _kind_name(value: Any) -> str:
    """What a JSON value is, in words."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def kind_error(value: Any, kind: str) -> str | None:
    """Why `value` is not of `kind` (int, float, str, bool or dict; a trailing `?` also allows None), or
    None when it is. true/false is no number here, and a float must be finite."""
    base, optional = kind.rstrip("?"), kind.endswith("?")
    if value is None and optional:
        return None
    ok = isinstance(value, _KIND_TYPES[base]) and (base == "bool" or not isinstance(value, bool))
    if ok and base == "float":
        ok = math.isfinite(value)
    return None if ok else f"must be {_KIND_WORDS[base]}" + (" or null" if optional else "")


def check_kinds(values: dict, kinds: dict[str, str], source: str, prefix: str = "") -> None:
    """ValueError `{source}: {prefix}{key}: must be an integer (got 'x')` for the first key of `values`
    whose value is not of its kind (`kinds`: key -> kind, see kind_error); keys not in `kinds` pass."""
    for key, kind in kinds.items():
        why = kind_error(values[key], kind) if key in values else None
        if why:
            raise ValueError(f"{source}: {prefix}{key}: {why} (got {_short(values[key])})")


@functools.cache
def field_kinds() -> dict[str, str]:
    """ModelConfig field -> kind, from the dataclass annotations (`Optional[int]` -> `int?`)."""
    return {f.name: f.type[len("Optional["):-1] + "?" if f.type.startswith("Optional[") else f.type
            for f in dataclasses.fields(ModelConfig) if f.name != "extra"}


def _coerce(kwargs: dict) -> dict:
    """YAML gives `1.0e-5` as float but `1e-5` as str, and `theta: 1000000` as int: numbers and numeric
    text of float fields become float (anything else is left for validate to name)."""
    out = dict(kwargs)
    for key, kind in field_kinds().items():
        value = out.get(key)
        if kind.rstrip("?") != "float" or value is None or isinstance(value, bool):
            continue
        try:
            out[key] = float(value) if isinstance(value, (int, float, str)) else value
        except ValueError:
            pass
    if out.get("extend_method") is None and "extend_method" in out:
        out["extend_method"] = "None"
    return out


_CPU = dict(compute_dtype="float32", param_init_type="float32")
_ASCEND = dict(compute_dtype="float16", param_init_type="float16", seq_length=16384)
_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=32, **_ASCEND)
_13B = dict(hidden_size=5120, num_layers=40, num_heads=40, n_kv_heads=40, **_ASCEND)
_34B = dict(hidden_size=8192, num_layers=48, num_heads=64, n_kv_heads=8, vocab_size=32000, **_ASCEND)

PRESETS: dict[str, dict] = {
    "codellama-7b": dict(_7B, vocab_size=32016),
    "codellama-7b-python": dict(_7B, vocab_size=32000),
    "codellama-7b-instruct": dict(_7B, vocab_size=32016),
    "codellama-13b": dict(_13B, vocab_size=32016),
    "codellama-13b-python": dict(_13B, vocab_size=32000),
    "codellama-13b-instruct": dict(_13B, vocab_size=32016),
    "codellama-34b": dict(_34B),
    "codellama-34b-python": dict(_34B),
    "codellama-34b-instruct": dict(_34B),
    # CPU configs: tests and the demo (tiny), benchmarks (small). seq_length holds the longest
    # HumanEval prompt (433 tokens) plus generated tokens.
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, vocab_size=32016,
                 seq_length=2048, **_CPU),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, n_kv_heads=12, vocab_size=32016,
                  seq_length=2048, **_CPU),
}
