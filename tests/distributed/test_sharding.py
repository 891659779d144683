"""The model's shard strategies: inert on one device (logits, loss and a training step unchanged),
dividing every tensor they split for every preset and layout or refused up front, and the one
source of the parameter layouts that strategy files are written from."""
import itertools

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from cllama.checkpoint.model_dir import random_model, state_dict
from cllama.config import PRESETS, ModelConfig
from cllama.distributed.parallel import ParallelConfig
from cllama.distributed.strategy import check_strategies, make_parallel, model_layouts, param_layouts, sharded_model
from cllama.layers import ShardedCrossEntropy
from cllama.train.optim import build_optimizer
from cllama.train.steps import TrainStep

TINY = ModelConfig.from_name("tiny", seq_length=64, n_kv_heads=4)


# (dp, mp, pp) with dp * mp * pp in {8, 16, 32}
LAYOUTS = sorted({(n // (mp * pp), mp, pp) for n in (8, 16, 32)
                  for mp, pp in itertools.product([1, 2, 4, 8, 16, 32], repeat=2) if n % (mp * pp) == 0})


@pytest.mark.parametrize("layout", [(2, 2, 1), (1, 4, 1)], ids=["dp2_mp2", "mp4"])
def test_strategies_are_inert_on_one_device(layout, rng):
    """The same weights with and without strategies: identical logits and loss, and one AdamW step
    ends at the same weights (the sharded loss is autodiff's, the plain one hand-written)."""
    plain = random_model(TINY, seed=5)
    sharded = random_model(TINY, seed=5).shard(make_parallel(*layout))
    assert isinstance(sharded.cross_entropy, ShardedCrossEntropy)
    assert sharded.model.layers[0].attention.bmm_qk.in_strategy == ((layout[0], layout[1], 1, 1),) * 2
    ids = Tensor(rng.integers(3, 32016, (2, 17)), ms.int32)
    assert np.array_equal(plain(ids[:, :-1]).asnumpy(), sharded(ids[:, :-1]).asnumpy())
    assert abs(float(plain.loss(ids, ids).asnumpy()) - float(sharded.loss(ids, ids).asnumpy())) < 1e-6
    for model in (plain, sharded):
        model.set_train(True)
        opt = build_optimizer({"type": "AdamW", "weight_decay": 0.1}, model.trainable_params())
        TrainStep(model, opt)(ids, ids, Tensor(1e-3, ms.float32))
    after = {n: p.asnumpy() for n, p in state_dict(plain).items()}
    for name, p in state_dict(sharded).items():
        assert np.allclose(p.asnumpy(), after[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_layout_divides_or_is_refused(preset):
    """All nine checkpoints (and the CPU presets) x every dp*mp*pp in {8, 16, 32}, with and without
    vocab_emb_dp: either the layout is refused with one error naming the constraint, or every strategy
    divides every dim it splits (global batch dp, the preset's sequence length)."""
    config = ModelConfig.from_name(preset)
    model = sharded_model(config, make_parallel())  # weights never allocated; re-sharded below
    accepted = 0
    for (dp, mp, pp), vocab_emb_dp in itertools.product(LAYOUTS, (True, False)):
        parallel = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=pp,
                                  vocab_emb_dp=vocab_emb_dp)
        try:
            model.shard(parallel)
        except ValueError as err:
            assert str(err).startswith("parallel_config.") and "must divide" in str(err), err
            continue
        assert check_strategies(model, dp, config.seq_length) > 30 * config.num_layers
        accepted += 1
    assert accepted


def test_card_layouts_fit_34b():
    """The card's 32-NPU training layout and 8-NPU inference layout fit 34B, with layouts for all
    of its 48 layers on the right stages."""
    config = ModelConfig.from_name("codellama-34b")
    train = param_layouts(config, ParallelConfig(data_parallel=4, model_parallel=4, pipeline_stage=2,
                                                 micro_batch_num=96))
    assert train["model.layers.23.attention.wq.weight"].stage == 0
    assert train["model.layers.24.attention.wq.weight"].stage == 1 and train["lm_head.weight"].stage == 1
    assert train["model.layers.0.attention.wk.weight"].splits == (4, 1)  # 8 kv heads over mp 4
    infer = param_layouts(config, make_parallel(model_parallel=8))
    assert infer["model.layers.0.feed_forward.w2.weight"].splits == (1, 8)
    with pytest.raises(ValueError, match="model_parallel=16 must divide n_kv_heads=8"):
        param_layouts(config, make_parallel(model_parallel=16))


def test_layouts_come_from_the_primitives():
    """Change one primitive's strategy and the derived layout follows it."""
    model = sharded_model(TINY, make_parallel(model_parallel=2))
    assert model_layouts(model)["model.layers.1.attention.wq.weight"].splits == (2, 1)
    model.model.layers[1].attention.wq.shard(((2, 1), (1, 1)))  # wq replicated
    layouts = model_layouts(model)
    assert layouts["model.layers.1.attention.wq.weight"].splits == (1, 1)
    assert layouts["model.layers.0.attention.wq.weight"].splits == (2, 1)
