"""Code Llama in MindSpore: RMSNorm, float32 RoPE, grouped-query attention, SwiGLU.

Parameter names are MindFormers' (REFERENCE.md section 4) so checkpoints interchange:
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight`, ..., `lm_head.weight`.

Shapes in comments: B batch, T query length, L cache length, H hidden, nh heads, nkv kv heads,
hd head dim, V vocab.
"""
from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from cllama.config import ModelConfig

log = logging.getLogger(__name__)

DTYPE = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
MASK_VALUE = -1e9  # added to masked attention scores (float32), exp() underflows to exactly 0


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every model parameter's MindFormers name and shape, without allocating anything."""
    h, hd, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    shapes = {"model.tok_embeddings.embedding_weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "attention.wq.weight"] = (config.num_heads * hd, h)
        shapes[p + "attention.wk.weight"] = (config.n_kv_heads * hd, h)
        shapes[p + "attention.wv.weight"] = (config.n_kv_heads * hd, h)
        shapes[p + "attention.wo.weight"] = (h, config.num_heads * hd)
        shapes[p + "ffn_norm.weight"] = (h,)
        shapes[p + "feed_forward.w1.weight"] = (ffn, h)
        shapes[p + "feed_forward.w2.weight"] = (h, ffn)
        shapes[p + "feed_forward.w3.weight"] = (ffn, h)
    shapes["model.norm_out.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def compute_dtype_for(config: ModelConfig) -> ms.Type:
    """The matmul dtype: config.compute_dtype on Ascend/GPU; float32 on CPU (no bf16 MatMul)."""
    if ms.get_context("device_target") == "CPU" and config.compute_dtype != "float32":
        log.info("CPU: computing in float32 (config.compute_dtype=%s is for Ascend)",
                 config.compute_dtype)
        return ms.float32
    return DTYPE[config.compute_dtype]


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

    def __init__(self, in_dim: int, out_dim: int, param_dtype, compute_dtype) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer(Normal(0.02), (out_dim, in_dim), param_dtype), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        return y.reshape(lead + (self.out_dim,))


class RMSNorm(nn.Cell):
    """x / rms(x) * weight, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float, param_dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), param_dtype), name="weight")

    def normalize(self, x: Tensor) -> Tensor:
        """x / rms(x) in float32, without the weight."""
        x = x.astype(ms.float32)
        return x * ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)

    def construct(self, x: Tensor) -> Tensor:
        return (self.normalize(x) * self.weight.astype(ms.float32)).astype(x.dtype)


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, param_dtype) -> None:
        super().__init__()
        self.embedding_weight = Parameter(initializer(Normal(0.02), (vocab, dim), param_dtype),
                                          name="embedding_weight")

    def construct(self, ids: Tensor) -> Tensor:
        table = self.embedding_weight
        if table.dtype == ms.bfloat16:  # no bfloat16 Gather kernel on CPU
            table = table.astype(ms.float32)
        return ops.gather(table, ids, 0)


class Attention(nn.Cell):
    """Grouped-query attention; query heads h*n_rep .. h*n_rep+n_rep-1 share kv head h."""

    def __init__(self, config: ModelConfig, param_dtype, compute_dtype) -> None:
        super().__init__()
        h, self.nh, self.nkv, self.hd = config.hidden_size, config.num_heads, config.n_kv_heads, config.head_dim
        self.n_rep = self.nh // self.nkv
        self.scale = self.hd ** -0.5
        self.compute_dtype = compute_dtype
        self.wq = Linear(h, self.nh * self.hd, param_dtype, compute_dtype)
        self.wk = Linear(h, self.nkv * self.hd, param_dtype, compute_dtype)
        self.wv = Linear(h, self.nkv * self.hd, param_dtype, compute_dtype)
        self.wo = Linear(self.nh * self.hd, h, param_dtype, compute_dtype)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor):
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.nh, self.hd).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(b, t, self.nkv, self.hd).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(b, t, self.nkv, self.hd).transpose(0, 2, 1, 3)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, nh, T, hd); k, v (B, nkv, L, hd); mask (B|1, 1, T, L) additive -> (B, T, nh*hd)."""
        b, _, t, _ = q.shape
        length = k.shape[2]
        q = q.reshape(b, self.nkv, self.n_rep * t, self.hd)
        scores = self.bmm_t(q, k).astype(ms.float32) * self.scale  # (B, nkv, n_rep*T, L)
        scores = scores.reshape(b, self.nkv, self.n_rep, t, length) + mask.expand_dims(2)
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)
        out = self.bmm(probs.reshape(b, self.nkv, self.n_rep * t, length), v)
        return out.reshape(b, self.nh, t, self.hd).transpose(0, 2, 1, 3).reshape(b, t, self.nh * self.hd)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self._qkv(x, cos, sin)
        return self.wo(self._attend(q, k, v, mask))

    # caches as explicit inputs/outputs (exported graphs; cllama/decoding.py runs generation)
    def prefill_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor):
        """Causal attention over T tokens; returns (out, k, v) with k, v (B, nkv, T, hd), a cache's
        first T slots."""
        q, k, v = self._qkv(x, cos, sin)
        return self.wo(self._attend(q, k, v, mask)), k, v

    def decode_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor,
                  key_cache: Tensor, value_cache: Tensor):
        """One token per row: writes its key/value at slots (B, nkv, 3) = [b, h, position] of caches
        (B, nkv, L, hd) and attends over them; returns (out, key_cache, value_cache)."""
        q, k, v = self._qkv(x, cos, sin)
        b = x.shape[0]
        key_cache = ops.tensor_scatter_update(key_cache, slots, k.reshape(b, self.nkv, self.hd))
        value_cache = ops.tensor_scatter_update(value_cache, slots, v.reshape(b, self.nkv, self.hd))
        return self.wo(self._attend(q, key_cache, value_cache, mask)), key_cache, value_cache


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig, param_dtype, compute_dtype) -> None:
        super().__init__()
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.w1 = Linear(h, ffn, param_dtype, compute_dtype)
        self.w2 = Linear(ffn, h, param_dtype, compute_dtype)
        self.w3 = Linear(h, ffn, param_dtype, compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, param_dtype, compute_dtype) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.attention = Attention(config, param_dtype, compute_dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.feed_forward = FeedForward(config, param_dtype, compute_dtype)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def prefill_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor):
        h, k, v = self.attention.prefill_kv(self.attention_norm(x), cos, sin, mask)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), k, v

    def decode_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor,
                  key_cache: Tensor, value_cache: Tensor):
        h, key_cache, value_cache = self.attention.decode_kv(self.attention_norm(x), cos, sin, mask, slots,
                                                             key_cache, value_cache)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), key_cache, value_cache


class LlamaModel(nn.Cell):
    def __init__(self, config: ModelConfig, param_dtype, compute_dtype) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, param_dtype)
        self.layers = nn.CellList([DecoderLayer(config, param_dtype, compute_dtype)
                                   for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)


class CodeLlama(nn.Cell):
    """Code Llama causal LM.

    `model(input_ids)` gives float32 logits (B, T, V) for a full causal forward;
    `model(input_ids, attention_mask)` also hides keys where attention_mask is 0 (positions stay
    0..T-1, as in transformers' forward). `loss(input_ids, labels)` is the training objective.
    Generation runs on `cllama.decoding.Engine` (static KV cache); `prefill_kv` / `decode_kv`
    are the exported graphs' functional form.
    """

    def __init__(self, config: ModelConfig, compute_dtype=None) -> None:
        super().__init__()
        self.config = config
        param_dtype = DTYPE[config.param_init_type]
        self.compute_dtype = compute_dtype or compute_dtype_for(config)
        self.model = LlamaModel(config, param_dtype, self.compute_dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, param_dtype, self.compute_dtype)
        cos, sin = rope_tables(config, config.seq_length)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)  # (seq_length, hd) float32
        self.cross_entropy = CrossEntropy()

    # ---- full forward ------------------------------------------------------------------------
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

    # ---- cached generation with caches as explicit inputs/outputs (exported graphs) ----------
    def prefill_kv(self, input_ids: Tensor, last_index: Tensor):
        """input_ids (B, T) right-padded prompts, last_index (B,) = length - 1 per row; returns
        (logits (B, V) at each row's last token, keys, values) with keys/values
        (layers, B, nkv, T, hd), the cache of a T-slot generation for `decode_kv`."""
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = causal_mask(t).astype(ms.float32) * MASK_VALUE
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        keys, values = (), ()
        for layer in self.model.layers:
            x, k, v = layer.prefill_kv(x, cos, sin, mask)
            keys += (k,)
            values += (v,)
        last = ops.gather_elements(x, 1, last_index.reshape(-1, 1, 1).broadcast_to((-1, 1, x.shape[2])))
        return self._logits(self.model.norm_out(last.squeeze(1))), ops.stack(keys), ops.stack(values)

    def decode_kv(self, input_ids: Tensor, positions: Tensor, keys: Tensor, values: Tensor):
        """One new token per row: input_ids (B, 1) at positions (B,), keys/values
        (layers, B, nkv, L, hd); returns (logits (B, V), keys, values) with the new token written."""
        b, nkv, length = input_ids.shape[0], self.config.n_kv_heads, keys.shape[3]
        cos = ops.gather(self.rope_cos, positions, 0).reshape(b, 1, 1, -1)
        sin = ops.gather(self.rope_sin, positions, 0).reshape(b, 1, 1, -1)
        hidden = ops.arange(length, dtype=ms.int32).reshape(1, -1) > positions.reshape(-1, 1)  # (B, L)
        mask = hidden.astype(ms.float32).reshape(b, 1, 1, -1) * MASK_VALUE
        rows = ops.arange(b, dtype=ms.int32).reshape(b, 1, 1).broadcast_to((b, nkv, 1))
        heads = ops.arange(nkv, dtype=ms.int32).reshape(1, nkv, 1).broadcast_to((b, nkv, 1))
        slots = ops.concat((rows, heads, positions.reshape(b, 1, 1).broadcast_to((b, nkv, 1))), -1)
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        new_keys, new_values = (), ()
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer.decode_kv(x, cos, sin, mask, slots, keys[i], values[i])
            new_keys += (k,)
            new_values += (v,)
        return self._logits(self.model.norm_out(x.squeeze(1))), ops.stack(new_keys), ops.stack(new_values)


def causal_mask(t: int) -> Tensor:
    """(1, 1, T, T) bool, True above the diagonal (future keys)."""
    r = ops.arange(t)
    return (r.reshape(1, -1) > r.reshape(-1, 1)).reshape(1, 1, t, t)


def masked_cross_entropy(logits: Tensor, targets: Tensor, input_mask: Tensor, ignore_id: int) -> Tensor:
    """Mean cross-entropy over positions where input_mask is true and targets != ignore_id."""
    v = logits.shape[-1]
    logits = logits.reshape(-1, v)
    targets = targets.reshape(-1)
    mask = ops.logical_and(input_mask.reshape(-1), targets != ignore_id).astype(ms.float32)
    safe = ops.select(targets == ignore_id, ops.zeros_like(targets), targets)
    picked = ops.gather_elements(logits, 1, safe.reshape(-1, 1)).squeeze(1)
    nll = ops.logsumexp(logits, -1) - picked
    return (nll * mask).sum() / ops.maximum(mask.sum(), 1.0)


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
