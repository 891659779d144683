"""Meta consolidated.NN.pth -> model directory, against the HF route on the same random weights."""
import copy
import json

import numpy as np
import pytest
import torch

from cllama.checkpoint.ckpt_file import CkptFile
from cllama.checkpoint.convert import hf_to_ms, meta_to_ms
from cllama.config import ModelConfig

# HF name piece -> (Meta name piece, concatenation dim across model-parallel shards; None: replicated)
TO_META = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
           "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
           "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
           "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
           "post_attention_layernorm": ("ffn_norm", None)}


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of REFERENCE.md section 3's permutation: rotate-half rows -> Meta's interleaved pairs."""
    out, dim_in = w.shape
    return w.view(heads, 2, out // heads // 2, dim_in).transpose(1, 2).reshape(out, dim_in)


def write_meta(hf_model, folder, shards: int) -> None:
    """Meta's layout of an HF Llama: names, interleaved wq/wk, split over `shards` files."""
    cfg = hf_model.config
    tensors = {}
    for name, t in hf_model.state_dict().items():
        if name == "model.embed_tokens.weight":
            tensors["tok_embeddings.weight"] = (t, 1)
        elif name == "model.norm.weight":
            tensors["norm.weight"] = (t, None)
        elif name == "lm_head.weight":
            tensors["output.weight"] = (t, 0)
        else:
            layer, piece = name.removeprefix("model.layers.").split(".", 1)
            meta, dim = TO_META[piece.removesuffix(".weight")]
            if meta == "attention.wq":
                t = to_interleaved(t, cfg.num_attention_heads)
            elif meta == "attention.wk":
                t = to_interleaved(t, cfg.num_key_value_heads)
            tensors[f"layers.{layer}.{meta}.weight"] = (t, dim)
    folder.mkdir()
    for k in range(shards):
        part = {n: (t if dim is None else t.chunk(shards, dim)[k]).clone() for n, (t, dim) in tensors.items()}
        part["rope.freqs"] = torch.ones(4)  # in Meta files; not a weight
        torch.save(part, folder / f"consolidated.{k:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": 16,
              "ffn_dim_multiplier": None, "norm_eps": cfg.rms_norm_eps, "rope_theta": 1e6}
    (folder / "params.json").write_text(json.dumps(params))


@pytest.fixture(scope="module")
def hf_bf16_ms(tmp_path_factory, hf_llama):
    root = tmp_path_factory.mktemp("meta")
    model = copy.deepcopy(hf_llama).to(torch.bfloat16)
    model.save_pretrained(root / "hf")
    hf_to_ms(root / "hf", root / "ms", progress=False)
    return model, root


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_converts_to_the_same_weights_as_hf(shards, hf_bf16_ms, tmp_path):
    model, root = hf_bf16_ms
    write_meta(model, tmp_path / "meta", shards)
    summary = meta_to_ms(tmp_path / "meta", tmp_path / "ms", progress=False)
    assert summary["dtype"] == "bfloat16"
    ours, ref = CkptFile(tmp_path / "ms" / "model.ckpt"), CkptFile(root / "ms" / "model.ckpt")
    assert ours.keys() == ref.keys()
    for name in ref.keys():
        assert ours.dtype(name) == "bfloat16" and np.array_equal(ours.get(name), ref.get(name)), name
    # wq/wk as REFERENCE.md section 3 permutes them (Meta -> HF/MindFormers), on the Meta files
    parts = [torch.load(f, weights_only=True) for f in sorted((tmp_path / "meta").glob("*.pth"))]
    for key, heads in (("wq", 8), ("wk", 2)):
        w = torch.cat([p[f"layers.2.attention.{key}.weight"] for p in parts], 0)
        dim_out, dim_in = w.shape
        w = w.view(heads, dim_out // heads // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)
        assert np.array_equal(ours.get(f"model.layers.2.attention.{key}.weight"),
                              w.view(torch.int16).numpy().view(np.uint16))
    config, hf_config = ModelConfig.load(tmp_path / "ms"), ModelConfig.load(root / "ms")
    assert (config.ffn_hidden_size, config.n_kv_heads, config.theta, config.seq_length) == \
        (hf_config.ffn_hidden_size, hf_config.n_kv_heads, hf_config.theta, 16384)


def test_missing_meta_shard_is_named(hf_bf16_ms, tmp_path):
    model, _ = hf_bf16_ms
    write_meta(model, tmp_path / "meta", 2)
    (tmp_path / "meta" / "consolidated.01.pth").rename(tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"1 consolidated.NN.pth shard\(s\).*a shard may be missing"):
        meta_to_ms(tmp_path / "meta", tmp_path / "ms", progress=False)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "meta" / "consolidated.01.pth")
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.00\.pth: model-parallel shard missing"):
        meta_to_ms(tmp_path / "meta", tmp_path / "ms", progress=False)
    (tmp_path / "meta" / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta/params\.json: missing"):
        meta_to_ms(tmp_path / "meta", tmp_path / "ms", progress=False)
    assert not (tmp_path / "ms").exists()
