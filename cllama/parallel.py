"""Parallel layout: MindFormers' `parallel_config` (data/model/pipeline parallel) and its checks."""
from __future__ import annotations

import dataclasses
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
    def from_dict(cls, values: dict, source: str = "parallel_config") -> "ParallelConfig":
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
        for ok, field, what in checks:
            if not ok:
                raise ValueError(f"parallel_config.{field}={getattr(self, field)} must divide {what}; "
                                 f"choose a {field} that divides it")
        if device_num is not None and device_num != self.device_num:
            raise ValueError(f"parallel_config: data_parallel*model_parallel*pipeline_stage = "
                             f"{self.device_num} but {device_num} devices are in use")
