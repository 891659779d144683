"""Compiled training steps: one optimizer step as one graph (TrainStep), gradient accumulation
(AccumulateStep) and validation loss (EvalStep). With pipeline stages the step runs the loss
through MindSpore's `Pipeline` cell (micro-batches) and, under semi-auto parallel, its
`PipelineGradReducer`."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer
from mindspore.parallel.nn import Pipeline, PipelineGradReducer

from cllama.model import CodeLlama
from cllama.train.optim import AdamW, GlobalNorm


class LossCell(nn.Cell):
    """model.loss(input_ids, labels) as a cell (gradients are taken of a cell)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.model.loss(input_ids, labels)


class TrainStep(nn.Cell):
    """One optimizer step as one graph: forward, backward, (all-reduce over data-parallel ranks),
    global-norm clipping, AdamW. `construct(input_ids, labels, lr) -> (loss, grad_norm, overflow,
    loss_scale)`.

    Loss scale, gradient accumulation and clipping are folded into the single divisor the fused
    AdamW kernel applies to the gradients, so no pass rewrites the gradients. With a loss scale
    (float16 on Ascend) gradients are taken of loss * scale; a non-finite norm skips the update and
    MindSpore's DynamicLossScaleUpdateCell lowers the scale. With accumulate > 1, AccumulateStep
    adds the first accumulate-1 micro-batches' gradients into `accu_grads.*` buffers.

    `world` > 1 is data parallel over that many ranks (gradients all-reduced here); under semi-auto
    parallel MindSpore inserts the reductions itself and `world` stays 1. `micro_batches` > 1 splits
    each batch into that many micro-batches through `mindspore.parallel.nn.Pipeline` (pipeline
    parallel); the Pipeline cell sums their losses, so the step divides loss and gradients by
    `micro_batches`. When the auto-parallel context has pipeline stages, MindSpore accumulates the
    micro-batch gradients into the PipelineGradReducer's buffers, which the step then reads.
    """

    def __init__(self, model: CodeLlama, optimizer: AdamW, max_grad_norm: Optional[float] = 1.0,
                 accumulate: int = 1, loss_scale: Optional[dict] = None, world: int = 1,
                 micro_batches: int = 1) -> None:
        super().__init__(auto_prefix=False)
        if micro_batches > 1 and accumulate > 1:
            raise ValueError("gradient_accumulation_steps must be 1 with pipeline stages: micro_batch_num "
                             "micro-batches already accumulate gradients")
        self.micro_batches = micro_batches
        self.network = Pipeline(LossCell(model), micro_batches) if micro_batches > 1 else LossCell(model)
        self.optimizer = optimizer
        self.weights = optimizer.params
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.norm = GlobalNorm()
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.accumulate = accumulate
        self.accu = None
        if accumulate > 1:
            self.accu = ms.ParameterTuple([Parameter(initializer("zeros", p.shape, ms.float32),
                                                     name=f"accu_grads.{p.name}", requires_grad=False)
                                           for p in self.weights])
        self.scaling = loss_scale is not None
        scale = float(loss_scale.get("loss_scale_value", 65536)) if self.scaling else 1.0
        self.scale_sense = Parameter(Tensor(scale, ms.float32), name="scale_sense", requires_grad=False)
        if self.scaling:
            self.scale_update = nn.DynamicLossScaleUpdateCell(
                scale, int(loss_scale.get("scale_factor", 2)), int(loss_scale.get("scale_window", 1000)))
        self.world = world
        if world > 1:
            self.reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=world)
            self.allreduce = ops.AllReduce()
        self.pipelined = micro_batches > 1 and (ms.get_auto_parallel_context("pipeline_stages") or 1) > 1
        if self.pipelined:
            self.pipeline_reducer = PipelineGradReducer(self.weights)
            self.pipeline_reducer.scale_sense.name = "pipeline_scale_sense"  # ours is scale_sense

    def state(self) -> list[Parameter]:
        """Loss-scale state to checkpoint (scale_sense and the update cell's counters)."""
        if self.scaling:
            return [self.scale_sense, self.scale_update.cur_iter, self.scale_update.last_overflow_iter]
        return [self.scale_sense]

    def construct(self, input_ids: Tensor, labels: Tensor, lr: Tensor):
        scale = self.scale_sense.value()
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale.astype(loss.dtype))
        if self.accumulate > 1:
            summed = ()
            for i in range(len(grads)):
                summed = summed + (grads[i].astype(ms.float32) + self.accu[i],)
            grads = summed
        if self.pipelined:
            grads = self.pipeline_reducer(grads)
        if self.world > 1:
            grads = self.reducer(grads)
            loss = self.allreduce(loss) / self.world
        if self.micro_batches > 1:
            loss = loss / self.micro_batches
        raw_norm = self.norm(grads)
        divisor = scale * self.accumulate * self.micro_batches
        norm = raw_norm / divisor
        if self.max_grad_norm > 0:
            divisor = divisor * ops.maximum((norm + 1e-6) / self.max_grad_norm, 1.0)
        overflow = ops.zeros((), ms.bool_)
        if self.scaling:
            overflow = self.scale_update(self.scale_sense, ops.logical_not(ops.isfinite(raw_norm)))
            if not overflow:
                self.optimizer(grads, lr, divisor)
        else:
            self.optimizer(grads, lr, divisor)
        if self.accumulate > 1:
            for accu in self.accu:
                ops.assign(accu, ops.zeros_like(accu))
        return loss, norm, overflow, scale


class AccumulateStep(nn.Cell):
    """Forward + backward of one micro-batch, gradients added into the TrainStep's accu_grads."""

    def __init__(self, step: TrainStep) -> None:
        super().__init__(auto_prefix=False)
        if step.accu is None:
            raise ValueError("AccumulateStep: the TrainStep was built with accumulate=1")
        self.network, self.weights, self.accu = step.network, step.weights, step.accu
        self.scale_sense = step.scale_sense
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.world = step.world
        if self.world > 1:
            self.allreduce = ops.AllReduce()

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, self.scale_sense.value().astype(loss.dtype))
        for i in range(len(grads)):
            ops.assign_add(self.accu[i], grads[i].astype(ms.float32))
        if self.world > 1:
            loss = self.allreduce(loss) / self.world
        return loss


class EvalStep(nn.Cell):
    """Validation loss of one batch (no gradients)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        self.network = LossCell(model)

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.network(input_ids, labels)
