"""Strategy files and checkpoint split/merge/re-shard through mindspore.transform_checkpoints."""
import json
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from cllama.cli import main
from cllama.config import ModelConfig
from cllama.distributed.strategy import (
    make_parallel,
    memory_per_rank,
    param_layouts,
    read_strategy,
    shard_table,
    write_strategy,
)
from cllama.distributed.transform import checksums, shard_files, transform, transform_rank
from tests.conftest import run_notebook

TINY = ModelConfig.from_name("tiny", seq_length=64)           # 4 heads, 2 kv heads, 2 layers
TINY_MP4 = ModelConfig.from_name("tiny", seq_length=64, n_kv_heads=4)  # mp 4 needs 4 kv heads
LAYOUTS = {  # name: (config, parallel layout)
    "mp2": (TINY, dict(model_parallel=2)),
    "mp4": (TINY_MP4, dict(model_parallel=4)),
    "dp2_mp2": (TINY, dict(data_parallel=2, model_parallel=2)),
    "pp2": (TINY, dict(pipeline_stage=2)),
    "dp2_mp2_vocab": (TINY, dict(data_parallel=2, model_parallel=2, vocab_emb_dp=False)),
}


@pytest.fixture(scope="module")
def models(make_model_dir):
    """{kv heads: model directory} for TINY (2) and TINY_MP4 (4)."""
    return {kv: make_model_dir(seed=7, tokenizer=False, seq_length=64, n_kv_heads=kv) for kv in (2, 4)}


def _full(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


@pytest.mark.parametrize("tag", sorted(LAYOUTS))
def test_full_to_shards_to_full_is_bit_exact(tag, models, tmp_path):
    config, layout = LAYOUTS[tag]
    layouts = param_layouts(config, make_parallel(**layout))
    src = models[config.n_kv_heads]
    report = transform(src, tmp_path / "shards", dst_strategy=layouts, progress=False)
    assert report["verified"] and report["ranks"] == make_parallel(**layout).device_num
    full = _full(src / "model.ckpt")
    per_stage = layouts["lm_head.weight"].stage_devices
    for rank, path in shard_files(tmp_path / "shards").items():
        shard = _full(path)
        stage = rank // per_stage
        assert sorted(shard) == sorted(n for n, lay in layouts.items() if lay.stage == stage)
        for name, value in shard.items():  # shape and content the layout implies (numpy slicing)
            lay = layouts[name]
            assert value.shape == lay.shard_shape()
            assert np.array_equal(value, lay.shard_of(full[name], rank % per_stage))
    back = transform(tmp_path / "shards", tmp_path / "merged", progress=False)
    assert back["kind"] == "merge" and back["fingerprint"] == report["fingerprint"]
    merged = _full(tmp_path / "merged" / "model.ckpt")
    assert sorted(merged) == sorted(full)
    assert all(np.array_equal(merged[n], full[n]) and merged[n].dtype == full[n].dtype for n in full)
    assert (tmp_path / "merged" / "config.json").read_text() == (src / "config.json").read_text()


def test_expected_shard_shapes_for_mp2():
    layouts = param_layouts(TINY, make_parallel(model_parallel=2))
    hd, ffn = TINY.head_dim, TINY.ffn_hidden_size
    assert layouts["model.layers.0.attention.wq.weight"].shard_shape() == (4 * hd // 2, 64)
    assert layouts["model.layers.0.attention.wk.weight"].shard_shape() == (2 * hd // 2, 64)
    assert layouts["model.layers.1.attention.wo.weight"].shard_shape() == (64, 4 * hd // 2)
    assert layouts["model.layers.1.feed_forward.w1.weight"].shard_shape() == (ffn // 2, 64)
    assert layouts["model.layers.1.feed_forward.w2.weight"].shard_shape() == (64, ffn // 2)
    assert layouts["model.norm_out.weight"].shard_shape() == (64,)
    # vocab_emb_dp (MindFormers' default) keeps embedding and lm_head whole on every rank
    assert layouts["lm_head.weight"].shard_shape() == (32016, 64)
    split = param_layouts(TINY, make_parallel(model_parallel=2, vocab_emb_dp=False))
    assert split["lm_head.weight"].shard_shape() == split["model.tok_embeddings.embedding_weight"].shard_shape() \
        == (16008, 64)


def test_mp4_to_mp2_equals_direct_split(models, tmp_path):
    src = models[4]
    mp4 = param_layouts(TINY_MP4, make_parallel(model_parallel=4))
    mp2 = param_layouts(TINY_MP4, make_parallel(model_parallel=2))
    transform(src, tmp_path / "mp4", dst_strategy=mp4, verify=False, progress=False)
    resharded = transform(tmp_path / "mp4", tmp_path / "mp4_to_mp2", dst_strategy=mp2, progress=False)
    assert resharded["kind"] == "reshard" and resharded["verified"]
    transform(src, tmp_path / "mp2", dst_strategy=mp2, verify=False, progress=False)
    a, b = shard_files(tmp_path / "mp4_to_mp2"), shard_files(tmp_path / "mp2")
    assert list(a) == list(b) == [0, 1]
    for rank in a:
        assert checksums(a[rank]) == checksums(b[rank])
    # one rank on its own (what a cluster node runs): transform_checkpoint_by_rank agrees
    one = transform_rank(tmp_path / "mp4", 1, tmp_path / "by_rank", dst_strategy=mp2)
    assert checksums(one) == checksums(b[1])


def test_34b_strategy_shapes_without_allocation(tmp_path):
    config = ModelConfig.from_name("codellama-34b")  # 64 heads, 8 kv heads, hidden 8192, ffn 22016
    layouts = param_layouts(config, make_parallel(data_parallel=1, model_parallel=8, pipeline_stage=2))
    expect = {"model.layers.0.attention.wq.weight": (1024, 8192), "model.layers.0.attention.wk.weight": (128, 8192),
              "model.layers.0.attention.wv.weight": (128, 8192), "model.layers.0.attention.wo.weight": (8192, 1024),
              "model.layers.47.feed_forward.w1.weight": (2752, 8192),
              "model.layers.47.feed_forward.w3.weight": (2752, 8192),
              "model.layers.47.feed_forward.w2.weight": (8192, 2752), "model.layers.47.ffn_norm.weight": (8192,),
              "model.tok_embeddings.embedding_weight": (32000, 8192), "lm_head.weight": (32000, 8192)}
    for name, shape in expect.items():
        assert layouts[name].shard_shape() == shape, name
    assert layouts["model.layers.23.attention.wq.weight"].stage == 0
    assert layouts["model.layers.24.attention.wq.weight"].stage == 1
    assert layouts["model.tok_embeddings.embedding_weight"].stage == 0 and layouts["lm_head.weight"].stage == 1
    # the written file, read back by MindSpore's own reader, gives the same splits and stages
    from mindspore.parallel._parallel_serialization import _extract_layout_map
    from mindspore.parallel._tensor import _get_tensor_strategy

    path = write_strategy(layouts, tmp_path / "34b.ckpt", stage_dir=tmp_path / "stages")
    ms_map = _extract_layout_map(str(path))
    assert set(ms_map) == set(layouts)
    for name, lay in layouts.items():
        assert tuple(_get_tensor_strategy(ms_map[name][0], ms_map[name][1])) == lay.splits
        assert ms_map[name][6] == [lay.stage]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["ckpt_strategy_rank_0.ckpt",
                                                                       "ckpt_strategy_rank_8.ckpt"]
    # a cluster's per-stage folder reads like the merged file (merge_pipeline_strategys)
    from_dir = read_strategy(tmp_path / "stages")
    assert {n: (lay.stage, lay.splits) for n, lay in from_dir.items()} == \
        {n: (lay.stage, lay.splits) for n, lay in layouts.items()}
    rows = shard_table(layouts, itemsize=2)
    assert len(rows) == len(layouts) and rows[0]["bytes_per_rank"] == 32000 * 8192 * 2
    layer = 2 * 8192 + (1024 + 128 + 128) * 8192 + 8192 * 1024 + 3 * 2752 * 8192
    per_rank = memory_per_rank(layouts, itemsize=2)
    assert per_rank == [2 * (32000 * 8192 + 24 * layer)] * 8 + [2 * (32000 * 8192 + 8192 + 24 * layer)] * 8


@pytest.mark.parametrize("config, layout, message", [
    (TINY, dict(model_parallel=4), "model_parallel=4 must divide n_kv_heads=2"),
    (TINY, dict(pipeline_stage=4), "pipeline_stage=4 must divide num_layers=2"),
    (ModelConfig.from_name("codellama-34b"), dict(model_parallel=16), "n_kv_heads=8"),
])
def test_invalid_layouts_are_clear_errors(config, layout, message):
    with pytest.raises(ValueError, match=message):
        param_layouts(config, make_parallel(**layout))


def test_wrong_strategy_and_missing_ranks_are_clear_errors(models, tmp_path):
    big = param_layouts(ModelConfig.from_name("tiny", hidden_size=96, num_heads=4), make_parallel(model_parallel=2))
    big.pop("lm_head.weight")
    with pytest.raises(ValueError, match="no layout for \\['lm_head.weight'\\]"):
        transform(models[2], tmp_path / "x", dst_strategy=big, progress=False)
    assert not (tmp_path / "x").exists()
    transform(models[2], tmp_path / "mp2", dst_strategy=param_layouts(TINY, make_parallel(model_parallel=2)),
              verify=False, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "mp2" / "rank_1")
    with pytest.raises(ValueError, match="rank folders \\[1\\]"):
        transform(tmp_path / "mp2", tmp_path / "y", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        transform(models[2], tmp_path / "mp2", dst_strategy=big, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "mp2"]  # no partial or work folders left behind


def test_cli_strategy_and_transform(models, tmp_path, capsys):
    assert main(["ckpt", "strategy", "--model", str(models[2]), "--mp", "2", "--out", str(tmp_path / "s.ckpt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["devices"] == 2 and len(info["bytes_per_rank"]) == 2
    assert main(["ckpt", "transform", "--src", str(models[2]), "--dst", str(tmp_path / "mp2"),
                 "--dst-strategy", str(tmp_path / "s.ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    assert main(["ckpt", "transform", "--src", str(tmp_path / "mp2"), "--dst", str(tmp_path / "pp2"), "--pp", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "reshard"
    assert main(["ckpt", "transform", "--src", str(tmp_path / "pp2"), "--dst", str(tmp_path / "one"), "--rank", "1",
                 "--dst-strategy", str(tmp_path / "s.ckpt")]) == 0
    assert checksums(json.loads(capsys.readouterr().out)["checkpoint"]) == checksums(
        shard_files(tmp_path / "mp2")[1])
    assert main(["ckpt", "strategy", "--preset", "tiny", "--mp", "3", "--out", str(tmp_path / "bad.ckpt")]) == 2
    assert "model_parallel=3 must divide" in capsys.readouterr().err


def test_cluster_stage_files_as_source_strategy(models, tmp_path):
    """Shards from a pipeline job whose strategy is a folder of per-rank files (as a cluster writes)."""
    layouts = param_layouts(TINY, make_parallel(data_parallel=2, pipeline_stage=2))
    transform(models[2], tmp_path / "pp2", dst_strategy=layouts, verify=False, progress=False)
    (tmp_path / "pp2" / "strategy.ckpt").unlink()
    stage_dir = tmp_path / "cluster_strategy"
    write_strategy(layouts, tmp_path / "unused.ckpt", stage_dir=stage_dir)
    for rank in (1, 3):  # every rank of a stage writes the same file; the merge keeps one per stage
        (stage_dir / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(
            (stage_dir / f"ckpt_strategy_rank_{rank - 1}.ckpt").read_bytes())
    with pytest.raises(ValueError, match="--src-strategy"):
        transform(tmp_path / "pp2", tmp_path / "merged", progress=False)
    report = transform(tmp_path / "pp2", tmp_path / "merged", src_strategy=stage_dir, progress=False)
    assert report["verified"]
    assert checksums(tmp_path / "merged" / "model.ckpt") == checksums(models[2] / "model.ckpt")


def test_notebook_05_defaults(tmp_path):
    """notebooks/05_transform_checkpoint.ipynb headlessly: the memory plan of the card's 34B finetuning
    on 32 devices (table and chart), then a random tiny model split for mp 2."""
    import nbformat
    import pandas as pd

    result = run_notebook("05_transform_checkpoint.ipynb", tmp_path)
    assert result["stage"] == "transform_checkpoint" and result["metrics"]["verified"] == 1.0
    assert result["metrics"]["devices"] == 2 and result["params"]["model_parallel"] == 2
    assert sorted(shard_files(result["artifacts"]["sharded_dir"])) == [0, 1]
    assert all(Path(f).is_file() for f in result["figures"]) and len(result["figures"]) == 2
    executed = (tmp_path / "05_transform_checkpoint.ipynb").read_text()
    assert "RANDOM" in executed
    plan = pd.read_csv(result["artifacts"]["memory_plan"])
    card = plan[plan["layout"] == "dp4 mp4 pp2"].iloc[0]
    assert bool(card["fits"]) and 0 < result["metrics"]["plan_fitting_layouts"] < len(plan)
    nb = nbformat.reads(executed, 4)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    html = sum("text/html" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 2 and html >= 2  # the plan chart and the memory-per-rank chart; the plan and shard tables


def test_one_stage_strategy_for_pipeline_shards_is_refused(models, tmp_path):
    layouts = param_layouts(TINY, make_parallel(pipeline_stage=2))
    transform(models[2], tmp_path / "pp2", dst_strategy=layouts, verify=False, progress=False)
    write_strategy(layouts, tmp_path / "merged.ckpt", stage_dir=tmp_path / "stages")
    with pytest.raises(ValueError, match="covers 1 ranks; for a pipeline job pass the strategy of every stage"):
        transform(tmp_path / "pp2", tmp_path / "full", src_strategy=tmp_path / "stages" / "ckpt_strategy_rank_0.ckpt",
                  progress=False)
    assert not (tmp_path / "full").exists()


def test_a_rerun_removes_what_a_killed_transform_left(models, tmp_path):
    """A SIGKILLed transform leaves DST.partial-PID and DST.work-PID-*; the next one removes them."""
    import signal
    import subprocess
    import sys

    dst = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "cllama", "ckpt", "transform", "--src", str(models[2]), "--dst",
                             str(dst), "--mp", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("shards.work-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(f"shards.work-{proc.pid}-") for n in left) and "shards" not in left, left
    transform(models[2], dst, dst_strategy=param_layouts(TINY, make_parallel(model_parallel=2)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
