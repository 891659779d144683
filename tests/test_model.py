import mindspore as ms
import numpy as np
import torch
from mindspore import Tensor

from cllama.checkpoint.model_dir import load_hf_weights, random_model
from cllama.checkpoint.names import param_shapes
from cllama.config import ModelConfig
from cllama.model import CodeLlama
from tests.conftest import make_hf_llama


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


def test_names_and_shapes_match_param_shapes():
    model = CodeLlama(ModelConfig.from_name("tiny"))
    got = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    assert got == param_shapes(model.config)


def test_logits_match_hf(hf_llama, ms_llama, rng):
    ids = rng.integers(0, 32016, (3, 24))
    out = ms_llama(Tensor(ids, ms.int32)).asnumpy()
    assert out.dtype == np.float32 and out.shape == (3, 24, 32016)
    assert np.abs(out - hf_logits(hf_llama, ids)).max() < 1e-4


def test_padded_batch_matches_hf(hf_llama, ms_llama, rng):
    ids = rng.integers(0, 32016, (3, 24))
    mask = np.ones((3, 24), np.int64)
    mask[1, :7] = 0   # left padding
    mask[2, 15:] = 0  # right padding
    ids[mask == 0] = 0
    out = ms_llama(Tensor(ids, ms.int32), Tensor(mask, ms.int32)).asnumpy()
    ref = hf_logits(hf_llama, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() < 1e-4


def _load(hf):
    model = CodeLlama(ModelConfig.from_hf(hf.config.to_dict()))
    load_hf_weights(model, hf.state_dict())
    return model


def test_position_interpolation_matches_hf_linear_scaling(rng):
    hf = make_hf_llama(seed=1, num_hidden_layers=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = _load(hf)
    assert model.config.extend_method == "PI" and model.config.scaling_factor == 4.0
    ids = rng.integers(0, 32016, (2, 40))
    assert np.abs(model(Tensor(ids, ms.int32)).asnumpy() - hf_logits(hf, ids)).max() < 1e-4


def test_ntk_is_the_closed_form_base_change(rng):
    factor, base = 8.0, 1e6
    hd = 64 // 8
    hf = make_hf_llama(seed=2, num_hidden_layers=2, rope_theta=base * factor ** (hd / (hd - 2)))
    model = CodeLlama(ModelConfig.from_hf(hf.config.to_dict(), theta=base, extend_method="NTK",
                                          scaling_factor=factor))
    load_hf_weights(model, hf.state_dict())
    ids = rng.integers(0, 32016, (2, 40))
    assert np.abs(model(Tensor(ids, ms.int32)).asnumpy() - hf_logits(hf, ids)).max() < 1e-4


def test_rope_in_float32_even_for_half_compute():
    cfg = ModelConfig.from_name("codellama-7b", num_layers=1, hidden_size=128, num_heads=2, n_kv_heads=2)
    model = CodeLlama(cfg)
    assert model.rope_cos.dtype == ms.float32 and model.compute_dtype == ms.float32  # CPU


def test_loss_matches_torch_cross_entropy(hf_llama, ms_llama, rng):
    ids = rng.integers(3, 32016, (2, 17))
    labels = ids.copy()
    labels[0, :6] = -100          # masked prompt
    ids[1, 12:] = 0               # padding: input positions with pad are left out
    labels[1, 12:] = 0
    loss = float(ms_llama.loss(Tensor(ids, ms.int32), Tensor(labels, ms.int32)).asnumpy())
    logits = torch.tensor(hf_logits(hf_llama, ids[:, :-1]))
    target = torch.tensor(labels[:, 1:]).clone()
    target[torch.tensor(ids[:, :-1]) == 0] = -100
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 32016), target.reshape(-1), ignore_index=-100)
    assert abs(loss - float(ref)) < 1e-4


def test_random_model_is_reproducible():
    a, b, c = (random_model(ModelConfig.from_name("tiny"), seed=s) for s in (3, 3, 4))
    ids = Tensor(np.arange(1, 9, dtype=np.int32).reshape(1, 8))
    assert np.array_equal(a(ids).asnumpy(), b(ids).asnumpy())
    assert not np.allclose(a(ids).asnumpy(), c(ids).asnumpy())  # another seed, other weights


def test_bfloat16_storage_computes_in_float32(rng):
    cfg = ModelConfig.from_name("tiny", param_init_type="bfloat16")
    model = random_model(cfg, seed=0)
    assert model.lm_head.weight.dtype == ms.bfloat16
    out = model(Tensor(rng.integers(0, 32016, (1, 8)), ms.int32)).asnumpy()
    assert out.dtype == np.float32 and np.isfinite(out).all()
