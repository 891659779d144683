"""Code Llama in MindSpore: RMSNorm, float32 RoPE, grouped-query attention, SwiGLU, static KV cache.

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

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.astype(ms.float32)
        x = x * ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)
        return (x * self.weight.astype(ms.float32)).astype(dtype)


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
        self.key_cache = None
        self.value_cache = None
        self.key_window = None
        self.value_window = None

    def set_cache(self, key: Parameter, value: Parameter, key_window: Parameter = None,
                  value_window: Parameter = None) -> None:
        self.key_cache, self.value_cache = key, value
        self.key_window, self.value_window = key_window, value_window

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

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """Full causal attention over T tokens; their keys/values fill cache slots 0..T-1."""
        q, k, v = self._qkv(x, cos, sin)
        ops.assign(self.key_cache, _fill_front(self.key_cache, k))
        ops.assign(self.value_cache, _fill_front(self.value_cache, v))
        return self.wo(self._attend(q, k, v, mask))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
        """One token per row: write its key/value at slots (B, nkv, 3) = [b, h, position], then
        attend over the whole cache with mask (B, 1, 1, L) hiding slots after each position."""
        q, k, v = self._qkv(x, cos, sin)
        b = x.shape[0]
        key_cache = ops.scatter_nd_update(self.key_cache, slots, k.reshape(b, self.nkv, self.hd))
        value_cache = ops.scatter_nd_update(self.value_cache, slots, v.reshape(b, self.nkv, self.hd))
        return self.wo(self._attend(q, key_cache, value_cache, mask))

    # functional variants: caches are inputs/outputs, not Parameters (exported graphs)
    def prefill_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor):
        """Like `prefill`; returns (out, k, v) with k, v (B, nkv, T, hd) instead of writing a cache."""
        q, k, v = self._qkv(x, cos, sin)
        return self.wo(self._attend(q, k, v, mask)), k, v

    def decode_kv(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor,
                  key_cache: Tensor, value_cache: Tensor):
        """Like `decode` with caches (B, nkv, L, hd) passed in; returns (out, key_cache, value_cache)."""
        q, k, v = self._qkv(x, cos, sin)
        b = x.shape[0]
        key_cache = ops.tensor_scatter_update(key_cache, slots, k.reshape(b, self.nkv, self.hd))
        value_cache = ops.tensor_scatter_update(value_cache, slots, v.reshape(b, self.nkv, self.hd))
        return self.wo(self._attend(q, key_cache, value_cache, mask)), key_cache, value_cache


    def decode_windowed(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, window_mask: Tensor,
                        slots: Tensor) -> Tensor:
        """Like decode, but the new key/value go to a small window buffer (B, nkv, W, hd) at
        slots (B, nkv, 3) = [b, h, w]: scattering into a CPU Parameter copies all of it, so
        the full cache is written only by prefill and `flush_window`, once per W steps.
        mask (B, 1, 1, L) hides unflushed cache slots; window_mask (B, 1, 1, W) later window slots."""
        q, k, v = self._qkv(x, cos, sin)
        b = x.shape[0]
        key_window = ops.scatter_nd_update(self.key_window, slots, k.reshape(b, self.nkv, self.hd))
        value_window = ops.scatter_nd_update(self.value_window, slots, v.reshape(b, self.nkv, self.hd))
        q = q.reshape(b, self.nkv, self.n_rep, self.hd)  # T = 1
        length = self.key_cache.shape[2]
        scores = ops.concat((self.bmm_t(q, self.key_cache).astype(ms.float32) * self.scale + mask,
                             self.bmm_t(q, key_window).astype(ms.float32) * self.scale + window_mask), -1)
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)  # (B, nkv, n_rep, L + W)
        out = self.bmm(probs[..., :length], self.value_cache) + self.bmm(probs[..., length:], value_window)
        return self.wo(out.reshape(b, 1, self.nh * self.hd))

    def flush_window(self, slots: Tensor) -> Tensor:
        """Copy the window into the cache at slots (B, nkv, W, 3) = [b, h, position]."""
        key = ops.scatter_nd_update(self.key_cache, slots, self.key_window)
        value = ops.scatter_nd_update(self.value_cache, slots, self.value_window)
        return key[0, 0, 0, 0] + value[0, 0, 0, 0]


def _fill_front(cache: Tensor, new: Tensor) -> Tensor:
    """cache (B, nkv, L, hd) with slots 0..T-1 replaced by new (B, nkv, T, hd)."""
    t, length = new.shape[2], cache.shape[2]
    new = new.astype(cache.dtype)
    if t == length:
        return new
    return ops.concat((new, cache[:, :, t:]), 2)


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

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention.prefill(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
        x = x + self.attention.decode(self.attention_norm(x), cos, sin, mask, slots)
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
    def decode_windowed(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, window_mask: Tensor,
                        slots: Tensor) -> Tensor:
        x = x + self.attention.decode_windowed(self.attention_norm(x), cos, sin, mask, window_mask, slots)
        return x + self.feed_forward(self.ffn_norm(x))


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
    For generation call `setup_cache(batch, length)` and run `PrefillStep` / `DecodeStep`.
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
        self.cache_shape = None
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

    # ---- cached generation ---------------------------------------------------------------------
    def setup_cache(self, batch_size: int, length: int, window: int = 32) -> "KVCache":
        """Preallocate per-layer key/value caches (batch_size, nkv, length, hd) and make them
        current. Compiled PrefillStep/DecodeStep graphs keep the cache that was current when
        they compiled: to hold several caches, keep the returned KVCache and `use_cache` it
        before calling (and so compiling) the steps built for it. `window` sizes the buffers
        of `decode_windowed` (B, nkv, window, hd)."""
        if length > self.config.seq_length:
            raise ValueError(f"setup_cache: length {length} exceeds ModelConfig.seq_length="
                             f"{self.config.seq_length}; raise seq_length or shorten the request")
        c = self.config
        shape = (batch_size, c.n_kv_heads, length, c.head_dim)

        def buffer(i: int, kind: str, size: int = length) -> Parameter:
            return Parameter(Tensor(np.zeros(shape[:2] + (size, shape[3]), np.float32), self.compute_dtype),
                             name=f"kv_cache.{i}.{kind}", requires_grad=False)

        slots = np.stack(np.meshgrid(np.arange(batch_size), np.arange(c.n_kv_heads), indexing="ij"), -1)
        cache = KVCache(keys=[buffer(i, "key") for i in range(c.num_layers)],
                        values=[buffer(i, "value") for i in range(c.num_layers)],
                        slots=Tensor(slots.astype(np.int32)),  # (B, nkv, 2) = [b, h]
                        positions=Tensor(np.arange(length, dtype=np.int32)),
                        shape=(batch_size, length),
                        key_windows=[buffer(i, "key_window", window) for i in range(c.num_layers)],
                        value_windows=[buffer(i, "value_window", window) for i in range(c.num_layers)],
                        window_positions=Tensor(np.arange(window, dtype=np.int32)))
        self.use_cache(cache)
        return cache

    def use_cache(self, cache: "KVCache") -> None:
        """Make `cache` (from setup_cache) the one the next compiled step binds to."""
        for i, layer in enumerate(self.model.layers):
            layer.attention.set_cache(cache.keys[i], cache.values[i], cache.key_windows[i],
                                      cache.value_windows[i])
        self.cache_shape = cache.shape
        self.cache_slots = cache.slots
        self.cache_positions = cache.positions
        self.window_positions = cache.window_positions

    def prefill(self, input_ids: Tensor, last_index: Tensor) -> Tensor:
        """input_ids (B, T) right-padded prompts; last_index (B,) = length - 1 per row.
        Fills cache slots 0..T-1 and returns float32 logits (B, V) at each row's last token."""
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = causal_mask(t).astype(ms.float32) * MASK_VALUE
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        for layer in self.model.layers:
            x = layer.prefill(x, cos, sin, mask)
        last = ops.gather_elements(x, 1, last_index.reshape(-1, 1, 1).broadcast_to((-1, 1, x.shape[2])))
        return self._logits(self.model.norm_out(last.squeeze(1)))

    def decode(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids (B, 1) one new token per row at positions (B,); returns logits (B, V)."""
        b = input_ids.shape[0]
        cos = ops.gather(self.rope_cos, positions, 0).reshape(b, 1, 1, -1)
        sin = ops.gather(self.rope_sin, positions, 0).reshape(b, 1, 1, -1)
        hidden = (self.cache_positions.reshape(1, -1) > positions.reshape(-1, 1))  # (B, L)
        mask = hidden.astype(ms.float32).reshape(b, 1, 1, -1) * MASK_VALUE
        pos = positions.reshape(b, 1, 1).broadcast_to((b, self.config.n_kv_heads, 1))
        slots = ops.concat((self.cache_slots, pos), -1)  # (B, nkv, 3)
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        for layer in self.model.layers:
            x = layer.decode(x, cos, sin, mask, slots)
        return self._logits(self.model.norm_out(x.squeeze(1)))

    # ---- functional cached generation: caches as explicit inputs/outputs (exported graphs) -----
    def prefill_kv(self, input_ids: Tensor, last_index: Tensor):
        """`prefill` without Parameters: returns (logits (B, V), keys, values) with keys/values
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
        """`decode` without Parameters: input_ids (B, 1) at positions (B,), keys/values
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


    def decode_windowed(self, input_ids: Tensor, positions: Tensor, starts: Tensor) -> Tensor:
        """decode() for long runs: the token of row b at positions[b] is the
        (positions[b] - starts[b])-th since the last flush and goes to the window buffer; cache
        slots from starts[b] on are hidden. Call flush_window(starts) before the window is full."""
        b = input_ids.shape[0]
        cos = ops.gather(self.rope_cos, positions, 0).reshape(b, 1, 1, -1)
        sin = ops.gather(self.rope_sin, positions, 0).reshape(b, 1, 1, -1)
        offsets = positions - starts  # (B,)
        mask = (self.cache_positions.reshape(1, -1) >= starts.reshape(-1, 1))
        mask = mask.astype(ms.float32).reshape(b, 1, 1, -1) * MASK_VALUE
        window_mask = (self.window_positions.reshape(1, -1) > offsets.reshape(-1, 1))
        window_mask = window_mask.astype(ms.float32).reshape(b, 1, 1, -1) * MASK_VALUE
        at = offsets.reshape(b, 1, 1).broadcast_to((b, self.config.n_kv_heads, 1))
        slots = ops.concat((self.cache_slots, at), -1)  # (B, nkv, 3)
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        for layer in self.model.layers:
            x = layer.decode_windowed(x, cos, sin, mask, window_mask, slots)
        return self._logits(self.model.norm_out(x.squeeze(1)))

    def flush_window(self, starts: Tensor) -> Tensor:
        """Write every layer's window buffer into its cache at slots starts[b] .. starts[b]+W-1."""
        b, nkv, w = starts.shape[0], self.config.n_kv_heads, self.window_positions.shape[0]
        at = (starts.reshape(b, 1, 1, 1) + self.window_positions.reshape(1, 1, w, 1)).broadcast_to((b, nkv, w, 1))
        slots = ops.concat((self.cache_slots.reshape(b, nkv, 1, 2).broadcast_to((b, nkv, w, 2)), at), -1)
        done = ops.zeros((), self.compute_dtype)
        for layer in self.model.layers:
            done = done + layer.attention.flush_window(slots)
        return done


@dataclass
class KVCache:
    """Per-layer key/value buffers (B, nkv, L, hd) plus the index tensors decode uses."""

    keys: list
    values: list
    slots: Tensor      # (B, nkv, 2) int32 = [b, h]
    positions: Tensor  # (L,) int32 = 0..L-1
    shape: tuple       # (B, L)
    key_windows: list  # (B, nkv, W, hd) each: decode_windowed's buffers
    value_windows: list
    window_positions: Tensor  # (W,) int32 = 0..W-1


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


class PrefillStep(nn.Cell):
    """Compiled prefill: (input_ids (B, T), last_index (B,)) -> logits (B, V)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        if model.cache_shape is None:
            raise ValueError("PrefillStep: call model.setup_cache(batch_size, length) first")
        self.model = model

    def construct(self, input_ids: Tensor, last_index: Tensor) -> Tensor:
        return self.model.prefill(input_ids, last_index)


class DecodeStep(nn.Cell):
    """Compiled one-token step: (input_ids (B, 1), positions (B,)) -> logits (B, V)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        if model.cache_shape is None:
            raise ValueError("DecodeStep: call model.setup_cache(batch_size, length) first")
        self.model = model

    def construct(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.decode(input_ids, positions)
