"""The compiled train step against transformers + torch.optim.AdamW, loss scaling, accumulation."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from cllama.checkpoint.model_dir import hf_to_ms_name, load_hf_weights, random_model
from cllama.config import ModelConfig
from cllama.model import CodeLlama
from cllama.train.optim import build_optimizer
from cllama.train.steps import AccumulateStep, TrainStep
from tests.conftest import make_hf_llama

ADAMW = {"type": "AdamW", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
LRS = [1e-3, 2e-3, 1.5e-3]


def _batches(rng, n=3):
    out = []
    for _ in range(n):
        ids = rng.integers(3, 32016, (2, 17))
        labels = ids.copy()
        labels[0, :5] = -100  # a masked prompt
        ids[1, 13:] = 0       # padding
        labels[1, 13:] = 0
        out.append((ids, labels))
    return out


def _torch_run(hf, batches, clip):
    params = dict(hf.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=LRS[0], betas=(0.9, 0.95), eps=1e-8)
    hf.train()
    losses, norms = [], []
    for (ids, labels), lr in zip(batches, LRS):
        logits = hf(torch.tensor(ids[:, :-1])).logits
        target = torch.tensor(labels[:, 1:]).clone()
        target[torch.tensor(ids[:, :-1]) == 0] = -100
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(hf.parameters(), clip if clip else 1e9)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses.append(float(loss.detach()))
    return {hf_to_ms_name(n): p.detach().numpy() for n, p in params.items()}, losses, norms


@pytest.fixture(scope="module")
def torch_and_ms_runs():
    """Three AdamW steps with clipping (max norm 0.05, active every step), both sides."""
    rng = np.random.default_rng(7)
    batches = _batches(rng)
    hf = make_hf_llama(seed=5)
    model = CodeLlama(ModelConfig.from_hf(hf.config.to_dict()))
    load_hf_weights(model, hf.state_dict())
    step = TrainStep(model, build_optimizer(ADAMW, model.trainable_params()), max_grad_norm=0.05)
    ms_losses, ms_norms = [], []
    for (ids, labels), lr in zip(batches, LRS):
        loss, norm, overflow, _ = step(Tensor(ids, ms.int32), Tensor(labels, ms.int32), Tensor(lr, ms.float32))
        ms_losses.append(float(loss.asnumpy()))
        ms_norms.append(float(norm.asnumpy()))
        assert not bool(overflow.asnumpy())
    ms_weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    return hf, batches, ms_weights, ms_losses, ms_norms


def test_adamw_steps_with_clipping_match_torch(torch_and_ms_runs):
    hf, batches, ms_weights, ms_losses, ms_norms = torch_and_ms_runs
    ref_weights, ref_losses, ref_norms = _torch_run(hf, batches, clip=0.05)
    assert min(ref_norms) > 0.05  # clipping was active on every step
    np.testing.assert_allclose(ms_losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(ms_norms, ref_norms, rtol=1e-4)
    worst = max(np.abs(ms_weights[n] - w).max() for n, w in ref_weights.items())
    assert worst < 1e-5, worst


def test_clipping_matters_in_that_comparison(torch_and_ms_runs):
    """The same torch run without clipping ends elsewhere: the parity above checks clipping."""
    _, batches, ms_weights, _, _ = torch_and_ms_runs
    ref_weights, _, _ = _torch_run(make_hf_llama(seed=5), batches, clip=None)
    assert max(np.abs(ms_weights[n] - w).max() for n, w in ref_weights.items()) > 1e-4


def _tiny(seq=16):
    return ModelConfig.from_name("tiny", seq_length=seq, vocab_size=512, num_layers=1)


def test_overflow_skips_the_update_and_lowers_the_scale(rng):
    """Loss scaling path on CPU: a scale of 1e38 overflows float32 gradients, so the step leaves the
    weights alone and DynamicLossScaleUpdateCell halves the scale; a finite scale then trains."""
    model = random_model(_tiny(), seed=1)
    opt = build_optimizer({"type": "FP32StateAdamWeightDecay"}, model.trainable_params())
    step = TrainStep(model, opt, max_grad_norm=1.0,
                     loss_scale={"loss_scale_value": 1e38, "scale_factor": 2, "scale_window": 1000})
    ids = Tensor(rng.integers(1, 512, (2, 17)), ms.int32)
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    loss, norm, overflow, scale = step(ids, ids, Tensor(1e-2, ms.float32))
    assert bool(overflow.asnumpy()) and float(scale.asnumpy()) == pytest.approx(1e38)
    assert all(np.array_equal(p.asnumpy(), before[n]) for n, p in model.parameters_and_names())
    assert float(step.scale_sense.asnumpy()) == pytest.approx(5e37)
    assert int(opt.global_step.asnumpy()) == 0
    step.scale_sense.set_data(Tensor(1024.0, ms.float32))
    _, norm, overflow, _ = step(ids, ids, Tensor(1e-2, ms.float32))
    assert not bool(overflow.asnumpy()) and np.isfinite(float(norm.asnumpy()))
    assert int(opt.global_step.asnumpy()) == 1
    assert not np.array_equal(model.lm_head.weight.asnumpy(), before["lm_head.weight"])


def test_accumulation_equals_the_mean_of_micro_batch_gradients(rng):
    """Two micro-batches accumulated == one step on their mean gradient (same norm and weights),
    with a loss scale folded in. (eps 1e-3: Adam's first step is ~sign(g), which would turn
    float32 rounding of near-zero gradients into full-size differences.)"""
    adamw = {**ADAMW, "eps": 1e-3}
    ids = [Tensor(rng.integers(1, 512, (2, 17)), ms.int32) for _ in range(2)]
    scale = {"loss_scale_value": 256.0, "scale_factor": 2, "scale_window": 1000}
    a = random_model(_tiny(), seed=2)
    step_a = TrainStep(a, build_optimizer(adamw, a.trainable_params()), 1.0, accumulate=2, loss_scale=scale)
    AccumulateStep(step_a)(ids[0], ids[0])
    _, norm_a, _, _ = step_a(ids[1], ids[1], Tensor(1e-2, ms.float32))
    assert all(not p.asnumpy().any() for p in step_a.accu)  # buffers cleared after the update

    b = random_model(_tiny(), seed=2)
    both = Tensor(np.concatenate([ids[0].asnumpy(), ids[1].asnumpy()]), ms.int32)  # no padding: same mean
    step_b = TrainStep(b, build_optimizer(adamw, b.trainable_params()), 1.0)
    _, norm_b, _, _ = step_b(both, both, Tensor(1e-2, ms.float32))
    assert float(norm_a.asnumpy()) == pytest.approx(float(norm_b.asnumpy()), rel=1e-5)
    for (n, p), q in zip(a.parameters_and_names(), b.get_parameters()):
        np.testing.assert_allclose(p.asnumpy(), q.asnumpy(), atol=1e-6, err_msg=n)
