"""Parallel layout: MindFormers' `parallel_config` and its checks, `init_parallel` (communication +
`set_auto_parallel_context`). msrun command lines are cllama.train.launch's."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cllama.config import ModelConfig


@dataclass
class ParallelConfig:
    """MindFormers `parallel_config` keys. device count = data * model * pipeline."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4
    use_seq_parallel: bool = False
    micro_batch_interleave_num: int = 1

    def __post_init__(self) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num",
                     "gradient_aggregation_group", "micro_batch_interleave_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel_config.{name}: must be an integer >= 1 (got {value!r})")
        if self.pipeline_stage > 1 and self.micro_batch_num < self.pipeline_stage:
            raise ValueError(f"parallel_config.micro_batch_num: must be >= pipeline_stage="
                             f"{self.pipeline_stage} (got {self.micro_batch_num})")

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @classmethod
    def from_dict(cls, values: dict, source: str = "parallel_config") -> ParallelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate_for(self, config: ModelConfig, device_num: int | None = None) -> None:
        """Check the layout against a model: every split must divide evenly."""
        mp, pp = self.model_parallel, self.pipeline_stage
        checks = [
            (config.num_heads % mp == 0, "model_parallel", f"num_heads={config.num_heads}"),
            (config.n_kv_heads % mp == 0, "model_parallel", f"n_kv_heads={config.n_kv_heads}"),
            (config.ffn_hidden_size % mp == 0, "model_parallel", f"ffn_hidden_size={config.ffn_hidden_size}"),
            (config.num_layers % pp == 0, "pipeline_stage", f"num_layers={config.num_layers}"),
        ]
        if not self.vocab_emb_dp:
            checks.append((config.vocab_size % mp == 0, "model_parallel", f"vocab_size={config.vocab_size}"))
        if self.use_seq_parallel:
            checks.append((config.seq_length % mp == 0, "model_parallel", f"seq_length={config.seq_length}"))
        for ok, field, what in checks:
            if not ok:
                raise ValueError(f"parallel_config.{field}={getattr(self, field)} must divide {what}; "
                                 f"choose a {field} that divides it")
        if device_num is not None and device_num != self.device_num:
            raise ValueError(f"parallel_config: data_parallel*model_parallel*pipeline_stage = "
                             f"{self.device_num} but {device_num} devices are in use")


# ---- context -------------------------------------------------------------------------------------
PARALLEL_MODES = {0: "data_parallel", 1: "semi_auto_parallel", 2: "auto_parallel", 3: "hybrid_parallel"}
PARALLEL_KEYS = ("parallel_mode", "gradients_mean", "enable_alltoall", "full_batch", "search_mode",
                 "enable_parallel_optimizer", "strategy_ckpt_save_file", "strategy_ckpt_load_file",
                 "parallel_optimizer_config", "loss_repeated_mean", "dataset_strategy")


@dataclass
class ParallelEnv:
    """Where this process stands: its rank, the number of ranks, the MindSpore parallel mode."""

    rank: int = 0
    world: int = 1
    mode: str = "stand_alone"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_msrun() -> bool:
    """True in a process msrun started: a worker (MS_ROLE=MS_WORKER) or the scheduler (MS_SCHED),
    which runs the same script and serves the cluster inside `init()`."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in os.environ


def parallel_mode_name(value: Any) -> str:
    """MindFormers' `parallel.parallel_mode` (0-3 or a name) as MindSpore's mode name."""
    if value in PARALLEL_MODES:
        return PARALLEL_MODES[value]
    if value in PARALLEL_MODES.values():
        return value
    raise ValueError(f"parallel.parallel_mode: {value!r} is not one of {dict(PARALLEL_MODES)}")


def auto_parallel_settings(config: ParallelConfig, parallel: dict | None, device_num: int,
                           device: str = "Ascend", model: ModelConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for `mindspore.set_auto_parallel_context` from the YAML's `parallel:` and
    `parallel_config:` blocks, checked against the device count (and the model when given).
    One device gives {"parallel_mode": "stand_alone"}. Semi-auto/auto parallel need Ascend or GPU."""
    parallel = dict(parallel or {})
    unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
    if unknown:
        raise ValueError(f"parallel: unknown keys {unknown}; valid keys are {list(PARALLEL_KEYS)}")
    if device_num == 1:
        return {"parallel_mode": "stand_alone"}
    mode = parallel_mode_name(parallel.get("parallel_mode", 0))
    if mode == "data_parallel":
        if config.model_parallel != 1 or config.pipeline_stage != 1:
            raise ValueError(f"parallel_config: data parallel mode takes model_parallel=1 and pipeline_stage=1 "
                             f"(got {config.model_parallel}, {config.pipeline_stage}); set parallel.parallel_mode: 1 "
                             "(semi-auto) for model/pipeline parallel on Ascend")
        if config.data_parallel not in (1, device_num):
            raise ValueError(f"parallel_config.data_parallel={config.data_parallel} but {device_num} devices "
                             "are in use; set it to the device count")
        return {"parallel_mode": mode, "gradients_mean": True, "device_num": device_num}
    if device == "CPU":
        raise ValueError(f"parallel.parallel_mode: {mode} needs Ascend or GPU (MindSpore runs only data "
                         "parallel on CPU); set parallel_mode: 0 with model_parallel=1, pipeline_stage=1")
    if model is not None:
        config.validate_for(model, device_num)
    elif device_num != config.device_num:
        raise ValueError(f"parallel_config: data_parallel*model_parallel*pipeline_stage = {config.device_num} "
                         f"but {device_num} devices are in use")
    settings = {"parallel_mode": mode, "device_num": device_num,
                "gradients_mean": bool(parallel.get("gradients_mean", False)),
                "full_batch": bool(parallel.get("full_batch", True)),
                "enable_parallel_optimizer": bool(parallel.get("enable_parallel_optimizer", False)),
                "pipeline_stages": config.pipeline_stage}
    for key in ("enable_alltoall", "search_mode", "strategy_ckpt_save_file", "strategy_ckpt_load_file",
                "parallel_optimizer_config", "loss_repeated_mean", "dataset_strategy"):
        if key in parallel:
            settings[key] = parallel[key]
    if mode == "semi_auto_parallel":
        settings.pop("search_mode", None)  # only meaningful for auto_parallel
    return settings


def init_parallel(config: ParallelConfig, parallel: dict | None = None, model: ModelConfig | None = None,
                  device: str | None = None) -> ParallelEnv:
    """Initialise communication and `set_auto_parallel_context` when launched by msrun; on one
    device (no msrun) it does nothing and returns rank 0 of 1. Call it before any output: in
    msrun's scheduler process `init()` serves the cluster and the process ends there."""
    if not launched_by_msrun():
        return ParallelEnv()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    device = device or ms.get_context("device_target")
    init()
    rank, world = get_rank(), get_group_size()
    settings = auto_parallel_settings(config, parallel, world, device, model)
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(**settings)
    return ParallelEnv(rank=rank, world=world, mode=settings["parallel_mode"])
