"""Code Llama in MindSpore: RMSNorm, float32 RoPE, grouped-query attention, SwiGLU.

Parameter names are MindFormers' (REFERENCE.md section 4) so checkpoints interchange:
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight`, ..., `lm_head.weight`.

Shapes in comments: B batch, T query length, L cache length, H hidden, nh heads, nkv kv heads,
hd head dim, V vocab.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from cllama.config import ModelConfig

log = logging.getLogger(__name__)

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
        _log_once(f"CPU: computing in float32 (compute_dtype={config.compute_dtype}, layernorm_compute_type="
                  f"{config.layernorm_compute_type}, softmax_compute_type={config.softmax_compute_type} "
                  "are for Ascend)")
    compute, norm, softmax = (ms.float32 if cpu else DTYPE[d] for d in wanted)
    return Dtypes(DTYPE[config.param_init_type], compute_dtype or compute, norm, softmax)


_LOGGED: set = set()


def _log_once(message: str) -> None:
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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, n, T, hd) rotated in float32; cos/sin broadcast to (B, 1, T, hd)."""
    dtype = x.dtype
    x = x.astype(ms.float32)
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return (x * cos + rotated * sin).astype(dtype)


class Linear(nn.Cell):
    """y = x @ weight.T with weight stored [out, in] (like HF and MindFormers), no bias."""

    def __init__(self, in_dim: int, out_dim: int, dtypes: Dtypes) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.compute_dtype = dtypes.compute
        self.weight = Parameter(initializer(Normal(0.02), (out_dim, in_dim), dtypes.param), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        return y.reshape(lead + (self.out_dim,))


class RMSNorm(nn.Cell):
    """x / rms(x) * weight, computed in layernorm_compute_type, returned in the input dtype."""

    def __init__(self, dim: int, eps: float, dtypes: Dtypes) -> None:
        super().__init__()
        self.eps = eps
        self.norm_dtype = dtypes.norm
        self.weight = Parameter(initializer("ones", (dim,), dtypes.param), name="weight")

    def normalize(self, x: Tensor) -> Tensor:
        """x / rms(x) in the norm dtype, without the weight."""
        x = x.astype(self.norm_dtype)
        return x * ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)

    def construct(self, x: Tensor) -> Tensor:
        return (self.normalize(x) * self.weight.astype(self.norm_dtype)).astype(x.dtype)


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, dtypes: Dtypes) -> None:
        super().__init__()
        self.embedding_weight = Parameter(initializer(Normal(0.02), (vocab, dim), dtypes.param),
                                          name="embedding_weight")

    def construct(self, ids: Tensor) -> Tensor:
        table = self.embedding_weight
        if table.dtype == ms.bfloat16:  # no bfloat16 Gather kernel on CPU
            table = table.astype(ms.float32)
        return ops.gather(table, ids, 0)


class Attention(nn.Cell):
    """Grouped-query attention; query heads h*n_rep .. h*n_rep+n_rep-1 share kv head h."""

    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        h, self.nh, self.nkv, self.hd = config.hidden_size, config.num_heads, config.n_kv_heads, config.head_dim
        self.n_rep = self.nh // self.nkv
        self.scale = self.hd ** -0.5
        self.compute_dtype, self.softmax_dtype = dtypes.compute, dtypes.softmax
        self.wq = Linear(h, self.nh * self.hd, dtypes)
        self.wk = Linear(h, self.nkv * self.hd, dtypes)
        self.wv = Linear(h, self.nkv * self.hd, dtypes)
        self.wo = Linear(self.nh * self.hd, h, dtypes)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, H), cos/sin (T, hd), mask additive (1, 1, T, T) -> (B, T, H)."""
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).reshape(b, t, self.nh, self.hd).transpose(0, 2, 1, 3), cos, sin)
        k = apply_rope(self.wk(x).reshape(b, t, self.nkv, self.hd).transpose(0, 2, 1, 3), cos, sin)
        v = self.wv(x).reshape(b, t, self.nkv, self.hd).transpose(0, 2, 1, 3)
        q = q.reshape(b, self.nkv, self.n_rep * t, self.hd)  # query heads grouped by their kv head
        scores = (self.bmm_t(q, k) * self.scale).astype(self.softmax_dtype)  # (B, nkv, n_rep*T, T)
        scores = scores.reshape(b, self.nkv, self.n_rep, t, t) + mask.expand_dims(2).astype(self.softmax_dtype)
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)
        out = self.bmm(probs.reshape(b, self.nkv, self.n_rep * t, t), v)
        return self.wo(out.reshape(b, self.nh, t, self.hd).transpose(0, 2, 1, 3).reshape(b, t, self.nh * self.hd))


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.w1 = Linear(h, ffn, dtypes)
        self.w2 = Linear(ffn, h, dtypes)
        self.w3 = Linear(h, ffn, dtypes)

    def construct(self, x: Tensor) -> Tensor:
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtypes)
        self.attention = Attention(config, dtypes)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtypes)
        self.feed_forward = FeedForward(config, dtypes)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class LlamaModel(nn.Cell):
    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, dtypes)
        self.layers = nn.CellList([DecoderLayer(config, dtypes) for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, dtypes)


class CodeLlama(nn.Cell):
    """Code Llama causal LM.

    `model(input_ids)` gives float32 logits (B, T, V) for a full causal forward;
    `model(input_ids, attention_mask)` also hides keys where attention_mask is 0 (positions stay
    0..T-1, as in transformers' forward). `loss(input_ids, labels)` is the training objective.
    Cached generation (prefill + one-token decode over a static KV cache, also what MindIR export
    writes) is cllama.generation.engine's.
    """

    def __init__(self, config: ModelConfig, compute_dtype=None) -> None:
        super().__init__()
        self.config = config
        for note in config.stored_only_notes():
            _log_once(note)
        self.dtypes = model_dtypes(config, compute_dtype)
        self.compute_dtype = self.dtypes.compute
        self.model = LlamaModel(config, self.dtypes)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, self.dtypes)
        cos, sin = rope_tables(config, config.seq_length)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)  # (seq_length, hd) float32
        self.cross_entropy = CrossEntropy()

    def _hidden(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm_out(x)

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(x).astype(ms.float32)

    def construct(self, input_ids: Tensor, attention_mask=None) -> Tensor:
        t = input_ids.shape[1]
        masked = causal_mask(t)  # (1, 1, T, T) bool, True = hidden
        if attention_mask is not None:
            masked = ops.logical_or(masked, (attention_mask == 0).reshape(-1, 1, 1, t))
        return self._logits(self._hidden(input_ids, masked.astype(ms.float32) * MASK_VALUE))

    def loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy (float32). input_ids/labels (B, S+1): the model reads
        input_ids[:, :-1] and predicts labels[:, 1:]; pad inputs and ignore_token_id labels
        are left out (MindFormers' input_mask * label_mask)."""
        tokens, targets = input_ids[:, :-1], labels[:, 1:]
        t = tokens.shape[1]
        logits = self._logits(self._hidden(tokens, causal_mask(t).astype(ms.float32) * MASK_VALUE))
        targets = targets.reshape(-1)
        mask = ops.logical_and(tokens.reshape(-1) != self.config.pad_token_id,
                               targets != self.config.ignore_token_id).astype(ms.float32)
        weights = mask / ops.maximum(mask.sum(), 1.0)
        safe = ops.select(targets == self.config.ignore_token_id, ops.zeros_like(targets), targets)
        return self.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe, weights)[0]


def causal_mask(t: int) -> Tensor:
    """(1, 1, T, T) bool, True above the diagonal (future keys)."""
    r = ops.arange(t)
    return (r.reshape(1, -1) > r.reshape(-1, 1)).reshape(1, 1, t, t)


class CrossEntropy(nn.Cell):
    """sum(weights * nll) over rows with a hand-written backward, for training speed on CPU.

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
