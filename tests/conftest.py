"""Shared fixtures: graph mode for the session, random tiny HF Llama oracles, tokenizers, random
model directories (`make_model_dir`), and `run_notebook` for the headless notebook tests."""
import json
import os
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")

import numpy as np
import pytest

from cllama.runtime import init_context

init_context("CPU", "graph")

ROOT = Path(__file__).resolve().parents[1]

TINY_HF = dict(vocab_size=32016, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=512,
               rms_norm_eps=1e-5)


def make_hf_llama(seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM (GQA: 4 query heads per kv head, theta 1e6)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF, **overrides}))
    with torch.no_grad():  # norms away from 1 so a mis-mapped norm weight shows up
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def hf_llama():
    return make_hf_llama()


@pytest.fixture(scope="session")
def ms_llama(hf_llama):
    from cllama.checkpoint.model_dir import load_hf_weights
    from cllama.config import ModelConfig
    from cllama.model import CodeLlama

    model = CodeLlama(ModelConfig.from_hf(hf_llama.config.to_dict()))
    load_hf_weights(model, hf_llama.state_dict())
    model.set_train(False)
    return model


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    from cllama.tokenizer import bundled_tokenizer_path

    return bundled_tokenizer_path()


@pytest.fixture(scope="session")
def codellama_tokenizer_path(tmp_path_factory, llama2_tokenizer_path):
    from cllama.tokenizer import extend_tokenizer

    return extend_tokenizer(llama2_tokenizer_path, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, codellama_tokenizer_path):
    """Factory of random model directories: make_model_dir(seed=0, tokenizer=True, **config) is a tiny
    preset (with config overrides) saved with the 32016-piece tokenizer (none with tokenizer=False);
    one directory per distinct call, made once per session. Treat them as read-only."""
    from cllama.checkpoint.model_dir import random_model, save_model_dir
    from cllama.config import ModelConfig

    made = {}

    def make(seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
        key = (seed, tokenizer, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("model")
            save_model_dir(random_model(ModelConfig.from_name("tiny", **overrides), seed=seed), path,
                           codellama_tokenizer_path if tokenizer else None)
            made[key] = path
        return made[key]

    return make


def run_notebook(name: str, tmp_path: Path, cwd: Path | None = None, **parameters) -> dict:
    """notebooks/<name> executed headlessly by papermill into tmp_path, with output_dir tmp_path/"out"
    unless given; returns its results.json. The kernel imports cllama from this checkout."""
    import papermill

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    tmp_path.mkdir(parents=True, exist_ok=True)
    parameters.setdefault("output_dir", str(tmp_path / "out"))
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(tmp_path / name), parameters=parameters,
                               kernel_name="python3", progress_bar=False, cwd=str(cwd or tmp_path))
    return json.loads((Path(parameters["output_dir"]) / "results.json").read_text())


def sigkill_after_first_checkpoint(config: Path, out: Path, timeout: float = 240) -> None:
    """`cllama train --config config` in a subprocess, SIGKILLed as soon as its first checkpoint under
    out/checkpoints is complete (wherever the save of a later one has got to)."""
    import signal
    import subprocess
    import sys
    import time

    from cllama.train.checkpoints import checkpoint_steps

    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    proc = subprocess.Popen([sys.executable, "-m", "cllama", "train", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not checkpoint_steps(out / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
