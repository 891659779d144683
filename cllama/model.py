"""Code Llama in MindSpore: RMSNorm, float32 RoPE, grouped-query attention, SwiGLU, with the shard
strategies of MindFormers' Llama for semi-auto parallel (`CodeLlama.shard(parallel_config)`).

Parameter names are MindFormers' (REFERENCE.md section 4) so checkpoints interchange:
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight`, ..., `lm_head.weight`.

Layout under `shard` (dp data parallel, mp model parallel; MindFormers' llama.py, llama_layer.py,
llama_transformer.py): the embedding Gather splits ids by dp and the table by vocabulary over mp
unless vocab_emb_dp; wq/wk/wv/w1/w3 MatMuls split their output columns over mp, wo/w2 their input
rows; attention works per kv-head group over mp; norms, residual adds and the SwiGLU product split
the batch (and with use_seq_parallel the sequence over mp); lm_head and the loss split the vocabulary
over mp unless vocab_emb_dp. Pipeline stages: the embedding on the first, layer i on
i // (layers / pipeline_stage), the final norm, head and loss on the last. On one device the
strategies are inert.

Shapes in comments: B batch, T query length, H hidden, nh heads, nkv kv heads, hd head dim, V vocab.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from cllama.config import ModelConfig
from cllama.layers import (
    MASK_VALUE,
    CrossEntropy,
    Dtypes,
    Embedding,
    Linear,
    RMSNorm,
    Rotary,
    ShardedCrossEntropy,
    causal_mask,
    log_once,
    model_dtypes,
    rope_tables,
)


class Attention(nn.Cell):
    """Grouped-query attention; query heads h*n_rep .. h*n_rep+n_rep-1 share kv head h. With
    use_flash_attention on Ascend it runs MindSpore's fused FlashAttentionScore (BNSD layout)."""

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
        self.rope = Rotary()
        self.heads, self.merge = ops.Transpose(), ops.Transpose()
        self.bmm_qk, self.bmm_pv = ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()
        self.mul_scale, self.add_mask, self.softmax = ops.Mul(), ops.Add(), ops.Softmax()
        self.flash = None
        if config.use_flash_attention and ms.get_context("device_target") == "Ascend":
            from mindspore.ops.operations.nn_ops import FlashAttentionScore

            self.flash = FlashAttentionScore(head_num=self.nh, scale_value=self.scale, input_layout="BNSD")
        elif config.use_flash_attention:
            log_once(f"{ms.get_context('device_target')}: use_flash_attention is for Ascend; attention runs its "
                     "math path here (same results)")

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, H), cos/sin (T, hd), mask additive float32 (B, 1, T, T) -> (B, T, H)."""
        b, t, _ = x.shape
        q = self.rope(self.heads(self.wq(x).reshape(b, t, self.nh, self.hd), (0, 2, 1, 3)), cos, sin)
        k = self.rope(self.heads(self.wk(x).reshape(b, t, self.nkv, self.hd), (0, 2, 1, 3)), cos, sin)
        v = self.heads(self.wv(x).reshape(b, t, self.nkv, self.hd), (0, 2, 1, 3))  # (B, nkv, T, hd)
        if self.flash is not None:  # query head i reads kv head i // n_rep, as grouped here
            out = self.flash(q, k, v, None, None, None, (mask < 0).astype(ms.uint8), None)[3]
        else:
            q = q.reshape(b, self.nkv, self.n_rep * t, self.hd)  # query heads grouped by their kv head
            scores = self.mul_scale(self.bmm_qk(q, k), self.scale).astype(self.softmax_dtype)  # (B, nkv, n_rep*T, T)
            scores = self.add_mask(scores.reshape(b, self.nkv, self.n_rep, t, t),
                                   mask.reshape(b, 1, 1, t, t).astype(self.softmax_dtype))
            probs = self.softmax(scores).astype(self.compute_dtype)
            out = self.bmm_pv(probs.reshape(b, self.nkv, self.n_rep * t, t), v).reshape(b, self.nh, t, self.hd)
        return self.wo(self.merge(out, (0, 2, 1, 3)).reshape(b, t, self.nh * self.hd))

    def shard(self, dp: int, mp: int, seq_parallel: bool) -> None:
        heads = (dp, mp, 1, 1)
        for proj in (self.wq, self.wk, self.wv):
            proj.shard(((dp, 1), (mp, 1)))
        self.wo.shard(((dp, mp), (1, mp)), out_strategy=((dp * mp, 1),) if seq_parallel else None)
        self.heads.shard(((dp, 1, mp, 1),))
        self.merge.shard((heads,))
        self.rope.shard(heads)
        self.bmm_qk.shard((heads, heads))
        self.bmm_pv.shard((heads, heads))
        self.mul_scale.shard((heads, ()))
        self.add_mask.shard(((dp, mp, 1, 1, 1), (dp, 1, 1, 1, 1)))
        self.softmax.shard(((dp, mp, 1, 1, 1),))
        if self.flash is not None:
            self.flash.shard((heads, heads, heads, (dp, 1, 1, 1)))

    def shard_shapes(self, b: int, t: int) -> dict:
        """Input shapes of each sharded primitive (the kv-headed ones, the tighter constraint)."""
        nkv, hd, rows = self.nkv, self.hd, b * t
        kv, grouped, scores = (b, nkv, t, hd), (b, nkv, self.n_rep * t, hd), (b, nkv, self.n_rep, t, t)
        shapes = {"heads": ((b, t, nkv, hd),), "merge": ((b, self.nh, t, hd),), "bmm_qk": (grouped, kv),
                  "bmm_pv": ((b, nkv, self.n_rep * t, t), kv), "mul_scale": ((b, nkv, self.n_rep * t, t), ()),
                  "add_mask": (scores, (b, 1, 1, t, t)), "softmax": (scores,),
                  **{f"rope.{k}": v for k, v in self.rope.shard_shapes(kv).items()}}
        for name in ("wq", "wk", "wv", "wo"):
            shapes.update({f"{name}.{k}": v for k, v in getattr(self, name).shard_shapes(rows).items()})
        return shapes


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x), silu(g) = g * sigmoid(g)."""

    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.w1 = Linear(h, ffn, dtypes)
        self.w2 = Linear(ffn, h, dtypes)
        self.w3 = Linear(h, ffn, dtypes)
        self.sigmoid, self.silu, self.mul = ops.Sigmoid(), ops.Mul(), ops.Mul()

    def construct(self, x: Tensor) -> Tensor:
        gate = self.w1(x)
        return self.w2(self.mul(self.silu(gate, self.sigmoid(gate)), self.w3(x)))

    def shard(self, dp: int, mp: int, seq_parallel: bool) -> None:
        self.w1.shard(((dp, 1), (mp, 1)))
        self.w3.shard(((dp, 1), (mp, 1)))
        self.w2.shard(((dp, mp), (1, mp)), out_strategy=((dp * mp, 1),) if seq_parallel else None)
        columns = (dp, 1, mp)
        self.sigmoid.shard((columns,))
        self.silu.shard((columns, columns))
        self.mul.shard((columns, columns))

    def shard_shapes(self, b: int, t: int) -> dict:
        hidden = (b, t, self.w1.out_dim)
        shapes = {"sigmoid": (hidden,), "silu": (hidden, hidden), "mul": (hidden, hidden)}
        for name in ("w1", "w2", "w3"):
            shapes.update({f"{name}.{k}": v for k, v in getattr(self, name).shard_shapes(b * t).items()})
        return shapes


class DecoderLayer(nn.Cell):
    def __init__(self, config: ModelConfig, dtypes: Dtypes) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtypes)
        self.attention = Attention(config, dtypes)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtypes)
        self.feed_forward = FeedForward(config, dtypes)
        self.add_attention, self.add_ffn = ops.Add(), ops.Add()

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = self.add_attention(x, self.attention(self.attention_norm(x), cos, sin, mask))
        return self.add_ffn(x, self.feed_forward(self.ffn_norm(x)))

    def shard(self, dp: int, mp: int, seq_parallel: bool) -> None:
        rows = (dp, mp, 1) if seq_parallel else (dp, 1, 1)
        for norm in (self.attention_norm, self.ffn_norm):
            norm.shard(rows)
        self.add_attention.shard((rows, rows))
        self.add_ffn.shard((rows, rows))
        self.attention.shard(dp, mp, seq_parallel)
        self.feed_forward.shard(dp, mp, seq_parallel)

    def shard_shapes(self, b: int, t: int) -> dict:
        x = (b, t, self.attention.wo.out_dim)
        shapes = {"add_attention": (x, x), "add_ffn": (x, x)}
        for name, sub in (("attention_norm", self.attention_norm.shard_shapes(x)),
                          ("ffn_norm", self.ffn_norm.shard_shapes(x)),
                          ("attention", self.attention.shard_shapes(b, t)),
                          ("feed_forward", self.feed_forward.shard_shapes(b, t))):
            shapes.update({f"{name}.{k}": v for k, v in sub.items()})
        return shapes


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
    writes) is cllama.generation.engine's. `shard(parallel_config)` sets the parallel layout.
    """

    def __init__(self, config: ModelConfig, compute_dtype=None) -> None:
        super().__init__()
        self.config = config
        for note in config.stored_only_notes():
            log_once(note)
        self.dtypes = model_dtypes(config, compute_dtype)
        self.compute_dtype = self.dtypes.compute
        self.model = LlamaModel(config, self.dtypes)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, self.dtypes)
        cos, sin = rope_tables(config, config.seq_length)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)  # (seq_length, hd) float32
        self.cross_entropy = CrossEntropy()
        self.parallel = None  # the ParallelConfig of `shard`

    def shard(self, parallel) -> CodeLlama:
        """Set every strategy and pipeline stage for `parallel` (a ParallelConfig: data_parallel,
        model_parallel, pipeline_stage, vocab_emb_dp, use_seq_parallel), after checking that it divides
        the model's shapes. With more than one device the loss becomes ShardedCrossEntropy."""
        parallel.validate_for(self.config)
        dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
        vocab_mp = 1 if parallel.vocab_emb_dp else mp
        per_stage = self.config.num_layers // pp
        self.model.tok_embeddings.shard(dp, mp, parallel.vocab_emb_dp)
        self.model.tok_embeddings.pipeline_stage = 0
        for i, layer in enumerate(self.model.layers):
            layer.shard(dp, mp, parallel.use_seq_parallel)
            layer.pipeline_stage = i // per_stage
        self.model.norm_out.shard((dp, 1, 1))
        self.lm_head.shard(((dp, 1), (vocab_mp, 1)))
        if parallel.device_num > 1 and not isinstance(self.cross_entropy, ShardedCrossEntropy):
            self.cross_entropy = ShardedCrossEntropy(self.config.vocab_size)
        if isinstance(self.cross_entropy, ShardedCrossEntropy):
            self.cross_entropy.shard(dp, vocab_mp)
        for cell in (self.model.norm_out, self.lm_head, self.cross_entropy):
            cell.pipeline_stage = pp - 1
        self.parallel = parallel
        return self

    def set_recompute(self, layers: bool = True, select: bool = False, **options: bool) -> CodeLlama:
        """Recompute activations in the backward pass instead of keeping them (MindFormers'
        recompute_config): every decoder layer (`layers`; `options` are Cell.recompute's:
        mp_comm_recompute, parallel_optimizer_comm_recompute, recompute_slice_activation), or with
        `select` only the attention scores' mask-add and softmax (the largest activations)."""
        for layer in self.model.layers:
            if layers:
                layer.recompute(**options)
            elif select:
                for prim in (layer.attention.mul_scale, layer.attention.add_mask, layer.attention.softmax):
                    prim.recompute()
        return self

    def at(self, path: str):
        """The cell or primitive at a dotted path, e.g. `model.layers.3.attention.wq`."""
        node = self
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def shard_shapes(self, b: int, t: int) -> dict:
        """The input shapes of every sharded primitive, by its path in the model (e.g.
        `model.layers.3.attention.bmm_qk`), for a global batch of b sequences of t tokens:
        cllama.distributed.strategy checks each strategy against them."""
        parts = [("lm_head", self.lm_head.shard_shapes(b * t)),
                 ("model.norm_out", self.model.norm_out.shard_shapes((b, t, self.config.hidden_size))),
                 ("model.tok_embeddings", self.model.tok_embeddings.shard_shapes(b, t))]
        parts += [(f"model.layers.{i}", layer.shard_shapes(b, t)) for i, layer in enumerate(self.model.layers)]
        if isinstance(self.cross_entropy, ShardedCrossEntropy):
            parts.append(("cross_entropy", self.cross_entropy.shard_shapes(b * t)))
        return {f"{prefix}.{k}": v for prefix, sub in parts for k, v in sub.items()}

    def _hidden(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm_out(x)

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(x).astype(ms.float32)

    def _mask(self, b: int, t: int, attention_mask=None) -> Tensor:
        """Additive float32 (B, 1, T, T): future keys, and keys where attention_mask is 0, hidden."""
        hidden = causal_mask(t).broadcast_to((b, 1, t, t))
        if attention_mask is not None:
            hidden = ops.logical_or(hidden, (attention_mask == 0).reshape(b, 1, 1, t))
        return hidden.astype(ms.float32) * MASK_VALUE

    def construct(self, input_ids: Tensor, attention_mask=None) -> Tensor:
        b, t = input_ids.shape
        return self._logits(self._hidden(input_ids, self._mask(b, t, attention_mask)))

    def loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy (float32). input_ids/labels (B, S+1): the model reads
        input_ids[:, :-1] and predicts labels[:, 1:]; pad inputs and ignore_token_id labels
        are left out (MindFormers' input_mask * label_mask)."""
        tokens, targets = input_ids[:, :-1], labels[:, 1:]
        b, t = tokens.shape
        logits = self._logits(self._hidden(tokens, self._mask(b, t)))
        targets = targets.reshape(-1)
        mask = ops.logical_and(tokens.reshape(-1) != self.config.pad_token_id,
                               targets != self.config.ignore_token_id).astype(ms.float32)
        weights = mask / ops.maximum(mask.sum(), 1.0)
        safe = ops.select(targets == self.config.ignore_token_id, ops.zeros_like(targets), targets)
        return self.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe, weights)[0]
