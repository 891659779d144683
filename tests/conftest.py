"""Shared fixtures: graph mode for the session, random tiny HF Llama oracles, tokenizers."""
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np
import pytest

from cllama.runtime import init_context

init_context("CPU", "graph")

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
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def hf_llama():
    return make_hf_llama()


@pytest.fixture(scope="session")
def ms_llama(hf_llama):
    from cllama.config import ModelConfig
    from cllama.model import CodeLlama
    from cllama.weights import load_hf_weights

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
