"""Run configs: MindFormers-shaped run YAMLs (configs/) read, overridden by dotted keys, checked.

Sections used: seed, output_dir, load_checkpoint, resume_training, run_mode, runner_config
(epochs, batch_size, gradient_accumulation_steps, max_steps), optimizer, lr_schedule,
train_dataset / eval_dataset (data_loader.dataset_dir), do_eval, eval_step_interval, use_parallel,
parallel, parallel_config, recompute_config (recompute, select_recompute and Cell.recompute's options),
callbacks (CheckpointMointor: save_checkpoint_steps, keep_checkpoint_max, integrated_save, checkpoint_format), context
(device_target), model.model_config (its pet_config: LoRA), processor.tokenizer.vocab_file,
runner_wrapper (use_clip_grad, max_grad_norm, scale_sense). Other MindFormers keys of the model card's
YAML are accepted and ignored.

Every section is checked the same way (SECTION_KEYS): a key cllama reads is used, a MindFormers key it
reads but does not act on (e.g. runner_config.sink_mode, context.max_call_depth, model.arch) is listed as
known-but-ignored and logged once (logging, INFO) as ignored, and any other key is a ValueError naming the
section, the key and the closest known key (a typo such as runner_config.batchsize must not train at the
YAML's default).
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cllama.checkpoint.lora import DEFAULT_TARGETS, LoraConfig
from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig, auto_parallel_settings
from cllama.fileio import atomic_write, read_yaml
from cllama.runtime import REPO_ROOT

TOP_LEVEL_KEYS = {
    # used
    "seed", "output_dir", "load_checkpoint", "resume_training", "run_mode", "runner_config", "optimizer",
    "lr_schedule", "train_dataset", "eval_dataset", "do_eval", "eval_step_interval", "use_parallel",
    "parallel", "parallel_config", "micro_batch_interleave_num", "recompute_config", "callbacks", "context",
    "model", "processor", "runner_wrapper",
    # MindFormers keys read and ignored (they configure MindFormers' own machinery)
    "src_strategy_path_or_dir", "auto_trans_ckpt", "only_save_strategy", "trainer", "train_dataset_task",
    "eval_dataset_task", "metric", "eval_callbacks", "auto_tune", "filepath_prefix", "autotune_per_step",
    "profile", "profile_start_step", "profile_stop_step", "init_start_profile", "profile_communication",
    "profile_memory", "layer_scale", "layer_decay", "lr_scale_factor", "remote_save_url", "eval_epoch_interval",
}
RUN_MODES = ("train", "finetune")
RECOMPUTE_OPTIONS = ("mp_comm_recompute", "parallel_optimizer_comm_recompute", "recompute_slice_activation")
CALLBACK_TYPES = ("MFLossMonitor", "CheckpointMointor", "CheckpointMonitor", "ObsMonitor", "SummaryMonitor")
INPUT_COLUMNS = ("input_ids", "labels")
log = logging.getLogger(__name__)

# section -> (keys cllama uses, MindFormers keys it accepts and ignores)
_DATASET_IGNORED = ("input_columns", "output_columns", "num_parallel_workers", "python_multiprocessing",
                    "drop_remainder", "batch_size", "repeat", "numa_enable", "prefetch_size", "seed", "tokenizer",
                    "max_length", "pad_token_id", "eod_reset", "construct_args_key", "column_names")
_CHECKPOINT_KEYS = ("type", "save_checkpoint_steps", "keep_checkpoint_max", "integrated_save", "checkpoint_format")
SECTION_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "runner_config": (("epochs", "batch_size", "gradient_accumulation_steps", "max_steps"),
                      ("sink_mode", "sink_size", "initial_epoch", "initial_step", "per_epoch_size", "num_classes")),
    "train_dataset": (("data_loader", "input_columns"), _DATASET_IGNORED),
    "eval_dataset": (("data_loader", "max_batches"), _DATASET_IGNORED),
    "data_loader": (("dataset_dir", "shuffle"), ("type", "dataset_files", "num_shards", "shard_id")),
    "context": (("device_target",),
                ("mode", "enable_graph_kernel", "graph_kernel_flags", "max_call_depth", "max_device_memory",
                 "save_graphs", "save_graphs_path", "device_id", "runtime_num_threads", "jit_config",
                 "memory_optimize_level", "ascend_config", "mempool_block_size", "jit_level", "infer_boost",
                 "enable_compile_cache", "compile_cache_path", "affinity_cpu_list", "deterministic")),
    "runner_wrapper": (("use_clip_grad", "max_grad_norm", "scale_sense"),
                       ("type", "local_norm", "calculate_per_token_loss", "use_skip_data_by_global_norm")),
    "scale_sense": (("type", "loss_scale_value", "scale_factor", "scale_window"), ()),
    "model": (("model_config",), ("arch",)),
    "recompute_config": (("recompute", "select_recompute") + RECOMPUTE_OPTIONS,
                         ("select_comm_recompute", "select_recompute_exclude", "select_comm_recompute_exclude")),
    "processor": (("tokenizer",), ("return_tensors", "type", "image_processor")),
    "tokenizer": (("vocab_file",),
                  ("type", "unk_token", "bos_token", "eos_token", "pad_token", "add_bos_token", "add_eos_token",
                   "legacy", "padding_side", "model_max_length", "tokenizer_file", "chat_template")),
    "CheckpointMointor": (_CHECKPOINT_KEYS,
                          ("prefix", "directory", "async_save", "save_network_params", "save_trainable_params",
                           "keep_checkpoint_per_n_minutes", "save_checkpoint_seconds", "remove_redundancy",
                           "embedding_local_norm_threshold", "checkpoint_format_type", "exception_save")),
    "MFLossMonitor": (("type",), ("per_print_times", "learning_rate", "micro_batch_num", "micro_batch_interleave_num",
                                  "origin_epochs", "dataset_size", "initial_epoch", "initial_step",
                                  "global_batch_size", "gradient_accumulation_steps",
                                  "check_for_nan_in_loss_and_grad")),
    "ObsMonitor": (("type",), ("src_dir", "target_dir", "step_upload_frequence", "epoch_upload_frequence",
                               "keep_last", "rank_id")),
    "SummaryMonitor": (("type",), ("summary_dir", "collect_freq", "collect_specified_data", "keep_default_action",
                                   "custom_lineage_data", "collect_tensor_freq", "max_file_size", "export_options")),
}
SECTION_KEYS["CheckpointMonitor"] = SECTION_KEYS["CheckpointMointor"]
_logged_ignored: set[str] = set()  # where.key, logged once per process


@dataclass
class RunConfig:
    """A run YAML, parsed and checked. `doc` is the document itself (saved beside the run)."""

    doc: dict
    source: str
    model: ModelConfig
    seed: int = 0
    output_dir: str = "./output"
    load_checkpoint: str = ""
    run_mode: str = "train"
    resume_training: bool = False
    epochs: int = 1
    batch_size: int = 1
    accumulate: int = 1
    max_steps: int = -1
    optimizer: dict = field(default_factory=dict)
    lr_schedule: dict = field(default_factory=dict)
    train_data: list = field(default_factory=list)
    shuffle: bool = True
    eval_data: list = field(default_factory=list)
    eval_interval: int = 0
    eval_batches: int = 0
    use_parallel: bool = False
    parallel: dict = field(default_factory=dict)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "CPU"
    recompute: bool = False
    select_recompute: bool = False
    recompute_options: dict = field(default_factory=dict)  # Cell.recompute's keyword arguments
    max_grad_norm: Optional[float] = 1.0
    loss_scale: Optional[dict] = None
    save_steps: int = 0
    keep_checkpoints: int = 5
    integrated_save: bool = True  # False: every rank saves its own slices (always so under semi-auto parallel)
    checkpoint_format: str = "ckpt"
    tokenizer: str = ""
    input_columns: list = field(default_factory=lambda: ["input_ids"])  # with labels: the data must have them
    lora: Optional[LoraConfig] = None  # model.model_config.pet_config: LoRA finetuning

    def parallel_settings(self, device: str = "Ascend", device_num: Optional[int] = None) -> dict:
        """`set_auto_parallel_context` arguments for this run on `device_num` devices (default the
        parallel_config's dp*mp*pp), validated against the model."""
        n = device_num or self.parallel_config.device_num
        return auto_parallel_settings(self.parallel_config, self.parallel, n, device, self.model)


# ---- YAML --------------------------------------------------------------------------------------------
def set_key(doc: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested YAML document; in a list, a segment is an index or an item's `type`
    (e.g. `callbacks.CheckpointMointor.save_checkpoint_steps`)."""
    parts = dotted.split(".")
    node: Any = doc
    for part in parts[:-1]:
        if isinstance(node, list):
            matches = [item for item in node if isinstance(item, dict) and item.get("type") == part]
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif matches:
                node = matches[0]
            else:
                node.append({"type": part})
                node = node[-1]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    node[parts[-1]] = value


def parse_overrides(pairs: list[str] | None, form: str = "KEY=VALUE", example: str = "seq_length=1024") -> dict:
    """Command-line `--set` pairs -> {key: value}; a value is read as JSON (numbers, true, lists),
    else kept as text."""
    import json

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: write {form}, e.g. --set {example}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def find_config(path: str | os.PathLike) -> Path:
    """`path` as given, else relative to the repository root (so `configs/tiny/pretrain.yaml` works
    from notebooks/ too)."""
    path = Path(path)
    if path.is_file():
        return path
    beside = REPO_ROOT / path
    if not path.is_absolute() and beside.is_file():
        return beside
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected a run YAML (see configs/tiny/pretrain.yaml)")
    raise FileNotFoundError(f"{path}: run config not found (see configs/tiny/pretrain.yaml)")


def load_run_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Read a run YAML (MindFormers layout), apply dotted-key overrides, check every section."""
    path = find_config(path)
    doc = read_yaml(path, "run YAML", "see configs/tiny/pretrain.yaml")
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a YAML mapping of run settings (see configs/tiny/pretrain.yaml)")
    for key, value in (overrides or {}).items():
        set_key(doc, key, value)
    return parse_run_config(doc, str(path))


def parse_run_config(doc: dict, source: str = "run config") -> RunConfig:
    """Check and flatten a run document (see load_run_config)."""
    def bad(where: str, why: str) -> ValueError:
        return ValueError(f"{source}: {where}: {why}")

    unknown = sorted(set(doc) - TOP_LEVEL_KEYS)
    if unknown:
        raise bad(str(unknown), f"unknown top-level keys; valid keys are {sorted(TOP_LEVEL_KEYS)}")
    try:
        block = doc["model"]["model_config"]
    except (KeyError, TypeError):
        raise bad("model.model_config", "missing; copy the block from configs/tiny/pretrain.yaml") from None
    if not isinstance(block, dict):
        raise bad("model.model_config", "must be a mapping; copy the block from configs/tiny/pretrain.yaml")
    block = dict(block)
    pet = block.pop("pet_config", None)
    model = ModelConfig.from_dict(block, source=f"{source}: model.model_config")
    runner = doc.get("runner_config") or {}
    run = RunConfig(doc=doc, source=source, model=model)
    _check_sections(doc, bad)
    if pet is not None:
        run.lora = LoraConfig.from_pet_config(pet, f"{source}: model.model_config.pet_config")
        run.lora.targets(model, f"{source}: model.model_config.pet_config")
    run.seed = _int(doc.get("seed", 0), "seed", bad, 0)
    run.output_dir = str(doc.get("output_dir") or "./output")
    run.load_checkpoint = str(doc.get("load_checkpoint") or "")
    run.resume_training = bool(doc.get("resume_training", False))
    run.run_mode = doc.get("run_mode", "train")
    if run.run_mode not in RUN_MODES:
        raise bad("run_mode", f"{run.run_mode!r}; use one of {list(RUN_MODES)}")
    run.epochs = _int(runner.get("epochs", 1), "runner_config.epochs", bad, 1)
    run.batch_size = _int(runner.get("batch_size", 1), "runner_config.batch_size", bad, 1)
    run.accumulate = _int(runner.get("gradient_accumulation_steps", 1),
                          "runner_config.gradient_accumulation_steps", bad, 1)
    run.max_steps = _int(runner.get("max_steps", -1), "runner_config.max_steps", bad, -1)
    run.optimizer = dict(doc.get("optimizer") or {"type": "FP32StateAdamWeightDecay"})
    from cllama.train.optim import build_lr_schedule, optimizer_settings

    optimizer_settings(run.optimizer, source=f"{source}: optimizer")  # before learning_rate moves to the schedule
    run.lr_schedule = dict(doc.get("lr_schedule") or {})
    if not run.lr_schedule:
        run.lr_schedule = {"type": "CosineWithWarmUpLR", "learning_rate": run.optimizer.get("learning_rate", 1e-5)}
    run.optimizer.pop("learning_rate", None)  # the schedule sets the rate, as in MindFormers
    train_block = doc.get("train_dataset") or {}
    loader = train_block.get("data_loader") or {}
    run.train_data = _paths(loader.get("dataset_dir"))
    run.shuffle = bool(loader.get("shuffle", True))
    default_columns = list(INPUT_COLUMNS) if run.run_mode == "finetune" else ["input_ids"]
    columns = train_block.get("input_columns", default_columns)
    if (not isinstance(columns, (list, tuple)) or "input_ids" not in columns
            or any(c not in INPUT_COLUMNS for c in columns)):
        raise bad("train_dataset.input_columns", f"{columns!r}; use [input_ids] (pretraining data) or "
                                                 "[input_ids, labels] (qa data: only answer tokens carry loss)")
    run.input_columns = [str(c) for c in columns]
    eval_block = doc.get("eval_dataset") or {}
    run.eval_data = _paths((eval_block.get("data_loader") or {}).get("dataset_dir"))
    run.eval_batches = _int(eval_block.get("max_batches", 0), "eval_dataset.max_batches", bad, 0)
    run.eval_interval = _int(doc.get("eval_step_interval", 0) or 0, "eval_step_interval", bad, 0)
    if doc.get("do_eval") and run.eval_data and run.eval_interval == 0:
        run.eval_interval = 100
    if not doc.get("do_eval", bool(run.eval_data)):
        run.eval_data = []
    run.use_parallel = bool(doc.get("use_parallel", False))
    run.parallel = dict(doc.get("parallel") or {})
    pc = dict(doc.get("parallel_config") or {})
    if "micro_batch_interleave_num" in doc:
        pc.setdefault("micro_batch_interleave_num", doc["micro_batch_interleave_num"])
    run.parallel_config = ParallelConfig.from_dict(pc, source=f"{source}: parallel_config")
    auto_parallel_settings(run.parallel_config, run.parallel, 1)  # checks the parallel block's keys
    context = doc.get("context") or {}
    run.device = str(context.get("device_target", "CPU"))
    if run.device not in ("CPU", "Ascend", "GPU", "auto"):
        raise bad("context.device_target", f"{run.device!r}; use CPU, Ascend, GPU or auto")
    recompute = doc.get("recompute_config") or {}
    run.recompute = bool(recompute.get("recompute", False))
    run.select_recompute = bool(recompute.get("select_recompute", False))
    run.recompute_options = {k: bool(recompute[k]) for k in RECOMPUTE_OPTIONS if k in recompute}
    wrapper = doc.get("runner_wrapper") or {}
    run.max_grad_norm = None
    if wrapper.get("use_clip_grad", True):
        run.max_grad_norm = _positive(wrapper.get("max_grad_norm", 1.0), "runner_wrapper.max_grad_norm", bad)
    run.loss_scale = _loss_scale(wrapper.get("scale_sense"), bad)
    for cb in doc.get("callbacks") or []:
        kind = cb.get("type") if isinstance(cb, dict) else None
        if kind not in CALLBACK_TYPES:
            raise bad("callbacks", f"type {kind!r} is not one of {list(CALLBACK_TYPES)}")
        if kind in ("CheckpointMointor", "CheckpointMonitor"):
            run.save_steps = _int(cb.get("save_checkpoint_steps", 0), "CheckpointMointor.save_checkpoint_steps", bad, 0)
            run.keep_checkpoints = _int(cb.get("keep_checkpoint_max", 5), "CheckpointMointor.keep_checkpoint_max",
                                        bad, 0)
            run.integrated_save = bool(cb.get("integrated_save", True))
            run.checkpoint_format = str(cb.get("checkpoint_format", "ckpt"))
            if run.checkpoint_format not in ("ckpt", "safetensors"):
                raise bad("CheckpointMointor.checkpoint_format", f"{run.checkpoint_format!r}; use ckpt or safetensors")
    tokenizer = ((doc.get("processor") or {}).get("tokenizer") or {}).get("vocab_file")
    run.tokenizer = str(tokenizer or "")
    build_lr_schedule(run.lr_schedule, 1000, source=f"{source}: lr_schedule")  # checks the block
    return run


def _int(value: Any, where: str, bad: Callable, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise bad(where, f"must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _positive(value: Any, where: str, bad: Callable, minimum: float = 0.0) -> float:
    """A finite number > minimum (YAML's `1e-5` without a dot is a string: read it as a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad(where, f"must be a number (got {value!r})") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= minimum:
        raise bad(where, f"must be a finite number > {minimum:g} (got {value!r})")
    return number


def _check_keys(block: Any, section: str, where: str, bad: Callable, seen: list) -> None:
    """`block` (the YAML mapping at `where`) holds only SECTION_KEYS[section]'s keys; the ignored ones
    present are added to `seen` as `where.key`."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise bad(where, f"must be a mapping of keys (got {block!r})")
    used, ignored = SECTION_KEYS[section]
    known = list(used) + list(ignored)
    for key in block:
        if key in used:
            continue
        if key in ignored:
            seen.append(f"{where}.{key}")
        else:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise bad(f"{where}.{key}", f"unknown key in {where}; {hint}known keys: {sorted(used)} (used), "
                                        f"{sorted(ignored)} (accepted, ignored)")


def _check_sections(doc: dict, bad: Callable) -> None:
    """Every section's keys (see SECTION_KEYS); model.model_config is checked by ModelConfig.from_dict.
    The known-but-ignored keys are logged once per process (one INFO line per new set of keys)."""
    seen: list[str] = []
    for section in ("runner_config", "train_dataset", "eval_dataset", "context", "runner_wrapper", "model",
                    "recompute_config", "processor"):
        _check_keys(doc.get(section), section, section, bad, seen)
    for section in ("train_dataset", "eval_dataset"):
        block = doc.get(section) or {}
        if isinstance(block, dict):
            _check_keys(block.get("data_loader"), "data_loader", f"{section}.data_loader", bad, seen)
    processor = doc.get("processor") or {}
    _check_keys(processor.get("tokenizer") if isinstance(processor, dict) else None, "tokenizer",
                "processor.tokenizer", bad, seen)
    wrapper = doc.get("runner_wrapper") or {}
    scale = wrapper.get("scale_sense") if isinstance(wrapper, dict) else None
    if isinstance(scale, dict):
        _check_keys(scale, "scale_sense", "runner_wrapper.scale_sense", bad, seen)
    callbacks = doc.get("callbacks")
    if callbacks is not None and not isinstance(callbacks, list):
        raise bad("callbacks", f"must be a list of {{type: ...}} blocks (got {callbacks!r})")
    for cb in callbacks or []:
        kind = cb.get("type") if isinstance(cb, dict) else None
        if kind not in CALLBACK_TYPES:
            raise bad("callbacks", f"type {kind!r} is not one of {list(CALLBACK_TYPES)}")
        _check_keys(cb, kind, f"callbacks.{kind}", bad, seen)
    new = [key for key in seen if key not in _logged_ignored]
    if new:
        _logged_ignored.update(new)
        log.info("MindFormers keys cllama reads but does not act on (ignored): %s", ", ".join(new))


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _loss_scale(value: Any, bad: Callable) -> Optional[dict]:
    """runner_wrapper.scale_sense: a DynamicLossScaleUpdateCell block, or None for no loss scaling."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or value.get("type") != "DynamicLossScaleUpdateCell":
        raise bad("runner_wrapper.scale_sense", "use {type: DynamicLossScaleUpdateCell, loss_scale_value, "
                                                "scale_factor, scale_window}, or omit it (no loss scaling)")
    where = "runner_wrapper.scale_sense"
    return {"loss_scale_value": _positive(value.get("loss_scale_value", 65536), f"{where}.loss_scale_value", bad),
            "scale_factor": _positive(value.get("scale_factor", 2), f"{where}.scale_factor", bad, 1.0),
            "scale_window": float(_int(value.get("scale_window", 1000), f"{where}.scale_window", bad, 1))}


def run_from_params(config: str | os.PathLike, output_dir: str | os.PathLike, data: str, val_data: str = "",
                    steps: int = 0, batch_size: int = 8, learning_rate: float = 1e-3, eval_every: int = 50,
                    save_steps: int = 100, seed: int = 0, tokenizer: str | os.PathLike = "",
                    load_checkpoint: str | os.PathLike = "", overrides: Optional[dict] = None) -> RunConfig:
    """A run YAML with the training notebooks' parameters set under their MindFormers keys (steps 0:
    the YAML's epochs; empty tokenizer / load_checkpoint: the YAML's), then `overrides` (dotted keys)."""
    keys: dict[str, Any] = {
        "output_dir": str(output_dir), "seed": seed, "train_dataset.data_loader.dataset_dir": str(data),
        "runner_config.batch_size": batch_size, "runner_config.max_steps": steps or -1,
        "lr_schedule.learning_rate": learning_rate, "eval_step_interval": eval_every,
        "eval_dataset.data_loader.dataset_dir": str(val_data or ""), "do_eval": bool(val_data),
        "callbacks.CheckpointMointor.save_checkpoint_steps": save_steps}
    if tokenizer:
        keys["processor.tokenizer.vocab_file"] = str(tokenizer)
    if load_checkpoint:
        keys["load_checkpoint"] = str(load_checkpoint)
    return load_run_config(config, {**keys, **(overrides or {})})


def peft_overrides(peft: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                   targets: str = DEFAULT_TARGETS) -> dict:
    """Run YAML overrides for a notebook's `peft` choice: "" keeps what the YAML says, "none" is full
    finetuning (a pet_config the YAML has is dropped), "lora" sets MindFormers' pet_config from the LoRA
    parameters."""
    if peft == "":
        return {}
    if peft == "none":
        return {"model.model_config.pet_config": None}
    if peft == "lora":
        return {"model.model_config.pet_config": LoraConfig(rank, alpha, dropout, targets).to_pet_config()}
    raise ValueError(f"peft: {peft!r} is not supported; use \"\" (the run YAML's), none (full finetuning) or lora")


def save_run_config(run: RunConfig, path: str | os.PathLike) -> Path:
    """Write the run document as YAML (atomically); load_run_config reads it back."""
    import yaml

    return atomic_write(path, yaml.safe_dump(run.doc, sort_keys=False))
