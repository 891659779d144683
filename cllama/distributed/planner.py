"""How many devices: the memory each rank needs for a layout (weights, gradients, optimizer state,
activations), for training or generation, over every layout of a device count, and which fit.
Pure Python (no MindSpore): it answers on a laptop what MindSpore's DryRun answers only on Ascend.

Weights, gradients and optimizer state are exact arithmetic over every parameter
(cllama.checkpoint.names.param_shapes, and the LoRA adapters of cllama.checkpoint.lora) with the split
the model's shard strategies give it (cllama.model, cllama.layers: q/k/v/w1/w3 rows and wo/w2 columns
over model_parallel, embedding and lm_head over model_parallel unless vocab_emb_dp, norms whole; a LoRA
A splits like its weight's input, B like its output) on its pipeline stage. Weights are stored in
param_init_type (adapters in float32), gradients in the trained parameters' dtype, and AdamW keeps two
float32 moments per trained parameter (cllama.train.optim), split over data_parallel with the parallel
optimizer. A rank's figure is its pipeline stage's; the plan reports the busiest stage.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv:2205.05198), section 4: per layer and micro-batch of b sequences of s tokens, the
tensors the backward pass keeps, counted for Llama (no dropout; SwiGLU with ffn_hidden_size f; grouped
kv heads of width kv): attention sbh (q/k/v input) + sbh (Q) + 2 s b kv (K, V) + sbh (wo input) and the
softmax output n s^2 b (none with flash attention, which keeps a float32 row statistic n s b instead);
MLP sbh (input) + 4 sbf (w1 and w3 outputs, silu, the product); two RMSNorm inputs 2 sbh; all times the
compute dtype's bytes. Under model parallel t the norm and projection inputs (4 sbh) stay whole on every
rank and the rest splits by t (with sequence parallel everything splits, their equations 2 and 3).
Full recompute keeps only each layer's input (sbh, split by t with sequence parallel) plus one layer's
full set while it is recomputed (their section 5). With 1F1B pipeline scheduling stage k holds
min(micro_batch_num, pp - k) micro-batches in flight (their section 4.2.3). The last stage adds the
float32 logits and their softmax (2 * 4 s b V, split by t unless vocab_emb_dp).

Generation (`inference`): weights, the KV cache (2 layers b s kv bytes, split by t) and one layer's
working set for a prefill of the whole sequence plus the last position's float32 logits.
Not counted: the framework's own workspace, communication buffers and fragmentation; `max_device_memory`
(MindSpore's cap, 54 GB of a 64 GB Atlas 800T A2 in the model card) leaves room for them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from cllama.checkpoint.lora import LORA_A, LoraConfig, adapter_shapes
from cllama.checkpoint.names import param_shapes
from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig

GB = 10 ** 9  # device memory is quoted in GB (max_device_memory: "54GB")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MOMENT_BYTES = 8  # AdamW: two float32 moments per trained parameter
KINDS = ("weights", "gradients", "optimizer", "activations")
USABLE_FRACTION = 54 / 64  # the model card: max_device_memory 54GB of a 64 GB device
_COLUMN = re.compile(r"\.(wq|wk|wv|w1|w3)\.")   # output rows split over model parallel
_ROW = re.compile(r"\.(wo|w2)\.")                # input columns split over model parallel


@dataclass(frozen=True)
class PlanSettings:
    """What the memory of a layout depends on besides the model and the device counts."""

    seq_length: int = 4096
    batch_size: int = 1             # sequences per micro-batch on each data-parallel rank
    micro_batch_num: int = 1        # pipeline micro-batches per step
    recompute: bool = False
    select_recompute: bool = False  # recompute only the attention softmax (cllama's select_recompute)
    optimizer_parallel: bool = False
    seq_parallel: bool = False
    flash_attention: bool = False
    vocab_emb_dp: bool = True
    lora: Optional[LoraConfig] = None
    inference: bool = False

    @classmethod
    def create(cls, lora_rank: int = 0, **fields) -> PlanSettings:
        """Settings with LoRA of `lora_rank` on wq/wk/wv/wo (alpha = rank) when lora_rank > 0."""
        for name in ("seq_length", "batch_size", "micro_batch_num"):
            if name in fields and fields[name] < 1:
                raise ValueError(f"{name}: must be >= 1 (got {fields[name]})")
        if lora_rank < 0:
            raise ValueError(f"lora_rank: must be >= 0 (got {lora_rank}); 0 plans full finetuning")
        return cls(lora=LoraConfig(rank=lora_rank, alpha=float(lora_rank)) if lora_rank else None, **fields)


@dataclass
class LayoutPlan:
    """Per-rank bytes of one layout (the busiest pipeline stage) and whether it fits."""

    dp: int
    mp: int
    pp: int
    bytes: dict = field(default_factory=dict)  # by KINDS, plus "total"
    stage: int = 0                               # the busiest stage
    fits: bool = False

    def to_dict(self) -> dict:
        return {"dp": self.dp, "mp": self.mp, "pp": self.pp, "per_rank_bytes": self.bytes,
                "busiest_stage": self.stage, "fits": self.fits}


def _stage(name: str, layers: int, pp: int) -> int:
    if name.startswith("model.tok_embeddings"):
        return 0
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) // (layers // pp) if m else pp - 1


def _parts(name: str, mp: int, vocab_emb_dp: bool) -> int:
    """Into how many slices model parallel cuts a parameter (cllama.model's strategies)."""
    if name.startswith(("model.tok_embeddings", "lm_head")):
        return 1 if vocab_emb_dp else mp
    if _COLUMN.search(name):  # weight and B split their output rows, A stays whole
        return 1 if name.endswith(LORA_A) else mp
    if _ROW.search(name):     # weight and A split their input columns, B stays whole
        return mp if name.endswith((".weight", LORA_A)) else 1
    return 1


def parameter_bytes(config: ModelConfig, mp: int, pp: int, settings: PlanSettings) -> list[dict]:
    """Per stage: bytes of weights, gradients and optimizer state on one rank of that stage (before
    the parallel optimizer's split), from every parameter's shape and split."""
    stages = [{"weights": 0, "trained": 0, "trained_bytes": 0} for _ in range(pp)]
    param = DTYPE_BYTES[config.param_init_type]
    shapes = [(n, s, param, settings.lora is None) for n, s in param_shapes(config).items()]
    if settings.lora is not None:
        shapes += [(n, s, 4, True) for n, s in adapter_shapes(config, settings.lora).items()]
    for name, shape, itemsize, trained in shapes:
        elements = math.prod(shape) // _parts(name, mp, settings.vocab_emb_dp)
        stage = stages[_stage(name, config.num_layers, pp)]
        stage["weights"] += elements * itemsize
        if trained and not settings.inference:
            stage["trained"] += elements
            stage["trained_bytes"] += elements * itemsize
    return stages


def layer_activation_bytes(config: ModelConfig, mp: int, settings: PlanSettings, full: bool = False) -> float:
    """Bytes one decoder layer keeps for the backward pass for one micro-batch on one rank (see the
    module docstring); `full` ignores recompute (the set a recomputed layer rebuilds)."""
    s, b, h, f = settings.seq_length, settings.batch_size, config.hidden_size, config.ffn_hidden_size
    kv, n = config.n_kv_heads * config.head_dim, config.num_heads
    a = DTYPE_BYTES[config.compute_dtype]
    split = mp if settings.seq_parallel else 1
    if settings.recompute and not full:
        return a * s * b * h / split
    whole = a * 4 * s * b * h                                 # 2 norm inputs, q/k/v input, MLP input
    parted = a * (2 * s * b * h + 2 * s * b * kv + 4 * s * b * f)  # Q, wo input, K, V; MLP intermediates
    if settings.flash_attention:
        parted += 4 * n * s * b                                # FlashAttention's float32 row statistic
    elif not settings.select_recompute:
        parted += a * n * s * s * b                            # the softmax output
    if settings.lora is not None:                              # the low-rank intermediate of each adapter
        per_layer = len(settings.lora.targets(config)) // config.num_layers
        parted += a * s * b * settings.lora.rank * per_layer
    return whole / split + parted / mp


def _logits_bytes(config: ModelConfig, mp: int, settings: PlanSettings, positions: int) -> float:
    return 2 * 4 * positions * settings.batch_size * config.vocab_size / (1 if settings.vocab_emb_dp else mp)


def plan_layout(config: ModelConfig, dp: int, mp: int, pp: int, settings: PlanSettings,
                usable_bytes: float) -> LayoutPlan:
    """Per-rank bytes of a dp x mp x pp layout on its busiest stage, and whether it fits `usable_bytes`."""
    stages = parameter_bytes(config, mp, pp, settings)
    per_stage_layers = config.num_layers // pp
    best: Optional[LayoutPlan] = None
    for k, stage in enumerate(stages):
        if settings.inference:
            kv_cache = 2 * per_stage_layers * settings.batch_size * settings.seq_length * config.n_kv_heads \
                * config.head_dim * DTYPE_BYTES[config.compute_dtype] / mp
            prefill = replace(settings, recompute=False)
            work = layer_activation_bytes(config, mp, prefill) + _logits_bytes(config, mp, settings, 1) / 2
            kinds = {"weights": stage["weights"], "gradients": 0, "optimizer": 0, "activations": kv_cache + work}
        else:
            in_flight = min(settings.micro_batch_num, pp - k) if pp > 1 else 1
            acts = per_stage_layers * in_flight * layer_activation_bytes(config, mp, settings)
            if settings.recompute:
                acts += layer_activation_bytes(config, mp, settings, full=True)
            if k == pp - 1:
                acts += _logits_bytes(config, mp, settings, settings.seq_length)
            optimizer = stage["trained"] * MOMENT_BYTES / (dp if settings.optimizer_parallel else 1)
            kinds = {"weights": stage["weights"], "gradients": stage["trained_bytes"], "optimizer": optimizer,
                     "activations": acts}
        kinds = {key: int(math.ceil(value)) for key, value in kinds.items()}
        kinds["total"] = sum(kinds.values())
        if best is None or kinds["total"] > best.bytes["total"]:
            best = LayoutPlan(dp, mp, pp, kinds, k)
    best.fits = best.bytes["total"] <= usable_bytes
    return best


def candidate_layouts(config: ModelConfig, devices: int, settings: PlanSettings) -> list[tuple[int, int, int]]:
    """Every dp x mp x pp = devices the model's shapes allow (ParallelConfig.validate_for)."""
    out = []
    for mp in range(1, devices + 1):
        for pp in range(1, devices // mp + 1):
            if devices % (mp * pp):
                continue
            dp = devices // (mp * pp)
            try:
                pc = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp,
                                    micro_batch_num=max(settings.micro_batch_num, pp),
                                    vocab_emb_dp=settings.vocab_emb_dp, use_seq_parallel=settings.seq_parallel)
                pc.validate_for(replace(config, seq_length=settings.seq_length))
            except ValueError:
                continue
            out.append((dp, mp, pp))
    return out


def usable_memory(device_memory_gb: float, max_device_memory_gb: Optional[float] = None) -> float:
    """Bytes MindSpore may take on one device: max_device_memory when given, else the card's share
    (54 of 64 GB) of the device's memory."""
    if device_memory_gb <= 0 or (max_device_memory_gb is not None and max_device_memory_gb <= 0):
        raise ValueError(f"--device-memory {device_memory_gb} / --max-device-memory {max_device_memory_gb}: "
                         "must be positive (GB)")
    gb = max_device_memory_gb if max_device_memory_gb is not None else device_memory_gb * USABLE_FRACTION
    return min(gb, device_memory_gb) * GB


def plan(config: ModelConfig, devices: int, settings: PlanSettings, device_memory_gb: float = 64.0,
         max_device_memory_gb: Optional[float] = None,
         layouts: Optional[list[tuple[int, int, int]]] = None) -> dict:
    """The plan `cllama plan --json` prints: every candidate layout (or the given ones) of `devices`
    with per-rank bytes by kind and `fits`, fitting layouts first, smallest total first."""
    if devices < 1:
        raise ValueError(f"--devices {devices}: must be >= 1")
    usable = usable_memory(device_memory_gb, max_device_memory_gb)
    chosen = layouts if layouts is not None else candidate_layouts(config, devices, settings)
    if not chosen:
        raise ValueError(f"no dp x mp x pp layout of {devices} devices divides the model (heads {config.num_heads}, "
                         f"kv heads {config.n_kv_heads}, layers {config.num_layers}); try another --devices")
    plans = sorted((plan_layout(config, dp, mp, pp, settings, usable) for dp, mp, pp in chosen),
                   key=lambda p: (not p.fits, p.bytes["total"]))
    mode = "inference" if settings.inference else "training"
    return {"params": config.num_params(), "devices": devices, "mode": mode,
            "device_memory_gb": device_memory_gb, "usable_bytes": int(usable),
            "settings": {k: (v.to_pet_config() if isinstance(v, LoraConfig) else v)
                         for k, v in settings.__dict__.items()},
            "fits": any(p.fits for p in plans), "layouts": [p.to_dict() for p in plans]}


def plan_run(run, devices: int, device_memory_gb: float = 64.0) -> dict:
    """The plan of a run YAML's own layout on `devices` (what `cllama run --check` prints for a training
    stage): its parallel_config (semi-auto) or data parallel over the devices, batch, micro-batches,
    recompute, parallel optimizer, flash attention, LoRA, and context.max_device_memory."""
    pc = run.parallel_config
    semi = run.use_parallel and devices > 1 and int(run.parallel.get("parallel_mode", 0)) != 0
    layout = (pc.data_parallel, pc.model_parallel, pc.pipeline_stage) if semi else (devices, 1, 1)
    settings = PlanSettings(seq_length=run.model.seq_length, batch_size=run.batch_size,
                            micro_batch_num=pc.micro_batch_num if semi else 1, recompute=run.recompute,
                            select_recompute=run.select_recompute,
                            optimizer_parallel=bool(semi and run.parallel.get("enable_parallel_optimizer")),
                            seq_parallel=bool(semi and pc.use_seq_parallel),
                            flash_attention=run.model.use_flash_attention and run.device != "CPU",
                            vocab_emb_dp=pc.vocab_emb_dp, lora=run.lora)
    cap = str((run.doc.get("context") or {}).get("max_device_memory") or "")
    match = re.fullmatch(r"\s*([\d.]+)\s*GB\s*", cap)
    return plan(run.model, devices, settings, device_memory_gb, float(match.group(1)) if match else None, [layout])


def plan_table(result: dict) -> list[dict]:
    """One row per layout in GB (what notebook 05 and `cllama plan` show)."""
    rows = []
    for lay in result["layouts"]:
        row = {"layout": f"dp{lay['dp']} mp{lay['mp']} pp{lay['pp']}"}
        row.update({k: round(lay["per_rank_bytes"][k] / GB, 2) for k in (*KINDS, "total")})
        row["fits"] = lay["fits"]
        rows.append(row)
    return rows
