"""Optimizers and the learning-rate schedule: AdamW in two flavours with float32 state, CosineWithWarmUpLR.

- `FP32StateAdamWeightDecay` (MindFormers; MindSpore `nn.AdamWeightDecay` semantics, REFERENCE.md
  section 4): update = m / (sqrt(v) + eps) + weight_decay * w, NO bias correction.
- `AdamW` (torch.optim.AdamW): bias-corrected, decoupled decay w *= 1 - lr * weight_decay.

Both run one fused CPU kernel per parameter (`FusedCastAdamWeightDecay`: moments, update and the
gradient divisor in one pass); torch-style AdamW uses the same kernel with rescaled hyper-parameters
(lr' = lr sqrt(bc2) / bc1, eps' = eps sqrt(bc2), wd' = wd bc1 / sqrt(bc2), exactly torch's step).
Elsewhere (Ascend/GPU) the same formula runs as plain element-wise ops in float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

OPTIMIZERS = {"AdamW": True, "FP32StateAdamWeightDecay": False, "AdamWeightDecay": False}  # -> bias correction
OPTIMIZER_KEYS = ("type", "beta1", "beta2", "eps", "weight_decay", "learning_rate")
LR_SCHEDULES = ("CosineWithWarmUpLR",)
LR_KEYS = ("type", "learning_rate", "lr_end", "warmup_steps", "warmup_ratio", "warmup_lr_init",
           "total_steps", "num_cycles", "decay_steps")


# ---- learning rate ---------------------------------------------------------------------------
@dataclass
class CosineWithWarmUpLR:
    """MindFormers' CosineWithWarmUpLR: linear warm-up from warmup_lr_init to learning_rate over
    warmup_steps (or int(total_steps * warmup_ratio)), then a cosine to lr_end; lr_end from
    decay_steps (default total_steps) on. `schedule(step)` is the rate of optimizer step `step`
    (0-based: the first update uses schedule(0), as MindSpore optimizers read global_step)."""

    learning_rate: float
    total_steps: int
    lr_end: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None
    warmup_lr_init: float = 0.0
    num_cycles: float = 0.5
    decay_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.total_steps is None or self.total_steps < 1:
            raise ValueError(f"lr_schedule.total_steps: must be >= 1 once resolved (got {self.total_steps}); "
                             "-1 means the run's number of steps")
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio <= 1.0:
                raise ValueError(f"lr_schedule.warmup_ratio: must be in [0, 1] (got {self.warmup_ratio})")
            self.warmup_steps = int(self.total_steps * self.warmup_ratio)
        if self.warmup_steps < 0:
            raise ValueError(f"lr_schedule.warmup_steps: must be >= 0 (got {self.warmup_steps})")

    def __call__(self, step: int) -> float:
        decay_steps = max(1, self.decay_steps if self.decay_steps is not None else self.total_steps)
        if step >= decay_steps:
            return float(self.lr_end)
        if step < self.warmup_steps:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        percent = max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))
        return self.lr_end + (self.learning_rate - self.lr_end) * percent


def build_lr_schedule(block: dict, total_steps: int, source: str = "lr_schedule") -> CosineWithWarmUpLR:
    """A schedule from a YAML `lr_schedule:` block; total_steps -1 (or absent) means `total_steps`."""
    kind = block.get("type", "CosineWithWarmUpLR")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"{source}.type: {kind!r} is not supported; use one of {list(LR_SCHEDULES)}")
    unknown = sorted(set(block) - set(LR_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {list(LR_KEYS)}")
    values = {k: v for k, v in block.items() if k != "type"}
    if values.get("total_steps") in (None, -1):
        values["total_steps"] = total_steps
    for key in ("learning_rate", "lr_end", "warmup_lr_init", "num_cycles", "warmup_ratio"):
        if values.get(key) is not None:
            values[key] = _number(values[key], f"{source}.{key}")
            if values[key] < 0:  # a negative rate climbs the loss instead of descending it
                raise ValueError(f"{source}.{key}: must be >= 0 (got {values[key]})")
    for key in ("total_steps", "warmup_steps", "decay_steps"):
        if values.get(key) is not None:
            number = _number(values[key], f"{source}.{key}")
            if number != int(number) or (number < 0 and not (key == "total_steps" and number == -1)):
                raise ValueError(f"{source}.{key}: must be a whole number >= 0"
                                 + (" (or -1: the run's number of steps)" if key == "total_steps" else "")
                                 + f" (got {values[key]!r})")
            values[key] = int(number)
    if "learning_rate" not in values:
        raise ValueError(f"{source}.learning_rate: missing; e.g. learning_rate: 1.e-5")
    if values["learning_rate"] == 0:
        raise ValueError(f"{source}.learning_rate: must be > 0 (got 0: nothing would train)")
    return CosineWithWarmUpLR(**values)


def _number(value, where: str) -> float:
    """A finite number: NaN and infinities (YAML `.nan`, `.inf`) are refused, as is `true`."""
    try:
        number = float(value)  # YAML reads `1e-5` (no dot) as a string
    except (TypeError, ValueError):
        raise ValueError(f"{where}: must be a number (got {value!r})") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{where}: must be a finite number (got {value!r})")
    return number


# ---- gradients --------------------------------------------------------------------------------
class GlobalNorm(nn.Cell):
    """sqrt(sum of squares) over a tuple of gradients, accumulated in float32 (one L2Loss per tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.l2 = ops.L2Loss()

    def construct(self, grads):
        squares = ()
        for g in grads:
            if g.dtype != ms.float32:
                g = g.astype(ms.float32)
            squares = squares + (self.l2(g),)
        return ops.sqrt(ops.addn(squares) * 2.0)


# ---- AdamW --------------------------------------------------------------------------------------
class AdamW(nn.Cell):
    """AdamW over `params` with float32 moments `adam_m.<name>`, `adam_v.<name>` and `global_step`
    (MindSpore/MindFormers checkpoint names).

    `construct(grads, lr, grad_divisor)` applies one step with gradients `grads / grad_divisor`
    (loss scale, accumulation and clipping folded into one scalar) and returns the new global_step.
    Weight decay applies to matrices only (ndim >= 2), not to norm weights.
    """

    def __init__(self, params: Sequence[Parameter], beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, bias_correction: bool = False,
                 fused: Optional[bool] = None) -> None:
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.moments1 = ms.ParameterTuple([_state(p, "adam_m") for p in params])
        self.moments2 = ms.ParameterTuple([_state(p, "adam_v") for p in params])
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.bias_correction = bias_correction
        self.decays = tuple(weight_decay if len(p.shape) >= 2 else 0.0 for p in params)
        if fused is None:
            fused = ms.get_context("device_target") == "CPU" and all(
                p.dtype in (ms.float32, ms.float16) for p in params)
        self.fused = fused
        self.fused_adam = ops.FusedCastAdamWeightDecay()

    def state(self) -> list[Parameter]:
        """Optimizer state to checkpoint: moments and global_step."""
        return list(self.moments1) + list(self.moments2) + [self.global_step]

    def construct(self, grads, lr: Tensor, grad_divisor: Tensor) -> Tensor:
        step = self.global_step + 1
        lr = lr.astype(ms.float32)
        eps = ops.ones((), ms.float32) * self.eps
        decay_scale = ops.ones((), ms.float32)
        if self.bias_correction:
            t = step.astype(ms.float32)
            bc1 = 1.0 - ops.pow(ops.ones((), ms.float32) * self.beta1, t)
            sqrt_bc2 = ops.sqrt(1.0 - ops.pow(ops.ones((), ms.float32) * self.beta2, t))
            lr = lr * sqrt_bc2 / bc1
            eps = eps * sqrt_bc2
            decay_scale = bc1 / sqrt_bc2
        beta1 = ops.ones((), ms.float32) * self.beta1
        beta2 = ops.ones((), ms.float32) * self.beta2
        divisor = grad_divisor.astype(ms.float32)
        for i in range(len(self.params)):
            decay = decay_scale * self.decays[i]
            if self.fused:
                self.fused_adam(self.params[i], self.moments1[i], self.moments2[i], lr, beta1, beta2, eps,
                                decay, grads[i], divisor)
            else:
                _adam_update(self.params[i], self.moments1[i], self.moments2[i], grads[i], lr, beta1, beta2,
                             eps, decay, divisor)
        ops.assign(self.global_step, step)
        return step


def _adam_update(param, m, v, grad, lr, beta1, beta2, eps, decay, divisor) -> None:
    """MindSpore AdamWeightDecay's update in float32 element-wise ops (any device)."""
    g = grad.astype(ms.float32) / divisor
    w = param.astype(ms.float32)
    next_m = beta1 * m + (1.0 - beta1) * g
    next_v = beta2 * v + (1.0 - beta2) * ops.square(g)
    update = next_m / (ops.sqrt(next_v) + eps) + decay * w
    ops.assign(param, (w - lr * update).astype(param.dtype))
    ops.assign(m, next_m)
    ops.assign(v, next_v)


def _state(param: Parameter, prefix: str) -> Parameter:
    """A float32 zero buffer shaped like `param`, cloned from it so that under semi-auto parallel
    it takes the parameter's layout (and its optimizer-parallel shard), as nn.Optimizer's states do."""
    state = param.clone(init="zeros")
    state.name = f"{prefix}.{param.name}"
    state.requires_grad = False
    if state.dtype != ms.float32:
        state.set_dtype(ms.float32)
    return state


def optimizer_settings(block: dict, source: str = "optimizer") -> dict:
    """Check a YAML `optimizer:` block; the AdamW keyword arguments it stands for."""
    kind = block.get("type", "FP32StateAdamWeightDecay")
    if kind not in OPTIMIZERS:
        raise ValueError(f"{source}.type: {kind!r} is not supported; use one of {list(OPTIMIZERS)} "
                         "(AdamW = torch-style with bias correction; the others = MindSpore AdamWeightDecay)")
    unknown = sorted(set(block) - set(OPTIMIZER_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {list(OPTIMIZER_KEYS)}")
    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    values = {k: _number(block.get(k, d), f"{source}.{k}") for k, d in defaults.items()}
    for name in ("beta1", "beta2"):
        if not 0.0 <= values[name] < 1.0:
            raise ValueError(f"{source}.{name}: must be in [0, 1) (got {values[name]})")
    if "learning_rate" in block:  # MindFormers' place for it; the schedule's learning_rate is the one used
        rate = _number(block["learning_rate"], f"{source}.learning_rate")
        if rate <= 0:
            raise ValueError(f"{source}.learning_rate: must be > 0 (got {rate})")
    if values["eps"] <= 0 or values["weight_decay"] < 0:
        raise ValueError(f"{source}: eps must be > 0 and weight_decay >= 0 (got {values['eps']}, "
                         f"{values['weight_decay']})")
    return {"bias_correction": OPTIMIZERS[kind], **values}


def build_optimizer(block: dict, params: Sequence[Parameter], source: str = "optimizer",
                    fused: Optional[bool] = None) -> AdamW:
    """An AdamW from a YAML `optimizer:` block; `type` picks the flavour (see OPTIMIZERS)."""
    return AdamW(params, fused=fused, **optimizer_settings(block, source))
