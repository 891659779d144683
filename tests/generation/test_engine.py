"""The generation engine: prefill/decode steps against the full forward, with the model's weights
and with the fused copy; the cache layout and the fused-weight memory rule."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from cllama.checkpoint.model_dir import random_model
from cllama.config import ModelConfig
from cllama.generation.engine import (
    DecodeGraph,
    DecodeStep,
    FusedWeights,
    KVCache,
    PrefillGraph,
    PrefillStep,
    fuse_by_default,
    fused_nbytes,
    left_pad,
    rotate_half_matrix,
)


@pytest.fixture(scope="module")
def fused(ms_llama):
    return FusedWeights(ms_llama)


@pytest.fixture(scope="module")
def no_gqa():
    """A tiny model with as many kv heads as query heads (7B/13B's layout; ms_llama has GQA)."""
    return random_model(ModelConfig.from_name("tiny", n_kv_heads=4, seq_length=64), seed=3)


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused_weights", "model_weights"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_steps_equal_full_forward(ms_llama, fused, no_gqa, rng, use_fused, gqa):
    """Two left-padded prompts (16 and 11 tokens) in a 32-slot cache: prefill's logits and six
    decode steps' equal the full causal forward at the same positions."""
    model = ms_llama if gqa else no_gqa
    ids = rng.integers(3, 32016, (2, 22)).astype(np.int32)
    full = model(Tensor(ids)).asnumpy()
    cache = KVCache.create(model, 2, 32)
    weights = (fused if gqa else FusedWeights(model)) if use_fused else None
    prefill = PrefillStep(model, 2, 32, cache, weights)
    decode = DecodeStep(model, 2, 32, cache, weights)
    width, lens = 16, np.array([16, 11])
    left, pads = left_pad([ids[0, :16], ids[1, :11]], 2, width, 0, 1)
    first = prefill(Tensor(left), Tensor(pads)).asnumpy()
    assert np.abs(first - full[[0, 1], lens - 1]).max() < 1e-4
    for step in range(6):
        positions = lens + step
        out = decode(Tensor(ids[[0, 1], positions].reshape(2, 1)), Tensor([width + step], ms.int32),
                     Tensor(pads)).asnumpy()
        assert np.abs(out - full[[0, 1], positions]).max() < 1e-4
    keys = cache.keys[0].asnumpy()  # (B, nkv, hd, L): slots after the last written one stay zero
    c = model.config
    assert keys.shape == (2, c.n_kv_heads, c.head_dim, 32)
    assert not keys[..., width + 6:].any() and keys[..., width + 5].any()


def test_argmax_steps_equal_logits_steps(ms_llama, fused, rng):
    ids = rng.integers(3, 32016, (4, 16)).astype(np.int32)
    pads = Tensor(np.zeros(4, np.int32))
    cache = KVCache.create(ms_llama, 4, 32)
    logits = PrefillStep(ms_llama, 4, 32, cache, fused)(Tensor(ids), pads).asnumpy()
    picked = PrefillStep(ms_llama, 4, 32, cache, fused, argmax=True)(Tensor(ids), pads).asnumpy()
    assert picked.dtype == np.int32 and (picked == logits.argmax(-1)).all()


def test_graphs_with_explicit_caches_equal_the_steps(ms_llama, rng):
    """The exported form (caches as inputs/outputs) computes what the in-place steps compute: the
    same logits and, slot for slot, the same cache contents."""
    prompts = [list(rng.integers(3, 32016, 9)), list(rng.integers(3, 32016, 14))]
    ids, pads = left_pad(prompts, 2, 16, 0, 1)
    cache = KVCache.create(ms_llama, 2, 24)
    steps = PrefillStep(ms_llama, 2, 24, cache), DecodeStep(ms_llama, 2, 24, cache)
    graphs = PrefillGraph(ms_llama, 2, 24), DecodeGraph(ms_llama, 2, 24)
    want = steps[0](Tensor(ids), Tensor(pads)).asnumpy()
    got, keys, values = graphs[0](Tensor(ids), Tensor(pads))
    assert np.abs(got.asnumpy() - want).max() < 1e-5
    tokens = want.argmax(-1).astype(np.int32).reshape(2, 1)
    for step in range(3):
        slot = Tensor([16 + step], ms.int32)
        want = steps[1](Tensor(tokens), slot, Tensor(pads)).asnumpy()
        got, keys, values = graphs[1](Tensor(tokens), slot, Tensor(pads), keys, values)
        assert np.abs(got.asnumpy() - want).max() < 1e-5
        tokens = want.argmax(-1).astype(np.int32).reshape(2, 1)
    assert np.abs(keys.asnumpy() - np.stack([k.asnumpy() for k in cache.keys])).max() < 1e-6
    assert np.abs(values.asnumpy() - np.stack([v.asnumpy() for v in cache.values])).max() < 1e-6


def test_fused_weights_layout_and_size(ms_llama, fused):
    c = ms_llama.config
    layer = fused.layers[0]
    assert layer.qkv.shape == (c.hidden_size, (c.num_heads + 2 * c.n_kv_heads) * c.head_dim)
    assert layer.gate_up.shape == (c.hidden_size, 2 * c.ffn_hidden_size)
    assert fused.head.shape == (c.hidden_size, c.vocab_size)
    size = sum(int(np.prod(p.shape)) * 4 for p in fused.get_parameters())
    assert size == fused_nbytes(c, ms.float32)
    x = np.arange(8, dtype=np.float32)
    assert (x @ rotate_half_matrix(8) == np.concatenate([-x[4:], x[:4]])).all()


def test_fusing_is_chosen_by_free_memory():
    """Fused when the copy takes at most half the free memory, whatever this host has free."""
    tiny = ModelConfig.from_name("tiny")
    need = fused_nbytes(tiny, ms.float32)
    assert fuse_by_default(tiny, ms.float32, free_bytes=2 * need)
    assert not fuse_by_default(tiny, ms.float32, free_bytes=2 * need - 1)
    assert fused_nbytes(ModelConfig.from_name("codellama-34b"), ms.float32) > 100e9


def test_cache_longer_than_seq_length_is_refused(ms_llama):
    with pytest.raises(ValueError, match="seq_length=512"):
        KVCache.create(ms_llama, 1, 1024)
