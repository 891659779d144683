"""The generation engine: prefill and one-token decode over a static KV cache, compiled as
MindSpore graphs, plus the shape buckets that let each step compile once per (batch, cache length).

Layout: prompts are left-padded to a common width W, so every row writes the same cache slot at
each step (W, W+1, ...); row b's RoPE positions are slot - pads[b] and its left padding is
masked, as in transformers' batched generate. Per layer the cache holds keys transposed,
(B, nkv, hd, L), and values (B, nkv, L, hd), so both attention products are plain batched
matmuls (on CPU q @ K^T with transpose_b ran at a third of the speed). A decode step adds its
key/value into the zeroed slot with IndexAdd, which writes in place (ScatterNdUpdate copies the
whole Parameter on CPU), and attention reads the Parameters as they are. Prefill zeroes every
slot after the prompt.

Weights: by default on CPU the steps read a fused copy of the projections, per layer [wq; wk; wv]
and [w1; w3], stored (in, out), with the RMSNorm weights and the attention scale folded in: CPU
MatMul reads (in, out) weights about 1.3x faster at batch 8 than the checkpoints' (out, in) with
transpose_b, and a decode step makes 4 projection matmuls per layer instead of 7. The copy costs
the linear weights' size again (fused_nbytes). Without the copy the steps read the model's own
Parameters: the default off CPU, or when the copy would take more than half the free memory.
The copy is taken once: after changing the model's weights, build a new FusedWeights (a new
Generator).

The same steps, with the cache as explicit graph inputs and outputs instead of Parameters
(`PrefillGraph`, `DecodeGraph`: keys stacked (layers, B, nkv, hd, L), values (layers, B, nkv, L, hd)),
are what MindIR export writes (cllama/generation/export.py): there is one cached forward.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from tqdm.auto import tqdm

from cllama.checkpoint.model_dir import to_numpy
from cllama.config import ModelConfig
from cllama.layers import MASK_VALUE, causal_mask
from cllama.model import CodeLlama, DecoderLayer
from cllama.runtime import memory_gib

log = logging.getLogger(__name__)


# ---- shape buckets -------------------------------------------------------------------------------
def batch_bucket(n: int) -> int:
    """Batch rows compiled for n prompts: the next power of two."""
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """Prefill width for a longest prompt of n tokens: 16, 32, 64, 128, then multiples of 128."""
    if n <= 128:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


def cache_bucket(n: int, max_length: int) -> int:
    """Cache slots for n positions: a multiple of 128, at most max_length."""
    return min(max_length, -(-n // 128) * 128)


def bucket_shapes(n: int, longest: int, max_new_tokens: int, max_length: int) -> tuple[int, int, int]:
    """(batch, prompt width, cache length) for n prompts, the longest `longest` tokens."""
    width = min(prompt_bucket(longest), max_length - max_new_tokens)  # >= longest (checked before)
    return batch_bucket(n), width, cache_bucket(width + max_new_tokens, max_length)


# ---- weights and cache ---------------------------------------------------------------------------
def _fused(name: str, weights, dtype, norm: Optional[Parameter] = None) -> Parameter:
    """One (in, out) Parameter holding [out, in] weights side by side; a preceding RMSNorm's
    weight folded in: (x * g) @ W.T == x @ (W * g).T."""
    stacked = np.concatenate(weights, 0)
    if norm is not None:
        stacked = stacked * to_numpy(norm)[None, :]
    return Parameter(Tensor(np.ascontiguousarray(stacked.T), dtype), name=name, requires_grad=False)


class FusedLayer(nn.Cell):
    """One layer's projections: qkv (H, (nh+2nkv)*hd) after attention_norm, its output viewed as
    (n_rep + 2, nkv, hd) = queries (scaled by hd**-0.5) grouped by the kv head they share, keys,
    values; o (nh*hd, H); gate_up (H, 2*ffn) after ffn_norm; down (ffn, H)."""

    def __init__(self, i: int, layer: DecoderLayer, dtype) -> None:
        super().__init__(auto_prefix=False)
        att, ffn = layer.attention, layer.feed_forward
        wq = to_numpy(att.wq.weight) * att.scale  # query head h*n_rep + r -> row block r*nkv + h
        wq = wq.reshape(att.nkv, att.n_rep, att.hd, -1).transpose(1, 0, 2, 3).reshape(wq.shape)
        self.qkv = _fused(f"fused.{i}.qkv", (wq, to_numpy(att.wk.weight), to_numpy(att.wv.weight)), dtype,
                          layer.attention_norm.weight)
        self.o = _fused(f"fused.{i}.o", (to_numpy(att.wo.weight),), dtype)
        self.gate_up = _fused(f"fused.{i}.gate_up", (to_numpy(ffn.w1.weight), to_numpy(ffn.w3.weight)), dtype,
                              layer.ffn_norm.weight)
        self.down = _fused(f"fused.{i}.down", (to_numpy(ffn.w2.weight),), dtype)


class FusedWeights(nn.Cell):
    """A copy of the model's projection weights in the engine's layout (see the module docstring),
    built one layer at a time, in the model's compute dtype."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        dtype, layers = model.compute_dtype, model.model.layers
        bar = tqdm(layers, desc="fusing weights for generation", leave=False, disable=len(layers) < 16)
        self.layers = nn.CellList([FusedLayer(i, layer, dtype) for i, layer in enumerate(bar)])
        self.head = _fused("fused.head", (to_numpy(model.lm_head.weight),), dtype, model.model.norm_out.weight)


def fused_nbytes(config: ModelConfig, compute_dtype) -> int:
    """Bytes a FusedWeights copy takes: every linear weight in the compute dtype."""
    c = config
    hd, nh, nkv, h, ffn = c.head_dim, c.num_heads, c.n_kv_heads, c.hidden_size, c.ffn_hidden_size
    per_layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * ffn
    itemsize = 4 if compute_dtype == ms.float32 else 2
    return itemsize * (c.num_layers * per_layer + h * c.vocab_size)


def fuse_by_default(config: ModelConfig, compute_dtype, free_bytes: Optional[float] = None) -> bool:
    """Fuse on CPU when the copy takes at most half the free memory (`free_bytes`, default: what
    /proc/meminfo says is available)."""
    if ms.get_context("device_target") != "CPU":
        return False
    free = memory_gib()["available"] * 2**30 if free_bytes is None else free_bytes
    need = fused_nbytes(config, compute_dtype)
    if free and need > free / 2:  # 0: /proc/meminfo unreadable
        log.info("generation reads the model's own weights: a fused copy needs %.1f GB, %.1f GB free",
                 need / 1e9, free / 1e9)
        return False
    return True


@dataclass
class KVCache:
    """Per-layer buffers: keys transposed (batch, nkv, hd, length), values (batch, nkv, length, hd)."""

    keys: ParameterTuple
    values: ParameterTuple
    batch: int
    length: int

    @classmethod
    def create(cls, model: CodeLlama, batch: int, length: int) -> KVCache:
        c = model.config
        if length > c.seq_length:
            raise ValueError(f"KV cache: length {length} exceeds ModelConfig.seq_length={c.seq_length}; "
                             "raise seq_length or shorten the request")

        def buffers(kind: str, shape: tuple) -> ParameterTuple:
            return ParameterTuple(
                Parameter(Tensor(np.zeros(shape, np.float32), model.compute_dtype), name=f"kv_cache.{i}.{kind}",
                          requires_grad=False)
                for i in range(c.num_layers))

        nkv, hd = c.n_kv_heads, c.head_dim
        return cls(buffers("key", (batch, nkv, hd, length)), buffers("value", (batch, nkv, length, hd)), batch, length)


def left_pad(prompts: Sequence[Sequence[int]], batch: int, width: int, pad_id: int,
             bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to (batch, width) int32, rows past the prompts a lone bos; and the pads
    per row (width - length)."""
    ids = np.full((batch, width), pad_id, np.int32)
    ids[len(prompts):, -1] = bos_id
    pads = np.full(batch, width - 1, np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        pads[i] = width - len(p)
    return ids, pads


def rotate_half_matrix(hd: int) -> np.ndarray:
    """R (hd, hd) with x @ R == concat(-x[..., hd/2:], x[..., :hd/2]) (rotate-half RoPE)."""
    half = hd // 2
    r = np.zeros((hd, hd), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


# ---- compiled steps ------------------------------------------------------------------------------
class Step(nn.Cell):
    """What prefill and decode share: a model, one (batch, cache length) bucket, the weights read
    (fused or the model's), the cache (a KVCache's Parameters, or with cache None explicit graph
    inputs/outputs) and the output (next ids by argmax in the graph, or float32 logits)."""

    def __init__(self, model: CodeLlama, batch: int, length: int, cache: Optional[KVCache] = None,
                 fused: Optional[FusedWeights] = None, argmax: bool = False) -> None:
        super().__init__(auto_prefix=False)
        c = model.config
        self.model, self.fused, self.argmax = model, fused, argmax
        self.io = cache is None  # the cache travels as graph inputs and outputs (exported graphs)
        if cache is not None:
            self.keys, self.values = cache.keys, cache.values
        self.batch, self.length = batch, length
        self.nh, self.nkv, self.hd, self.ffn = c.num_heads, c.n_kv_heads, c.head_dim, c.ffn_hidden_size
        self.compute_dtype = model.compute_dtype
        self.softmax_dtype = model.dtypes.softmax
        self.slots = Tensor(np.arange(length, dtype=np.int32))
        self.rotate = Tensor(rotate_half_matrix(c.head_dim))
        self.eye = Tensor(np.eye(c.head_dim, dtype=np.float32))
        self.mm = ops.MatMul()
        self.bmm = ops.BatchMatMul()
        self.split2, self.split3 = ops.Split(-1, 2), ops.Split(1, 3)  # one kernel; ops.split slices

    def _rope(self, x: Tensor, rope: tuple) -> Tensor:
        """x (N, ..., hd) rotated in float32 by rope = (cos, sin) broadcasting to it."""
        cos, sin = rope
        dtype, shape = x.dtype, x.shape
        x = x.astype(ms.float32)
        rotated = self.mm(x.reshape(-1, self.hd), self.rotate).reshape(shape)
        return (x * cos + rotated * sin).astype(dtype)

    def _norm(self, x: Tensor, norm) -> Tensor:
        """RMSNorm; with fused weights its weight is already in the next projection."""
        if self.fused is None:
            return norm(x)
        return norm.normalize(x).astype(x.dtype)

    def _rope_tables(self, cos: Tensor, sin: Tensor):
        """cos/sin (N, 1, hd) as _qkv applies them: for fused weights (N, n_rep + 2, 1, hd), with
        the value part left unrotated (cos 1, sin 0), so one RoPE pass covers the whole qkv."""
        if self.fused is None:
            return cos, sin
        n, parts = cos.shape[0], self.nh // self.nkv + 1
        one = ops.ones((n, 1, 1, self.hd), ms.float32)
        cos = ops.concat((cos.reshape(n, 1, 1, -1).broadcast_to((n, parts, 1, self.hd)), one), 1)
        sin = ops.concat((sin.reshape(n, 1, 1, -1).broadcast_to((n, parts, 1, self.hd)), one * 0), 1)
        return cos, sin

    def _qkv(self, i: int, layer: DecoderLayer, x: Tensor, rope):
        """x (N, H) -> q (N, nkv, n_rep, hd) scaled by hd**-0.5 and k (N, nkv, hd) with RoPE,
        v (N, nkv, hd); rope: what _rope takes ((cos, sin) from _rope_tables here)."""
        n, nh, nkv, hd = x.shape[0], self.nh, self.nkv, self.hd
        h = self._norm(x, layer.attention_norm)
        if self.fused is not None:
            qkv = self._rope(self.mm(h, self.fused.layers[i].qkv).reshape(n, nh // nkv + 2, nkv, hd), rope)
            if nh == nkv:
                q, k, v = self.split3(qkv)
            else:
                q, k, v = ops.split(qkv, (nh // nkv, 1, 1), 1)
                q = q.transpose(0, 2, 1, 3)  # (N, nkv, n_rep, hd)
            return q.reshape(n, nkv, nh // nkv, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)
        att = layer.attention
        q = self._rope(att.wq(h).reshape(n, nh, hd), rope) * att.scale
        k = self._rope(att.wk(h).reshape(n, nkv, hd), rope)
        return q.reshape(n, nkv, nh // nkv, hd), k, att.wv(h).reshape(n, nkv, hd)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """q (B, nkv, n_rep*T, hd) scaled, queries grouped by kv head; keys (B, nkv, hd, L'),
        values (B, nkv, L', hd); mask additive, (B|1, 1, 1, T, L') -> (B*T, nh*hd) with query
        head h*n_rep + r at h*n_rep + r."""
        b, nkv, _, hd = q.shape
        nh, t, length = self.nh, mask.shape[3], values.shape[2]
        scores = self.bmm(q, keys).astype(self.softmax_dtype)
        scores = scores.reshape(b, nkv, nh // nkv, t, length) + mask.astype(self.softmax_dtype)
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)
        out = self.bmm(probs.reshape(b, nkv, nh // nkv * t, length), values)  # (B, nkv, n_rep*T, hd)
        if t > 1:
            out = out.reshape(b, nh, t, hd).transpose(0, 2, 1, 3)
        return out.reshape(b * t, nh * hd)

    def _layer(self, i: int, layer: DecoderLayer, x: Tensor, q: Tensor, keys: Tensor, values: Tensor,
               mask: Tensor) -> Tensor:
        """Attention of q over keys/values (see _attend), then the feed-forward, each added to x (B*T, H)."""
        a = self._attend(q, keys, values, mask)
        x = x + (self.mm(a, self.fused.layers[i].o) if self.fused is not None else layer.attention.wo(a))
        h = self._norm(x, layer.ffn_norm)
        if self.fused is None:
            return x + layer.feed_forward(h)
        gate, up = self.split2(self.mm(h, self.fused.layers[i].gate_up))
        return x + self.mm(ops.silu(gate) * up, self.fused.layers[i].down)

    def _next(self, x: Tensor) -> Tensor:
        """x (B, H) final hidden states -> next ids (B,) int32 or logits (B, V) float32."""
        h = self._norm(x, self.model.model.norm_out)
        logits = (self.mm(h, self.fused.head) if self.fused is not None else self.model.lm_head(h)).astype(ms.float32)
        if self.argmax:
            return ops.argmax(logits, -1).astype(ms.int32)
        return logits


class PrefillStep(Step):
    """(input_ids (B, W) left-padded prompts, pads (B,) = W - length) -> next ids or logits after
    each row's last token; fills cache slots 0..W-1 and zeroes the rest."""

    def construct(self, input_ids: Tensor, pads: Tensor) -> Tensor:
        return self._prefill(input_ids, pads)

    def _prefill(self, input_ids: Tensor, pads: Tensor):
        """The step; with explicit caches (self.io) it returns (out, keys, values) stacked over layers."""
        b, t = input_ids.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        columns = self.slots[:t].reshape(1, -1)
        positions = ops.maximum(columns - pads.reshape(-1, 1), 0).reshape(-1)  # (B*W,)
        cos, sin = self._rope_tables(ops.gather(self.model.rope_cos, positions, 0).reshape(b * t, 1, hd),
                                     ops.gather(self.model.rope_sin, positions, 0).reshape(b * t, 1, hd))
        hidden = ops.logical_or(causal_mask(t), (columns < pads.reshape(-1, 1)).reshape(b, 1, 1, t))
        mask = (hidden.astype(ms.float32) * MASK_VALUE).reshape(b, 1, 1, t, t)
        x = self.model.model.tok_embeddings(input_ids.reshape(-1)).astype(self.compute_dtype)  # (B*W, H)
        keys, values = (), ()
        for i, layer in enumerate(self.model.model.layers):
            q, k, v = self._qkv(i, layer, x, (cos, sin))
            q = q.reshape(b, t, nkv, nh // nkv, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, -1, hd)
            k = k.reshape(b, t, nkv, hd).transpose(0, 2, 3, 1)  # (B, nkv, hd, W)
            v = v.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)  # (B, nkv, W, hd)
            if self.io:
                keys += (self._fill(k, 3),)
                values += (self._fill(v, 2),)
            else:
                ops.assign(self.keys[i], self._fill(k, 3))
                ops.assign(self.values[i], self._fill(v, 2))
            x = self._layer(i, layer, x, q, k, v, mask)
        out = self._next(x.reshape(b, t, -1)[:, -1])
        if self.io:
            return out, ops.stack(keys), ops.stack(values)
        return out

    def _fill(self, new: Tensor, axis: int) -> Tensor:
        """The cache's new contents: new in slots 0..W-1 along axis, zeros after."""
        new = new.astype(self.compute_dtype)
        t = new.shape[axis]
        if t == self.length:
            return new
        shape = new.shape[:axis] + (self.length - t,) + new.shape[axis + 1:]
        return ops.concat((new, ops.zeros(shape, self.compute_dtype)), axis)


class DecodeStep(Step):
    """(input_ids (B, 1), slot (1,), pads (B,)) -> next ids or logits: each row's token goes to
    cache slot `slot` (position slot - pads[b]) and attends to slots pads[b]..slot.

    RoPE here is one batched matmul per layer with each row's rotation matrix, built once per step
    (_rotation): a decode step has one position per row, and on CPU one small BatchMatMul costs
    less than the rotate-half MatMul and the three elementwise kernels of Step._rope."""

    def construct(self, input_ids: Tensor, slot: Tensor, pads: Tensor) -> Tensor:
        return self._decode(input_ids, slot, pads, self.keys, self.values)

    def _rotation(self, positions: Tensor) -> Tensor:
        """positions (B,) -> per-row rotations, x @ rot == x * cos + rotate_half(x) * sin: for fused
        weights (B, n_rep + 2, hd, hd) with the identity for the value part, else (B, 1, hd, hd)."""
        b, hd = positions.shape[0], self.hd
        cos = ops.gather(self.model.rope_cos, positions, 0).reshape(b, 1, 1, hd)
        sin = ops.gather(self.model.rope_sin, positions, 0).reshape(b, 1, 1, hd)
        rotation = self.eye * cos + self.rotate * sin  # (B, 1, hd, hd): [j, k] = cos_k (j == k) + R[j, k] sin_k
        if self.fused is None:
            return rotation
        parts = self.nh // self.nkv + 1
        return ops.concat((rotation.broadcast_to((b, parts, hd, hd)), self.eye.broadcast_to((b, 1, hd, hd))), 1)

    def _rope(self, x: Tensor, rotation: Tensor) -> Tensor:
        """x (B, parts, ..., hd) or (B, heads, hd) rotated by _rotation's matrices."""
        dtype, shape, b = x.dtype, x.shape, x.shape[0]
        x = x.astype(ms.float32).reshape(b, rotation.shape[1], -1, self.hd)
        return self.bmm(x, rotation).reshape(shape).astype(dtype)

    def _write(self, cache: Tensor, new: Tensor, slot: Tensor, axis: int) -> Tensor:
        """cache with `new` at `slot` along axis: IndexAdd into the zeroed slot of a Parameter (in
        place), or a select over an explicit cache tensor (exported graphs)."""
        new = new.astype(cache.dtype)
        if not self.io:
            return ops.index_add(cache, slot, new, axis)
        shape = [1] * cache.ndim
        shape[axis] = self.length
        return ops.select((self.slots == slot).reshape(tuple(shape)), new, cache)

    def _decode(self, input_ids: Tensor, slot: Tensor, pads: Tensor, key_cache, value_cache):
        """The step over caches (a ParameterTuple, or with self.io stacked tensors, then it returns
        (out, keys, values))."""
        b, nkv, hd, length = self.batch, self.nkv, self.hd, self.length
        rotation = self._rotation(slot - pads)
        slots = self.slots.reshape(1, -1)
        hidden = ops.logical_or(slots < pads.reshape(-1, 1), slots > slot)  # (B, L)
        mask = (hidden.astype(ms.float32) * MASK_VALUE).reshape(b, 1, 1, 1, length)
        x = self.model.model.tok_embeddings(input_ids.reshape(-1)).astype(self.compute_dtype)  # (B, H)
        new_keys, new_values = (), ()
        for i, layer in enumerate(self.model.model.layers):
            q, k, v = self._qkv(i, layer, x, rotation)
            keys = self._write(key_cache[i], k.reshape(b, nkv, hd, 1), slot, 3)
            values = self._write(value_cache[i], v.reshape(b, nkv, 1, hd), slot, 2)
            new_keys += (keys,)
            new_values += (values,)
            x = self._layer(i, layer, x, q, keys, values, mask)
        out = self._next(x)
        if self.io:
            return out, ops.stack(new_keys), ops.stack(new_values)
        return out


class PrefillGraph(PrefillStep):
    """PrefillStep with the cache as outputs: (input_ids, pads) -> (logits or ids, keys, values)."""

    def construct(self, input_ids: Tensor, pads: Tensor):
        return self._prefill(input_ids, pads)


class DecodeGraph(DecodeStep):
    """DecodeStep with the cache as inputs and outputs:
    (input_ids, slot, pads, keys, values) -> (logits or ids, keys, values)."""

    def construct(self, input_ids: Tensor, slot: Tensor, pads: Tensor, keys: Tensor, values: Tensor):
        return self._decode(input_ids, slot, pads, keys, values)


@dataclass
class Steps:
    """A (batch, cache length) bucket's compiled prefill/decode: `prefill(ids, pads)` and
    `decode(tokens, slot, pads)` give next ids, or float32 logits when `logits`."""

    prefill: nn.Cell
    decode: nn.Cell
    logits: bool
    cache: Optional[KVCache] = None


class Engine:
    """The prefill/decode steps of one model, compiled once per shape bucket (batch to a power of
    two, prompt width 16..128 by powers of two then multiples of 128, cache multiples of 128) and
    kept for reuse. `fused_weights` as in Generator."""

    max_batch: Optional[int] = None  # any batch size

    def __init__(self, model: CodeLlama, fused_weights: Optional[bool] = None) -> None:
        self.model, self.config = model, model.config
        model.set_train(False)
        fused = fuse_by_default(self.config, model.compute_dtype) if fused_weights is None else fused_weights
        self.fused = FusedWeights(model) if fused else None
        self._steps: dict[tuple, Steps] = {}

    def shapes(self, n: int, longest: int, max_new_tokens: int, max_length: int) -> tuple[int, int, int]:
        return bucket_shapes(n, longest, max_new_tokens, max_length)

    def steps_for(self, batch: int, length: int, logits: bool) -> Steps:
        """The compiled cells of a (batch, cache length) bucket, built on first use; greedy
        (argmax in the graph) and logits cells of a bucket share its cache."""
        key = (batch, length, logits)
        if key not in self._steps:
            cache = next((s.cache for (b, n, _), s in self._steps.items() if (b, n) == (batch, length)), None)
            cache = cache or KVCache.create(self.model, batch, length)
            self._steps[key] = Steps(PrefillStep(self.model, batch, length, cache, self.fused, not logits),
                                     DecodeStep(self.model, batch, length, cache, self.fused, not logits),
                                     logits, cache)
        return self._steps[key]

    def clear(self) -> None:
        """Drop every cached KV buffer and compiled step (frees their memory)."""
        self._steps.clear()
