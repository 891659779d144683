import pytest

from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig


def test_34b_card_layouts_validate():
    c = ModelConfig.from_name("codellama-34b")
    ParallelConfig(data_parallel=1, model_parallel=8, pipeline_stage=2, micro_batch_num=128).validate_for(c, 16)
    ParallelConfig(data_parallel=4, model_parallel=4, pipeline_stage=2, micro_batch_num=96).validate_for(c, 32)


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
