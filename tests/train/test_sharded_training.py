"""Runs whose ranks save their own slices (integrated_save: False, as every semi-auto run does): the
rank_K/ layout, resuming from it, merging it; pipeline micro-batches; a full model directory split
into a run's layout before loading."""
import logging
import os
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from cllama.checkpoint.model_dir import random_model, read_checkpoint, save_model_dir, state_dict
from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelEnv
from cllama.distributed.strategy import make_parallel, param_layouts, read_strategy, write_strategy
from cllama.distributed.transform import checksums, merge, shard_files
from cllama.train.launch import launch
from cllama.train.loop import train
from cllama.train.metrics import read_metrics
from cllama.train.optim import build_optimizer
from cllama.train.runconfig import load_run_config
from cllama.train.sharded import split_for_run, transform_memory
from cllama.train.steps import TrainStep
from tests.conftest import ROOT

PRETRAIN = ROOT / "configs" / "tiny" / "pretrain.yaml"


@pytest.fixture(scope="module")
def code_data(tmp_path_factory, llama2_tokenizer_path):
    """Packed pretraining rows (65 tokens, no padding) from 6 stdlib modules."""
    from cllama.data.prepare import prepare_code

    out = tmp_path_factory.mktemp("code") / "train.mindrecord"
    return prepare_code(Path(os.__file__).parent, out, seq_length=64, glob="*.py", max_files=6,
                        tokenizer=llama2_tokenizer_path, workers=1, progress=False).path


def _run(out, data, steps=4, batch_size=4, **overrides):
    return load_run_config(PRETRAIN, {"output_dir": str(out), "train_dataset.data_loader.dataset_dir": str(data),
                                      "runner_config.batch_size": batch_size, "runner_config.max_steps": steps,
                                      "model.model_config.seq_length": 64,
                                      "callbacks.CheckpointMointor.save_checkpoint_steps": 2, **overrides})


SLICES = {"callbacks.CheckpointMointor.integrated_save": False}


def test_pipeline_micro_batches_match_the_whole_batch():
    """The Pipeline cell's micro-batches (stand-alone: summed losses, summed gradients) give the loss,
    gradient norm and updated weights of one step over the whole batch."""
    config = ModelConfig.from_name("tiny", seq_length=32, vocab_size=512)
    ids = Tensor(np.random.default_rng(0).integers(3, 512, (4, 33)).astype(np.int32))
    results = []
    for micro in (1, 2, 4):
        model = random_model(config, seed=3)
        optimizer = build_optimizer({"weight_decay": 0.1}, model.trainable_params())
        loss, norm, _, _ = TrainStep(model, optimizer, 1.0, micro_batches=micro)(ids, ids, Tensor(1e-3, ms.float32))
        results.append((float(loss.asnumpy()), float(norm.asnumpy()),
                        {n: p.asnumpy() for n, p in state_dict(model).items()}))
    for loss, norm, weights in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5) and norm == pytest.approx(results[0][1], rel=1e-4)
        # lr 1e-3: the first Adam step moves each weight by about lr * sign(gradient)
        assert max(np.abs(weights[n] - results[0][2][n]).max() for n in weights) < 1e-5
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1 with pipeline"):
        TrainStep(model, optimizer, 1.0, accumulate=2, micro_batches=2)


def test_rank_slices_resume_and_merge_like_a_whole_model_run(code_data, tmp_path):
    """One rank saving its slices: step_N/rank_0/checkpoint_0.ckpt + optimizer.ckpt + strategy.ckpt;
    resuming from step 2 ends where the uninterrupted run does; `ckpt merge` gives the weights a
    whole-model run saves (bit-exact), here in safetensors."""
    whole = train(_run(tmp_path / "whole", code_data, **{"callbacks.CheckpointMointor.checkpoint_format":
                                                          "safetensors"}), progress=False)
    sliced = train(_run(tmp_path / "sliced", code_data, **SLICES), progress=False)
    step = Path(sliced.checkpoint)
    assert step.name == "step_4" and (step / "rank_0" / "checkpoint_0.ckpt").is_file()
    assert sorted(p.name for p in step.iterdir()) == ["config.json", "rank_0", "strategy.ckpt",
                                                      "trainer_state.json"]
    assert (step / "rank_0" / "optimizer.ckpt").is_file() and set(read_strategy(step / "strategy.ckpt")) == set(
        read_checkpoint(step / "rank_0" / "checkpoint_0.ckpt"))
    assert (Path(whole.checkpoint) / "model.safetensors").is_file()
    merged = tmp_path / "merged"
    report = merge(step, merged, progress=False, fmt="safetensors")
    assert report["verified"] and report["kind"] == "merge"
    assert checksums(merged / "model.safetensors") == checksums(Path(whole.checkpoint) / "model.safetensors")

    shutil.rmtree(step)  # resume from step_2's slices
    again = train(_run(tmp_path / "sliced", code_data, **SLICES), resume=True, progress=False)
    assert checksums(Path(again.checkpoint) / "rank_0" / "checkpoint_0.ckpt") == checksums(
        Path(whole.checkpoint) / "model.safetensors")
    losses = [r["loss"] for r in read_metrics(tmp_path / "sliced" / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]


def test_two_ranks_save_their_slices_and_resume_them(code_data, tmp_path):
    """Two msrun workers (data parallel on CPU) each save rank_K/; the step merges into the weights of
    one worker with the doubled batch, and both ranks resume from their own slices."""
    one = train(_run(tmp_path / "one", code_data, batch_size=8), progress=False)
    two = launch(_run(tmp_path / "two", code_data, **SLICES), workers=2, timeout_s=600)
    step = Path(two.checkpoint)
    assert sorted(shard_files(step)) == [0, 1] and (step / "rank_1" / "optimizer.ckpt").is_file()
    merge(step, tmp_path / "merged", progress=False)
    wa, wb = read_checkpoint(Path(one.checkpoint) / "model.ckpt"), read_checkpoint(tmp_path / "merged" / "model.ckpt")
    assert max(np.abs(wa[n].asnumpy() - wb[n].asnumpy()).max() for n in wa) < 1e-5
    final = checksums(shard_files(step)[1])
    shutil.rmtree(step)
    launch(_run(tmp_path / "two", code_data, **SLICES), workers=2, resume=True, timeout_s=600)
    assert checksums(shard_files(step)[1]) == final


def test_a_full_model_dir_is_split_into_the_run_layout_first(tmp_path, caplog):
    """load_checkpoint for a sharded run: rank 0 reports the host memory, splits the model directory
    into the run's layout (dp2/mp2 here) once, and every rank finds its slices there."""
    config = ModelConfig.from_name("tiny", vocab_size=512)
    model_dir = save_model_dir(random_model(config, seed=5), tmp_path / "model")
    strategy = write_strategy(param_layouts(config, make_parallel(2, 2)), tmp_path / "out" / "strategy" / "s.ckpt")
    need = transform_memory(model_dir, strategy)
    size = (model_dir / "model.ckpt").stat().st_size
    assert need["weights_bytes"] == size and 2 * size < need["needed_bytes"] <= 2.5 * size
    with caplog.at_level(logging.WARNING, logger="cllama.train.sharded"):
        dst = split_for_run(model_dir, strategy, tmp_path / "out", ParallelEnv(), progress=False)
    assert "GiB of host memory" in caplog.text
    assert sorted(shard_files(dst)) == [0, 1, 2, 3]
    full = read_checkpoint(model_dir / "model.ckpt")
    rank3 = read_checkpoint(shard_files(dst)[3])
    wq = full["model.layers.0.attention.wq.weight"].asnumpy()
    np.testing.assert_array_equal(rank3["model.layers.0.attention.wq.weight"].asnumpy(), wq[wq.shape[0] // 2:])
    stamp = (dst / "rank_0").stat().st_mtime_ns
    split_for_run(model_dir, strategy, tmp_path / "out", ParallelEnv(), progress=False)  # reused
    assert (dst / "rank_0").stat().st_mtime_ns == stamp
