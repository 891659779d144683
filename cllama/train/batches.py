"""Training batches: MindRecord datasets opened for a run, each rank's share of a global batch, and
the checks every batch passes before it is fed (columns, token ids against the vocabulary, length)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np

from cllama.train.runconfig import RunConfig


def open_dataset(paths: list[str], batch_size: int, shuffle: bool = True, seed: int = 0, repeat: int = 1,
                 columns: Optional[list[str]] = None):
    """Batched training data, a mindspore.dataset yielding int32 (batch, seq_length+1) input_ids
    (and labels for finetuning data): the one place that knows the reader."""
    from cllama.data.mindrecord import load_dataset

    return load_dataset(paths, batch_size, columns=columns, shuffle=shuffle, seed=seed, repeat=repeat)


def rank_batches(dataset, rank: int, world: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) for this rank: rows [rank*b, (rank+1)*b) of every global batch of b*world,
    so N workers see exactly the batches one worker sees with an N-times larger batch. Pretraining
    data (no labels column) gets labels = input_ids. The first `skip` global batches are passed over."""
    if skip:
        dataset = dataset.skip(skip)
    for item in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        ids = item["input_ids"]
        b = ids.shape[0] // world
        labels = item.get("labels", ids)
        yield ids[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]


def check_columns(paths: list[str], want_labels: bool, where: str) -> None:
    """A run that expects labels (finetuning on qa data) refuses data without a labels column."""
    if not want_labels:
        return
    have = open_dataset(paths, 1, shuffle=False).get_col_names()
    if "labels" not in have:
        raise ValueError(f"{', '.join(paths)}: has columns {sorted(have)}, no labels, but {where} expects "
                         "{input_ids, labels} (run_mode finetune: only answer tokens carry loss); write qa data "
                         "with `cllama data qa`, or set train_dataset.input_columns: [input_ids] (or run_mode: "
                         "train) to train on every token")


def check_token_ids(ids: np.ndarray, labels: np.ndarray, vocab_size: int, ignore_id: int, paths: list[str]) -> None:
    """Every id of input_ids, and of labels other than ignore_id, in [0, vocab_size) (a cheap max/min per
    batch): an id past the embedding would otherwise be read as garbage (Gather clamps or returns zeros)."""
    for name, values in (("input_ids", ids), ("labels", labels)):
        if name == "labels":
            values = values[values != ignore_id]
        if values.size == 0:
            continue
        high, low = int(values.max()), int(values.min())
        if high < vocab_size and low >= 0:
            continue
        bad = high if high >= vocab_size else low
        fix = (f"set model.model_config.vocab_size to at least {bad + 1} (32016 for Code Llama's tokenizer with "
               "the infilling tokens 32007-32010) or rewrite the data with the model's tokenizer (`cllama data "
               "... --tokenizer`)") if bad >= vocab_size else "rewrite the data with `cllama data ...`"
        raise ValueError(f"{', '.join(paths)}: {name} holds token id {bad}, outside the model's vocabulary "
                         f"(vocab_size={vocab_size}: ids 0..{vocab_size - 1}); {fix}")


# ---- the loop ----------------------------------------------------------------------------------------------
def check_length(run: RunConfig, ids: np.ndarray, seq_length: int) -> None:
    if ids.shape[1] - 1 > seq_length:
        raise ValueError(f"{run.train_data[0]}: samples hold {ids.shape[1]} tokens (seq_length+1) but "
                         f"model.model_config.seq_length is {seq_length}; raise seq_length to {ids.shape[1] - 1}")
