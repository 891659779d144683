"""Generation with a static KV cache: completion, infilling, chat and streaming around an engine's
compiled prefill + one-token decode steps (cllama/generation/engine.py, or the reloaded MindIR
graphs of cllama/generation/export.py).

Greedy decoding takes the argmax inside the graph, so only token ids cross to the host; sampling
(temperature, top-k, top-p, repetition penalty) runs on the host from a seeded numpy Generator
(cllama/generation/sampling.py). Every call takes one `SamplingParams`, or its fields as keywords.

    gen = Generator.from_dir("models/tiny")
    gen.complete(["def fib(n):"], max_new_tokens=64, stop=["\\ndef"])
    gen.infill("def f(x):\\n    ", "\\n    return y\\n")
    stream = gen.stream("import numpy as np\\n")
    for piece in stream: print(piece, end="")
    stream.generation                                  # ids, finish reason, tokens/s
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from mindspore import Tensor

from cllama.fileio import write_json
from cllama.generation.engine import Engine, left_pad
from cllama.generation.sampling import SamplingParams, select_tokens
from cllama.generation.textstream import RowText
from cllama.model import CodeLlama
from cllama.tokenizer import MODES, Tokenizer


@dataclass
class Generation:
    """One prompt's result. output_ids: generated ids only, without the end token and cut
    before a stop string; text: their decoded text (None without a tokenizer);
    finish_reason: "eos" (eos or a stop id such as ▁<EOT>), "stop" (stop string) or "length"."""

    prompt_ids: list
    output_ids: list
    text: Optional[str]
    finish_reason: str
    tokens_per_s: float


class Stream:
    """Text pieces of one generation as they are decoded (iterate it); their concatenation is the
    final text, and once the iteration ends `generation` holds the Generation."""

    def __init__(self, run: Iterator) -> None:
        self._run, self.generation = run, None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                pieces = next(self._run)
            except StopIteration as done:
                self.generation = done.value[0]
                return
            for _, piece in pieces:
                yield piece


def _drain(run: Iterator, on_pieces: Optional[Callable[[list], None]] = None) -> list[Generation]:
    """Run a generation to the end, handing each step's text pieces to on_pieces; its results."""
    while True:
        try:
            pieces = next(run)
        except StopIteration as done:
            return done.value
        if on_pieces is not None:
            on_pieces(pieces)


class Generator:
    """Completion, infilling, chat and streaming with a CodeLlama (or an exported engine)."""

    def __init__(self, model, tokenizer: Optional[Tokenizer] = None, max_length: Optional[int] = None,
                 fused_weights: Optional[bool] = None) -> None:
        """model: a CodeLlama (its steps compile here) or an engine (cllama.generation.export.MindIREngine).
        fused_weights: read a fused copy of the projection weights (faster on CPU; costs their size
        again, taken now: build a new Generator after changing the model's weights); None decides by
        device and free memory (cllama.generation.engine.fuse_by_default)."""
        self.engine = Engine(model, fused_weights) if isinstance(model, CodeLlama) else model
        self.model = model if isinstance(model, CodeLlama) else None
        config = self.engine.config
        self.tokenizer = tokenizer
        self.max_length = min(max_length or config.seq_length, config.seq_length)
        if tokenizer is not None and tokenizer.vocab_size < config.vocab_size:
            raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the "
                             f"model's vocab_size is {config.vocab_size}; use the tokenizer.model "
                             "that came with the model (`cllama tokenizer extend` makes a 32016 one)")
        self.vocab_size = config.vocab_size
        self.eos_id = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
        self.bos_id = tokenizer.bos_id if tokenizer is not None else config.bos_token_id
        self.pad_id = config.pad_token_id
        self._anchor = tokenizer.encode("a", bos=False) if tokenizer is not None else []
        self._anchor_len = len(tokenizer.decode(self._anchor)) if tokenizer is not None else 0
        self.stats: dict[str, float] = {}

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 adapter: str | os.PathLike | None = None, **kwargs) -> Generator:
        """Load a model directory, with a LoRA adapter directory merged into its weights in memory
        when `adapter` is given; the tokenizer from tokenizer_path, else model_dir/tokenizer.model
        when present, else none (then only ids in and out)."""
        from cllama.checkpoint.adapter import model_with_adapter
        from cllama.checkpoint.model_dir import tokenizer_of

        path = tokenizer_of(model_dir, tokenizer_path)
        return cls(model_with_adapter(model_dir, adapter), Tokenizer(path) if path is not None else None, **kwargs)

    def close(self) -> None:
        """Stop the engine's worker processes, if it has any (cllama.generation.remote)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    @property
    def fused(self) -> bool:
        """Whether the steps read a fused copy of the weights."""
        return getattr(self.engine, "fused", None) is not None

    # ---- text helpers ------------------------------------------------------------------------
    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass Generator(model, tokenizer) or put "
                             "tokenizer.model in the model directory")
        return self.tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids as a continuation: a leading '▁' stays a space (SentencePiece
        alone would drop it), so prompt + text reads as the model wrote it."""
        text = self._need_tokenizer("decoding").decode(self._anchor + list(ids))
        return text[self._anchor_len:]

    # ---- core loop ---------------------------------------------------------------------------
    def _check(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompt_ids, (str, bytes)) or not len(prompt_ids):
            raise ValueError("generate: empty batch; pass a list of prompts, each a list of token ids")
        prompts = []
        for i, ids in enumerate(prompt_ids):
            if isinstance(ids, (str, bytes)) or not len(ids):
                raise ValueError(f"generate: prompt {i} is {'text' if ids else 'empty'}; give token ids "
                                 "(use complete() for text)")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"generate: prompt {i} has ids {bad[:5]} outside the model's vocab "
                                 f"[0, {self.vocab_size}); infill pieces need a 32016-vocab model")
            if len(ids) + max_new_tokens > self.max_length:
                raise ValueError(f"generate: prompt {i} has {len(ids)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} that exceeds the maximum length {self.max_length} "
                                 "(ModelConfig.seq_length): shorten the prompt or lower max_new_tokens")
            prompts.append(ids)
        return prompts

    def _run(self, prompts: list[list[int]], params: SamplingParams, rng: np.random.Generator,
             ignore_eos: bool, stream: bool, lstrip: bool):
        """Generate for every prompt (one batch); after each step yield the new stable text pieces
        [(row, piece)] (only when stream is true); return the Generations."""
        if (params.stop or stream or lstrip) and self.tokenizer is None:
            self._need_tokenizer("stop strings, streaming and chat")
        n, max_new = len(prompts), params.max_new_tokens
        batch, width, length = self.engine.shapes(n, max(len(p) for p in prompts), max_new, self.max_length)
        steps = self.engine.steps_for(batch, length, params.needs_logits)
        ids, pads = left_pad(prompts, batch, width, self.pad_id, self.bos_id)
        end_ids = set(params.stop_ids) | (set() if ignore_eos else {self.eos_id})
        outputs: list[list[int]] = [[] for _ in range(n)]
        track = bool(params.stop or stream or lstrip) and self.tokenizer is not None
        texts = [RowText(self.decode, params.stop, lstrip) for _ in range(n)] if track else []
        finish: list[Optional[str]] = [None] * n
        finished_at = [0.0] * n

        def pick(out: np.ndarray) -> np.ndarray:
            if not steps.logits:
                return out
            seen = [np.asarray(prompts[i] + outputs[i]) if i < n else ids[i, -1:] for i in range(batch)]
            return select_tokens(out, params, rng, seen)

        start = time.perf_counter()
        pads_t = Tensor(pads)
        tokens = pick(steps.prefill(Tensor(ids), pads_t).asnumpy())
        self.stats = {"prefill_s": time.perf_counter() - start, "batch": batch, "cache_length": length,
                      "prompt_width": width, "fused_weights": self.fused}
        for step in range(max_new):
            pieces = []
            now = time.perf_counter()
            for i in range(n):
                if finish[i] is not None:
                    continue
                token = int(tokens[i])
                if token in end_ids:
                    finish[i] = "eos"
                else:
                    outputs[i].append(token)
                    if track and texts[i].add(outputs[i]):
                        outputs[i] = texts[i].ids
                        finish[i] = "stop"
                    if finish[i] is None and len(outputs[i]) == max_new:
                        finish[i] = "length"
                if finish[i] is not None:
                    finished_at[i] = now
                if stream:
                    piece = texts[i].release(final=finish[i] is not None)
                    if piece:
                        pieces.append((i, piece))
            if stream:
                yield pieces
            if all(f is not None for f in finish):
                break
            slot = Tensor(np.array([width + step], np.int32))  # every row writes this cache slot
            tokens = pick(steps.decode(Tensor(tokens.reshape(batch, 1)), slot, pads_t).asnumpy())
        elapsed = time.perf_counter() - start
        self.stats.update(decode_s=elapsed - self.stats["prefill_s"], total_s=elapsed, steps=step + 1)
        results = []
        for i in range(n):
            text = None
            if self.tokenizer is not None:
                text = texts[i].text if track else self.decode(outputs[i])
            used = len(outputs[i]) + (finish[i] == "eos")
            results.append(Generation(prompts[i], outputs[i], text, finish[i],
                                      used / max(finished_at[i] - start, 1e-9)))
        return results

    # ---- public API --------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Optional[SamplingParams] = None, *,
                 on_text: Optional[Callable[[int, str], None]] = None, ignore_eos: bool = False,
                 batch_size: int = 8, lstrip: bool = False, **sampling) -> list[Generation]:
        """Generate for each prompt (lists of ids, any lengths) as `params` (a SamplingParams, or its
        fields as keywords) says. on_text(index, piece) receives text as it becomes stable. More
        prompts than batch_size run in batches of similar lengths (results keep the input order).
        lstrip: the text starts at its first non-blank character (chat answers)."""
        params = SamplingParams.build(params, **sampling)
        prompts = self._check(prompt_ids, params.max_new_tokens)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"generate: batch_size must be a positive integer, got {batch_size!r}")
        batch_size = min(batch_size, self.engine.max_batch or batch_size)
        rng = np.random.default_rng(params.seed)
        order = list(range(len(prompts)))
        if len(prompts) > batch_size:
            order.sort(key=lambda i: -len(prompts[i]))
        results: list[Generation] = [None] * len(prompts)
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]

            def forward(pieces: list, rows: list = rows) -> None:
                for row, piece in pieces:
                    on_text(rows[row], piece)

            run = self._run([prompts[i] for i in rows], params, rng, ignore_eos, on_text is not None, lstrip)
            for i, g in zip(rows, _drain(run, forward)):
                results[i] = g
        return results

    def prompt_for(self, prompt: str, mode: str = "completion", suffix: str = "",
                   system: Optional[str] = None, suffix_first: bool = False) -> tuple[list[int], list[int]]:
        """(prompt ids, extra stop ids) for one text prompt in a mode: completion, infill (prompt is
        the prefix; PSM, or SPM with suffix_first), chat (prompt is the user turn after the optional
        system message)."""
        tok = self._need_tokenizer(f"{mode} prompts")
        if mode == "completion":
            return tok.encode(prompt), []
        if mode == "infill":
            tok.require_infill()
            if tok.eot_id >= self.vocab_size:
                raise ValueError(f"infill: the model's vocab_size is {self.vocab_size}, without the infilling "
                                 "pieces (ids 32007..32010); Code Llama - Python and 34B models cannot infill: "
                                 "use a 7B/13B base or Instruct model")
            return tok.infill_prompt(prompt, suffix, suffix_first), [tok.eot_id]
        if mode == "chat":
            dialog = ([{"role": "system", "content": system}] if system else []) + \
                     [{"role": "user", "content": prompt}]
            return tok.chat_prompt(dialog), []
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def generate_for(self, prompts: Sequence[str], mode: str = "completion", suffix: str | Sequence[str] = "",
                     system: Optional[str] = None, params: Optional[SamplingParams] = None,
                     suffix_first: bool = False, **kwargs) -> list[Generation]:
        """Generations for text prompts in one mode (see prompt_for); in infill mode `suffix` is
        one suffix for every prompt or one per prompt."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("generate: empty batch; pass a non-empty list of prompts")
        suffixes = [suffix] * len(prompts) if isinstance(suffix, str) else list(suffix)
        requests = [self.prompt_for(p, mode, s, system, suffix_first) for p, s in zip(prompts, suffixes)]
        params = SamplingParams.build(params, **{k: kwargs.pop(k) for k in list(kwargs)
                                                 if k in SamplingParams.__dataclass_fields__})
        params = dataclasses.replace(params, stop_ids=params.stop_ids + tuple(requests[0][1]))
        return self.generate([ids for ids, _ in requests], params, lstrip=mode == "chat", **kwargs)

    def complete(self, prompts: Sequence[str], params: Optional[SamplingParams] = None, **kwargs) -> list[str]:
        """Continuations of text prompts (bos + prompt), cut at the first stop string."""
        return [g.text for g in self.generate_for(prompts, "completion", params=params, **kwargs)]

    def infill_many(self, pairs: Sequence[tuple[str, str]], suffix_first: bool = False,
                    params: Optional[SamplingParams] = None, **kwargs) -> list[str]:
        """The middles for a batch of (prefix, suffix) pairs; each stops at ▁<EOT>."""
        out = self.generate_for([p for p, _ in pairs], "infill", [s for _, s in pairs], params=params,
                                suffix_first=suffix_first, **kwargs)
        return [g.text for g in out]

    def infill(self, prefix: str, suffix: str, suffix_first: bool = False, **kwargs) -> str:
        """The middle between prefix and suffix (PSM, or SPM with suffix_first); stops at ▁<EOT>."""
        return self.infill_many([(prefix, suffix)], suffix_first, **kwargs)[0]

    def chat(self, dialogs: Sequence[Sequence[dict]], params: Optional[SamplingParams] = None, **kwargs) -> list[str]:
        """Instruct replies: each dialog is [{"role": "system"|"user"|"assistant", "content"}, ...]
        alternating user/assistant and ending with user."""
        tok = self._need_tokenizer("chat()")
        if not len(dialogs) or isinstance(dialogs[0], dict):
            raise ValueError("chat: pass a list of dialogs (each a list of messages), e.g. chat([dialog])")
        return [g.text for g in self.generate([tok.chat_prompt(d) for d in dialogs], params, lstrip=True, **kwargs)]

    def stream(self, prompt: str, mode: str = "completion", suffix: str = "", system: Optional[str] = None,
               params: Optional[SamplingParams] = None, ignore_eos: bool = False, **sampling) -> Stream:
        """Text pieces of one prompt as they are decoded (see Stream)."""
        ids, extra = self.prompt_for(prompt, mode, suffix, system)
        params = SamplingParams.build(params, **sampling)
        params = dataclasses.replace(params, stop_ids=params.stop_ids + tuple(extra))
        prompts = self._check([ids], params.max_new_tokens)
        rng = np.random.default_rng(params.seed)
        return Stream(self._run(prompts, params, rng, ignore_eos, True, mode == "chat"))


class TextGenerationPipeline:
    """MindFormers-style `pipeline("text_generation", model=..., tokenizer=...)`: call it with a
    prompt or a list and get [{"text_generation_text": [prompt + continuation]}] per prompt.
    Sampling comes from the model config (do_sample, top_k, top_p, repetition_penalty,
    max_decode_length), overridden by a SamplingParams or its fields per call."""

    def __init__(self, generator: Generator, params: Optional[SamplingParams] = None) -> None:
        self.generator = generator
        config = generator.model.config if generator.model is not None else None
        defaults = {} if config is None else dict(
            temperature=1.0 if config.do_sample else 0.0, top_k=config.top_k, top_p=config.top_p,
            repetition_penalty=config.repetition_penalty)
        self.params = params or SamplingParams(**defaults)
        self.max_length = config.max_decode_length if config is not None else generator.max_length

    def __call__(self, inputs: str | Sequence[str], params: Optional[SamplingParams] = None,
                 max_length: Optional[int] = None, **sampling) -> list[dict]:
        """max_length: prompt plus new tokens (MindFormers' meaning) when max_new_tokens is not given."""
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        tok = self.generator._need_tokenizer("pipeline")
        if "max_new_tokens" not in sampling and (params is None or max_length is not None):
            limit = min(max_length or self.max_length, self.generator.max_length)
            sampling["max_new_tokens"] = max(1, limit - max(len(tok.encode(p)) for p in prompts))
        out = self.generator.generate_for(prompts, params=SamplingParams.build(params or self.params, **sampling))
        return [{"text_generation_text": [p + g.text]} for p, g in zip(prompts, out)]


def write_samples(path: str | os.PathLike, prompts: Sequence[str], generations: Sequence[Generation]) -> Path:
    """Write [{prompt, text, prompt_ids, output_ids, finish_reason, tokens_per_s}] as JSON (atomically)."""
    return write_json(path, [{"prompt": p, **dataclasses.asdict(g)} for p, g in zip(prompts, generations)])


def pipeline(task: str = "text_generation", model=None, tokenizer=None,
             params: Optional[SamplingParams] = None) -> TextGenerationPipeline:
    """MindFormers' call shape: model is a CodeLlama, a model directory or a Generator;
    tokenizer a Tokenizer or a tokenizer.model path (default: the model directory's)."""
    if task not in ("text_generation", "text-generation"):
        raise ValueError(f"pipeline: only task='text_generation' is supported, got {task!r}")
    if model is None:
        raise ValueError("pipeline: pass model= (a CodeLlama, a model directory or a Generator)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer(tokenizer)
    if isinstance(model, Generator):
        generator = model
    elif isinstance(model, CodeLlama):
        generator = Generator(model, tokenizer)
    else:
        generator = Generator.from_dir(model, tokenizer.path if tokenizer is not None else None)
    return TextGenerationPipeline(generator, params)
