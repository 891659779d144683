"""MindIR export of the generation engine's prefill and decode steps, and generation from the
reloaded graphs.

The graphs are the engine's own steps (cllama.generation.engine: `PrefillGraph`, `DecodeGraph`, on
the model's weights), with static shapes, laid out like the model card's MindSpore Lite flow
(`--prefill_model_path .../mindir_full_checkpoint/rank_0_graph.mindir`,
`--increment_model_path .../mindir_inc_checkpoint/rank_0_graph.mindir`):

  prefill  (input_ids int32 (B, W), pads int32 (B,))
           -> (logits float32 (B, V), keys, values)
  decode   (input_ids int32 (B, 1), slot int32 (1,), pads int32 (B,), keys, values)
           -> (logits float32 (B, V), keys, values)
  keys (layers, B, nkv, hd, L), values (layers, B, nkv, L, hd)

Prompts are left-padded to the prompt width W (pads = W - length per row); decode step s writes
cache slot W + s for every row, up to L - 1. Graphs loaded as two `nn.GraphCell`s share no
Parameters, so the KV cache travels as explicit graph inputs and outputs: prefill's caches feed the
first decode step, each step's feed the next. `MindIREngine` runs them under `Generator`, so the
reloaded graphs generate through the same loop as the model.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllama.fileio import atomic_path, read_json, write_json
from cllama.tokenizer import check_tokenizer

PREFILL_FILE = "mindir_full_checkpoint/rank_0_graph.mindir"
DECODE_FILE = "mindir_inc_checkpoint/rank_0_graph.mindir"
MANIFEST = "export.json"


def cache_shapes(config, batch_size: int, seq_length: int) -> tuple[list[int], list[int]]:
    """Shapes of the stacked key and value caches."""
    c = config
    return ([c.num_layers, batch_size, c.n_kv_heads, c.head_dim, seq_length],
            [c.num_layers, batch_size, c.n_kv_heads, seq_length, c.head_dim])


def export_mindir(model, out_dir: str | os.PathLike, batch_size: int, seq_length: int,
                  prompt_length: int | None = None, overwrite: bool = False,
                  tokenizer_model: str | os.PathLike | None = None) -> Path:
    """Export `model` (a CodeLlama) as the two MindIR graphs for `batch_size` prompts of at most
    `prompt_length` tokens (default seq_length // 2) and a `seq_length` cache, plus `export.json`
    describing them, config.json (and tokenizer.model when given). Written to a temporary folder
    and renamed when complete."""
    import mindspore as ms
    from mindspore import Tensor
    from tqdm.auto import tqdm

    from cllama.generation.engine import DecodeGraph, PrefillGraph

    config = model.config
    b, s = batch_size, seq_length
    w = prompt_length or s // 2
    if b < 1 or not 1 <= w < s:
        raise ValueError(f"export: batch_size must be >= 1 and 1 <= prompt_length < seq_length "
                         f"(got {b}, {w}, {s})")
    if s > config.seq_length:
        raise ValueError(f"export: seq_length {s} exceeds ModelConfig.seq_length={config.seq_length}; "
                         "pass a smaller --seq-length")
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose a new --out or pass --overwrite")
    if tokenizer_model is not None:
        check_tokenizer(tokenizer_model)
    model.set_train(False)
    keys_shape, values_shape = cache_shapes(config, b, s)
    dtype = model.compute_dtype

    def zeros(shape, dt=ms.int32):
        return Tensor(np.zeros(shape, np.float32 if dt != ms.int32 else np.int32), dt)

    graphs = [(PREFILL_FILE, PrefillGraph(model, b, s), (zeros((b, w)), zeros((b,)))),
              (DECODE_FILE, DecodeGraph(model, b, s),
               (zeros((b, 1)), zeros((1,)), zeros((b,)), zeros(keys_shape, dtype), zeros(values_shape, dtype)))]
    with atomic_path(out) as tmp:
        for rel, cell, inputs in tqdm(graphs, desc="export MindIR"):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            ms.export(cell, *inputs, file_name=str(path.with_suffix("")), file_format="MINDIR")
        config.save(tmp / "config.json")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        logits = [b, config.vocab_size]
        write_json(tmp / MANIFEST, {
            "batch_size": b, "prompt_length": w, "seq_length": s, "vocab_size": config.vocab_size,
            "cache_dtype": str(dtype), "padding": "left",
            "prefill": {"file": PREFILL_FILE, "inputs": {"input_ids": [b, w], "pads": [b]},
                        "outputs": {"logits": logits, "keys": keys_shape, "values": values_shape}},
            "decode": {"file": DECODE_FILE,
                       "inputs": {"input_ids": [b, 1], "slot": [1], "pads": [b], "keys": keys_shape,
                                  "values": values_shape},
                       "outputs": {"logits": logits, "keys": keys_shape, "values": values_shape}},
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id})
    return out


class MindIRSteps:
    """The reloaded graphs as the Generator's steps; the caches pass from call to call."""

    logits = True

    def __init__(self, prefill_graph, decode_graph) -> None:
        self.prefill_graph, self.decode_graph = prefill_graph, decode_graph
        self.keys = self.values = None

    def prefill(self, ids, pads):
        out, self.keys, self.values = self.prefill_graph(ids, pads)
        return out

    def decode(self, tokens, slot, pads):
        out, self.keys, self.values = self.decode_graph(tokens, slot, pads, self.keys, self.values)
        return out


@dataclass
class _Config:
    """What the Generator reads of a model config, from export.json."""

    vocab_size: int
    seq_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


class MindIREngine:
    """Exported graphs reloaded with `mindspore.load` + `nn.GraphCell`, run on this device, in the
    Generator's engine interface: `Generator(MindIREngine(export_dir), tokenizer)`."""

    def __init__(self, export_dir: str | os.PathLike) -> None:
        import mindspore as ms
        from mindspore import nn

        self.path = Path(export_dir)
        self.manifest = m = read_json(self.path / MANIFEST, "MindIR export manifest",
                                      "point at a folder written by `cllama export`")
        self.max_batch, self.width = m["batch_size"], m["prompt_length"]
        self.config = _Config(m["vocab_size"], m["seq_length"], m["bos_token_id"], m["eos_token_id"],
                              m["pad_token_id"])
        self.steps = MindIRSteps(nn.GraphCell(ms.load(str(self.path / m["prefill"]["file"]))),
                                 nn.GraphCell(ms.load(str(self.path / m["decode"]["file"]))))

    def shapes(self, n: int, longest: int, max_new_tokens: int, max_length: int) -> tuple[int, int, int]:
        length = self.config.seq_length
        if longest > self.width:
            raise ValueError(f"{self.path}: a prompt of {longest} tokens exceeds the exported prompt length "
                             f"{self.width}; export again with a larger --prompt-length")
        if self.width + max_new_tokens > length:
            raise ValueError(f"{self.path}: {max_new_tokens} new tokens after a {self.width}-token prompt window "
                             f"exceed the exported cache of {length}; ask for at most {length - self.width}")
        return self.max_batch, self.width, length

    def steps_for(self, batch: int, length: int, logits: bool) -> MindIRSteps:
        return self.steps


def compare_with_model(model, export_dir: str | os.PathLike, prompts: Sequence[Sequence[int]],
                       max_new_tokens: int = 32) -> dict:
    """Greedy generation from the reloaded MindIR graphs against the in-framework model (the same
    Generator loop over either), and the largest difference between the prefill graph's logits and
    the model's full forward at each prompt's last token. max_new_tokens is capped to what the
    exported cache holds."""
    from mindspore import Tensor

    from cllama.generation.engine import left_pad
    from cllama.generation.generator import Generator

    engine = MindIREngine(export_dir)
    max_new_tokens = min(max_new_tokens, engine.config.seq_length - engine.width)
    mindir = Generator(engine).generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
    reference = Generator(model, fused_weights=False).generate(prompts, max_new_tokens=max_new_tokens,
                                                             ignore_eos=True)
    c = engine.config
    ids, pads = left_pad(prompts, engine.max_batch, engine.width, c.pad_token_id, c.bos_token_id)
    logits = engine.steps.prefill(Tensor(ids), Tensor(pads)).asnumpy()
    full = np.stack([model(Tensor(np.array([p], np.int32))).asnumpy()[0, -1] for p in prompts])
    mindir_tokens = [g.output_ids for g in mindir]
    model_tokens = [g.output_ids for g in reference]
    return {"tokens_equal": mindir_tokens == model_tokens,
            "prefill_max_abs_diff": float(np.abs(logits[:len(prompts)] - full).max()),
            "mindir_tokens": mindir_tokens, "model_tokens": model_tokens}
