"""LoRA against Hugging Face peft: forward, one AdamW step, merging, PEFT export/import, MindFormers
names, layouts and bad input."""
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from cllama.checkpoint.adapter import (
    adapter_params,
    add_lora,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapter,
    model_with_adapter,
    write_adapter_files,
)
from cllama.checkpoint.convert import ms_to_hf
from cllama.checkpoint.lora import LoraConfig, adapter_shapes, ms_to_peft_name, peft_to_ms_name
from cllama.checkpoint.model_dir import load_hf_weights, load_model_dir, save_model_dir, state_dict
from cllama.config import ModelConfig
from cllama.model import CodeLlama
from cllama.train.optim import build_optimizer
from cllama.train.steps import TrainStep
from tests.conftest import ROOT, make_hf_llama

ATTENTION = r".*wq|.*wk|.*wv|.*wo"
EVERYTHING = ATTENTION + r"|.*w1|.*w2|.*w3"
PEFT_TARGETS = {ATTENTION: ["q_proj", "k_proj", "v_proj", "o_proj"],
                EVERYTHING: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ADAMW = {"type": "AdamW", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _ids(seed=0, shape=(2, 12)):
    return np.random.default_rng(seed).integers(3, 32016, shape)


def _ms_lora(hf, lora: LoraConfig, seed=1):
    """cllama model with hf's weights and adapters whose B is random (so the adapter matters)."""
    model = CodeLlama(ModelConfig.from_hf(hf.config.to_dict()))
    load_hf_weights(model, hf.state_dict())
    add_lora(model, lora, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, param in adapter_params(model).items():
        if name.endswith("lora_b"):
            param.set_data(Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    model.set_train(False)
    return model


def _peft_from(hf, model, lora: LoraConfig):
    """A peft LoraModel on `hf` holding the cllama model's adapter values."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    peft = get_peft_model(hf, PeftConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                         target_modules=PEFT_TARGETS[lora.target_modules]))
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for name, param in adapter_params(model).items():
            peft_name = ms_to_peft_name(name).replace(".weight", ".default.weight")
            params[peft_name].copy_(torch.from_numpy(param.asnumpy()))
    return peft.eval()


@pytest.mark.parametrize("targets", [ATTENTION, EVERYTHING], ids=["attention", "attention+mlp"])
def test_lora_forward_equals_peft(targets):
    hf = make_hf_llama(seed=3)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=targets)
    model = _ms_lora(hf, lora)
    assert len(adapter_params(model)) == 2 * 3 * len(PEFT_TARGETS[targets])
    peft = _peft_from(hf, model, lora)
    ids = _ids()
    got = model(Tensor(ids, ms.int32)).asnumpy()
    with torch.no_grad():
        ref = peft(torch.tensor(ids)).logits.numpy()
    plain = make_hf_llama(seed=3)(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(ref - plain).max() > 1e-3  # the adapters change the logits
    assert np.abs(got - ref).max() < 1e-5


def test_one_adamw_step_equals_torch_on_peft_and_leaves_base_bit_identical():
    hf = make_hf_llama(seed=4)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=EVERYTHING)
    model = _ms_lora(hf, lora)
    base_before = {n: p.asnumpy().copy() for n, p in state_dict(model).items()}
    peft = _peft_from(hf, model, lora)
    ids = _ids(5, (2, 17))
    labels = ids.copy()
    labels[0, :5] = -100

    model.set_train(True)
    assert [p.name for p in model.trainable_params()] == list(adapter_params(model))
    optimizer = build_optimizer(ADAMW, model.trainable_params())
    assert len(optimizer.state()) == 2 * len(adapter_params(model)) + 1  # moments of adapters only + global_step
    step = TrainStep(model, optimizer, max_grad_norm=0.0)
    loss, _, _, _ = step(Tensor(ids, ms.int32), Tensor(labels, ms.int32), Tensor(1e-2, ms.float32))

    trainable = [p for p in peft.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    peft.train()
    logits = peft(torch.tensor(ids[:, :-1])).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    ref_loss.backward()
    torch_opt.step()
    assert abs(float(loss.asnumpy()) - float(ref_loss)) < 1e-5
    params = dict(peft.named_parameters())
    worst = max(np.abs(p.asnumpy() - params[ms_to_peft_name(n).replace(".weight", ".default.weight")]
                       .detach().numpy()).max() for n, p in adapter_params(model).items())
    assert worst < 1e-5, worst
    moved = max(np.abs(p.asnumpy() - 0).max() for n, p in adapter_params(model).items() if n.endswith("lora_b"))
    assert moved > 0
    for name, param in state_dict(model).items():
        assert np.array_equal(param.asnumpy(), base_before[name]), name


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, codellama_tokenizer_path):
    """A base model directory (random tiny HF weights) and a trained-looking adapter directory for it."""
    root = tmp_path_factory.mktemp("lora")
    hf = make_hf_llama(seed=6)
    base = CodeLlama(ModelConfig.from_hf(hf.config.to_dict()))
    load_hf_weights(base, hf.state_dict())
    base_dir = save_model_dir(base, root / "base", codellama_tokenizer_path)
    lora = LoraConfig(rank=4, alpha=16.0, target_modules=EVERYTHING)
    model = _ms_lora(hf, lora, seed=7)
    adapter_dir = write_adapter_files(model, root / "adapter", base_dir)
    return root, base_dir, adapter_dir, model


def test_merged_model_equals_the_adapter_model(base_and_adapter, tmp_path):
    root, base_dir, adapter_dir, model = base_and_adapter
    ids = Tensor(_ids(8), ms.int32)
    unmerged = model(ids).asnumpy()
    merged_dir = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    assert sorted(p.name for p in merged_dir.iterdir()) == ["config.json", "model.ckpt", "tokenizer.model"]
    merged = load_model_dir(merged_dir)(ids).asnumpy()
    assert np.abs(merged - unmerged).max() < 1e-5
    in_memory = model_with_adapter(base_dir, adapter_dir)(ids).asnumpy()
    assert np.abs(in_memory - unmerged).max() < 1e-5
    reloaded = load_model_dir(base_dir)
    load_adapter(reloaded, adapter_dir)
    assert np.abs(reloaded(ids).asnumpy() - unmerged).max() < 1e-6


def test_peft_export_loads_with_peft_on_the_converted_base(base_and_adapter, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base_dir, adapter_dir, model = base_and_adapter
    hf_dir = tmp_path / "hf"
    ms_to_hf(base_dir, hf_dir, progress=False)
    peft_dir = export_peft(adapter_dir, tmp_path / "peft")
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                                     peft_dir).eval()
    ids = _ids(9)
    with torch.no_grad():
        ref = peft(torch.tensor(ids)).logits.numpy()
    assert np.abs(model(Tensor(ids, ms.int32)).asnumpy() - ref).max() < 1e-5


def test_peft_adapter_imports_with_the_same_logits(base_and_adapter, tmp_path):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    root, base_dir, _, _ = base_and_adapter
    hf_dir = tmp_path / "hf"
    ms_to_hf(base_dir, hf_dir, progress=False)
    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                          PeftConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)).eval()  # random B: the adapter matters
    peft.save_pretrained(tmp_path / "peft")
    adapter_dir = import_peft(tmp_path / "peft", base_dir, tmp_path / "adapter")
    doc = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert doc["pet_config"] == {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 6.0, "lora_dropout": 0.0,
                                 "target_modules": ".*wq|.*wv|.*w2"}
    ids = _ids(10)
    with torch.no_grad():
        ref = peft(torch.tensor(ids)).logits.numpy()
    model = load_model_dir(base_dir)
    load_adapter(model, adapter_dir)
    assert np.abs(model(Tensor(ids, ms.int32)).asnumpy() - ref).max() < 1e-5


def test_mindformers_named_checkpoint_loads(base_and_adapter, tmp_path):
    """A MindFormers LoRA checkpoint (base weights, adapters and optimizer state in one file, written by
    mindspore.save_checkpoint) is an adapter file: the adapters are read from it by name."""
    root, base_dir, adapter_dir, model = base_and_adapter
    folder = tmp_path / "mf"
    folder.mkdir()
    entries = [{"name": n, "data": p} for n, p in model.parameters_and_names()]
    entries += [{"name": f"adam_m.{n}", "data": Tensor(np.zeros(p.shape, np.float32))}
                for n, p in adapter_params(model).items()]
    entries.append({"name": "global_step", "data": Tensor(np.array(10, np.int32))})
    ms.save_checkpoint(entries, str(folder / "adapter.ckpt"))
    (folder / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    names = ms.load_checkpoint(str(folder / "adapter.ckpt"))
    assert "model.layers.0.attention.wq.mindpet_delta_lora_a" in names
    assert tuple(names["model.layers.0.feed_forward.w2.mindpet_delta_lora_b"].shape) == (64, 4)
    reloaded = load_model_dir(base_dir)
    load_adapter(reloaded, folder)
    ids = Tensor(_ids(11), ms.int32)
    assert np.abs(reloaded(ids).asnumpy() - model(ids).asnumpy()).max() < 1e-6


def test_adapter_layouts_follow_their_weights():
    from cllama.distributed.strategy import check_strategies, make_parallel, param_layouts, sharded_model

    config = ModelConfig.from_name("tiny")
    lora = LoraConfig(rank=8, target_modules=EVERYTHING)
    layouts = param_layouts(config, make_parallel(2, 2, 1), lora)
    assert set(adapter_shapes(config, lora)) <= set(layouts)
    p = "model.layers.0."
    assert layouts[p + "attention.wq.weight"].splits == (2, 1)                  # columns over mp
    assert layouts[p + "attention.wq.mindpet_delta_lora_a"].splits == (1, 1)    # replicated
    assert layouts[p + "attention.wq.mindpet_delta_lora_b"].splits == (2, 1)    # out split like wq
    assert layouts[p + "attention.wo.weight"].splits == (1, 2)                  # rows over mp
    assert layouts[p + "attention.wo.mindpet_delta_lora_a"].splits == (1, 2)    # in split like wo
    assert layouts[p + "attention.wo.mindpet_delta_lora_b"].splits == (1, 1)
    assert layouts[p + "feed_forward.w2.mindpet_delta_lora_a"].splits == (1, 2)
    assert check_strategies(sharded_model(config, make_parallel(2, 2, 1), lora), 4, 64) > 0


@pytest.mark.parametrize("block, match", [
    ({"pet_type": "prefixtuning"}, r"pet_type: 'prefixtuning' is not supported; set pet_type: lora"),
    ({"pet_type": "lora", "lora_rank": 0}, r"lora_rank: must be a positive integer"),
    ({"pet_type": "lora", "lora_rank": -2}, r"lora_rank: must be a positive integer"),
    ({"pet_type": "lora", "target_modules": ".*q_proj"}, r"target_modules: '.\*q_proj' matches none"),
    ({"pet_type": "lora", "lora_alpha": 0}, r"lora_alpha: must be > 0"),
    ({"pet_type": "lora", "lora_dropout": 1.0}, r"lora_dropout: must be in \[0, 1\)"),
    ({"pet_type": "lora", "rank": 8}, r"unknown keys \['rank'\]"),
])
def test_bad_pet_config_is_one_clear_error(block, match):
    from cllama.train.runconfig import load_run_config

    with pytest.raises(ValueError, match=match):
        load_run_config(ROOT / "configs" / "tiny" / "lora.yaml", {"model.model_config.pet_config": block})


def test_peft_names_round_trip():
    name = "model.layers.3.feed_forward.w2.mindpet_delta_lora_b"
    assert ms_to_peft_name(name) == "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    assert peft_to_ms_name(ms_to_peft_name(name), "x") == name
    assert peft_to_ms_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "x") == \
        "model.layers.0.attention.wq.mindpet_delta_lora_a"
    with pytest.raises(ValueError, match="not a LoRA weight of a Llama"):
        peft_to_ms_name("base_model.model.lm_head.lora_A.weight", "adapter_model.safetensors")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cllama", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_merge_export_import_generate(base_and_adapter, tmp_path):
    root, base_dir, adapter_dir, _ = base_and_adapter
    merged = tmp_path / "merged"
    assert _cli("lora", "merge", "--base", base_dir, "--adapter", adapter_dir, "--dst", merged).returncode == 0
    assert _cli("lora", "export-peft", "--adapter", adapter_dir, "--dst", tmp_path / "peft").returncode == 0
    done = _cli("lora", "import-peft", "--src", tmp_path / "peft", "--base", base_dir, "--dst", tmp_path / "back",
                "--format", "safetensors")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back" / "adapter.safetensors").is_file()
    outputs = []
    for extra in (["--model", merged], ["--model", base_dir, "--adapter", adapter_dir],
                  ["--model", base_dir, "--adapter", tmp_path / "back"], ["--model", base_dir]):
        done = _cli("generate", *extra, "--prompt-ids", "1,822,285", "--max-new-tokens", "6", "--json")
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout)["output_ids"])
    assert outputs[0] == outputs[1] == outputs[2] != outputs[3]
    done = _cli("eval", "humaneval", "--model", base_dir, "--adapter", adapter_dir, "--limit", "1", "--k", "1",
                "--max-new-tokens", "4", "--sandbox-workers", "1", "--out", tmp_path / "he")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "he" / "results.json").read_text())["params"]["adapter"] == str(adapter_dir)


def test_cli_bad_adapter_input_exits_2(base_and_adapter, tmp_path, make_model_dir):
    root, base_dir, adapter_dir, _ = base_and_adapter
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter.ckpt").write_bytes((adapter_dir / "adapter.ckpt").read_bytes())
    other_base = make_model_dir(seed=1)  # the tiny preset: another shape than the adapter's base
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    (truncated / "adapter.ckpt").write_bytes((adapter_dir / "adapter.ckpt").read_bytes()[:-100])
    cases = [
        (["lora", "merge", "--base", base_dir, "--adapter", no_config, "--dst", tmp_path / "m1"],
         "adapter_config.json: missing"),
        (["lora", "merge", "--base", other_base, "--adapter", adapter_dir, "--dst", tmp_path / "m2"],
         "the adapter belongs to another base model"),
        (["lora", "merge", "--base", base_dir, "--adapter", truncated, "--dst", tmp_path / "m4"],
         f"{truncated / 'adapter.ckpt'}: "),
        (["generate", "--model", base_dir, "--adapter", tmp_path / "nowhere", "--prompt-ids", "1"],
         "adapter directory not found"),
        (["lora", "import-peft", "--src", adapter_dir, "--base", base_dir, "--dst", tmp_path / "m3"],
         "adapter_model.safetensors: missing"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
