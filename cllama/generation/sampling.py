"""Next-token selection on the host (numpy): repetition penalty, temperature, top-k, top-p.

Greedy decoding without a repetition penalty never comes here: its argmax runs inside the compiled
graph (cllama/generation/engine.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How a generation picks its tokens and when it ends; what `Generator.generate`, `stream`,
    the pipeline object, evaluation, the CLI and the widgets take.

    temperature 0 (or top_k 1) means greedy; top_k 0 and top_p 1 mean no filtering;
    repetition_penalty 1 means none. A row ends at eos, at any of `stop_ids`, at the first of the
    `stop` strings (its text cut before it) or after `max_new_tokens`. `seed` seeds sampling
    (None: fresh entropy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    stop: tuple = ()
    stop_ids: tuple = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a list of strings, e.g. [{self.stop!r}]")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    @classmethod
    def build(cls, params: Optional[SamplingParams] = None, **fields) -> SamplingParams:
        """`params` (default: the defaults) with some fields replaced; an unknown field is an error."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling settings {unknown}; SamplingParams has "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(params or cls(), **fields)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_logits(self) -> bool:
        """Whether the host needs full logits (else the graph's argmax suffices)."""
        return not self.greedy or self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[np.ndarray], penalty: float) -> np.ndarray:
    """CTRL / transformers rule on every id seen so far (prompt and output) in each row:
    positive logits are divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, ids in enumerate(seen):
        ids = np.unique(ids)
        values = logits[row, ids]
        logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_logits(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set to -inf every logit outside the top_k and outside the smallest set whose
    probability reaches top_p (always keeping the best token). logits (B, V) float32."""
    out = logits.astype(np.float32, copy=True)
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(out, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        ranked = np.take_along_axis(out, order, -1)
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        before = np.cumsum(probs, -1) - probs  # mass of the better-ranked tokens
        drop = before >= top_p
        drop[:, 0] = False
        ranked[drop] = -np.inf
        np.put_along_axis(out, order, ranked, -1)
    return out


def select_tokens(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                  seen: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Next token per row (B,) int32 from float32 logits (B, V)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1).astype(np.int32)
    scaled = filter_logits(logits / np.float32(params.temperature), params.top_k, params.top_p)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True)).astype(np.float64)
    cdf = np.cumsum(probs, -1)
    u = rng.random(len(cdf)) * cdf[:, -1]
    picked = (cdf <= u[:, None]).sum(-1)
    return np.minimum(picked, logits.shape[-1] - 1).astype(np.int32)
