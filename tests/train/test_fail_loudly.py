"""Training fails loudly: out-of-vocabulary token ids, finetuning data without labels, invalid
hyper-parameters, diverging runs (no NaN checkpoint, a failed marker, strict JSON) and typos in every
section of a run YAML."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cllama.cli import main
from cllama.data.mindrecord import write_mindrecord
from cllama.train.batches import check_token_ids
from cllama.train.checkpoints import checkpoint_steps
from cllama.train.loop import FAILED_MARKER, TrainingDiverged, summarize, train
from cllama.train.runconfig import load_run_config
from tests.conftest import ROOT

PRETRAIN = ROOT / "configs" / "tiny" / "pretrain.yaml"
FINETUNE = ROOT / "configs" / "tiny" / "finetune.yaml"
SEQ = 16


def _rows(n: int, high: int = 32000, seed: int = 0, labels: bool = False, bad: dict | None = None):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(3, high, SEQ + 1).astype(np.int32)
        if bad and i in bad:
            ids[5] = bad[i]
        row = {"input_ids": ids}
        if labels:
            lab = ids.copy()
            lab[:4] = -100
            row["labels"] = lab
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = {"plain": root / "plain.mindrecord", "infill": root / "infill.mindrecord",
             "late": root / "late.mindrecord", "qa": root / "qa.mindrecord"}
    write_mindrecord(paths["plain"], _rows(16))
    write_mindrecord(paths["infill"], _rows(16, bad={0: 32007}))  # FIM ids of the 32016-piece tokenizer
    write_mindrecord(paths["late"], _rows(16, bad={13: 32009}))  # the 7th batch of 2 (no shuffling)
    write_mindrecord(paths["qa"], _rows(16, labels=True))
    return paths


def run_for(out: Path, data: Path, config: Path = PRETRAIN, **overrides):
    return load_run_config(config, {"output_dir": str(out), "train_dataset.data_loader.dataset_dir": str(data),
                                    "train_dataset.data_loader.shuffle": False, "runner_config.batch_size": 2,
                                    "runner_config.max_steps": 8, "model.model_config.seq_length": SEQ,
                                    "callbacks.CheckpointMointor.save_checkpoint_steps": 1,
                                    "callbacks.CheckpointMointor.keep_checkpoint_max": 10, **overrides})


def steps_saved(out: Path) -> list[int]:
    return [step for step, _ in checkpoint_steps(out / "checkpoints")]


# ---- 1. data against the model ------------------------------------------------------------------
def test_ids_at_or_above_vocab_size_stop_before_the_first_step(tmp_path, data):
    run = run_for(tmp_path / "o", data["infill"], **{"model.model_config.vocab_size": 32000})
    with pytest.raises(ValueError) as err:
        train(run, progress=False)
    message = str(err.value)
    assert str(data["infill"]) in message and "token id 32007" in message and "vocab_size=32000" in message
    assert "32016" in message and "\n" not in message
    assert not (tmp_path / "o" / "metrics.jsonl").exists() or not (tmp_path / "o" / "metrics.jsonl").read_text()
    assert steps_saved(tmp_path / "o") == []


def test_every_batch_is_checked_not_only_the_first(tmp_path, data):
    run = run_for(tmp_path / "o", data["late"], **{"model.model_config.vocab_size": 32000})
    with pytest.raises(ValueError, match="token id 32009"):
        train(run, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the 7th batch holds the id: never fed


def test_token_id_check_ignores_ignore_token_id_in_labels():
    ids = np.array([[1, 2, 31999]], np.int32)
    check_token_ids(ids, np.array([[-100, 2, 31999]], np.int32), 32000, -100, ["d"])
    with pytest.raises(ValueError, match="labels holds token id -5"):
        check_token_ids(ids, np.array([[-5, 2, 3]], np.int32), 32000, -100, ["d"])
    with pytest.raises(ValueError, match="input_ids holds token id 32000"):
        check_token_ids(ids + 1, ids, 32000, -100, ["d"])


def test_finetuning_pretraining_data_without_labels_is_one_clear_error(tmp_path, data):
    run = run_for(tmp_path / "o", data["plain"], FINETUNE)
    with pytest.raises(ValueError, match="no labels.*cllama data qa.*input_columns: \\[input_ids\\]"):
        train(run, progress=False)
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_cli_exits_2_on_out_of_vocabulary_data(tmp_path, data, capsys):
    code = main(["train", "--config", str(PRETRAIN), "--output-dir", str(tmp_path / "o"), "--set",
                 f"train_dataset.data_loader.dataset_dir={data['infill']}", "model.model_config.vocab_size=32000",
                 f"model.model_config.seq_length={SEQ}", "runner_config.batch_size=2", "runner_config.max_steps=2",
                 "train_dataset.data_loader.shuffle=false"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cllama")]  # not the progress bar
    assert code == 2 and len(errors) == 1 and "token id 32007" in errors[0] and "Traceback" not in err


# ---- 2. diverging runs ---------------------------------------------------------------------------
def test_a_diverging_run_stops_keeps_the_last_finite_checkpoint_and_is_marked_failed(tmp_path, data, capsys):
    out = tmp_path / "o"
    code = main(["train", "--config", str(PRETRAIN), "--output-dir", str(out), "--set",
                 f"train_dataset.data_loader.dataset_dir={data['plain']}", "train_dataset.data_loader.shuffle=false",
                 f"model.model_config.seq_length={SEQ}", "runner_config.batch_size=2", "runner_config.max_steps=6",
                 "lr_schedule.learning_rate=1e30", "lr_schedule.warmup_ratio=0",
                 "callbacks.CheckpointMointor.save_checkpoint_steps=1",
                 "callbacks.CheckpointMointor.keep_checkpoint_max=10"])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("cllama")]  # not the progress bar
    assert code == 1 and len(err) == 1 and "Traceback" not in captured.err
    assert err[0].startswith("cllama train: failed: ") and "training diverged at step" in err[0]
    assert captured.out == ""  # no JSON result (and so no NaN in it)
    marker = json.loads((out / FAILED_MARKER).read_text())
    diverged = marker["step"]
    assert marker["status"] == "failed" and diverged >= 2
    assert steps_saved(out) == list(range(1, diverged))  # nothing saved at or after it
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
        assert math.isfinite(record["loss"]) and record["step"] < diverged
    for step_dir in (out / "checkpoints").iterdir():
        state = (step_dir / "trainer_state.json").read_text()
        assert "NaN" not in state and "Infinity" not in state
    result = summarize(out)
    assert result.status == "failed" and "diverged" in result.error and result.steps == diverged - 1
    assert result.checkpoint.endswith(f"step_{diverged - 1}")


def test_with_loss_scaling_overflow_steps_are_skipped_until_they_persist_at_scale_1(tmp_path, data):
    """Weights of 1e30 after step 1: every later step's gradients overflow. The scale halves (4, 2, 1)
    and those steps are skipped by design; overflowing at scale 1 on 3 consecutive steps is divergence."""
    scale = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4, "scale_factor": 2, "scale_window": 1000}
    run = run_for(tmp_path / "o", data["plain"], **{"lr_schedule.learning_rate": 1e30, "lr_schedule.warmup_ratio": 0,
                                                    "runner_wrapper.scale_sense": scale})
    with pytest.raises(TrainingDiverged, match="at step 6: .*on 3 consecutive steps \\(loss scaling\\)"):
        train(run, progress=False)
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["overflow"] for r in records] == [False, True, True, True, True]
    assert [r["loss_scale"] for r in records] == [4.0, 4.0, 2.0, 1.0, 1.0]
    assert all(r["grad_norm"] is None for r in records[1:])  # non-finite: null, not NaN
    assert json.loads((tmp_path / "o" / FAILED_MARKER).read_text())["status"] == "failed"
    assert steps_saved(tmp_path / "o") == [1, 2, 3, 4, 5]  # skipped steps: weights unchanged


def test_a_new_run_clears_the_failed_marker(tmp_path, data):
    out = tmp_path / "o"
    out.mkdir()
    (out / FAILED_MARKER).write_text('{"status": "failed"}\n')
    result = train(run_for(out, data["qa"], FINETUNE, **{"runner_config.max_steps": 2}), progress=False)
    assert result.status == "completed" and not (out / FAILED_MARKER).exists() and result.steps == 2


@pytest.mark.parametrize("overrides, message", [
    ({"lr_schedule.learning_rate": float("nan")}, "lr_schedule.learning_rate: must be a finite number"),
    ({"lr_schedule.learning_rate": ".nan"}, "lr_schedule.learning_rate: must be a number"),
    ({"lr_schedule.learning_rate": float("inf")}, "lr_schedule.learning_rate: must be a finite number"),
    ({"lr_schedule.learning_rate": -1e-3}, "lr_schedule.learning_rate: must be >= 0"),
    ({"lr_schedule.learning_rate": 0}, "lr_schedule.learning_rate: must be > 0"),
    ({"lr_schedule.lr_end": -1e-5}, "lr_schedule.lr_end: must be >= 0"),
    ({"lr_schedule.warmup_lr_init": float("nan")}, "lr_schedule.warmup_lr_init: must be a finite number"),
    ({"lr_schedule.warmup_ratio": 1.5}, "lr_schedule.warmup_ratio: must be in \\[0, 1\\]"),
    ({"lr_schedule.warmup_ratio": float("nan")}, "lr_schedule.warmup_ratio: must be a finite number"),
    ({"lr_schedule.warmup_steps": -3}, "lr_schedule.warmup_steps: must be a whole number >= 0"),
    ({"lr_schedule.warmup_steps": 2.5}, "lr_schedule.warmup_steps: must be a whole number"),
    ({"lr_schedule.total_steps": -2}, "lr_schedule.total_steps: must be a whole number"),
    ({"optimizer.learning_rate": float("nan")}, "optimizer.learning_rate: must be a finite number"),
    ({"optimizer.eps": float("nan")}, "optimizer.eps: must be a finite number"),
    ({"optimizer.weight_decay": float("inf")}, "optimizer.weight_decay: must be a finite number"),
    ({"optimizer.beta1": 1.0}, "optimizer.beta1: must be in"),
    ({"runner_wrapper.max_grad_norm": float("nan")}, "runner_wrapper.max_grad_norm: must be a finite number > 0"),
    ({"runner_wrapper.max_grad_norm": 0}, "runner_wrapper.max_grad_norm: must be a finite number > 0"),
    ({"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 0}},
     "scale_sense.loss_scale_value: must be a finite number > 0"),
    ({"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCell", "scale_factor": 1}},
     "scale_sense.scale_factor: must be a finite number > 1"),
    ({"train_dataset.input_columns": ["labels"]}, "train_dataset.input_columns"),
])
def test_invalid_hyperparameters_are_refused_at_load(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(PRETRAIN, overrides)


def test_metrics_lines_are_strict_json(tmp_path):
    from cllama.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "extra": [float("-inf"), 1.0]})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert read_metrics(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None, "extra": [None, 1.0]}]


# ---- 3. every section is checked ----------------------------------------------------------------
@pytest.mark.parametrize("key, where, closest", [
    ("runner_config.batchsize", "runner_config", "batch_size"),
    ("runner_config.max_step", "runner_config", "max_steps"),
    ("train_dataset.input_column", "train_dataset", "input_columns"),
    ("train_dataset.data_loader.dataset_dirs", "train_dataset.data_loader", "dataset_dir"),
    ("eval_dataset.max_batch", "eval_dataset", "max_batches"),
    ("eval_dataset.data_loader.shufle", "eval_dataset.data_loader", "shuffle"),
    ("context.device_targets", "context", "device_target"),
    ("runner_wrapper.max_grad_nrom", "runner_wrapper", "max_grad_norm"),
    ("model.archh", "model", "arch"),
    ("callbacks.CheckpointMointor.save_checkpoint_step", "callbacks.CheckpointMointor", "save_checkpoint_steps"),
    ("callbacks.MFLossMonitor.per_print_time", "callbacks.MFLossMonitor", "per_print_times"),
    ("recompute_config.recompte", "recompute_config", "recompute"),
    ("processor.tokenizer.vocabfile", "processor.tokenizer", "vocab_file"),
])
def test_a_typo_in_any_section_names_the_section_the_key_and_the_closest_key(key, where, closest):
    with pytest.raises(ValueError) as err:
        load_run_config(PRETRAIN, {key: 4})
    message = str(err.value)
    assert f"{key}: unknown key in {where}; did you mean {closest!r}?" in message and "\n" not in message


def test_a_typo_under_scale_sense_is_refused():
    with pytest.raises(ValueError, match="runner_wrapper.scale_sense.loss_scale: unknown key.*'loss_scale_value'"):
        load_run_config(PRETRAIN, {"runner_wrapper.scale_sense": {"type": "DynamicLossScaleUpdateCell",
                                                                  "loss_scale": 1024}})


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="runner_config: must be a mapping"):
        load_run_config(PRETRAIN, {"runner_config": 8})


def _run_yamls():
    """Every run YAML under configs/, and every pipeline stage's run YAML with its config_overrides."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if "stages" not in doc:
            yield pytest.param(path, {}, id=str(path.relative_to(ROOT)))
            continue
        for stage in doc["stages"]:
            params = stage.get("params") or {}
            if "config" in params:
                yield pytest.param(ROOT / params["config"], params.get("config_overrides") or {},
                                   id=f"{path.relative_to(ROOT)}:{stage['name']}")


@pytest.mark.parametrize("path, overrides", list(_run_yamls()))
def test_every_run_yaml_under_configs_loads(path, overrides):
    run = load_run_config(path, overrides)
    assert run.batch_size >= 1 and run.lr_schedule["learning_rate"]


def test_known_but_ignored_keys_load_and_are_logged_once(caplog):
    from cllama.train import runconfig

    card = ROOT / "configs" / "codellama" / "run_codellama_34b_910b.yaml"
    runconfig._logged_ignored.clear()
    with caplog.at_level(logging.INFO, logger="cllama.train.runconfig"):
        load_run_config(card)
        load_run_config(card)
    lines = [r.getMessage() for r in caplog.records if "does not act on" in r.getMessage()]
    assert len(lines) == 1
    for key in ("runner_config.sink_mode", "runner_config.sink_size", "train_dataset.num_parallel_workers",
                "context.max_call_depth", "model.arch", "callbacks.CheckpointMointor.prefix",
                "callbacks.CheckpointMointor.async_save"):
        assert key in lines[0]
    assert "train_dataset.input_columns" not in lines[0]  # read: it says whether the data must have labels
