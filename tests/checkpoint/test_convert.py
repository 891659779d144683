import copy
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from cllama.checkpoint import convert
from cllama.checkpoint.ckpt_file import CkptFile
from cllama.checkpoint.convert import hf_to_ms, ms_to_hf
from cllama.checkpoint.model_dir import hf_to_ms_name, load_model_dir, load_state_dict, read_checkpoint
from cllama.checkpoint.names import param_shapes
from cllama.checkpoint.safetensors_file import SafetensorsFile, float32_to_bf16_bits
from cllama.cli import main
from cllama.config import ModelConfig
from cllama.model import CodeLlama

IDS = np.random.default_rng(7).integers(0, 32016, (2, 16))


@pytest.fixture(scope="module")
def hf_logits(hf_llama):
    with torch.no_grad():
        return hf_llama(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, hf_llama):
    """The random tiny HF model saved four ways: single safetensors, sharded, .bin, sharded .bin."""
    root = tmp_path_factory.mktemp("hf")
    hf_llama.save_pretrained(root / "single")
    hf_llama.save_pretrained(root / "sharded", max_shard_size="1MB")
    state = {k: v.contiguous() for k, v in hf_llama.state_dict().items()}
    for name in ("bin", "bin_sharded"):
        (root / name).mkdir()
        shutil.copy(root / "single" / "config.json", root / name)
    torch.save(state, root / "bin" / "pytorch_model.bin")
    names = list(state)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, root / "bin_sharded" / file)
        weight_map.update({n: file for n in part})
    (root / "bin_sharded" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return root


@pytest.fixture(scope="module")
def ms_model(hf_llama):
    """One compiled model; each test loads converted weights into it (no recompilation)."""
    model = CodeLlama(ModelConfig.from_hf(hf_llama.config.to_dict()))
    model.set_train(False)
    return model


def _logits(model, ckpt):
    load_state_dict(model, read_checkpoint(ckpt), str(ckpt))
    return model(Tensor(IDS, ms.int32)).asnumpy()


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_hf2ms_logits_match_hf(layout, hf_dirs, tmp_path, ms_model, hf_logits, hf_llama):
    summary = hf_to_ms(hf_dirs / layout, tmp_path / "m", progress=False)
    assert summary["dtype"] == "float32" and summary["tensors"] == len(param_shapes(ms_model.config))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.ckpt"]
    np.testing.assert_allclose(_logits(ms_model, tmp_path / "m" / "model.ckpt"), hf_logits, atol=1e-4, rtol=0)
    assert ModelConfig.load(tmp_path / "m") == ModelConfig.from_hf(hf_llama.config.to_dict())
    if layout == "single":  # the model-dir contract: MindSpore's own loader and load_model_dir
        loaded = ms.load_checkpoint(str(tmp_path / "m" / "model.ckpt"))
        assert list(loaded) == list(param_shapes(ms_model.config))
        model = load_model_dir(tmp_path / "m")
        np.testing.assert_allclose(model(Tensor(IDS, ms.int32)).asnumpy(), hf_logits, atol=1e-4, rtol=0)


def test_ms2hf_loads_in_transformers(hf_dirs, tmp_path, hf_logits, llama2_tokenizer_path):
    from transformers import LlamaForCausalLM

    hf_to_ms(hf_dirs / "single", tmp_path / "m", progress=False)
    shutil.copy(llama2_tokenizer_path, tmp_path / "m" / "tokenizer.model")
    with pytest.warns(convert.VocabularyWarning, match="32000 token ids .* 32016 rows"):
        summary = ms_to_hf(tmp_path / "m", tmp_path / "hf", max_shard_size="2MB", progress=False)
    assert len(summary["files"]) > 3 and summary["files"][-1].endswith("model.safetensors.index.json")
    assert (tmp_path / "hf" / "tokenizer.model").exists()
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.float32
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.tensor(IDS)).logits.numpy(), hf_logits, atol=1e-4, rtol=0)


def _hf_bits(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        st = SafetensorsFile(path)
        out.update({n: (st.dtype(n), np.array(st.raw(n))) for n in st.keys()})
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_ms_hf_round_trip_is_bit_exact(dtype, hf_llama, tmp_path):
    copy.deepcopy(hf_llama).to(getattr(torch, dtype)).save_pretrained(tmp_path / "hf")
    hf_to_ms(tmp_path / "hf", tmp_path / "m", progress=False)
    assert ModelConfig.load(tmp_path / "m").param_init_type == dtype
    ms_to_hf(tmp_path / "m", tmp_path / "back", progress=False)
    original, back = _hf_bits(tmp_path / "hf"), _hf_bits(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, (code, bits) in original.items():
        assert back[name][0] == code and np.array_equal(back[name][1], bits), name


def test_dtype_casts_match_torch_and_mindspore(hf_dirs, hf_llama, tmp_path):
    hf_to_ms(hf_dirs / "single", tmp_path / "bf16", dtype="bfloat16", progress=False)
    loaded = ms.load_checkpoint(str(tmp_path / "bf16" / "model.ckpt"))
    w = hf_llama.state_dict()["model.layers.1.mlp.down_proj.weight"]
    ours = loaded["model.layers.1.feed_forward.w2.weight"]
    assert ours.dtype == ms.bfloat16
    assert np.array_equal(ours.astype(ms.float32).asnumpy(), w.to(torch.bfloat16).float().numpy())
    hf_to_ms(hf_dirs / "single", tmp_path / "f16", dtype="float16", progress=False)
    f16 = ms.load_checkpoint(str(tmp_path / "f16" / "model.ckpt"))["model.layers.1.feed_forward.w2.weight"]
    assert np.array_equal(f16.asnumpy(), Tensor(w.numpy()).astype(ms.float16).asnumpy())
    # bfloat16 -> float32 widening is exact, so a bf16 model dir converts back to the same bits
    ms_to_hf(tmp_path / "bf16", tmp_path / "hf32", dtype="float32", progress=False)
    back = SafetensorsFile(tmp_path / "hf32" / "model.safetensors").get("model.layers.1.mlp.down_proj.weight")
    assert np.array_equal(float32_to_bf16_bits(back), w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_34b_name_and_shape_map_by_shapes_only():
    """transformers builds the 34B model on the meta device (no memory); every HF name and shape
    must map onto the codellama-34b preset's MindFormers parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = ModelConfig.from_name("codellama-34b").to_hf()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config))
    hf_shapes = {hf_to_ms_name(n): tuple(p.shape) for n, p in model.state_dict().items()}
    expected = param_shapes(ModelConfig.from_hf(hf_config))
    assert hf_shapes == expected == param_shapes(ModelConfig.from_name("codellama-34b"))
    assert expected["model.layers.47.attention.wk.weight"] == (1024, 8192)
    assert expected["model.layers.0.feed_forward.w1.weight"] == (22016, 8192)
    assert sum(np.prod(s) for s in expected.values()) == 33_743_970_304


def test_vocabulary_warning_like_the_34b_tokenizer(hf_llama, tmp_path, llama2_tokenizer_path):
    hf_llama_32000 = tmp_path / "hf"
    config = {**hf_llama.config.to_dict(), "vocab_size": 32000}
    state = {k: (v[:32000] if v.shape[0] == 32016 else v).contiguous() for k, v in hf_llama.state_dict().items()}
    from safetensors.torch import save_file

    hf_llama_32000.mkdir()
    save_file(state, str(hf_llama_32000 / "model.safetensors"), metadata={"format": "pt"})
    (hf_llama_32000 / "config.json").write_text(json.dumps(config))
    shutil.copy(llama2_tokenizer_path, hf_llama_32000 / "tokenizer.model")
    added = [{"id": i, "content": c} for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    added += [{"id": 32000 + i, "content": c} for i, c in enumerate(["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"])]
    (hf_llama_32000 / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    with pytest.warns(convert.VocabularyWarning, match=r"32004 token ids .*32000 rows: ids 32000\.\.32003"):
        summary = hf_to_ms(hf_llama_32000, tmp_path / "m", progress=False)
    assert "▁<PRE>=32000" in summary["warnings"][0]
    assert (tmp_path / "m" / "tokenizer.model").exists()


def test_weights_disagreeing_with_config_json_is_an_error(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs / "single", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    with pytest.raises(ValueError, match=r"model\.safetensors against config\.json.*\n.*wrong shape .*"
                                         r"embedding_weight: expected \(32000, 64\), found \(32016, 64\)"):
        hf_to_ms(tmp_path / "hf", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_missing_shard_and_truncated_file_are_named(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs / "sharded", tmp_path / "hf")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated safetensors file"):
        hf_to_ms(tmp_path / "hf", tmp_path / "m", progress=False)
    shard.unlink()
    listed = rf"{shard.name}: shard listed in model.safetensors.index.json is missing"
    with pytest.raises(FileNotFoundError, match=listed):
        hf_to_ms(tmp_path / "hf", tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "model.ckpt").exists()
    shutil.copytree(hf_dirs / "bin", tmp_path / "bin")
    data = (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a readable torch checkpoint"):
        hf_to_ms(tmp_path / "bin", tmp_path / "m", progress=False)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failing_conversion_leaves_nothing_under_the_final_name(failure, hf_dirs, tmp_path, monkeypatch):
    calls = []

    def failing_cast(chunk, src, dst):
        calls.append(1)
        if len(calls) == 10:
            raise failure("interrupted")
        return chunk

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.ckpt").write_bytes(b"old")
    monkeypatch.setattr(convert, "cast", failing_cast)
    with pytest.raises(failure):
        hf_to_ms(hf_dirs / "single", tmp_path / "m", progress=False)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.ckpt"]
    assert (tmp_path / "m" / "model.ckpt").read_bytes() == b"old"  # the old file is untouched
    monkeypatch.undo()
    hf_to_ms(hf_dirs / "single", tmp_path / "m", progress=False)
    monkeypatch.setattr(convert, "cast", failing_cast)
    calls.clear()
    with pytest.raises(failure):  # fails in the third of several shards
        ms_to_hf(tmp_path / "m", tmp_path / "hf", max_shard_size="1MB", progress=False)
    assert list((tmp_path / "hf").iterdir()) == []


def test_peak_memory_is_bounded_by_a_tensor_not_the_model(tmp_path, rng, monkeypatch):
    """tracemalloc sees numpy's buffers: converting 64 MiB of bfloat16 weights to float32 (128 MiB
    written) must never hold more than a few chunks."""
    import tracemalloc

    from cllama.checkpoint.safetensors_file import SafetensorsWriter
    from cllama.checkpoint.sources import TensorSource

    specs = [(f"t{i}", "BF16", (1024, 2048)) for i in range(16)]
    with SafetensorsWriter(tmp_path / "w.safetensors", specs) as w:
        for name, _, shape in specs:
            w.begin(name)
            w.write(rng.integers(0, 2**15, shape, dtype=np.uint16))
    st = SafetensorsFile(tmp_path / "w.safetensors")
    sources = [TensorSource(n, st.shape(n), "bfloat16", str(st.path), lambda m, n=n: st.chunks(n, m))
               for n in st.keys()]
    monkeypatch.setattr(convert, "CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    convert.write_weights(sources, tmp_path / "w.ckpt", "float32", progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert CkptFile(tmp_path / "w.ckpt").nbytes("t3") == 1024 * 2048 * 4
    assert peak < 8 << 20, peak  # 1 MiB chunks; the output is 128 MiB


def test_cli_convert(hf_dirs, tmp_path, capsys):
    assert main(["convert", "hf2ms", "--src", str(hf_dirs / "single"), "--dst", str(tmp_path / "m"),
                 "--dtype", "bfloat16", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "bfloat16" and out["files"] == [str(tmp_path / "m" / "model.ckpt")]
    assert main(["convert", "ms2hf", "--src", str(tmp_path / "m"), "--dst", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [str(tmp_path / "hf" / "model.safetensors")]
    assert main(["convert", "hf2ms", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cllama convert: error:") and "nowhere/config.json: missing" in err
    assert main(["convert", "ms2hf", "--src", str(hf_dirs / "single"), "--dst", str(tmp_path / "y")]) == 2
    assert "Hugging Face config.json" in capsys.readouterr().err


def test_a_used_destination_is_refused_unless_overwrite_and_then_replaced_whole(hf_dirs, tmp_path):
    from cllama.checkpoint.convert import convert

    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "model.ckpt").write_bytes(b"trained weights")
    (dst / "optimizer.ckpt").write_bytes(b"optimizer state")  # must not survive beside new weights
    with pytest.raises(FileExistsError, match="exists and is not empty; choose a new destination or pass --overwrite"):
        convert("hf", hf_dirs / "single", dst, progress=False)
    assert (dst / "model.ckpt").read_bytes() == b"trained weights"
    summary = convert("hf", hf_dirs / "single", dst, progress=False, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.ckpt"]
    assert summary["dst"] == str(dst) and summary["files"] == [str(dst / "model.ckpt")]
    assert not list(tmp_path.glob("m.partial-*"))
