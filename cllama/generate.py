"""Generation with a static KV cache: prefill + one-token decode steps compiled as MindSpore graphs.

Shapes are bucketed (batch to a power of two, prompt to 16..128 by powers of two then multiples
of 128, cache to multiples of 128) so each (batch, cache) bucket compiles its steps once; the
compiled cells live on the Generator and are reused across calls. Greedy decoding takes the
argmax inside the graph, so only token ids cross to the host; sampling (temperature, top-k,
top-p, repetition penalty) runs on the host from a seeded numpy Generator (cllama/sampling.py).
The steps and their weights (on CPU a fused copy) are cllama/decoding.py's.

    gen = Generator.from_dir("runs/tiny")
    gen.complete(["def fib(n):"], max_new_tokens=64, stop=HUMANEVAL_STOPS)
    gen.infill("def f(x):\\n    ", "\\n    return y\\n")
    for piece in gen.stream("import numpy as np\\n"): print(piece, end="")
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from mindspore import Tensor

from cllama.decoding import (DecodeStep, FusedWeights, KVCache, PrefillStep, Steps,  # noqa: F401
                             batch_bucket, cache_bucket, fuse_by_default, prompt_bucket)
from cllama.model import CodeLlama
from cllama.sampling import SamplingParams, select_tokens
from cllama.textstream import RowText
from cllama.tokenizer import Tokenizer

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
MODES = ("completion", "infill", "chat")


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


# ---- the generator -------------------------------------------------------------------------------
class Generator:
    """Completion, infilling, chat and streaming around a CodeLlama with a static KV cache."""

    def __init__(self, model: CodeLlama, tokenizer: Optional[Tokenizer] = None,
                 max_length: Optional[int] = None, fused_weights: Optional[bool] = None) -> None:
        """fused_weights: read a fused copy of the projection weights (faster on CPU; costs their
        size again, taken now: build a new Generator after changing the model's weights); None
        decides by device and free memory (cllama.decoding.fuse_by_default)."""
        config = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length or config.seq_length, config.seq_length)
        if tokenizer is not None and tokenizer.vocab_size < config.vocab_size:
            raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the "
                             f"model's vocab_size is {config.vocab_size}; use the tokenizer.model "
                             "that came with the model (`cllama tokenizer extend` makes a 32016 one)")
        self.eos_id = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
        self.bos_id = tokenizer.bos_id if tokenizer is not None else config.bos_token_id
        self.pad_id = config.pad_token_id
        self._anchor = tokenizer.encode("a", bos=False) if tokenizer is not None else []
        self._anchor_len = len(tokenizer.decode(self._anchor)) if tokenizer is not None else 0
        self._steps: dict[tuple, Steps] = {}
        self.last_generations: list[Generation] = []
        self.stats: dict[str, float] = {}
        model.set_train(False)
        fused = fuse_by_default(config, model.compute_dtype) if fused_weights is None else fused_weights
        self.fused = FusedWeights(model) if fused else None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 **kwargs) -> "Generator":
        """Load a model directory; the tokenizer from tokenizer_path, else model_dir/tokenizer.model
        when present, else none (then only ids in and out)."""
        from cllama.weights import load_model_dir

        model = load_model_dir(model_dir)
        path = Path(tokenizer_path) if tokenizer_path else Path(model_dir) / "tokenizer.model"
        tokenizer = Tokenizer(path) if tokenizer_path or path.is_file() else None
        return cls(model, tokenizer, **kwargs)

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
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        vocab = self.model.config.vocab_size
        prompts = []
        for i, ids in enumerate(prompt_ids):
            if isinstance(ids, (str, bytes)) or not len(ids):
                raise ValueError(f"generate: prompt {i} is {'text' if ids else 'empty'}; give token ids "
                                 "(use complete() for text)")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"generate: prompt {i} has ids {bad[:5]} outside the model's vocab "
                                 f"[0, {vocab}); infill pieces need a 32016-vocab model")
            if len(ids) + max_new_tokens > self.max_length:
                raise ValueError(f"generate: prompt {i} has {len(ids)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} that exceeds the maximum length {self.max_length} "
                                 "(ModelConfig.seq_length): shorten the prompt or lower max_new_tokens")
            prompts.append(ids)
        return prompts

    def steps_for(self, batch: int, length: int, logits: bool) -> Steps:
        """The compiled cells of a (batch, cache length) bucket, built on first use; greedy
        (argmax in the graph) and logits cells of a bucket share its cache."""
        key = (batch, length, logits)
        if key not in self._steps:
            cache = next((s.cache for (b, n, _), s in self._steps.items() if (b, n) == (batch, length)), None)
            cache = cache or KVCache.create(self.model, batch, length)
            self._steps[key] = Steps(cache, PrefillStep(self.model, cache, self.fused, not logits),
                                     DecodeStep(self.model, cache, self.fused, not logits))
        return self._steps[key]

    def clear(self) -> None:
        """Drop every cached KV buffer and compiled step (frees their memory)."""
        self._steps.clear()

    def _run(self, prompt_ids, max_new_tokens: int, params: SamplingParams, stop: Sequence[str],
             stop_ids: Sequence[int], rng: np.random.Generator, ignore_eos: bool,
             stream: bool) -> Iterator[list[tuple[int, str]]]:
        """Generate for every prompt; after each step yield the new stable text pieces
        [(row, piece)] (only when stream is true); finally set self.last_generations."""
        prompts = self._check(prompt_ids, max_new_tokens)
        stop = [s for s in stop if s]
        if (stop or stream) and self.tokenizer is None:
            self._need_tokenizer("stop strings and streaming")
        n, lens = len(prompts), np.array([len(p) for p in prompts], np.int32)
        batch = batch_bucket(n)
        width = min(prompt_bucket(int(lens.max())), self.max_length - max_new_tokens)  # >= lens.max()
        length = cache_bucket(width + max_new_tokens, self.max_length)
        steps = self.steps_for(batch, length, params.needs_logits)
        ids = np.full((batch, width), self.pad_id, np.int32)
        ids[n:, -1] = self.bos_id  # filler rows of the batch bucket
        pads = np.full(batch, width - 1, np.int32)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            pads[i] = width - len(p)
        end_ids = set(int(t) for t in stop_ids) | (set() if ignore_eos else {self.eos_id})
        outputs: list[list[int]] = [[] for _ in range(n)]
        track = (stop or stream) and self.tokenizer is not None
        texts = [RowText(self.decode, stop) for _ in range(n)] if track else []
        finish: list[Optional[str]] = [None] * n
        finished_at = [0.0] * n

        def pick(out: np.ndarray) -> np.ndarray:
            if not params.needs_logits:
                return out
            seen = [np.asarray(prompts[i] + outputs[i]) if i < n else ids[i, -1:] for i in range(batch)]
            return select_tokens(out, params, rng, seen)

        start = time.perf_counter()
        pads_t = Tensor(pads)
        tokens = pick(steps.prefill(Tensor(ids), pads_t).asnumpy())
        self.stats = {"prefill_s": time.perf_counter() - start, "batch": batch, "cache_length": length,
                      "prompt_width": width, "fused_weights": self.fused is not None}
        for step in range(max_new_tokens):
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
                    if finish[i] is None and len(outputs[i]) == max_new_tokens:
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
            out = steps.decode(Tensor(tokens.reshape(batch, 1)), slot, pads_t).asnumpy()
            tokens = pick(out)
        elapsed = time.perf_counter() - start
        self.stats.update(decode_s=elapsed - self.stats["prefill_s"], total_s=elapsed, steps=step + 1)
        results = []
        for i in range(n):
            text = None
            if self.tokenizer is not None:
                text = texts[i].text if track else self.decode(outputs[i])
            used = len(outputs[i]) + (finish[i] == "eos")
            seconds = max(finished_at[i] - start, 1e-9)
            results.append(Generation(prompts[i], outputs[i], text, finish[i], used / seconds))
        self.last_generations = results

    # ---- public API --------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop: Sequence[str] = (), stop_ids: Sequence[int] = (),
                 seed: Optional[int] = None, on_text: Optional[Callable[[int, str], None]] = None,
                 ignore_eos: bool = False, batch_size: int = 8) -> list[Generation]:
        """Generate up to max_new_tokens for each prompt (lists of ids, any lengths). Stops a row
        at eos (unless ignore_eos), at any of stop_ids, or at the first stop string (text cut
        before it). on_text(index, piece) receives text as it becomes stable. More prompts than
        batch_size run in batches of similar lengths (results keep the input order)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        prompts = self._check(prompt_ids, max_new_tokens)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"generate: batch_size must be a positive integer, got {batch_size!r}")
        rng = np.random.default_rng(seed)
        order = list(range(len(prompts)))
        if len(prompts) > batch_size:
            order.sort(key=lambda i: -len(prompts[i]))
        results: list[Generation] = [None] * len(prompts)
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            for pieces in self._run([prompts[i] for i in rows], max_new_tokens, params, stop, stop_ids, rng,
                                    ignore_eos, on_text is not None):
                for row, piece in pieces:
                    on_text(rows[row], piece)
            for i, g in zip(rows, self.last_generations):
                results[i] = g
        self.last_generations = results
        return results

    def complete(self, prompts: Sequence[str], **kwargs) -> list[str]:
        """Continuations of text prompts (bos + prompt), cut at the first stop string."""
        tok = self._need_tokenizer("complete()")
        if isinstance(prompts, str):
            raise ValueError("complete: pass a list of prompts, e.g. complete([prompt])")
        return [g.text for g in self.generate([tok.encode(p) for p in prompts], **kwargs)]

    def infill_prompt(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """Prompt ids for infilling (REFERENCE.md layouts), checked against the model's vocab."""
        tok = self._need_tokenizer("infill()")
        tok.require_infill()
        if tok.eot_id >= self.model.config.vocab_size:
            raise ValueError(f"infill: the model's vocab_size is {self.model.config.vocab_size}, without "
                             f"the infilling pieces (ids 32007..32010); Code Llama - Python and 34B "
                             "models cannot infill: use a 7B/13B base or Instruct model")
        return tok.infill_prompt(prefix, suffix, suffix_first)

    def infill_many(self, pairs: Sequence[tuple[str, str]], suffix_first: bool = False,
                    **kwargs) -> list[str]:
        """The middles for a batch of (prefix, suffix) pairs; each stops at ▁<EOT>."""
        prompts = [self.infill_prompt(p, s, suffix_first) for p, s in pairs]
        stop_ids = [self.tokenizer.eot_id, *kwargs.pop("stop_ids", ())]
        return [g.text for g in self.generate(prompts, stop_ids=stop_ids, **kwargs)]

    def infill(self, prefix: str, suffix: str, suffix_first: bool = False, **kwargs) -> str:
        """The middle between prefix and suffix (PSM, or SPM with suffix_first); stops at ▁<EOT>."""
        return self.infill_many([(prefix, suffix)], suffix_first, **kwargs)[0]

    def chat(self, dialogs: Sequence[Sequence[dict]], **kwargs) -> list[str]:
        """Instruct replies: each dialog is [{"role": "system"|"user"|"assistant", "content"}, ...]
        alternating user/assistant and ending with user."""
        tok = self._need_tokenizer("chat()")
        if not len(dialogs):
            raise ValueError("chat: empty batch; pass a list of dialogs")
        if isinstance(dialogs[0], dict):
            raise ValueError("chat: pass a list of dialogs (each a list of messages), e.g. chat([dialog])")
        prompts = [tok.chat_prompt(d) for d in dialogs]
        return [g.text.lstrip() for g in self.generate(prompts, **kwargs)]

    def prompt_for(self, prompt: str, mode: str = "completion", suffix: str = "",
                   system: Optional[str] = None, suffix_first: bool = False) -> tuple[list[int], list[int]]:
        """(prompt ids, extra stop ids) for one text prompt in a mode: completion, infill, chat."""
        tok = self._need_tokenizer(f"{mode} prompts")
        if mode == "completion":
            return tok.encode(prompt), []
        if mode == "infill":
            return self.infill_prompt(prompt, suffix, suffix_first), [tok.eot_id]
        if mode == "chat":
            dialog = ([{"role": "system", "content": system}] if system else []) + \
                     [{"role": "user", "content": prompt}]
            return tok.chat_prompt(dialog), []
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def generate_for(self, prompts: Sequence[str], mode: str = "completion", suffix: str = "",
                     system: Optional[str] = None, **kwargs) -> list[Generation]:
        """Generations for text prompts in one mode (infill: each prompt is a prefix before the
        shared suffix; chat: each prompt is a user turn after the optional system message)."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("generate_for: pass a non-empty list of prompts")
        requests = [self.prompt_for(p, mode, suffix, system) for p in prompts]
        stop_ids = [*requests[0][1], *kwargs.pop("stop_ids", ())]
        out = self.generate([ids for ids, _ in requests], stop_ids=stop_ids, **kwargs)
        for g in out if mode == "chat" else ():
            g.text = g.text.lstrip()
        return out

    def stream(self, prompt: str, mode: str = "completion", suffix: str = "", system: Optional[str] = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, stop: Sequence[str] = (), stop_ids: Sequence[int] = (),
               seed: Optional[int] = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield text pieces of one prompt as they are decoded; their concatenation is the final
        text. Afterwards self.last_generations[0] holds the Generation (ids, tokens/s)."""
        ids, extra = self.prompt_for(prompt, mode, suffix, system)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        first = mode == "chat"
        rng = np.random.default_rng(seed)
        for pieces in self._run([ids], max_new_tokens, params, stop, [*extra, *stop_ids], rng, ignore_eos, True):
            for _, piece in pieces:
                if first:
                    piece = piece.lstrip()
                    first = not piece
                if piece:
                    yield piece
        if mode == "chat":
            self.last_generations[0].text = self.last_generations[0].text.lstrip()


class TextGenerationPipeline:
    """MindFormers-style `pipeline("text_generation", model=..., tokenizer=...)`: call it with a
    prompt or a list and get [{"text_generation_text": [prompt + continuation]}] per prompt."""

    def __init__(self, generator: Generator, **defaults) -> None:
        self.generator, self.defaults = generator, defaults

    def __call__(self, inputs: str | Sequence[str], max_length: Optional[int] = None,
                 max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None, **kwargs) -> list[dict]:
        config = self.generator.model.config
        opts = {**self.defaults, **kwargs}
        do_sample = config.do_sample if do_sample is None else do_sample
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        tok = self.generator._need_tokenizer("pipeline")
        encoded = [tok.encode(p) for p in prompts]
        if max_new_tokens is None:
            limit = max_length or opts.pop("max_length", None) or config.max_decode_length
            max_new_tokens = max(1, min(limit, self.generator.max_length) - max(len(e) for e in encoded))
        out = self.generator.generate(
            encoded, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
            top_k=config.top_k if top_k is None else top_k, top_p=config.top_p if top_p is None else top_p,
            repetition_penalty=repetition_penalty, seed=seed, **opts)
        return [{"text_generation_text": [p + g.text]} for p, g in zip(prompts, out)]


def write_samples(path: str | os.PathLike, prompts: Sequence[str], generations: Sequence[Generation]) -> Path:
    """Write [{prompt, text, prompt_ids, output_ids, finish_reason, tokens_per_s}] as JSON
    (under a temporary name, renamed when complete)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, **asdict(g)} for p, g in zip(prompts, generations)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def pipeline(task: str = "text_generation", model=None, tokenizer=None, **kwargs) -> TextGenerationPipeline:
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
    return TextGenerationPipeline(generator, **kwargs)
