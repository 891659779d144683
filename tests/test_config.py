import json
import re
from pathlib import Path

import pytest

from cllama.checkpoint.names import param_shapes
from cllama.config import PRESETS, ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# Parameter counts of the released checkpoints.
COUNTS = {"codellama-7b": 6_738_546_688, "codellama-7b-instruct": 6_738_546_688,
          "codellama-7b-python": 6_738_415_616, "codellama-13b": 13_016_028_160,
          "codellama-13b-instruct": 13_016_028_160, "codellama-34b": 33_743_970_304,
          "codellama-34b-python": 33_743_970_304, "codellama-34b-instruct": 33_743_970_304}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_preset_parameter_counts(name):
    assert ModelConfig.from_name(name).num_params() == COUNTS[name]


def test_13b_python_count_follows_vocab():
    c = ModelConfig.from_name("codellama-13b-python")
    assert c.num_params() == COUNTS["codellama-13b"] - 2 * 16 * 5120


def test_cpu_presets():
    tiny, small = ModelConfig.from_name("tiny"), ModelConfig.from_name("small")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.n_kv_heads, tiny.vocab_size) == (64, 2, 4, 2, 32016)
    assert 3.9e6 < tiny.num_params() < 4.5e6
    assert small.ffn_hidden_size == 2048 and 130e6 < small.num_params() < 140e6
    assert tiny.seq_length >= 433 + 512  # the longest HumanEval prompt plus generated tokens


def test_34b_names_and_shapes_are_mindformers():
    shapes = param_shapes(ModelConfig.from_name("codellama-34b"))
    assert len(shapes) == 2 + 1 + 48 * 9
    assert shapes["model.tok_embeddings.embedding_weight"] == (32000, 8192)
    assert shapes["lm_head.weight"] == (32000, 8192)
    assert shapes["model.norm_out.weight"] == (8192,)
    layer = {k.split(".", 3)[3]: v for k, v in shapes.items() if k.startswith("model.layers.47.")}
    assert layer == {
        "attention_norm.weight": (8192,), "ffn_norm.weight": (8192,),
        "attention.wq.weight": (8192, 8192), "attention.wk.weight": (1024, 8192),
        "attention.wv.weight": (1024, 8192), "attention.wo.weight": (8192, 8192),
        "feed_forward.w1.weight": (22016, 8192), "feed_forward.w2.weight": (8192, 22016),
        "feed_forward.w3.weight": (22016, 8192)}


def test_from_name_overrides_and_unknown_preset():
    c = ModelConfig.from_name("tiny", seq_length=128, theta=10000)
    assert c.seq_length == 128 and c.theta == 10000.0
    with pytest.raises(ValueError, match="unknown preset 'codellama-70b'"):
        ModelConfig.from_name("codellama-70b")


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=5), "hidden_size"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(compute_dtype="int8"), "compute_dtype"),
    (dict(extend_method="YaRN"), "extend_method"),
    (dict(num_layers=0), "num_layers"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_name("tiny", **overrides)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown model_config keys \\['hidden_sise'\\]"):
        ModelConfig.from_dict({"hidden_sise": 64})


def test_34b_run_yaml_loads():
    c = ModelConfig.from_yaml(ROOT / "configs/codellama/run_codellama_34b_910b.yaml")
    assert (c.seq_length, c.hidden_size, c.num_layers, c.num_heads, c.n_kv_heads, c.vocab_size) == \
        (4096, 8192, 48, 64, 8, 32000)
    assert c.theta == 1e6 and c.rms_norm_eps == 1e-5 and c.compute_dtype == "float16"
    assert c.extra["checkpoint_name_or_path"] == "codellama_34b"
    assert c.num_params() == COUNTS["codellama-34b"]


def test_yaml_without_model_block(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("runner_config:\n  epochs: 1\n")
    with pytest.raises(ValueError, match="bad.yaml: no `model: model_config:` block"):
        ModelConfig.from_yaml(p)


@pytest.mark.parametrize("text", ["model:\n  model_config:\n", "model: [1, 2]\n", "model:\n  model_config: [1]\n"])
def test_yaml_model_block_that_is_not_a_mapping(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match="bad.yaml: no `model: model_config:` block"):
        ModelConfig.from_yaml(p)


def test_yaml_that_does_not_parse_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  model_config: {hidden_size: 64\n")
    with pytest.raises(ValueError, match="bad.yaml: not a valid MindFormers run YAML"):
        ModelConfig.from_yaml(p)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_layers="2"), "num_layers: must be an integer (got '2')"),
    (dict(num_layers=True), "num_layers: must be an integer (got True)"),
    (dict(seq_length=None), "seq_length: must be an integer (got None)"),
    (dict(theta=[1]), "theta: must be a finite number (got [1])"),
    (dict(theta=float("inf")), "theta: must be a finite number (got inf)"),
    (dict(top_p=False), "top_p: must be a finite number (got False)"),
    (dict(do_sample=1), "do_sample: must be true/false (got 1)"),
    (dict(extend_method=3), "extend_method: must be a string (got 3)"),
    (dict(n_kv_heads="2"), "n_kv_heads: must be an integer or null (got '2')"),
    (dict(ffn_dim_multiplier={}), "ffn_dim_multiplier: must be a finite number or null (got {})"),
])
def test_every_field_is_type_checked(overrides, message):
    with pytest.raises(ValueError, match=f"^preset 'tiny': ModelConfig.{re.escape(message)}$"):
        ModelConfig.from_name("tiny", **overrides)
    with pytest.raises(ValueError, match=f"^ModelConfig.{re.escape(message)}$"):
        ModelConfig(**overrides)


def test_numbers_as_text_still_read_as_floats():
    c = ModelConfig.from_name("tiny", rms_norm_eps="1e-6", theta=10000, ffn_dim_multiplier="1.3")
    assert (c.rms_norm_eps, c.theta, c.ffn_dim_multiplier) == (1e-6, 10000.0, 1.3)
    assert isinstance(c.theta, float)


@pytest.mark.parametrize("content, message", [
    ([], "must be a JSON object (a Hugging Face LlamaConfig; got a list)"),
    ({"rope_scaling": "x"}, "rope_scaling: must be an object or null (got 'x')"),
    ({"rope_scaling": {"type": "linear", "factor": None}}, None),
    ({"bos_token_id": [1, None]}, "bos_token_id: must be a token id, a list of them, or null (got [1, None])"),
])
def test_hf_config_types_name_the_file_and_field(tmp_path, content, message):
    base = ModelConfig.from_name("tiny").to_hf()
    (tmp_path / "config.json").write_text(json.dumps(content if isinstance(content, list) else {**base, **content}))
    if message is None:  # a null factor is no scaling factor: 1.0
        assert ModelConfig.from_hf(tmp_path).scaling_factor == 1.0
        return
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: {re.escape(message)}$"):
        ModelConfig.from_hf(tmp_path)


def test_json_round_trip(tmp_path):
    c = ModelConfig.from_name("codellama-34b", batch_size=4, extend_method="NTK", scaling_factor=4.0)
    c.save(tmp_path)
    assert ModelConfig.load(tmp_path) == c
    assert json.loads((tmp_path / "config.json").read_text())["n_kv_heads"] == 8


def test_hf_config_round_trip():
    from transformers import LlamaConfig

    for name in PRESETS:
        c = ModelConfig.from_name(name)
        hf = LlamaConfig(**c.to_hf())
        assert hf.intermediate_size == c.ffn_hidden_size
        assert ModelConfig.from_hf(hf.to_dict(), param_init_type=c.param_init_type,
                                   compute_dtype=c.compute_dtype) == c


def test_hf_config_pi_and_ntk():
    pi = ModelConfig.from_name("tiny", extend_method="PI", scaling_factor=2.0)
    hf = pi.to_hf()
    assert hf["rope_scaling"]["factor"] == 2.0
    assert ModelConfig.from_hf(hf).extend_method == "PI"
    ntk = ModelConfig.from_name("tiny", extend_method="NTK", scaling_factor=4.0)
    d = ntk.head_dim
    assert ntk.to_hf()["rope_theta"] == pytest.approx(1e6 * 4.0 ** (d / (d - 2)))


def test_load_refuses_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_name("tiny").to_hf()))
    with pytest.raises(ValueError, match="Hugging Face config.json"):
        ModelConfig.load(tmp_path)


def test_stored_only_keys_are_said_not_silently_honoured(caplog):
    import logging

    from cllama.model import CodeLlama

    config = ModelConfig.from_name("tiny", num_layers=1, use_flash_attention=True, use_past=True,
                                   layernorm_compute_type="float16", extra={"qkv_concat": True})
    notes = config.stored_only_notes()
    assert [n.split("=")[0] for n in notes] == ["use_past", "use_flash_attention", "qkv_concat"]
    assert ModelConfig.from_name("tiny").stored_only_notes() == []
    with caplog.at_level(logging.INFO, logger="cllama.model"):
        model = CodeLlama(config)
    logged = caplog.text
    assert "use_flash_attention=True: stored only" in logged and "qkv_concat=True: stored only" in logged
    assert "CPU: computing in float32" in logged  # layernorm_compute_type float16 is for Ascend
    import mindspore as ms

    assert model.dtypes.norm == ms.float32 and model.dtypes.softmax == ms.float32  # CPU
