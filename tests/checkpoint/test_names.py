"""Name maps and parameter shapes: pure (no MindSpore), complete for the real presets."""
import math
import subprocess
import sys

from cllama.checkpoint.names import hf_to_ms_name, meta_to_ms_name, model_order, ms_to_hf_name, param_shapes
from cllama.config import PRESETS, ModelConfig


def test_importing_names_loads_no_mindspore():
    code = ("import sys, cllama.checkpoint.names, cllama.cli; cllama.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mindspore', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_name_map_round_trips_every_34b_name():
    names = param_shapes(ModelConfig.from_name("codellama-34b"))
    hf_names = {ms_to_hf_name(n) for n in names}
    assert None not in hf_names and len(hf_names) == len(names)
    assert {hf_to_ms_name(n) for n in hf_names} == set(names)
    assert ms_to_hf_name("model.layers.47.feed_forward.w1.weight") == "model.layers.47.mlp.gate_proj.weight"
    assert hf_to_ms_name("model.embed_tokens.weight") == "model.tok_embeddings.embedding_weight"
    assert hf_to_ms_name("model.layers.0.self_attn.q_proj.bias") is None


def test_meta_names():
    assert meta_to_ms_name("layers.3.attention.wk.weight") == ("model.layers.3.attention.wk.weight", 0)
    assert meta_to_ms_name("layers.3.feed_forward.w2.weight") == ("model.layers.3.feed_forward.w2.weight", 1)
    assert meta_to_ms_name("norm.weight") == ("model.norm_out.weight", None)
    assert meta_to_ms_name("rope.freqs") is None


def test_hf_names_cover_a_real_hf_model(hf_llama, ms_llama):
    assert {hf_to_ms_name(n) for n in hf_llama.state_dict()} == set(param_shapes(ms_llama.config))


def test_num_params_is_the_sum_of_the_shapes():
    for name in PRESETS:
        config = ModelConfig.from_name(name)
        shapes = param_shapes(config)
        assert config.num_params() == sum(math.prod(s) for s in shapes.values()), name


def test_model_order():
    config = ModelConfig.from_name("tiny")
    names = list(param_shapes(config))
    assert model_order(reversed(names + ["zzz"]), config) == names + ["zzz"]
