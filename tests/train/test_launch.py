"""Data parallel through msrun on CPU, parallel settings and msrun command lines."""
import os
from pathlib import Path

import numpy as np
import pytest

from cllama.checkpoint.model_dir import read_checkpoint
from cllama.config import ModelConfig
from cllama.distributed.msrun import msrun_command
from cllama.distributed.parallel import ParallelConfig, auto_parallel_settings, init_parallel, launched_by_msrun
from cllama.train.launch import cluster_commands, launch
from cllama.train.loop import train
from cllama.train.metrics import read_metrics
from cllama.train.runconfig import load_run_config
from tests.conftest import ROOT

PRETRAIN = ROOT / "configs" / "tiny" / "pretrain.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def code_data(tmp_path_factory, llama2_tokenizer_path):
    """Packed pretraining data (no padding, so every rank's mean loss weighs the same number of
    tokens): the first 8 stdlib modules, 65-token rows."""
    from cllama.data.prepare import prepare_code

    out = tmp_path_factory.mktemp("code") / "train.mindrecord"
    return prepare_code(Path(os.__file__).parent, out, seq_length=64, glob="*.py", max_files=8,
                        tokenizer=llama2_tokenizer_path, workers=1, progress=False).path


def _run(out, data, batch_size):
    return load_run_config(PRETRAIN, {"output_dir": str(out), "train_dataset.data_loader.dataset_dir": str(data),
                                      "runner_config.batch_size": batch_size, "runner_config.max_steps": STEPS,
                                      "model.model_config.seq_length": 64,
                                      "callbacks.CheckpointMointor.save_checkpoint_steps": 0})


def test_two_msrun_workers_match_one_worker_with_the_doubled_batch(code_data, tmp_path):
    """2 ranks x batch 4 (gradients all-reduced, each rank reading its half of every global batch)
    follow one worker with batch 8: same loss curve within 1e-5 absolute, same weights within 1e-5."""
    one = train(_run(tmp_path / "one", code_data, 8), progress=False)
    two = launch(_run(tmp_path / "two", code_data, 4), workers=2, timeout_s=600)
    a, b = read_metrics(one.output_dir), read_metrics(two.output_dir)
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-4)
    assert a[-1]["loss"] < a[0]["loss"]
    wa = read_checkpoint(Path(one.checkpoint) / "model.ckpt")
    wb = read_checkpoint(Path(two.checkpoint) / "model.ckpt")
    assert max(np.abs(wa[n].asnumpy() - wb[n].asnumpy()).max() for n in wa) < 1e-5
    logs = sorted((Path(two.output_dir) / "msrun_log").glob("worker_*.log"))
    assert len(logs) == 2
    assert not (Path(two.output_dir) / "checkpoints" / "step_6" / "rank_1").exists()


def test_data_parallel_settings():
    one = ParallelConfig()
    assert auto_parallel_settings(one, {"parallel_mode": 0}, 1, "CPU") == {"parallel_mode": "stand_alone"}
    assert auto_parallel_settings(ParallelConfig(data_parallel=2), {"parallel_mode": 0}, 2, "CPU") == {
        "parallel_mode": "data_parallel", "gradients_mean": True, "device_num": 2}
    with pytest.raises(ValueError, match="data parallel mode takes model_parallel=1"):
        auto_parallel_settings(ParallelConfig(model_parallel=2), {"parallel_mode": 0}, 2, "CPU")
    with pytest.raises(ValueError, match="data_parallel=4 but 2 devices"):
        auto_parallel_settings(ParallelConfig(data_parallel=4), {}, 2, "CPU")
    with pytest.raises(ValueError, match="parallel: unknown keys \\['paralel_mode'\\]"):
        auto_parallel_settings(one, {"paralel_mode": 1}, 1)
    semi = auto_parallel_settings(ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2,
                                                 micro_batch_num=4), {"parallel_mode": 1}, 8, "Ascend",
                                  ModelConfig.from_name("tiny", num_layers=4))
    assert semi["parallel_mode"] == "semi_auto_parallel" and semi["pipeline_stages"] == 2
    with pytest.raises(ValueError, match="pipeline_stage=2 must divide num_layers=3"):
        auto_parallel_settings(ParallelConfig(model_parallel=2, pipeline_stage=2, micro_batch_num=2),
                               {"parallel_mode": 1}, 4, "Ascend", ModelConfig.from_name("tiny", num_layers=3))


def test_init_parallel_does_nothing_on_one_device(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    assert not launched_by_msrun()
    env = init_parallel(ParallelConfig(data_parallel=8))
    assert (env.rank, env.world, env.mode, env.is_main) == (0, 1, "stand_alone", True)


def test_msrun_lines():
    cmd = msrun_command(["python", "-m", "cllama", "train", "--config", "a.yaml"], 2, log_dir="logs")
    assert cmd[:3] == ["msrun", "--worker_num=2", "--local_worker_num=2"] and cmd[-6:] == [
        "python", "-m", "cllama", "train", "--config", "a.yaml"]
    lines = cluster_commands(4, 8, "192.168.1.10", ["python", "-m", "cllama", "train", "--config", "x y.yaml"])
    assert len(lines) == 4 and "--node_rank=3" in lines[3] and "--worker_num=32 --local_worker_num=8" in lines[0]
    assert lines[0].endswith("--config 'x y.yaml'")
    with pytest.raises(ValueError, match="multiple of local_worker_num"):
        msrun_command(["x"], 6, 4)
