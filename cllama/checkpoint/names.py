"""Parameter names and shapes as pure functions (no MindSpore import): every parameter of a
ModelConfig under MindFormers' names (REFERENCE.md section 4), and the maps to and from Hugging Face
and Meta names.

MindFormers: `model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight`, ...,
`model.norm_out.weight`, `lm_head.weight`; Linear weights stored [out, in] like Hugging Face.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from cllama.config import ModelConfig

# (Hugging Face regex, MindFormers template); the layer index is group 1.
HF_NAMES = [
    (r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "model.layers.{}.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "model.layers.{}.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "model.layers.{}.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "model.layers.{}.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "model.layers.{}.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "model.layers.{}.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "model.layers.{}.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "model.layers.{}.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "model.layers.{}.ffn_norm.weight"),
    (r"model\.norm\.weight", "model.norm_out.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_HF_TO_MS = [(re.compile(f"^{hf}$"), ms) for hf, ms in HF_NAMES]
_MS_TO_HF = [(re.compile("^" + re.escape(ms).replace(r"\{\}", r"(\d+)") + "$"),
              hf.replace(r"(\d+)", "{}").replace("\\", "")) for hf, ms in HF_NAMES]
# Buffers of a Hugging Face folder that are not weights (the rotary cache of older exports).
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# Meta consolidated.NN.pth: (Meta regex, MindFormers template, concatenation dim across
# model-parallel shards, None when replicated). wq/wk rows also need the RoPE permutation.
META_NAMES = [
    (r"tok_embeddings\.weight", "model.tok_embeddings.embedding_weight", 1),
    (r"norm\.weight", "model.norm_out.weight", None),
    (r"output\.weight", "lm_head.weight", 0),
    (r"layers\.(\d+)\.attention\.(wq|wk|wv)\.weight", "model.layers.{}.attention.{}.weight", 0),
    (r"layers\.(\d+)\.attention\.wo\.weight", "model.layers.{}.attention.wo.weight", 1),
    (r"layers\.(\d+)\.feed_forward\.(w1|w3)\.weight", "model.layers.{}.feed_forward.{}.weight", 0),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{}.feed_forward.w2.weight", 1),
    (r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight", "model.layers.{}.{}.weight", None),
]
_META = [(re.compile(f"^{p}$"), t, d) for p, t, d in META_NAMES]
META_IGNORED = ("rope.freqs",)

# Non-model entries of MindSpore/MindFormers training checkpoints; never read as weights.
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "global_step",
                           "learning_rate", "scale_sense", "loss_scale", "current_iterator_step",
                           "epoch_num", "step_num", "last_overflow_iterator_step")


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(*m.groups())
    return None


def hf_to_ms_name(name: str) -> str | None:
    """MindFormers name of a Hugging Face Llama parameter, or None if it has none."""
    return _rename(name, _HF_TO_MS)


def ms_to_hf_name(name: str) -> str | None:
    """Hugging Face name of a MindFormers parameter, or None if it has none."""
    return _rename(name, _MS_TO_HF)


def meta_to_ms_name(name: str) -> tuple[str, int | None] | None:
    """(MindFormers name, shard concatenation dim or None) of a Meta parameter, or None."""
    for pattern, template, dim in _META:
        m = pattern.match(name)
        if m:
            return template.format(*m.groups()), dim
    return None


def is_training_state(name: str) -> bool:
    """Optimizer / loss-scale entries a training checkpoint carries beside the weights."""
    return name.startswith(TRAINING_STATE_PREFIXES)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every model parameter's MindFormers name and shape, in model order."""
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


def model_order(names: Iterable[str], config: ModelConfig) -> list[str]:
    """`names` sorted in model order (unknown names last, in their order)."""
    rank = {name: i for i, name in enumerate(param_shapes(config))}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def check_names(expected: Mapping[str, tuple], found: Mapping[str, tuple], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped parameter."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{n}: expected {tuple(expected[n])}, found {tuple(found[n])}"
                 for n in expected if n in found and tuple(expected[n]) != tuple(found[n])]
    if missing or unexpected or misshaped:
        lines = [f"{source}: weights do not match the model config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items))
        lines.append("  fix: use the config.json that came with these weights, or the right preset")
        raise ValueError("\n".join(lines))
