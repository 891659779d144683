"""The memory planner: exact parameter arithmetic (against the model's own layouts), the model card's
facts, LoRA, the activation formula's terms, the CLI, and the compile check's strategy diff."""
import json
import math
import subprocess
import sys

import pytest

from cllama.checkpoint.lora import LoraConfig, adapter_shapes, is_adapter_name
from cllama.config import PRESETS, ModelConfig
from cllama.distributed.compile_check import diff_layouts
from cllama.distributed.planner import GB, PlanSettings, layer_activation_bytes, plan, plan_layout
from cllama.distributed.strategy import make_parallel, param_layouts, read_strategy, write_strategy
from tests.conftest import ROOT

CARD = PlanSettings(seq_length=4096, micro_batch_num=96, recompute=True, optimizer_parallel=True,
                    flash_attention=True)  # the model card's 34B finetuning settings


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("codellama")])
def test_one_device_bytes_are_exact_parameter_arithmetic(preset):
    config = ModelConfig.from_name(preset)
    n, itemsize = config.num_params(), config.param_itemsize
    lay = plan_layout(config, 1, 1, 1, PlanSettings(), usable_bytes=1e15)
    assert lay.bytes["weights"] == lay.bytes["gradients"] == n * itemsize
    assert lay.bytes["optimizer"] == 8 * n  # two float32 AdamW moments per parameter
    lora = LoraConfig(rank=16)
    adapters = sum(math.prod(s) for s in adapter_shapes(config, lora).values())
    lay = plan_layout(config, 1, 1, 1, PlanSettings(lora=lora), usable_bytes=1e15)
    assert lay.bytes["weights"] == n * itemsize + 4 * adapters  # float32 adapters beside the frozen base
    assert lay.bytes["gradients"] == 4 * adapters and lay.bytes["optimizer"] == 8 * adapters


@pytest.mark.parametrize("preset, dp, mp, pp, lora", [
    ("codellama-34b", 4, 4, 2, None), ("codellama-34b", 1, 8, 1, None), ("codellama-13b", 2, 2, 2, None),
    ("codellama-7b", 1, 4, 2, LoraConfig(rank=8, target_modules=r".*wq|.*wv|.*w2")),
])
def test_weights_per_rank_equal_the_models_own_layouts(preset, dp, mp, pp, lora):
    """The planner's name rules against the layouts read from the model's shard strategies."""
    config = ModelConfig.from_name(preset)
    layouts = param_layouts(config, make_parallel(dp, mp, pp), lora)
    per_stage = [0] * pp
    for name, lay in layouts.items():
        per_stage[lay.stage] += math.prod(lay.shard_shape()) * (4 if is_adapter_name(name) else config.param_itemsize)
    lay = plan_layout(config, dp, mp, pp, PlanSettings(lora=lora, inference=True), usable_bytes=1e15)
    assert lay.bytes["weights"] == max(per_stage)


def test_the_model_cards_facts():
    c34 = ModelConfig.from_name("codellama-34b")
    card = plan(c34, 32, CARD, 64, 54, layouts=[(4, 4, 2)])
    assert card["fits"] and card["layouts"][0]["per_rank_bytes"]["total"] < 54 * GB
    eight = plan(c34, 8, CARD, 64, 54)  # 34B full finetuning does not fit one 8-device node, in any layout
    assert not eight["fits"] and len(eight["layouts"]) >= 4
    one = plan(c34, 1, PlanSettings(inference=True), 64, 54)
    two = plan(c34, 2, PlanSettings(inference=True), 64, 54)
    assert not one["fits"] and two["fits"]  # "at least 2 cards" for 34B inference (bfloat16/float16)
    c7 = ModelConfig.from_name("codellama-7b")
    assert not plan(c7, 1, CARD, 64, 54)["fits"]  # full finetuning of 7B needs more than one device
    assert plan(c7, 1, PlanSettings.create(16, recompute=True, flash_attention=True), 64, 54)["fits"]  # LoRA does
    assert plan(c7, 8, CARD, 64, 54)["fits"]


def test_activation_terms():
    config = ModelConfig.from_name("codellama-34b")
    s, n, a = 4096, config.num_heads, 2
    plain = layer_activation_bytes(config, 4, PlanSettings(seq_length=s))
    flash = layer_activation_bytes(config, 4, PlanSettings(seq_length=s, flash_attention=True))
    assert plain - flash == pytest.approx(a * n * s * s / 4 - 4 * n * s / 4)  # the softmax output, split by mp
    whole = a * 4 * s * config.hidden_size
    seq = layer_activation_bytes(config, 4, PlanSettings(seq_length=s, seq_parallel=True))
    assert plain - seq == pytest.approx(whole - whole / 4)  # sequence parallel splits the replicated part
    assert layer_activation_bytes(config, 4, PlanSettings(seq_length=s, recompute=True)) == a * s * config.hidden_size
    lays = {k: plan(config, 32, PlanSettings(seq_length=s, micro_batch_num=96, **kw), 64, 54, [(4, 4, 2)])
            for k, kw in (("card", {}), ("recompute", {"recompute": True}))}
    acts = {k: v["layouts"][0]["per_rank_bytes"]["activations"] for k, v in lays.items()}
    assert acts["recompute"] < acts["card"] / 5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cllama", "plan", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_json_and_table():
    done = _cli("--preset", "codellama-34b", "--devices", 32, "--micro-batch", 96, "--recompute",
                "--optimizer-parallel", "--flash-attention", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["devices"] == 32 and result["fits"] and result["mode"] == "training"
    layout = next(lay for lay in result["layouts"] if (lay["dp"], lay["mp"], lay["pp"]) == (4, 4, 2))
    assert layout["fits"] and set(layout["per_rank_bytes"]) == {"weights", "gradients", "optimizer",
                                                                 "activations", "total"}
    assert all(lay["dp"] * lay["mp"] * lay["pp"] == 32 for lay in result["layouts"])
    done = _cli("--preset", "codellama-34b", "--devices", 2, "--inference")
    assert done.returncode == 0 and "dp1 mp2 pp1" in done.stdout and "fits: yes" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset", "codellama-99b", "--devices", 8], "not a preset"),
    (["--preset", "codellama-7b", "--devices", 0], "--devices 0: must be >= 1"),
    (["--preset", "codellama-7b", "--devices", 8, "--dp", 3], "not --devices 8"),
    (["--preset", "codellama-7b", "--devices", 8, "--seq-length", 0], "seq_length: must be >= 1"),
    (["--preset", "codellama-7b", "--devices", 1, "--dp", 1, "--compile"],
     "MindSpore compiles semi-auto parallel only for Ascend or GPU"),
])
def test_cli_bad_input_and_compile_on_cpu_exit_2(args, message):
    done = _cli(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_compile_check_diff_reads_a_strategy_file(tmp_path):
    """What --compile compares on hardware, on a strategy file written through MindSpore's protobuf."""
    config = ModelConfig.from_name("tiny")
    layouts = param_layouts(config, make_parallel(2, 2, 1))
    path = write_strategy(layouts, tmp_path / "strategy.ckpt")
    assert diff_layouts(layouts, read_strategy(path)) == []
    other = param_layouts(config, make_parallel(2, 2, 1, vocab_emb_dp=False))
    differences = diff_layouts(other, read_strategy(path))
    assert "lm_head.weight: MindSpore splits it (1, 1), cllama (2, 1)" in differences
    written = read_strategy(path)
    del written["model.norm_out.weight"]
    assert diff_layouts(layouts, written) == ["model.norm_out.weight: not in MindSpore's strategy file"]


def test_run_check_prints_and_enforces_the_finetune_stage_plan(tmp_path):
    """`cllama run codellama_34b_ascend --check`: the card's layout is planned per rank and fits; the same
    stage on 8 devices (dp1 mp4 pp2) does not, and the check says so in one line."""
    done = subprocess.run([sys.executable, "-m", "cllama", "run", "codellama_34b_ascend", "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    [finetune] = [c for c in json.loads(done.stdout)["checks"] if c["stage"] == "finetune"]
    plan_row = finetune["memory_plan_gb"]
    assert plan_row["layout"] == "dp4 mp4 pp2" and plan_row["fits"] and plan_row["usable"] == 54.0
    assert plan_row["total"] == pytest.approx(sum(plan_row[k] for k in ("weights", "gradients", "optimizer",
                                                                        "activations")), abs=0.05)
    done = subprocess.run([sys.executable, "-m", "cllama", "run", "codellama_34b_ascend", "--check", "--set",
                           "finetune.nodes=1", "finetune.config_overrides={\"parallel_config.data_parallel\": 1, "
                           "\"parallel_config.model_parallel\": 4, \"parallel_config.pipeline_stage\": 2, "
                           "\"parallel_config.micro_batch_num\": 96}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "more than the 54.0 GB usable" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
