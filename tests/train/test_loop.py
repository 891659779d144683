"""Training runs on the bundled data: loss goes down, checkpoints, metrics, SIGKILL + resume, configs."""
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from cllama.checkpoint.model_dir import load_model_dir, random_model, read_checkpoint, save_model_dir
from cllama.config import ModelConfig
from cllama.train.checkpoints import checkpoint_steps
from cllama.train.loop import train
from cllama.train.metrics import read_metrics
from cllama.train.runconfig import load_run_config, save_run_config
from tests.conftest import ROOT, sigkill_after_first_checkpoint

FINETUNE = ROOT / "configs" / "tiny" / "finetune.yaml"
CARD_34B = ROOT / "configs" / "codellama" / "run_codellama_34b_910b.yaml"


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory, llama2_tokenizer_path):
    """400 code-alpaca examples -> Vicuna-template qa MindRecord (seq_length 128) + a held-out split."""
    from cllama.data.prepare import prepare_qa

    root = tmp_path_factory.mktemp("qa")
    subset = root / "alpaca400.json"
    subset.write_text(json.dumps(json.loads((ROOT / "cllama/assets/code_alpaca_2k.json").read_text())[:400]))
    prepared = prepare_qa(subset, root / "train.mindrecord", seq_length=128, tokenizer=llama2_tokenizer_path,
                          val_fraction=0.05, workers=1, progress=False)
    return prepared.path, prepared.val_path


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory, llama2_tokenizer_path):
    """A model directory to finetune (random tiny weights standing in for converted ones)."""
    path = tmp_path_factory.mktemp("start") / "model"
    config = ModelConfig.from_dict(load_run_config(FINETUNE).doc["model"]["model_config"])
    return save_model_dir(random_model(config, seed=11), path, llama2_tokenizer_path)


def tiny_run(out, qa_data, start_dir, **overrides):
    train_path, val_path = qa_data
    values = {"output_dir": str(out), "load_checkpoint": str(start_dir),
              "train_dataset.data_loader.dataset_dir": str(train_path),
              "eval_dataset.data_loader.dataset_dir": str(val_path), "do_eval": True,
              "eval_step_interval": 50, "eval_dataset.max_batches": 4,
              "runner_config.batch_size": 4, "runner_config.max_steps": 100,
              "callbacks.CheckpointMointor.save_checkpoint_steps": 25,
              "callbacks.CheckpointMointor.keep_checkpoint_max": 2, **overrides}
    return load_run_config(FINETUNE, values)


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, qa_data, start_dir):
    out = tmp_path_factory.mktemp("run") / "uninterrupted"
    result = train(tiny_run(out, qa_data, start_dir), progress=False)
    return out, result


def test_hundred_steps_reduce_the_loss(hundred):
    out, result = hundred
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 101))
    first, last10 = records[0]["loss"], np.mean([r["loss"] for r in records[-10:]])
    assert first > 9.5  # ln(32016) = 10.37 for random weights
    assert last10 < first - 4.0, (first, last10)
    assert result.final_loss == records[-1]["loss"] and result.steps == 100 and result.tokens_per_s > 0
    assert result.val_loss is not None and result.val_perplexity == pytest.approx(np.exp(result.val_loss))
    assert [r["step"] for r in records if "val_loss" in r] == [50, 100]
    assert records[0]["lr"] == 0.0 and records[3]["lr"] == pytest.approx(5e-4)  # warmup_ratio 0.03 -> 3 steps
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records)


def test_checkpoints_are_model_dirs_with_training_state(hundred, start_dir):
    out, result = hundred
    assert [s for s, _ in checkpoint_steps(out / "checkpoints")] == [75, 100]  # keep_checkpoint_max 2
    final = Path(result.checkpoint)
    assert final.name == "step_100"
    assert (final / "tokenizer.model").read_bytes() == (start_dir / "tokenizer.model").read_bytes()
    model = load_model_dir(final)
    assert model.config == ModelConfig.load(start_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 100 and state["samples_consumed"] == 400 and state["seed"] == 0
    names = set(ms.load_checkpoint(str(final / "optimizer.ckpt")))
    assert {"global_step", "scale_sense", "adam_m.lm_head.weight", "adam_v.model.norm_out.weight"} <= names
    assert set(read_checkpoint(final / "model.ckpt")) == {n for n, _ in model.parameters_and_names()}
    assert (out / "run_config.yaml").is_file() and not list((out / "checkpoints").glob(".step_*"))


def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(hundred, qa_data, start_dir, tmp_path):
    out = tmp_path / "killed"
    run = tiny_run(out, qa_data, start_dir)
    config = save_run_config(run, tmp_path / "run.yaml")
    sigkill_after_first_checkpoint(config, out)
    saved = checkpoint_steps(out / "checkpoints")
    assert saved and saved[-1][0] < 100
    for _, path in saved:  # whatever the kill interrupted, final names hold complete checkpoints
        json.loads((path / "trainer_state.json").read_text())
        load_model_dir(path)
        assert ms.load_checkpoint(str(path / "optimizer.ckpt"))
    before = [r for r in read_metrics(out) if r["step"] <= saved[-1][0]]  # timed by the killed process
    assert len(before) == saved[-1][0]

    result = train(load_run_config(config), resume=True, progress=False)
    assert not list((out / "checkpoints").glob(".step_*"))
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 101))  # the killed run's extra records were dropped
    assert records[:len(before)] == before  # kept as written: the run resumed after the saved step
    assert result.steps == 100
    ref = read_checkpoint(Path(hundred[1].checkpoint) / "model.ckpt")
    got = read_checkpoint(Path(result.checkpoint) / "model.ckpt")
    worst = max(np.abs(got[n].asnumpy() - ref[n].asnumpy()).max() for n in ref)
    assert worst <= 1e-5, worst
    ref_loss = [r["loss"] for r in read_metrics(hundred[0])]
    np.testing.assert_allclose([r["loss"] for r in records], ref_loss, rtol=1e-5)


def test_model_card_34b_yaml_loads_and_validates():
    run = load_run_config(CARD_34B)
    assert run.model.num_layers == 48 and run.model.n_kv_heads == 8 and run.use_parallel
    assert run.optimizer == {"type": "FP32StateAdamWeightDecay", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    assert run.loss_scale == {"loss_scale_value": 65536.0, "scale_factor": 2.0, "scale_window": 1000.0}
    assert run.max_grad_norm == 1.0 and run.recompute and run.save_steps == 100
    settings = run.parallel_settings("Ascend")
    assert settings["parallel_mode"] == "semi_auto_parallel" and settings["device_num"] == 16
    assert settings["pipeline_stages"] == 2 and settings["enable_parallel_optimizer"] is True
    assert settings["parallel_optimizer_config"]["parallel_optimizer_threshold"] == 64
    doc_layout = load_run_config(CARD_34B, {"parallel_config.data_parallel": 4, "parallel_config.model_parallel": 4,
                                            "parallel_config.micro_batch_num": 96})
    assert doc_layout.parallel_settings("Ascend")["device_num"] == 32
    with pytest.raises(ValueError, match="model_parallel=16 must divide n_kv_heads=8"):
        load_run_config(CARD_34B, {"parallel_config.model_parallel": 16}).parallel_settings("Ascend")
    with pytest.raises(ValueError, match="needs Ascend or GPU"):
        run.parallel_settings("CPU")
    with pytest.raises(ValueError, match="dataset_dir is empty"):
        train(run)
    with pytest.raises(ValueError, match="device_target: Ascend requested"):
        train(load_run_config(CARD_34B, {"train_dataset.data_loader.dataset_dir": "x.mindrecord"}))


@pytest.mark.parametrize("overrides, message", [
    ({"optimzer": {}}, "unknown top-level keys"),
    ({"optimizer.type": "Lamb"}, "optimizer.type: 'Lamb' is not supported"),
    ({"lr_schedule.warmup_ratio": 2.0}, "warmup_ratio: must be in"),
    ({"runner_config.batch_size": 0}, "runner_config.batch_size: must be an integer >= 1"),
    ({"parallel_config.data_paralel": 2}, "unknown keys \\['data_paralel'\\]"),
    ({"model.model_config.num_heads": 5}, "model.model_config: ModelConfig.hidden_size"),
    ({"runner_wrapper.scale_sense": 3}, "runner_wrapper.scale_sense"),
    ({"callbacks.EarlyStop.patience": 3}, "callbacks: type 'EarlyStop'"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(FINETUNE, overrides)


def test_missing_inputs_are_clear_errors(tmp_path, qa_data):
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        train(load_run_config(FINETUNE, {"load_checkpoint": str(tmp_path), "output_dir": str(tmp_path / "o"),
                                         "train_dataset.data_loader.dataset_dir": str(qa_data[0])}))
    assert not (tmp_path / "o").exists()  # checked before anything is written
    with pytest.raises(FileNotFoundError, match="no MindRecord dataset"):
        train(load_run_config(FINETUNE, {"train_dataset.data_loader.dataset_dir": str(tmp_path / "none.mindrecord"),
                                         "output_dir": str(tmp_path / "o")}))


def test_cli_check_prints_the_cluster_plan(capsys):
    from cllama.cli import main

    assert main(["train", "--config", str(CARD_34B), "--check", "--master-addr", "10.0.0.1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device_num"] == 16 and plan["auto_parallel_context"]["parallel_mode"] == "semi_auto_parallel"
    assert len(plan["msrun"]) == 2 and "--worker_num=16 --local_worker_num=8" in plan["msrun"][1]
    assert "--node_rank=1" in plan["msrun"][1] and "--master_addr=10.0.0.1" in plan["msrun"][0]
    assert main(["train", "--config", str(CARD_34B), "--print-msrun", "--devices-per-node", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("msrun --worker_num=16 --local_worker_num=4")
    assert main(["train", "--config", str(FINETUNE), "--set", "optimizer.type=SGD"]) == 2
    assert "optimizer.type: 'SGD'" in capsys.readouterr().err
