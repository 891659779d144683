"""Datasets for pretraining and finetuning: code-alpaca / conversations (qa), WikiText and source
trees (packed, optional fill-in-the-middle) to MindRecord, and the training reader.

    prepare("qa", [], "out/train.mindrecord", seq_length=256)    # the bundled code-alpaca sample
    prepare("code", ["/usr/lib/python3.11"], "out/code.mindrecord", seq_length=256, fim_rate=0.9)
    cllama.data.mindrecord.load_dataset("out/train.mindrecord", batch_size=8)   # int32 (8, 257)

Every dataset `X.mindrecord` gets `X.stats.json` beside it and, with val_fraction > 0, a held-out
`X.val.mindrecord`: round(val_fraction * n) whole examples / documents (WikiText, streamed: each
paragraph with probability val_fraction), chosen by a generator seeded with `seed`.
Tokenization runs in a process pool (`workers`); the output is identical for any worker count.
"""
from __future__ import annotations

import multiprocessing
import os
import sysconfig
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np

from cllama.data.corpus import (
    IGNORE_ID,
    TEMPLATES,
    CodeEncoder,
    QAEncoder,
    WikiEncoder,
    alpaca_to_conversations,
    check_utf8,
    code_files,
    qa_records_to_turns,
    read_records,
    wiki_paragraphs,
)
from cllama.data.mindrecord import MindRecordWriter, existing_files, remove_dataset
from cllama.fileio import check_destination, interrupted, publishing, write_json
from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer

MIN_SEQ_LENGTH = 8
KINDS = ("qa", "wiki", "code")


def val_path(path: str | os.PathLike) -> Path:
    """Held-out split beside a dataset: out/train.mindrecord -> out/train.val.mindrecord."""
    path = Path(path)
    stem = path.name[:-len(".mindrecord")] if path.name.endswith(".mindrecord") else path.name
    return path.with_name(f"{stem}.val.mindrecord")


def stats_path(path: str | os.PathLike) -> Path:
    """Stats JSON beside a dataset: out/train.mindrecord -> out/train.stats.json."""
    path = Path(path)
    stem = path.name[:-len(".mindrecord")] if path.name.endswith(".mindrecord") else path.name
    return path.with_name(f"{stem}.stats.json")


def convert_alpaca(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> int:
    """Alpaca JSON file -> conversation JSON file (written atomically); returns the record count. An
    existing `dst` is refused unless `overwrite`."""
    check_destination(dst, overwrite)
    conversations = alpaca_to_conversations(read_records(src), str(src))
    write_json(dst, conversations)
    return len(conversations)


# ---- parallel tokenization ----------------------------------------------------------------------
_WORKER_ENCODER: Callable | None = None


def _init_worker(encoder: Callable) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _run_worker(chunk: list) -> list:
    return _WORKER_ENCODER(chunk)


def parallel_map(encoder: Callable[[list], list], units: Iterable, workers: int = 1,
                 chunk_size: int = 256) -> Iterator:
    """encoder(chunk) over chunks of units in `workers` processes, results in input order; at most
    4 chunks per worker in flight, so long inputs stream."""
    units = iter(units)
    chunks = iter(lambda: list(islice(units, chunk_size)), [])
    if workers <= 1:
        for chunk in chunks:
            yield from encoder(chunk)
        return
    with multiprocessing.get_context().Pool(workers, _init_worker, (encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_run_worker, (chunk,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---- sinks: rows to a writer, with counts -------------------------------------------------------
@dataclass
class _Sink:
    writer: MindRecordWriter
    length: int  # seq_length + 1
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens in the written samples
    units: int = 0  # examples / paragraphs / documents routed here
    dropped: int = 0  # units that produced no sample
    dropped_tokens: int = 0  # cut by truncation (qa) or the last partial chunk (packed)
    layouts: dict = field(default_factory=dict)
    _buffer: list = field(default_factory=list)
    _buffered: int = 0

    def add_row(self, length: int, ids: np.ndarray | None, labels: np.ndarray | None) -> None:
        """One qa example: a padded row, or None when its answer was cut away."""
        self.units += 1
        if ids is None:
            self.dropped += 1
            self.dropped_tokens += length
            return
        self.writer.write({"input_ids": ids, "labels": labels})
        self.samples += 1
        self.tokens += min(length, self.length)
        self.dropped_tokens += max(0, length - self.length)

    def add_document(self, ids: np.ndarray | None, layout: str) -> None:
        """One document for packing: whole seq_length+1 chunks of the running stream are written."""
        self.units += 1
        self.layouts[layout] = self.layouts.get(layout, 0) + 1
        if ids is None:
            self.dropped += 1
            return
        self._buffer.append(ids)
        self._buffered += len(ids)
        if self._buffered >= self.length:
            stream = np.concatenate(self._buffer)
            full = len(stream) // self.length * self.length
            for start in range(0, full, self.length):
                self.writer.write({"input_ids": stream[start:start + self.length]})
            self.samples += full // self.length
            self.tokens += full
            self._buffer, self._buffered = [stream[full:]], len(stream) - full

    def finish(self) -> dict:
        """Counts; the partial last chunk of a packed stream is dropped (as MindFormers does)."""
        self.dropped_tokens += self._buffered
        slots = self.samples * self.length
        return {"samples": self.samples, "tokens": self.tokens, "units": self.units, "dropped": self.dropped,
                "dropped_tokens": self.dropped_tokens,
                "padding_fraction": round(1 - self.tokens / slots, 6) if slots else 0.0,
                **({"layouts": self.layouts} if self.layouts else {})}


@dataclass
class Prepared:
    """What a prepare_* call wrote: dataset path (base name), held-out path, stats and, for the
    histogram, each example's / document's token length before padding or packing."""
    path: Path
    val_path: Path | None
    stats_path: Path
    stats: dict
    lengths: np.ndarray

    @property
    def tokenizer(self) -> Path:
        """The tokenizer.model the dataset was written with."""
        return Path(self.stats["tokenizer"]["path"])


def check_outputs(dst: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (FileExistsError, before any work) when a file of dataset `dst` exists: its data file or
    shards `dst0..`, their `.db` indexes, the held-out set, the stats. With `overwrite` a new run replaces
    them all (shards and held-out set of an older run included) once it is complete."""
    found = [f for f in [*existing_files(dst), *existing_files(val_path(dst)), stats_path(dst)] if f.exists()]
    if interrupted(dst):  # a run killed while publishing them: an incomplete dataset, not the user's
        for f in found:
            f.unlink(missing_ok=True)
        found = []
    if found and not overwrite:
        listed = ", ".join(f.name for f in found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(f"{dst}: the dataset exists ({listed}); choose a new --dst or pass --overwrite "
                              "(overwrite=True in Python and notebooks; all its files are then replaced)")


def _check_options(dst, seq_length: int, val_fraction: float, shards: int, overwrite: bool) -> None:
    if Path(dst).is_dir():
        raise ValueError(f"{dst}: is a folder; give a dataset file name like {Path(dst) / 'train.mindrecord'}")
    if not isinstance(seq_length, int) or seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"seq_length must be an integer >= {MIN_SEQ_LENGTH} (got {seq_length!r}); "
                         "samples hold seq_length+1 tokens")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    if shards < 1:
        raise ValueError(f"shards must be >= 1 (got {shards})")
    check_outputs(dst, overwrite)


def _run(kind: str, units: Iterable, total: int | None, encoder, dst, columns: Sequence[str], tok: Tokenizer,
         seq_length: int, val_fraction: float, seed: int, shards: int, workers: int | None, progress: bool,
         chunk_size: int, params: dict) -> Prepared:
    """Tokenize units (in a pool), route each to train or held-out, write both, then the stats."""
    from tqdm.auto import tqdm

    workers = (os.cpu_count() or 1) if workers is None else workers
    if total is not None and total <= chunk_size:
        workers = 1  # one chunk: a pool would only add start-up time
    dst = Path(dst)
    start = time.perf_counter()
    split = np.random.default_rng(seed)
    held_out = None  # known total: exactly round(val_fraction * total) units (at least one), else Bernoulli
    if total and val_fraction > 0:
        held_out = set(split.choice(total, max(1, round(val_fraction * total)), replace=False).tolist())
    lengths: list[int] = []
    with ExitStack() as stack:  # exits held-out first, then train; an error discards both
        train = _Sink(stack.enter_context(MindRecordWriter(dst, columns, shards)), seq_length + 1)
        val = _Sink(stack.enter_context(MindRecordWriter(val_path(dst), columns)), seq_length + 1) \
            if val_fraction > 0 else None
        results = stack.enter_context(closing(parallel_map(encoder, units, workers, chunk_size)))
        bar = tqdm(results, total=total, desc=f"{kind} {dst.name}", unit="doc" if kind != "qa" else "ex",
                   disable=not progress, mininterval=0.5, delay=1.0)  # delay: a quick failure shows no bar
        stack.callback(bar.close)
        stack.push(lambda failed, *_: setattr(bar, "leave", bar.leave and failed is None))  # an error clears it
        for index, result in enumerate(bar):
            to_val = val is not None and (index in held_out if held_out is not None else split.random() < val_fraction)
            sink = val if to_val else train
            lengths.append(result[0])
            if kind == "qa":
                sink.add_row(*result)
            else:
                sink.add_document(result[1], result[2])
        stats = {"kind": kind, **train.finish(), "seq_length": seq_length, "sample_length": seq_length + 1,
                 "tokenizer": {"path": str(tok.path), "vocab_size": tok.vocab_size, "pad_id": tok.pad_id},
                 "columns": list(columns), "shards": shards, "seed": seed, "val_fraction": val_fraction, **params}
        what = "examples" if kind == "qa" else "documents"
        if train.samples == 0:
            raise ValueError(f"{params['source']}: no samples for {dst.name} ({train.units} {what}, "
                             f"{train.dropped} dropped, {train.dropped_tokens} tokens left over); "
                             f"{'raise seq_length' if kind == 'qa' else 'give more text or lower seq_length'}")
        if train.samples < shards:
            raise ValueError(f"{params['source']}: {train.samples} samples cannot fill {shards} shards; "
                             "use fewer shards")
        if val is not None:
            stats["val"] = {"path": str(val_path(dst)), **val.finish()}
            if val.samples == 0:
                raise ValueError(f"{params['source']}: val_fraction {val_fraction} held out no complete "
                                 f"sample ({val.units} {what}); raise val_fraction or give more data")
        publishing(dst)  # from here to the stats, the files under dst's names are not one whole dataset
    if val is None:
        remove_dataset(val_path(dst))  # an earlier run's held-out set would not match this training set
    stats["seconds"] = round(time.perf_counter() - start, 3)
    stats["tokens_per_second"] = round(sum(lengths) / max(stats["seconds"], 1e-9), 1)
    arr = np.array(lengths, dtype=np.int64)
    stats["length"] = {"min": int(arr.min()), "mean": round(float(arr.mean()), 2),
                       "p50": int(np.percentile(arr, 50)), "p95": int(np.percentile(arr, 95)), "max": int(arr.max())}
    spath = write_json(stats_path(dst), stats)
    publishing(dst, done=True)
    return Prepared(dst, val_path(dst) if val_fraction > 0 else None, spath, stats, arr)


def _tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    return Tokenizer(path or bundled_tokenizer_path())


def prepare_qa(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
               seq_length: int, tokenizer: str | os.PathLike | None = None, template: str = "vicuna",
               max_examples: int | None = None, val_fraction: float = 0.0, seed: int = 0, shards: int = 1,
               workers: int | None = None, progress: bool = True, overwrite: bool = False) -> Prepared:
    """Conversation JSON (or Alpaca JSON, converted first) -> MindRecord {input_ids, labels} rows
    of seq_length+1 tokens: answers supervised, everything else IGNORE_ID; examples whose answer
    is cut away entirely are dropped and counted. `max_examples`: the first N examples only. An existing
    dataset `dst` is refused unless `overwrite` (check_outputs)."""
    _check_options(dst, seq_length, val_fraction, shards, overwrite)
    if template not in TEMPLATES:
        raise ValueError(f"qa: template must be one of {TEMPLATES} (got {template!r})")
    tok = _tokenizer(tokenizer)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    turns = [t for s in sources for t in qa_records_to_turns(read_records(s), str(s))][:max_examples or None]
    return _run("qa", turns, len(turns), QAEncoder(tok.path, seq_length, template), dst, ["input_ids", "labels"],
                tok, seq_length, val_fraction, seed, shards, workers, progress, 256,
                {"source": ", ".join(map(str, sources)), "template": template})


def prepare_wiki(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
                 seq_length: int, tokenizer: str | os.PathLike | None = None, val_fraction: float = 0.0,
                 seed: int = 0, shards: int = 1, workers: int | None = None, progress: bool = True,
                 overwrite: bool = False) -> Prepared:
    """WikiText file(s) -> cleaned paragraphs (headings dropped) as bos+ids+eos, concatenated and
    cut into seq_length+1 chunks -> MindRecord {input_ids}. `overwrite` as in prepare_qa."""
    _check_options(dst, seq_length, val_fraction, shards, overwrite)
    tok = _tokenizer(tokenizer)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    for s in sources:  # fail before any work
        if not Path(s).is_file():
            raise FileNotFoundError(f"{s}: WikiText file not found (e.g. wikitext-2-raw/wiki.train.raw)")
        check_utf8(s, "WikiText file")
    paragraphs = (p for s in sources for p in wiki_paragraphs(s))
    return _run("wiki", paragraphs, None, WikiEncoder(tok.path), dst, ["input_ids"], tok, seq_length,
                val_fraction, seed, shards, workers, progress, 512, {"source": ", ".join(map(str, sources))})


def prepare_code(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
                 seq_length: int, tokenizer: str | os.PathLike | None = None, glob: str = "**/*.py",
                 max_files: int | None = None, fim_rate: float = 0.0, val_fraction: float = 0.0, seed: int = 0,
                 shards: int = 1, workers: int | None = None, progress: bool = True,
                 overwrite: bool = False) -> Prepared:
    """Source files (one document each) -> bos+ids+eos, or with probability fim_rate a FIM layout
    (PSM/SPM 50/50, `cllama.data.fim`), packed into seq_length+1 chunks -> MindRecord {input_ids}.
    Empty and non-UTF-8 files found under folders are skipped and counted (stats layouts `empty`,
    `not_utf8`); a file named in `src` must be UTF-8. `overwrite` as in prepare_qa."""
    _check_options(dst, seq_length, val_fraction, shards, overwrite)
    if not 0 <= fim_rate <= 1:
        raise ValueError(f"code: fim_rate must be in [0, 1] (got {fim_rate}); Code Llama used 0.9")
    tok = _tokenizer(tokenizer)
    if fim_rate > 0 and not tok.has_infill:
        raise ValueError(f"{tok.path}: fim_rate {fim_rate} needs a tokenizer with infill pieces; this one has "
                         f"{tok.vocab_size} pieces and none of them. Build a 32016-piece one with "
                         "`cllama tokenizer extend --dst tokenizer.model` or set fim_rate 0")
    files = code_files(src, glob, max_files)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    return _run("code", [(i, str(f)) for i, f in enumerate(files)], len(files), CodeEncoder(tok.path, fim_rate, seed),
                dst, ["input_ids"], tok, seq_length, val_fraction, seed, shards, workers, progress, 8,
                {"source": ", ".join(map(str, sources)), "glob": glob, "files": len(files), "fim_rate": fim_rate})


def default_inputs(kind: str, inputs: Sequence[str | os.PathLike] = ()) -> list[str]:
    """`inputs` as given; empty: the bundled code-alpaca sample for qa, this Python's standard library
    for code (announced); wiki needs its files."""
    inputs = [str(i) for i in inputs if str(i).strip()]
    if inputs:
        return inputs
    if kind == "qa":
        inputs = [str(resources.files("cllama") / "assets" / "code_alpaca_2k.json")]
        print(f"No inputs given: using the bundled code-alpaca sample ({inputs[0]}, CC BY-NC 4.0).")
    elif kind == "code":
        inputs = [sysconfig.get_paths()["stdlib"]]
        print(f"No inputs given: using this Python's standard library ({inputs[0]}).")
    else:
        raise ValueError(f"{kind}: needs input files, e.g. wikitext-2-raw/wiki.train.raw")
    return inputs


def prepare(kind: str, inputs: Sequence[str | os.PathLike], dst: str | os.PathLike, *, seq_length: int,
            tokenizer: str | os.PathLike | None = None, template: str = "vicuna", max_examples: int | None = None,
            glob: str = "**/*.py", max_files: int | None = None, fim_rate: float = 0.0, val_fraction: float = 0.0,
            seed: int = 0, shards: int = 1, workers: int | None = None, progress: bool = True,
            overwrite: bool = False) -> Prepared:
    """One dataset of `kind` (qa, wiki or code; see prepare_qa / prepare_wiki / prepare_code and
    default_inputs). Without a tokenizer: the bundled Llama 2 one, for code with FIM extended to
    Code Llama's 32016 pieces (written beside dst). Options of other kinds are ignored. An existing
    dataset `dst` is refused unless `overwrite` (check_outputs)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {list(KINDS)}")
    _check_options(dst, seq_length, val_fraction, shards, overwrite)  # before the tokenizer is written
    inputs = default_inputs(kind, inputs)
    if tokenizer is None and kind == "code" and fim_rate > 0:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tokenizer = extend_tokenizer(bundled_tokenizer_path(), Path(dst).parent / "tokenizer.model", overwrite)
    common = dict(seq_length=seq_length, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed, shards=shards,
                  workers=workers, progress=progress, overwrite=overwrite)
    if kind == "qa":
        return prepare_qa(inputs, dst, template=template, max_examples=max_examples, **common)
    if kind == "wiki":
        return prepare_wiki(inputs, dst, **common)
    return prepare_code(inputs, dst, glob=glob, max_files=max_files, fim_rate=fim_rate, **common)


def dataset_or_prepared(data: str | os.PathLike, val_data: str | os.PathLike, kind: str, out_dir: str | os.PathLike,
                        **options) -> tuple[str, str]:
    """(training set, held-out set) as given; when `data` is empty, `prepare(kind, [], ...)` builds
    one in `<out_dir>/data/` (5% held out unless options say otherwise; a stand-in, rebuilt on every
    call) and its files are used."""
    if data:
        return str(data), str(val_data or "")
    options = {"val_fraction": 0.05, "overwrite": True, **options}
    prepared = prepare(kind, [], Path(out_dir) / "data" / f"{kind}.mindrecord", **options)
    return str(prepared.path), str(val_data or prepared.val_path or "")


def sample_html(tok: Tokenizer, ids: Sequence[int], labels: Sequence[int] | None = None) -> str:
    """One sample as HTML: masked positions (label IGNORE_ID: system, user turns, first token)
    grey and struck through, supervised tokens on green, special tokens as tags, trailing
    padding as one `<pad x N>` tag."""
    import html

    from cllama.data.fim import decode_nospace

    ids = [int(i) for i in ids]
    labels = [int(x) for x in labels] if labels is not None else [None] * len(ids)
    pads = 0
    while ids and ids[-1] == tok.pad_id and labels[-1] in (IGNORE_ID, None):
        ids.pop(), labels.pop()
        pads += 1
    special = {i: name for i, name in [(tok.bos_id, "<s>"), (tok.eos_id, "</s>"), (tok.prefix_id, "<PRE>"),
               (tok.suffix_id, "<SUF>"), (tok.middle_id, "<MID>"), (tok.eot_id, "<EOT>")] if i is not None}
    style = {"masked": "color:#999;text-decoration:line-through", "trained": "background:#d8f3dc",
             "plain": "", "tag": "color:#fff;background:#6c757d;border-radius:3px;padding:0 2px"}
    parts, group, kind = [], [], None

    def flush() -> None:
        if group:
            text = html.escape(decode_nospace(tok, group))
            parts.append(f'<span style="{style[kind]}">{text}</span>')

    for i, label in zip(ids, labels):
        if i in special:
            flush()
            group, kind = [], None
            tag_style = style["tag"] + (";opacity:0.5" if label == IGNORE_ID else "")
            parts.append(f'<span style="{tag_style}">{html.escape(special[i])}</span>')
            continue
        k = "plain" if label is None else "masked" if label == IGNORE_ID else "trained"
        if k != kind:
            flush()
            group, kind = [], k
        group.append(i)
    flush()
    if pads:
        parts.append(f'<span style="{style["tag"]};opacity:0.5">&lt;pad x {pads}&gt;</span>')
    legend = ("<div style='font-size:smaller;color:#555'>grey struck-through: masked (label -100, no loss); "
              "green: trained (answer)</div>" if labels and labels[0] is not None else "")
    return (f"{legend}<div style='white-space:pre-wrap;font-family:monospace;line-height:1.5'>"
            f"{''.join(parts)}</div>")
