"""Generation over workers: the full-forward engine the model-parallel workers run, the file queue
that drives them from another process, and the refusal on CPU of what only Ascend/GPU can run."""
import shutil
from pathlib import Path

import pytest

from cllama.checkpoint.model_dir import load_model_dir
from cllama.cli import main
from cllama.distributed.strategy import make_parallel, param_layouts
from cllama.distributed.transform import transform
from cllama.generation.distributed import FullForwardEngine, checkpoint_files
from cllama.generation.engine import Engine
from cllama.generation.generator import Generator
from cllama.generation.remote import RemoteEngine, open_generator
from cllama.generation.sampling import SamplingParams
from cllama.tokenizer import Tokenizer

PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "class Stack:\n    def push(self, x):"]
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=12, seed=3)


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir(seed=4, seq_length=256)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The single-device cached Generator: greedy, and sampled with a seed."""
    gen = Generator.from_dir(model_dir)
    return gen, {"greedy": gen.generate_for(PROMPTS, max_new_tokens=12),
                 "sampled": gen.generate_for(PROMPTS, params=SAMPLED)}


def _ids(generations):
    return [g.output_ids for g in generations]


def test_full_forward_engine_generates_the_cached_engines_tokens(model_dir, reference):
    gen, expected = reference
    full = Generator(FullForwardEngine(load_model_dir(model_dir)), gen.tokenizer)
    assert _ids(full.generate_for(PROMPTS, max_new_tokens=12)) == _ids(expected["greedy"])
    sampled = full.generate_for(PROMPTS, params=SAMPLED)
    assert _ids(sampled) == _ids(expected["sampled"])


def test_a_worker_process_answers_every_step(model_dir, reference, tmp_path):
    """RemoteEngine with one worker (a separate process, as each msrun worker is): same tokens, text
    and stream; the queue folder is gone after close."""
    gen, expected = reference
    with RemoteEngine(model_dir, workers=1, log_dir=tmp_path / "logs") as engine:
        remote = Generator(engine, Tokenizer(Path(model_dir) / "tokenizer.model"))
        assert [g.text for g in remote.generate_for(PROMPTS, max_new_tokens=12)] == [g.text for g in expected["greedy"]]
        sampled = remote.generate_for(PROMPTS, params=SAMPLED)
        assert _ids(sampled) == _ids(expected["sampled"])
        assert "".join(remote.stream(PROMPTS[0], max_new_tokens=12)) == expected["greedy"][0].text
        queue = engine.queue
        assert sorted(p.name for p in queue.iterdir() if p.name.endswith((".npz", ".npy"))) == []
    assert not queue.exists() and engine.proc.returncode == 0


def test_a_worker_that_cannot_start_says_why(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(Path(model_dir) / "config.json", broken / "config.json")  # and no weights
    with pytest.raises(RuntimeError, match="while loading the model: FileNotFoundError: .*no model.ckpt"):
        RemoteEngine(broken, workers=1, log_dir=tmp_path / "logs")


def test_checkpoint_files_of_a_model_dir_and_of_rank_shards(model_dir, tmp_path):
    files, strategy, fmt = checkpoint_files(model_dir, tmp_path)
    assert files == [str(Path(model_dir) / "model.ckpt")] and Path(strategy).is_file() and fmt == "ckpt"
    from cllama.config import ModelConfig

    layouts = param_layouts(ModelConfig.load(model_dir), make_parallel(model_parallel=2))
    transform(model_dir, tmp_path / "mp2", dst_strategy=layouts, progress=False)
    files, strategy, fmt = checkpoint_files(tmp_path / "mp2", tmp_path)
    assert [Path(f).parent.name for f in files] == ["rank_0", "rank_1"]
    assert strategy == str(tmp_path / "mp2" / "strategy.ckpt")


def test_several_workers_are_refused_on_cpu(model_dir, capsys):
    with pytest.raises(ValueError, match="only on Ascend or GPU"):
        open_generator(model_dir, workers=2)
    assert main(["generate", "--model", str(model_dir), "--prompt", "def f():", "--workers", "2"]) == 2
    assert "--workers 2" in capsys.readouterr().err
    assert isinstance(open_generator(model_dir).engine, Engine)  # one device: the cached engine, in process
