"""ipywidgets generation demo: prompt (and suffix) boxes, mode, sampling sliders, streamed output."""
from __future__ import annotations

import dataclasses
from typing import Optional

from cllama.generation.generator import Generation, Generator
from cllama.generation.sampling import SamplingParams
from cllama.tokenizer import MODES


class GenerationDemo:
    """`display(GenerationDemo(gen))` in a notebook. Clicking "Generate" streams the text into
    the output area and shows tokens/s; `run()` does the same from code (tests, papermill).
    CSS classes for browser tests: cllama-mode, -prompt, -suffix, -system, -generate, -speed, -output."""

    def __init__(self, generator: Generator, prompt: str = "def fibonacci(n):", mode: str = "completion",
                 suffix: str = "", system: str = "", params: Optional[SamplingParams] = None) -> None:
        """params: the sampling the sliders start from (temperature, top-p, max tokens) and the rest of
        it (top-k, repetition penalty, stops, seed) used as is."""
        import ipywidgets as w

        if mode not in MODES:
            raise ValueError(f"GenerationDemo: mode must be one of {MODES}, got {mode!r}")
        self.generator, self.params = generator, params or SamplingParams(top_p=0.95, seed=0)
        temperature, top_p, max_new_tokens = self.params.temperature, self.params.top_p, self.params.max_new_tokens
        wide = w.Layout(width="95%")
        self.mode = w.Dropdown(options=list(MODES), value=mode, description="Mode")
        self.prompt = w.Textarea(value=prompt, description="Prompt", placeholder="prompt / prefix",
                                 layout=w.Layout(width="95%", height="120px"))
        self.suffix = w.Textarea(value=suffix, description="Suffix", placeholder="text after the gap",
                                 layout=w.Layout(width="95%", height="80px"))
        self.system = w.Text(value=system, description="System", placeholder="optional system message",
                             layout=wide)
        self.temperature = w.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                         description="Temperature")
        self.top_p = w.FloatSlider(value=top_p, min=0.05, max=1.0, step=0.05, description="Top-p")
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=512, description="Max tokens")
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.speed = w.Label(value="")
        self.output = w.Output(layout=w.Layout(border="1px solid #ccc", min_height="80px", width="95%"))
        self.text = ""
        self.last: Optional[Generation] = None
        for widget, name in ((self.mode, "mode"), (self.prompt, "prompt"), (self.suffix, "suffix"),
                             (self.system, "system"), (self.button, "generate"), (self.speed, "speed"),
                             (self.output, "output")):
            widget.add_class(f"cllama-{name}")  # stable CSS hooks for browser tests
        self.mode.observe(lambda change: self._show_boxes(), names="value")
        self.button.on_click(lambda _: self.run())
        self._show_boxes()
        self.widget = w.VBox([self.mode, self.prompt, self.suffix, self.system,
                              w.HBox([self.temperature, self.top_p, self.max_new_tokens]),
                              w.HBox([self.button, self.speed]), self.output])

    def _show_boxes(self) -> None:
        """Suffix box in infill mode only, system box in chat mode only."""
        self.suffix.layout.display = None if self.mode.value == "infill" else "none"
        self.system.layout.display = None if self.mode.value == "chat" else "none"

    def run(self) -> Optional[Generation]:
        """Generate with the current widget values, streaming into the output area."""
        self.button.disabled = True
        self.output.outputs = ()
        self.text, self.speed.value = "", "generating..."
        try:
            params = dataclasses.replace(self.params, max_new_tokens=self.max_new_tokens.value,
                                         temperature=self.temperature.value, top_p=self.top_p.value)
            stream = self.generator.stream(self.prompt.value, self.mode.value, self.suffix.value,
                                           self.system.value or None, params)
            for piece in stream:
                self.text += piece  # one growing stdout entry: the browser shows one block
                self.output.outputs = ({"output_type": "stream", "name": "stdout", "text": self.text},)
            self.last = stream.generation
            self.speed.value = (f"{len(self.last.output_ids)} tokens, {self.last.tokens_per_s:.1f} tokens/s "
                                f"({self.last.finish_reason})")
        except (ValueError, FileNotFoundError) as err:
            self.last = None
            self.speed.value = "error"
            self.output.append_stderr(f"error: {err}\n")
        finally:
            self.button.disabled = False
        return self.last

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
