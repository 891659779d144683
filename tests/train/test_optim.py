import math

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, nn

from cllama.train.optim import CosineWithWarmUpLR, GlobalNorm, build_lr_schedule, build_optimizer

SHAPES = [(6, 5), (5,), (3, 4, 2)]


def _params(rng, prefix="p"):
    return [Parameter(Tensor(rng.normal(size=s).astype(np.float32)), name=f"{prefix}{i}")
            for i, s in enumerate(SHAPES)]


def _grads(rng, steps):
    return [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


class _Apply(nn.Cell):
    """One optimizer call as a compiled graph."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer

    def construct(self, grads, lr, divisor):
        return self.optimizer(grads, lr, divisor)


def _run(opt, grads, lrs, divisor=1.0):
    apply = _Apply(opt)
    for g, lr in zip(grads, lrs):
        apply(ms.mutable(tuple(Tensor(x) for x in g)), Tensor(lr, ms.float32), Tensor(divisor, ms.float32))
    return [p.asnumpy() for p in opt.params]


@pytest.mark.parametrize("fused", [True, False])
def test_mindformers_flavour_matches_mindspore_adamweightdecay(fused, rng):
    """FP32StateAdamWeightDecay == nn.AdamWeightDecay (decay on matrices only), step for step."""
    grads, lrs = _grads(rng, 4), [1e-2, 2e-2, 5e-3, 1e-2]
    start = _params(rng)
    ours = build_optimizer({"type": "FP32StateAdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                            "weight_decay": 0.1}, [p.clone() for p in start], fused=fused)
    ref_params = [Parameter(p.value().copy(), name=f"r{i}") for i, p in enumerate(start)]
    decay = [p for p in ref_params if p.ndim >= 2]
    groups = [{"params": decay, "weight_decay": 0.1},
              {"params": [p for p in ref_params if p.ndim < 2], "weight_decay": 0.0},
              {"order_params": ref_params}]
    ref = nn.AdamWeightDecay(groups, learning_rate=Parameter(Tensor(lrs[0], ms.float32), name="lr"),
                             beta1=0.9, beta2=0.95, eps=1e-8)
    for i, (g, lr) in enumerate(zip(grads, lrs)):
        _run(ours, [g], [lr])
        ref.learning_rate.set_data(Tensor(lr, ms.float32))  # the optimizer keeps its own copy
        ref(tuple(Tensor(x) for x in g))
        for a, b in zip(ours.params, ref_params):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-6, err_msg=f"step {i}")
    for a, b in zip(ours.moments2, ref.moments2):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5)
    assert all(m.dtype == ms.float32 for m in ours.moments1)
    assert ours.moments1[0].name == "adam_m.p0" and int(ours.global_step.asnumpy()) == 4


@pytest.mark.parametrize("fused", [True, False])
def test_torch_flavour_matches_torch_adamw(fused, rng):
    """type AdamW == torch.optim.AdamW (bias correction, decoupled decay) over several steps, with a
    gradient divisor standing for loss scale / clipping."""
    grads, lrs = _grads(rng, 5), [1e-2, 3e-2, 2e-2, 1e-2, 5e-3]
    start = _params(rng)
    ours = build_optimizer({"type": "AdamW", "beta1": 0.9, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1},
                           [p.clone() for p in start], fused=fused)
    tparams = [torch.nn.Parameter(torch.tensor(p.asnumpy())) for p in start]
    topt = torch.optim.AdamW([{"params": [p for p in tparams if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in tparams if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lrs[0], betas=(0.9, 0.95), eps=1e-6)
    for g, lr in zip(grads, lrs):
        _run(ours, [g], [lr], divisor=4.0)
        for group in topt.param_groups:
            group["lr"] = lr
        for p, x in zip(tparams, g):
            p.grad = torch.tensor(x) / 4.0
        topt.step()
    for a, b in zip(ours.params, tparams):
        np.testing.assert_allclose(a.asnumpy(), b.detach().numpy(), atol=1e-6)


def test_global_norm(rng):
    grads = [Tensor(x) for x in _grads(rng, 1)[0]]

    class Norm(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm = GlobalNorm()

        def construct(self, g):
            return self.norm(g)

    expected = math.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    assert abs(float(Norm()(ms.mutable(tuple(grads))).asnumpy()) - expected) < 1e-4


def test_cosine_schedule_values():
    s = CosineWithWarmUpLR(learning_rate=1e-3, total_steps=100, lr_end=1e-5, warmup_ratio=0.1)
    assert s.warmup_steps == 10
    assert s(0) == 0.0 and s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)
    for step in (10, 37, 55, 99):
        progress = (step - 10) / 90
        expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * progress))
        assert s(step) == pytest.approx(expected, rel=1e-12)
    assert s(100) == 1e-5 and s(150) == 1e-5
    steps = CosineWithWarmUpLR(learning_rate=2.0, total_steps=10, warmup_steps=4, warmup_lr_init=1.0)
    assert steps(2) == pytest.approx(1.5) and steps(4) == pytest.approx(2.0)


def test_lr_schedule_from_yaml_block():
    s = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": "5.e-6", "lr_end": 0,
                           "warmup_ratio": 0.03, "total_steps": -1}, total_steps=1000)
    assert s.total_steps == 1000 and s.warmup_steps == 30 and s.learning_rate == 5e-6
    with pytest.raises(ValueError, match="lr_schedule.type: 'Linear'"):
        build_lr_schedule({"type": "Linear", "learning_rate": 1.0}, 10)
    with pytest.raises(ValueError, match="unknown keys \\['warmup'\\]"):
        build_lr_schedule({"learning_rate": 1.0, "warmup": 3}, 10)
    with pytest.raises(ValueError, match="warmup_ratio"):
        build_lr_schedule({"learning_rate": 1.0, "warmup_ratio": 1.5}, 10)


def test_optimizer_block_errors():
    p = [Parameter(Tensor(np.zeros((2, 2), np.float32)), name="w")]
    with pytest.raises(ValueError, match="optimizer.type: 'SGD'"):
        build_optimizer({"type": "SGD"}, p)
    with pytest.raises(ValueError, match="optimizer.beta2"):
        build_optimizer({"type": "AdamW", "beta2": 1.0}, p)
