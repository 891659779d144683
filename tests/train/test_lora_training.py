"""LoRA runs (configs/tiny/lora.yaml): adapters only train and are checkpointed, a SIGKILL resumes to
the same adapters, rank slices merge into an adapter directory, the result merges into a model."""
import json
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from cllama.checkpoint.adapter import merge_adapter
from cllama.checkpoint.model_dir import load_model_dir, random_model, save_model_dir
from cllama.config import ModelConfig
from cllama.train.checkpoints import checkpoint_steps
from cllama.train.loop import train
from cllama.train.metrics import read_metrics
from cllama.train.runconfig import load_run_config, save_run_config
from tests.conftest import ROOT, sigkill_after_first_checkpoint

LORA = ROOT / "configs" / "tiny" / "lora.yaml"
STEPS = 30


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory, llama2_tokenizer_path):
    from cllama.data.prepare import prepare_qa

    root = tmp_path_factory.mktemp("qa")
    subset = root / "alpaca.json"
    subset.write_text(json.dumps(json.loads((ROOT / "cllama/assets/code_alpaca_2k.json").read_text())[:160]))
    return prepare_qa(subset, root / "train.mindrecord", seq_length=128, tokenizer=llama2_tokenizer_path,
                      workers=1, progress=False).path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, llama2_tokenizer_path):
    return save_model_dir(random_model(ModelConfig.from_yaml(LORA), seed=11),
                          tmp_path_factory.mktemp("base") / "model", llama2_tokenizer_path)


def lora_run(out, qa_data, base_dir, **overrides):
    return load_run_config(LORA, {"output_dir": str(out), "load_checkpoint": str(base_dir),
                                  "train_dataset.data_loader.dataset_dir": str(qa_data),
                                  "runner_config.batch_size": 4, "runner_config.max_steps": STEPS,
                                  "callbacks.CheckpointMointor.save_checkpoint_steps": 10,
                                  "callbacks.CheckpointMointor.keep_checkpoint_max": 2, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, qa_data, base_dir):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, train(lora_run(out, qa_data, base_dir), progress=False)


def _adapters(step_dir: Path, name: str = "adapter.ckpt") -> dict:
    return {n: p.asnumpy() for n, p in ms.load_checkpoint(str(step_dir / name)).items()}


def test_lora_run_trains_and_checkpoints_adapters_only(uninterrupted, base_dir):
    out, result = uninterrupted
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # a random base's frozen lm_head (std 0.02 after RMSNorm) bounds what adapters can do: the loss
    # moves ~0.1 nat here, where full finetuning of the same base falls by 4
    assert np.mean([r["loss"] for r in records[-5:]]) < records[0]["loss"] - 0.05
    assert [s for s, _ in checkpoint_steps(out / "checkpoints")] == [20, 30]
    final = Path(result.checkpoint)
    assert sorted(p.name for p in final.iterdir()) == ["adapter.ckpt", "adapter_config.json", "optimizer.ckpt",
                                                       "trainer_state.json"]
    adapters = _adapters(final)
    assert len(adapters) == 2 * 2 * 7 and all("mindpet_delta_lora" in n for n in adapters)
    assert max(np.abs(a).max() for n, a in adapters.items() if n.endswith("lora_b")) > 0  # B moved from zero
    optimizer = set(ms.load_checkpoint(str(final / "optimizer.ckpt")))
    assert optimizer == {f"adam_{m}.{n}" for n in adapters for m in "mv"} | {"global_step", "scale_sense"}
    doc = json.loads((final / "adapter_config.json").read_text())
    assert doc["pet_config"]["lora_rank"] == 8 and doc["base_model"]["path"] == str(base_dir.resolve())
    # the base never changed: merging the adapter into it is the trained model
    merged = load_model_dir(merge_adapter(base_dir, final, out / "merged"))
    base = load_model_dir(base_dir)
    assert merged.config == base.config
    wq = "model.layers.0.attention.wq.weight"
    delta = dict(merged.parameters_and_names())[wq].asnumpy() - dict(base.parameters_and_names())[wq].asnumpy()
    a, b = adapters[wq[:-6] + "mindpet_delta_lora_a"], adapters[wq[:-6] + "mindpet_delta_lora_b"]
    np.testing.assert_allclose(delta, 2.0 * b @ a, atol=1e-6)  # alpha 16 / rank 8


def test_lora_sigkill_then_resume_gives_the_same_adapters(uninterrupted, qa_data, base_dir, tmp_path):
    out = tmp_path / "killed"
    config = save_run_config(lora_run(out, qa_data, base_dir), tmp_path / "run.yaml")
    sigkill_after_first_checkpoint(config, out)
    saved = checkpoint_steps(out / "checkpoints")
    assert saved and saved[-1][0] < STEPS
    result = train(load_run_config(config), resume=True, progress=False)
    assert result.steps == STEPS
    ref, got = _adapters(Path(uninterrupted[1].checkpoint)), _adapters(Path(result.checkpoint))
    assert set(ref) == set(got)
    worst = max(np.abs(got[n] - ref[n]).max() for n in ref)
    assert worst <= 1e-5, worst
    np.testing.assert_allclose([r["loss"] for r in read_metrics(out)],
                               [r["loss"] for r in read_metrics(uninterrupted[0])], rtol=1e-5)


def test_lora_rank_slices_merge_into_the_adapter_directory(uninterrupted, qa_data, base_dir, tmp_path):
    from cllama.distributed.transform import merge

    out = tmp_path / "slices"
    result = train(lora_run(out, qa_data, base_dir, **{"callbacks.CheckpointMointor.integrated_save": False,
                                                       "runner_config.max_steps": 10}), progress=False)
    step = Path(result.checkpoint)
    assert (step / "rank_0" / "checkpoint_0.ckpt").is_file() and (step / "adapter_config.json").is_file()
    merged = Path(merge(step, tmp_path / "adapter", progress=False)["dst"])
    assert (merged / "adapter.ckpt").is_file() and not (merged / "model.ckpt").exists()
    ref = _adapters(Path(uninterrupted[0]) / "checkpoints" / "step_20")  # a different step: shapes only
    got = _adapters(merged)
    assert {n: a.shape for n, a in got.items()} == {n: a.shape for n, a in ref.items()}
    whole = train(lora_run(tmp_path / "whole", qa_data, base_dir, **{"runner_config.max_steps": 10}), progress=False)
    expected = _adapters(Path(whole.checkpoint))
    assert all(np.array_equal(got[n], expected[n]) for n in expected)


def test_lora_needs_a_base(qa_data, tmp_path):
    with pytest.raises(ValueError, match="pet_config \\(LoRA\\) finetunes a base model; set load_checkpoint"):
        train(lora_run(tmp_path / "x", qa_data, ""), progress=False)


def test_lora_keeps_a_bfloat16_base_frozen_in_its_storage_dtype(qa_data, base_dir, tmp_path):
    """param_init_type bfloat16 (as on Ascend): the base is stored in bfloat16 and never written, the
    float32 adapters train (CPU computes in float32)."""
    from cllama.train import loop

    run = lora_run(tmp_path / "bf16", qa_data, base_dir, **{"runner_config.max_steps": 3,
                                                            "model.model_config.param_init_type": "bfloat16"})
    model = loop._build_model(run)
    assert {p.dtype for p in model.trainable_params()} == {ms.float32}
    assert {p.dtype for n, p in model.parameters_and_names() if "lora" not in n} == {ms.bfloat16}
    result = train(run, progress=False)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    assert json.loads((Path(result.checkpoint) / "adapter_config.json").read_text())["base_model"]["config"][
        "param_init_type"] == "bfloat16"


def test_two_msrun_workers_train_lora_like_one_worker_with_the_doubled_batch(base_dir, tmp_path,
                                                                            llama2_tokenizer_path):
    """Packed rows (every token counts, so two ranks' mean losses average to the whole batch's)."""
    from cllama.data.prepare import prepare_code
    from cllama.train.launch import launch

    data = prepare_code(Path(os.__file__).parent, tmp_path / "code.mindrecord", seq_length=64, glob="*.py",
                        max_files=6, tokenizer=llama2_tokenizer_path, workers=1, progress=False).path
    short = {"runner_config.max_steps": 4, "callbacks.CheckpointMointor.save_checkpoint_steps": 4,
             "train_dataset.input_columns": ["input_ids"]}  # packed pretraining rows: no labels column
    one = train(lora_run(tmp_path / "one", data, base_dir, **short, **{"runner_config.batch_size": 8}),
                progress=False)
    two = launch(lora_run(tmp_path / "two", data, base_dir, **short), workers=2, timeout_s=600)
    ref, got = _adapters(Path(one.checkpoint)), _adapters(Path(two.checkpoint))
    assert max(np.abs(got[n] - ref[n]).max() for n in ref) < 1e-5


def test_a_used_output_dir_is_resumed_or_refused(uninterrupted, qa_data, base_dir):
    out, result = uninterrupted
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint step_30\); continue it with --resume"):
        train(lora_run(out, qa_data, base_dir, **{"runner_config.max_steps": 2}), progress=False)
    assert [s for s, _ in checkpoint_steps(out / "checkpoints")] == [20, 30]  # nothing rotated away
