"""The model's building blocks (Linear, RMSNorm, Embedding, rotary embedding, the loss) with the
shard strategies MindSpore's semi-auto parallel reads, as MindFormers' Llama sets them; and the
dtype, RoPE-table and mask helpers.

Every sharded primitive is an attribute of its cell and gets its strategy from the cell's `shard`;
`param_ops()` names, for each parameter, the primitive and input that consume it, which is where
cllama.distributed.strategy reads the parameter layouts from. On one device (and on CPU) strategies
are inert: the numerics do not change.

Shapes in comments: B batch, T sequence, H hidden, V vocab, N = B*T rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from cllama.config import ModelConfig

log = logging.getLogger("cllama.model")

DTYPE = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
MASK_VALUE = -1e9  # added to masked attention scores (float32), exp() underflows to exactly 0


@dataclass(frozen=True)
class Dtypes:
    """What a model stores and computes in: parameters (param_init_type), matmuls
    (compute_dtype), RMSNorm (layernorm_compute_type) and attention softmax (softmax_compute_type)."""

    param: ms.Type
    compute: ms.Type
    norm: ms.Type
    softmax: ms.Type


def model_dtypes(config: ModelConfig, compute_dtype=None) -> Dtypes:
    """The config's dtypes on this device: on CPU everything computes in float32 (CPU MatMul has no
    bfloat16 kernel), bfloat16/float16 stay storage; `compute_dtype` overrides the matmul dtype."""
    cpu = ms.get_context("device_target") == "CPU"
    wanted = (config.compute_dtype, config.layernorm_compute_type, config.softmax_compute_type)
    if cpu and any(d != "float32" for d in wanted):
        log_once(f"CPU: computing in float32 (compute_dtype={config.compute_dtype}, layernorm_compute_type="
                 f"{config.layernorm_compute_type}, softmax_compute_type={config.softmax_compute_type} "
                 "are for Ascend)")
    compute, norm, softmax = (ms.float32 if cpu else DTYPE[d] for d in wanted)
    return Dtypes(DTYPE[config.param_init_type], compute_dtype or compute, norm, softmax)


_LOGGED: set = set()


def log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def rope_tables(config: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (length, hd) in float32 for rotate-half RoPE, with PI or NTK applied."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    positions = np.arange(length, dtype=np.float64)
    if config.extend_method == "PI":
        positions = positions / config.scaling_factor
    angles = np.outer(positions, inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def causal_mask(t: int) -> Tensor:
    """(1, 1, T, T) bool, True above the diagonal (future keys)."""
    r = ops.arange(t)
    return (r.reshape(1, -1) > r.reshape(-1, 1)).reshape(1, 1, t, t)


class Linear(nn.Cell):
    """y = x @ weight.T with weight stored [out, in] (like HF and MindFormers), no bias.

    `add_lora(path, a_init, scaling, dropout)` gives it a LoRA adapter (MindFormers' names
    `<path>.mindpet_delta_lora_a` (rank, in), `<path>.mindpet_delta_lora_b` (out, rank), float32,
    B zero): y += scaling * dropout(x) A^T B^T, with the adapter matmuls sharded like the weight's."""

    def __init__(self, in_dim: int, out_dim: int, dtypes: Dtypes) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.compute_dtype = dtypes.compute
        self.weight = Parameter(initializer(Normal(0.02), (out_dim, in_dim), dtypes.param), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)
        self.lora_rank = 0

    def add_lora(self, path: str, a_init: np.ndarray, scaling: float, dropout: float = 0.0) -> None:
        """An adapter of rank a_init.shape[0]: A = a_init, B = 0, parameters named under `path`."""
        rank = a_init.shape[0]
        self.lora_rank, self.lora_scaling = rank, scaling
        self.mindpet_delta_lora_a = Parameter(Tensor(a_init, ms.float32))
        self.mindpet_delta_lora_b = Parameter(Tensor(np.zeros((self.out_dim, rank), np.float32)))
        self.mindpet_delta_lora_a.name = f"{path}.mindpet_delta_lora_a"  # the cell path, as MindFormers names them
        self.mindpet_delta_lora_b.name = f"{path}.mindpet_delta_lora_b"
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_down, self.lora_up = ops.MatMul(transpose_b=True), ops.MatMul(transpose_b=True)
        self.lora_scale, self.lora_add = ops.Mul(), ops.Add()

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)
        y = self.matmul(rows, self.weight.astype(self.compute_dtype))
        if self.lora_rank:
            a = self.mindpet_delta_lora_a.astype(self.compute_dtype)
            b = self.mindpet_delta_lora_b.astype(self.compute_dtype)
            low = self.lora_down(self.lora_dropout(rows), a)
            y = self.lora_add(y, self.lora_scale(self.lora_up(low, b), self.lora_scaling))
        return y.reshape(lead + (self.out_dim,))

    def shard(self, strategy: tuple, out_strategy: tuple | None = None) -> None:
        """strategy ((rows, in), (out, in)) of the (N, in) x (out, in)^T MatMul. An adapter follows it:
        A splits `in` as the weight does, B splits `out` (MindFormers' LoRA layer)."""
        self.matmul.shard(in_strategy=strategy, out_strategy=out_strategy)
        if self.lora_rank:
            (dp, split_in), (split_out, _) = strategy
            self.lora_down.shard(((dp, split_in), (1, split_in)))
            self.lora_up.shard(((dp, 1), (split_out, 1)))
            self.lora_scale.shard(((dp, split_out), ()))
            self.lora_add.shard(((dp, split_out), (dp, split_out)))

    def param_ops(self) -> dict:
        ops_of = {"weight": (self.matmul, 1)}
        if self.lora_rank:
            ops_of.update({"mindpet_delta_lora_a": (self.lora_down, 1), "mindpet_delta_lora_b": (self.lora_up, 1)})
        return ops_of

    def shard_shapes(self, rows: int) -> dict:
        shapes = {"matmul": ((rows, self.in_dim), (self.out_dim, self.in_dim))}
        if self.lora_rank:
            r, out = self.lora_rank, (rows, self.out_dim)
            shapes.update({"lora_down": ((rows, self.in_dim), (r, self.in_dim)),
                           "lora_up": ((rows, r), (self.out_dim, r)), "lora_scale": (out, ()), "lora_add": (out, out)})
        return shapes


class RMSNorm(nn.Cell):
    """x / rms(x) * weight, computed in layernorm_compute_type, returned in the input dtype."""

    def __init__(self, dim: int, eps: float, dtypes: Dtypes) -> None:
        super().__init__()
        self.eps = eps
        self.norm_dtype = dtypes.norm
        self.weight = Parameter(initializer("ones", (dim,), dtypes.param), name="weight")
        self.square, self.mean = ops.Square(), ops.ReduceMean(keep_dims=True)
        self.add, self.rsqrt = ops.Add(), ops.Rsqrt()
        self.mul, self.mul_weight = ops.Mul(), ops.Mul()

    def normalize(self, x: Tensor) -> Tensor:
        """x / rms(x) in the norm dtype, without the weight."""
        x = x.astype(self.norm_dtype)
        return self.mul(x, self.rsqrt(self.add(self.mean(self.square(x), -1), self.eps)))

    def construct(self, x: Tensor) -> Tensor:
        return self.mul_weight(self.normalize(x), self.weight.astype(self.norm_dtype)).astype(x.dtype)

    def shard(self, strategy: tuple) -> None:
        """strategy of the input, e.g. (dp, 1, 1); the weight is never split."""
        for prim in (self.square, self.mean, self.rsqrt):
            prim.shard((strategy,))
        self.add.shard((strategy, ()))
        self.mul.shard((strategy, strategy))
        self.mul_weight.shard((strategy, (1,)))

    def param_ops(self) -> dict:
        return {"weight": (self.mul_weight, 1)}

    def shard_shapes(self, shape: tuple) -> dict:
        """Input shapes of each sharded primitive for an input of `shape`."""
        reduced = shape[:-1] + (1,)
        return {"square": (shape,), "mean": (shape,), "add": (reduced, ()), "rsqrt": (reduced,),
                "mul": (shape, reduced), "mul_weight": (shape, shape[-1:])}


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, dtypes: Dtypes) -> None:
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.embedding_weight = Parameter(initializer(Normal(0.02), (vocab, dim), dtypes.param),
                                          name="embedding_weight")
        self.gather = ops.Gather()

    def construct(self, ids: Tensor) -> Tensor:
        table = self.embedding_weight
        if table.dtype == ms.bfloat16:  # no bfloat16 Gather kernel on CPU
            table = table.astype(ms.float32)
        return self.gather(table, ids, 0)

    def shard(self, dp: int, mp: int, vocab_emb_dp: bool) -> None:
        """ids (B, T) split by dp; the table replicated (vocab_emb_dp) or its rows split by mp."""
        self.gather.shard(((1, 1), (dp, 1)) if vocab_emb_dp else ((mp, 1), (dp, 1)))

    def param_ops(self) -> dict:
        return {"embedding_weight": (self.gather, 0)}

    def shard_shapes(self, b: int, t: int) -> dict:
        return {"gather": ((self.vocab, self.dim), (b, t))}


class Rotary(nn.Cell):
    """Rotate-half RoPE in float32: x (B, n, T, hd) * cos + rotate_half(x) * sin, cos/sin (T, hd)."""

    def __init__(self) -> None:
        super().__init__()
        self.split, self.neg, self.concat = ops.Split(-1, 2), ops.Neg(), ops.Concat(-1)
        self.mul_cos, self.mul_sin, self.add = ops.Mul(), ops.Mul(), ops.Add()

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.astype(ms.float32)
        first, second = self.split(x)
        rotated = self.concat((self.neg(second), first))
        return self.add(self.mul_cos(x, cos), self.mul_sin(rotated, sin)).astype(dtype)

    def shard(self, strategy: tuple) -> None:
        """strategy of x, e.g. (dp, mp, 1, 1): heads split over model parallel."""
        for prim in (self.split, self.neg):
            prim.shard((strategy,))
        self.concat.shard((strategy, strategy))
        self.mul_cos.shard((strategy, (1, 1)))
        self.mul_sin.shard((strategy, (1, 1)))
        self.add.shard((strategy, strategy))

    def shard_shapes(self, shape: tuple) -> dict:
        half = shape[:-1] + (shape[-1] // 2,)
        return {"split": (shape,), "neg": (half,), "concat": (half, half), "mul_cos": (shape, shape[-2:]),
                "mul_sin": (shape, shape[-2:]), "add": (shape, shape)}


class CrossEntropy(nn.Cell):
    """sum(weights * nll) over rows with a hand-written backward, for training speed on one device.

    `(logits (N, V) float32, targets (N,) int32, weights (N,) float32) -> (loss, probs)`.
    One fused Softmax kernel serves both passes: lse = max - log(p[argmax]) (no ReduceMax,
    which is ~8x slower than ArgMaxWithValue on CPU), and d loss / d logits =
    weights * (probs - onehot(targets)), kept instead of autodiff's chain through logsumexp.
    """

    def __init__(self) -> None:
        super().__init__()
        self.argmax_with_value = ops.ArgMaxWithValue(axis=-1)

    def construct(self, logits: Tensor, targets: Tensor, weights: Tensor):
        probs = ops.softmax(logits, -1)
        top_index, top = self.argmax_with_value(logits)
        p_top = ops.gather_elements(probs, 1, top_index.reshape(-1, 1)).squeeze(1)  # = 1 / sum(exp(x - max))
        picked = ops.gather_elements(logits, 1, targets.reshape(-1, 1)).squeeze(1)
        nll = top - ops.log(p_top) - picked
        return (nll * weights).sum(), probs

    def bprop(self, logits: Tensor, targets: Tensor, weights: Tensor, out, dout):
        scale = weights * dout[0]  # (N,)
        grad = out[1] * scale.reshape(-1, 1)
        rows = ops.arange(logits.shape[0], dtype=targets.dtype)
        grad = ops.tensor_scatter_add(grad, ops.stack((rows, targets), 1), -scale)
        return grad.astype(logits.dtype), ops.zeros_like(targets), ops.zeros_like(weights)


class ShardedCrossEntropy(nn.Cell):
    """The same loss from primitives that shard over (dp, mp) with the vocabulary split across model
    parallel (MindFormers' formulation: a max-shifted log-softmax and a one-hot pick), differentiated
    by autodiff. `(logits, targets, weights) -> (loss, log_probs)`."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max, self.sum = ops.ReduceMax(keep_dims=True), ops.ReduceSum(keep_dims=True)
        self.sum_rows = ops.ReduceSum()
        self.shift, self.norm, self.exp, self.log = ops.Sub(), ops.Sub(), ops.Exp(), ops.Log()
        self.onehot, self.pick, self.weigh, self.total = ops.OneHot(), ops.Mul(), ops.Mul(), ops.ReduceSum()

    def construct(self, logits: Tensor, targets: Tensor, weights: Tensor):
        shifted = self.shift(logits, ops.stop_gradient(self.max(logits, -1)))
        log_probs = self.norm(shifted, self.log(self.sum(self.exp(shifted), -1)))
        hot = self.onehot(targets, self.vocab_size, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        picked = self.sum_rows(self.pick(log_probs, hot), -1)
        return self.total(self.weigh(-picked, weights)), log_probs

    def shard(self, dp: int, mp: int) -> None:
        """rows over dp, the vocabulary over mp (1 when lm_head is not split)."""
        rows, row = (dp, mp), (dp, 1)
        for prim in (self.max, self.sum, self.exp, self.sum_rows):
            prim.shard((rows,))
        self.log.shard((row,))
        self.shift.shard((rows, row))
        self.norm.shard((rows, row))
        self.onehot.shard((rows, (), ()))
        self.pick.shard((rows, rows))
        self.weigh.shard(((dp,), (dp,)))
        self.total.shard(((dp,),))

    def shard_shapes(self, rows: int) -> dict:
        table, row = (rows, self.vocab_size), (rows, 1)
        return {"max": (table,), "sum": (table,), "exp": (table,), "sum_rows": (table,), "log": (row,),
                "shift": (table, row), "norm": (table, row), "onehot": (table, (), ()), "pick": (table, table),
                "weigh": ((rows,), (rows,)), "total": ((rows,),)}
