import json

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from cllama.checkpoint.model_dir import (
    load_hf_weights,
    load_model_dir,
    load_state_dict,
    random_model,
    save_model_dir,
    state_dict,
)
from cllama.checkpoint.names import param_shapes
from cllama.checkpoint.safetensors_file import SafetensorsFile, bf16_bits_to_float32, float32_to_bf16_bits
from cllama.config import ModelConfig
from cllama.model import CodeLlama


def test_bad_weights_list_every_problem(hf_llama):
    model = CodeLlama(ModelConfig.from_hf(hf_llama.config.to_dict()))
    state = dict(hf_llama.state_dict())
    del state["model.layers.0.mlp.up_proj.weight"]
    del state["lm_head.weight"]
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    state["model.layers.7.input_layernorm.weight"] = torch.ones(64)
    with pytest.raises(ValueError) as err:
        load_hf_weights(model, state)
    text = str(err.value)
    assert "missing (2): lm_head.weight; model.layers.0.feed_forward.w3.weight" in text
    assert "unexpected (1): model.layers.7.attention_norm.weight" in text
    assert "model.layers.1.attention.wk.weight: expected (16, 64), found (3, 64)" in text


def test_unmapped_hf_name_is_named(hf_llama):
    model = CodeLlama(ModelConfig.from_hf(hf_llama.config.to_dict()))
    state = {**hf_llama.state_dict(), "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf_weights(model, state)


def test_load_from_safetensors_file(tmp_path, hf_llama, ms_llama, rng):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf_llama.state_dict().items()}, str(path))
    model = CodeLlama(ms_llama.config)
    load_hf_weights(model, path)
    ids = Tensor(rng.integers(0, 32016, (1, 8)), ms.int32)
    assert np.array_equal(model(ids).asnumpy(), ms_llama(ids).asnumpy())


def test_truncated_safetensors_is_named(tmp_path, hf_llama):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": hf_llama.state_dict()["lm_head.weight"].contiguous()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        SafetensorsFile(path)


def test_bfloat16_bits_match_torch(rng):
    x = rng.normal(0, 3, 1000).astype(np.float32)
    ours = float32_to_bf16_bits(x)
    theirs = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(bf16_bits_to_float32(ours), torch.tensor(x).to(torch.bfloat16).float().numpy())


def test_model_dir_round_trip(tmp_path, ms_llama, rng, llama2_tokenizer_path):
    save_model_dir(ms_llama, tmp_path / "m", llama2_tokenizer_path)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.ckpt", "tokenizer.model"]
    assert "num_layers" in json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = load_model_dir(tmp_path / "m")
    ids = Tensor(rng.integers(0, 32016, (1, 8)), ms.int32)
    assert np.array_equal(loaded(ids).asnumpy(), ms_llama(ids).asnumpy())
    names = set(ms.load_checkpoint(str(tmp_path / "m" / "model.ckpt")))
    assert names == set(param_shapes(ms_llama.config))  # no cache buffers, no optimizer state


def test_training_state_entries_are_not_weights(tmp_path):
    model = random_model(ModelConfig.from_name("tiny"), seed=1)
    entries = [{"name": n, "data": p} for n, p in state_dict(model).items()]
    entries += [{"name": "adam_m." + n, "data": p} for n, p in state_dict(model).items()]
    entries += [{"name": "global_step", "data": Tensor([7], ms.int32)}]
    model.config.save(tmp_path / "config.json")
    ms.save_checkpoint(entries, str(tmp_path / "model.ckpt"))
    loaded = load_model_dir(tmp_path)
    assert np.array_equal(loaded.lm_head.weight.asnumpy(), model.lm_head.weight.asnumpy())


def test_model_dir_with_wrong_config_is_clear(tmp_path):
    save_model_dir(random_model(ModelConfig.from_name("tiny"), seed=1), tmp_path)
    ModelConfig.from_name("tiny", hidden_size=128).save(tmp_path)
    with pytest.raises(ValueError, match="model.ckpt: weights do not match"):
        load_model_dir(tmp_path)


def test_load_state_dict_from_numpy():
    model = CodeLlama(ModelConfig.from_name("tiny", param_init_type="bfloat16"))
    state = {n: np.full(s, 0.5, np.float32) for n, s in param_shapes(model.config).items()}
    load_state_dict(model, state)
    assert model.lm_head.weight.dtype == ms.bfloat16
    assert float(model.lm_head.weight.astype(ms.float32).asnumpy()[0, 0]) == 0.5
