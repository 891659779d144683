"""The ipywidgets demo: streamed text lands in the Output area, boxes follow the mode."""
import pytest

from cllama.checkpoint.model_dir import random_model
from cllama.config import ModelConfig
from cllama.generation.generator import Generator
from cllama.generation.sampling import SamplingParams
from cllama.tokenizer import Tokenizer
from cllama.workbench.widgets import GenerationDemo


@pytest.fixture(scope="module")
def demo(codellama_tokenizer_path):
    gen = Generator(random_model(ModelConfig.from_name("tiny", seq_length=256), seed=0),
                    Tokenizer(codellama_tokenizer_path))
    return GenerationDemo(gen, prompt="def fib(n):", params=SamplingParams(max_new_tokens=12, top_p=0.95))


def _shown(output) -> str:
    return "".join(o.get("text", "") for o in output.outputs if o.get("name") == "stdout")


def test_button_streams_into_output(demo):
    assert demo.button.description == "Generate"
    demo.button.click()
    final = demo.last
    assert final.output_ids and _shown(demo.output) == demo.text == final.text != ""
    assert "tokens/s" in demo.speed.value and not demo.button.disabled
    greedy = demo.generator.complete(["def fib(n):"], max_new_tokens=12)[0]
    assert demo.text == greedy


def test_mode_switch_shows_suffix_and_runs_infill(demo):
    assert demo.suffix.layout.display == "none"
    demo.mode.value = "infill"
    assert demo.suffix.layout.display is None and demo.system.layout.display == "none"
    demo.suffix.value = "\n    return a\n"
    generation = demo.run()
    middle = demo.generator.infill("def fib(n):", "\n    return a\n", max_new_tokens=12)
    assert generation.prompt_ids[:2] == [1, 32007] and _shown(demo.output) == demo.text == middle
    demo.mode.value = "chat"
    assert demo.system.layout.display is None and demo.suffix.layout.display == "none"
    demo.mode.value = "completion"


def test_errors_show_in_the_output(demo):
    demo.max_new_tokens.value = 12
    demo.prompt.value = "x " * 400  # 400+ tokens + 12 > max length 256
    assert demo.run() is None and demo.speed.value == "error"
    assert "maximum length" in "".join(o.get("text", "") for o in demo.output.outputs)
    demo.prompt.value = "def fib(n):"
