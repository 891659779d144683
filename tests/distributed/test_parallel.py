import pytest

from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig


@pytest.mark.parametrize("dp, mp, pp, micro, devices", [(1, 8, 2, 128, 16), (4, 4, 2, 96, 32)])
def test_34b_card_layouts_validate(dp, mp, pp, micro, devices):
    """MindFormers' r1.5 layout and the card's 32-device one fit 34B's shapes on exactly their device count."""
    c = ModelConfig.from_name("codellama-34b")
    layout = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=micro)
    assert layout.device_num == devices
    layout.validate_for(c, devices)  # raises if a split does not divide
    with pytest.raises(ValueError, match=f"= {devices} but {2 * devices} devices are in use"):
        layout.validate_for(c, 2 * devices)


@pytest.mark.parametrize("layout, field", [
    (dict(model_parallel=16), "model_parallel=16 must divide n_kv_heads=8"),
    (dict(pipeline_stage=5, micro_batch_num=5), "pipeline_stage=5 must divide num_layers=48"),
])
def test_bad_layouts(layout, field):
    with pytest.raises(ValueError, match=field):
        ParallelConfig(**layout).validate_for(ModelConfig.from_name("codellama-34b"))


def test_field_checks():
    with pytest.raises(ValueError, match="micro_batch_num"):
        ParallelConfig(pipeline_stage=2, micro_batch_num=1)
    with pytest.raises(ValueError, match="unknown keys \\['model_paralel'\\]"):
        ParallelConfig.from_dict({"model_paralel": 2})
    with pytest.raises(ValueError, match="8 devices"):
        ParallelConfig(model_parallel=2).validate_for(ModelConfig.from_name("tiny"), 8)
