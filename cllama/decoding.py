"""Compiled generation steps (prefill, windowed decode, window flush) and the shape buckets
that let each compile once per (batch, cache length)."""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, nn, ops

from cllama.model import CodeLlama, KVCache


# ---- shape buckets -------------------------------------------------------------------------------
def batch_bucket(n: int) -> int:
    """Batch rows compiled for n prompts: the next power of two."""
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """Prefill width for a longest prompt of n tokens: 16, 32, 64, 128, then multiples of 128."""
    if n <= 128:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


def cache_bucket(n: int, max_length: int) -> int:
    """Cache slots for n positions: a multiple of 128, at most max_length."""
    return min(max_length, -(-n // 128) * 128)


# ---- compiled steps ------------------------------------------------------------------------------
class PrefillIds(nn.Cell):
    """Prefill returning the next token per row (argmax in the graph) or float32 logits."""

    def __init__(self, model: CodeLlama, argmax: bool) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.argmax = argmax

    def construct(self, input_ids: Tensor, last_index: Tensor) -> Tensor:
        logits = self.model.prefill(input_ids, last_index)
        if self.argmax:
            return ops.argmax(logits, -1).astype(ms.int32)
        return logits


class DecodeIds(nn.Cell):
    """One windowed decode step (CodeLlama.decode_windowed) returning the next token per row
    (argmax in the graph) or float32 logits."""

    def __init__(self, model: CodeLlama, argmax: bool) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.argmax = argmax

    def construct(self, input_ids: Tensor, positions: Tensor, starts: Tensor) -> Tensor:
        logits = self.model.decode_windowed(input_ids, positions, starts)
        if self.argmax:
            return ops.argmax(logits, -1).astype(ms.int32)
        return logits


class FlushWindow(nn.Cell):
    """Moves the decode window into the KV cache (CodeLlama.flush_window)."""

    def __init__(self, model: CodeLlama) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, starts: Tensor) -> Tensor:
        return self.model.flush_window(starts)


@dataclass
class Steps:
    """A cache bucket's buffers and its compiled prefill/decode cells."""

    cache: KVCache
    prefill: PrefillIds
    decode: DecodeIds
    flush: FlushWindow
