"""Checkpoints of sharded runs and safetensors model directories: the card's layouts round-trip
bit-exactly through MindSpore's transform in both formats, a step folder of rank shards merges into a
model directory that generates what the original does, safetensors model directories load and
convert to Hugging Face and back bit-exactly."""
import json

import mindspore as ms
import numpy as np
import pytest

from cllama.checkpoint.convert import hf_to_ms, ms_to_hf, tensor_table
from cllama.checkpoint.files import weights_file
from cllama.checkpoint.model_dir import load_model_dir, save_model_dir
from cllama.checkpoint.safetensors_file import SafetensorsFile
from cllama.cli import main
from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig
from cllama.distributed.strategy import make_parallel, param_layouts
from cllama.distributed.transform import checksums, shard_files, transform
from cllama.generation.generator import Generator

CARD_TRAIN = ParallelConfig(data_parallel=4, model_parallel=4, pipeline_stage=2, micro_batch_num=96)
CARD_INFER = make_parallel(model_parallel=8)


@pytest.fixture(scope="module")
def eight_heads(make_model_dir):
    """A tiny model 8-way model parallel fits: 8 heads, 8 kv heads, ffn 256, 2 layers."""
    return make_model_dir(seed=3, seq_length=64, num_heads=8, n_kv_heads=8)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("layout", [CARD_TRAIN, CARD_INFER], ids=["dp4_mp4_pp2", "mp8"])
def test_card_layouts_round_trip_bit_exact(eight_heads, tmp_path, layout, fmt):
    config = ModelConfig.load(eight_heads)
    source = tmp_path / "full"
    save_model_dir(load_model_dir(eight_heads), source, fmt=fmt)
    split = transform(source, tmp_path / "shards", dst_strategy=param_layouts(config, layout), progress=False)
    assert split["ranks"] == layout.device_num and split["format"] == fmt
    assert {p.suffix for p in shard_files(tmp_path / "shards").values()} == {"." + fmt}
    merged = transform(tmp_path / "shards", tmp_path / "merged", progress=False)
    assert merged["fingerprint"] == split["fingerprint"]
    assert checksums(weights_file(tmp_path / "merged")) == checksums(weights_file(source))


def test_step_folder_of_rank_shards_merges_into_a_model_directory(eight_heads, tmp_path):
    """checkpoints/step_N/ as a sharded run leaves it (rank_K/ shards beside optimizer state, the
    strategy file, config.json) -> `cllama ckpt merge` -> the same greedy tokens as the original."""
    config = ModelConfig.load(eight_heads)
    layouts = param_layouts(config, make_parallel(data_parallel=2, model_parallel=2))
    step = tmp_path / "checkpoints" / "step_4"
    transform(eight_heads, step, dst_strategy=layouts, progress=False)
    for path in shard_files(step).values():  # optimizer state sits beside each shard
        ms.save_checkpoint([{"name": "adam_m.x", "data": ms.Tensor(np.ones(2, np.float32))}],
                           str(path.parent / "optimizer.ckpt"))
    assert main(["ckpt", "merge", "--src", str(step), "--dst", str(tmp_path / "model")]) == 0
    prompt = [[1, 822, 18755, 29898]]
    want = Generator.from_dir(eight_heads).generate(prompt, max_new_tokens=12, ignore_eos=True)[0].output_ids
    got = Generator.from_dir(tmp_path / "model").generate(prompt, max_new_tokens=12, ignore_eos=True)[0].output_ids
    assert got == want


def test_safetensors_model_directory_loads_and_converts_both_ways(eight_heads, tmp_path):
    original = load_model_dir(eight_heads)
    save_model_dir(original, tmp_path / "st", fmt="safetensors")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors"]
    header = SafetensorsFile(tmp_path / "st" / "model.safetensors").metadata
    assert header == {"format": "ms"}  # MindSpore's own writer
    ids = ms.Tensor(np.array([[1, 5, 9, 200]], np.int32))
    assert np.array_equal(load_model_dir(tmp_path / "st")(ids).asnumpy(), original(ids).asnumpy())
    ms_to_hf(tmp_path / "st", tmp_path / "hf", progress=False)
    hf_to_ms(tmp_path / "hf", tmp_path / "back", progress=False, fmt="safetensors")
    back = weights_file(tmp_path / "back")
    assert back.name == "model.safetensors"
    assert ms.load_checkpoint(str(back), format="safetensors")  # MindSpore reads cllama's writer
    table_in, table_out = tensor_table(tmp_path / "st", "ms"), tensor_table(tmp_path / "back", "ms")
    assert list(table_in["crc32"]) == list(table_out["crc32"]) and len(table_in) == 3 + 9 * 2
    assert checksums(back) == checksums(tmp_path / "st" / "model.safetensors")
    summary = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert summary["num_attention_heads"] == 8
