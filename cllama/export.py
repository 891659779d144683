"""MindIR export of the prefill and incremental (one-token) graphs, reload and greedy generation.

Two static-shape graphs, laid out like the model card's MindSpore Lite flow
(`--prefill_model_path .../mindir_full_checkpoint/rank_0_graph.mindir`,
`--increment_model_path .../mindir_inc_checkpoint/rank_0_graph.mindir`):

  prefill  (input_ids int32 (B, S), last_index int32 (B,))
           -> (logits float32 (B, V), keys, values)        keys/values (layers, B, nkv, S, hd)
  decode   (input_ids int32 (B, 1), positions int32 (B,), keys, values)
           -> (logits float32 (B, V), keys, values)

Graphs loaded as two `nn.GraphCell`s share no Parameters, so the KV cache travels as explicit graph
inputs and outputs: prefill's caches feed the first decode step, each step's feed the next.
Prompts are right-padded to S; a row at position p writes cache slot p and attends to slots <= p.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

PREFILL_FILE = "mindir_full_checkpoint/rank_0_graph.mindir"
DECODE_FILE = "mindir_inc_checkpoint/rank_0_graph.mindir"


def _graph_cells():
    from mindspore import nn

    class PrefillGraph(nn.Cell):
        def __init__(self, model) -> None:
            super().__init__(auto_prefix=False)
            self.model = model

        def construct(self, input_ids, last_index):
            return self.model.prefill_kv(input_ids, last_index)

    class DecodeGraph(nn.Cell):
        def __init__(self, model) -> None:
            super().__init__(auto_prefix=False)
            self.model = model

        def construct(self, input_ids, positions, keys, values):
            return self.model.decode_kv(input_ids, positions, keys, values)

    return PrefillGraph, DecodeGraph


def cache_shape(config, batch_size: int, seq_length: int) -> tuple[int, ...]:
    """(layers, B, nkv, S, hd): one stacked tensor for keys, one for values."""
    return (config.num_layers, batch_size, config.n_kv_heads, seq_length, config.head_dim)


def export_mindir(model, out_dir: str | os.PathLike, batch_size: int, seq_length: int,
                  overwrite: bool = False, tokenizer_model: str | os.PathLike | None = None) -> Path:
    """Export `model` (a CodeLlama) as the two MindIR graphs plus `export.json` describing their
    inputs and outputs, config.json (and tokenizer.model when given). Written to a temporary
    folder and renamed when complete."""
    import mindspore as ms
    from mindspore import Tensor
    from tqdm.auto import tqdm

    config = model.config
    if batch_size < 1 or seq_length < 2:
        raise ValueError(f"export: batch_size must be >= 1 and seq_length >= 2 (got {batch_size}, {seq_length})")
    if seq_length > config.seq_length:
        raise ValueError(f"export: seq_length {seq_length} exceeds ModelConfig.seq_length={config.seq_length}; "
                         "pass a smaller --seq-length")
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose a new --out or pass --overwrite")
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.set_train(False)
    prefill_cell, decode_cell = _graph_cells()
    b, s = batch_size, seq_length
    cache = np.zeros(cache_shape(config, b, s), np.float32)
    dtype = model.compute_dtype
    graphs = [
        (PREFILL_FILE, prefill_cell(model), (Tensor(np.zeros((b, s), np.int32)), Tensor(np.zeros((b,), np.int32)))),
        (DECODE_FILE, decode_cell(model), (Tensor(np.zeros((b, 1), np.int32)), Tensor(np.zeros((b,), np.int32)),
                                           Tensor(cache, dtype), Tensor(cache, dtype))),
    ]
    try:
        for rel, cell, inputs in tqdm(graphs, desc="export MindIR"):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            ms.export(cell, *inputs, file_name=str(path.with_suffix("")), file_format="MINDIR")
        config.save(tmp / "config.json")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        kv = list(cache_shape(config, b, s))
        manifest = {
            "batch_size": b, "seq_length": s, "vocab_size": config.vocab_size, "cache_dtype": str(dtype),
            "prefill": {"file": PREFILL_FILE, "inputs": {"input_ids": [b, s], "last_index": [b]},
                        "outputs": {"logits": [b, config.vocab_size], "keys": kv, "values": kv}},
            "decode": {"file": DECODE_FILE,
                       "inputs": {"input_ids": [b, 1], "positions": [b], "keys": kv, "values": kv},
                       "outputs": {"logits": [b, config.vocab_size], "keys": kv, "values": kv}},
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class MindIRGenerator:
    """The exported graphs reloaded with `mindspore.load` + `nn.GraphCell`, run on this device."""

    def __init__(self, export_dir: str | os.PathLike) -> None:
        import mindspore as ms
        from mindspore import nn

        self.path = Path(export_dir)
        manifest = self.path / "export.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: not found; point at a folder written by `cllama export`")
        self.manifest = json.loads(manifest.read_text())
        self.batch_size, self.seq_length = self.manifest["batch_size"], self.manifest["seq_length"]
        self.prefill_graph = nn.GraphCell(ms.load(str(self.path / self.manifest["prefill"]["file"])))
        self.decode_graph = nn.GraphCell(ms.load(str(self.path / self.manifest["decode"]["file"])))

    def pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts right-padded to the exported (B, S); returns (ids, lengths)."""
        m = self.manifest
        return pad_prompts(prompts, self.batch_size, self.seq_length, m["pad_token_id"], m["bos_token_id"])

    def prefill(self, ids: np.ndarray, last_index: np.ndarray):
        """Run the prefill graph: (logits (B, V) numpy, keys, values)."""
        from mindspore import Tensor

        logits, keys, values = self.prefill_graph(Tensor(ids.astype(np.int32)), Tensor(last_index.astype(np.int32)))
        return logits.asnumpy(), keys, values

    def decode(self, tokens: np.ndarray, positions: np.ndarray, keys, values):
        """Run the incremental graph once: (logits (B, V) numpy, keys, values)."""
        from mindspore import Tensor

        logits, keys, values = self.decode_graph(Tensor(tokens.reshape(-1, 1).astype(np.int32)),
                                                 Tensor(positions.astype(np.int32)), keys, values)
        return logits.asnumpy(), keys, values

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """Greedy continuation of each prompt (generated ids only), at most until the cache is full."""
        ids, lengths = self.pad(prompts)

        def prefill(ids, last):
            logits, keys, values = self.prefill(ids, last)
            return logits, (keys, values)

        def decode(tokens, positions, state):
            logits, keys, values = self.decode(tokens, positions, *state)
            return logits, (keys, values)

        eos = self.manifest["eos_token_id"] if stop_at_eos else None
        return greedy(prefill, decode, ids, lengths, len(prompts), max_new_tokens, eos)


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int, seq_length: int, pad_id: int,
                bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1..batch_size prompts to (batch_size, seq_length) int32; unused rows hold bos.
    Returns (ids, lengths)."""
    if not 1 <= len(prompts) <= batch_size:
        raise ValueError(f"the graphs take 1..{batch_size} prompts per call (batch size); got {len(prompts)}")
    ids = np.full((batch_size, seq_length), pad_id, np.int32)
    ids[:, 0] = bos_id
    lengths = np.ones(batch_size, np.int32)
    for i, p in enumerate(prompts):
        if not 1 <= len(p) < seq_length:
            raise ValueError(f"prompt {i} has {len(p)} tokens; seq_length {seq_length} holds 1..{seq_length - 1}")
        ids[i, :len(p)] = p
        lengths[i] = len(p)
    return ids, lengths


def greedy(prefill, decode, ids: np.ndarray, lengths: np.ndarray, n: int, max_new_tokens: int,
           eos_id: int | None) -> list[list[int]]:
    """Greedy loop over static shapes: prefill(ids, last_index) -> (logits, state),
    decode(tokens, positions, state) -> (logits, state). Returns the generated ids of the first n
    rows; a row stops at eos or when its next position no longer fits the cache."""
    seq_length = ids.shape[1]
    logits, state = prefill(ids, lengths - 1)
    out: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    positions = lengths.astype(np.int32).copy()
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1).astype(np.int32)
        for i in range(n):
            if not done[i]:
                out[i].append(int(tokens[i]))
                done[i] = (eos_id is not None and tokens[i] == eos_id) or positions[i] >= seq_length
        if done.all():
            break
        logits, state = decode(tokens, np.minimum(positions, seq_length - 1), state)
        positions += 1
    return out


def reference_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """The same greedy generation in-framework (cllama.generate.Generator on the model's own
    weights, eos ignored): the generated ids of each prompt."""
    from cllama.generate import Generator

    generations = Generator(model, fused_weights=False).generate(prompts, max_new_tokens=max_new_tokens,
                                                                 ignore_eos=True)
    return [g.output_ids for g in generations]


def compare_with_model(model, export_dir: str | os.PathLike, prompts: Sequence[Sequence[int]],
                       max_new_tokens: int = 32) -> dict:
    """Greedy generation from the reloaded MindIR graphs against the in-framework model: equal
    tokens, and the largest difference between the prefill graph's logits and the model's full
    forward at each prompt's last token. max_new_tokens is capped so the longest prompt fits."""
    from mindspore import Tensor

    gen = MindIRGenerator(export_dir)
    ids, lengths = gen.pad(prompts)
    logits = gen.prefill(ids, lengths - 1)[0]
    n = len(prompts)
    max_new_tokens = min(max_new_tokens, gen.seq_length - int(lengths[:n].max()))
    mindir_tokens = gen.generate(prompts, max_new_tokens, stop_at_eos=False)
    ref_tokens = reference_generate(model, prompts, max_new_tokens)
    full = model(Tensor(ids[:n])).asnumpy()[np.arange(n), lengths[:n] - 1]
    return {"tokens_equal": mindir_tokens == ref_tokens,
            "prefill_max_abs_diff": float(np.abs(logits[:n] - full).max()),
            "mindir_tokens": mindir_tokens, "model_tokens": ref_tokens}
