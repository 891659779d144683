"""Data pipeline throughput: cllama's prepare_qa / prepare_code (process pool, batched MindRecord
writes) against a single-process per-example loop in the MindFormers style (tokenize one example,
build its arrays, `FileWriter.write_raw_data([sample])`, next), on the same input in the same run.
Both sides must write identical rows. Tokens/s counts tokens produced by tokenization (before
padding / packing) over the wall time of the whole call (read, tokenize, write, commit).

    python bench/data.py [--repeats 3] [--qa-copies 5] [--code-files 400] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOG_v", "3")

from cllama.data.corpus import pad_sample, qa_records_to_turns, qa_tokens, read_records  # noqa: E402
from cllama.data.fim import document_ids  # noqa: E402
from cllama.data.mindrecord import read_mindrecord  # noqa: E402
from cllama.data.prepare import prepare_code, prepare_qa  # noqa: E402
from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer  # noqa: E402


def _writer(path: Path, columns: list[str]):
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in columns}, "baseline")
    return writer


def single_qa(src: Path, dst: Path, tokenizer: Path, seq_length: int) -> int:
    """MindFormers-style qa: one example at a time, one write_raw_data call per sample."""
    tok = Tokenizer(tokenizer)
    writer = _writer(dst, ["input_ids", "labels"])
    tokens = 0
    for turns in qa_records_to_turns(read_records(src), str(src)):
        ids, labels = qa_tokens(tok, turns, "vicuna")
        tokens += len(ids)
        sample = pad_sample(ids, labels, seq_length + 1, tok.pad_id)
        if sample is not None:
            writer.write_raw_data([{"input_ids": sample[0], "labels": sample[1]}])
    writer.commit()
    return tokens


def single_code(files: list[Path], dst: Path, tokenizer: Path, seq_length: int, fim_rate: float, seed: int) -> int:
    """MindFormers-style packing: tokenize every file into one list, cut, write chunk by chunk."""
    tok = Tokenizer(tokenizer)
    content: list[int] = []
    for i, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            content += document_ids(tok, text, np.random.default_rng([seed, i]), fim_rate)[0]
    writer = _writer(dst, ["input_ids"])
    length = seq_length + 1
    for start in range(0, len(content) - length + 1, length):
        writer.write_raw_data([{"input_ids": np.array(content[start:start + length], dtype=np.int32)}])
    writer.commit()
    return len(content)


def same_rows(a: Path, b: Path) -> None:
    x, y = read_mindrecord(a), read_mindrecord(b)
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), f"{a} and {b} differ"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qa-copies", type=int, default=5, help="code-alpaca (2017 examples) repeated N times")
    ap.add_argument("--code-files", type=int, default=400, help="first N stdlib files (sorted)")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cllama_bench_data_"))
    try:
        records = read_records(resources.files("cllama") / "assets" / "code_alpaca_2k.json") * args.qa_copies
        qa_src = tmp / "alpaca.json"
        qa_src.write_text(json.dumps(records))
        tok_fim = extend_tokenizer(bundled_tokenizer_path(), tmp / "tokenizer.model")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted((p for p in stdlib.glob("**/*.py") if p.is_file()), key=str)[:args.code_files]
        seq = args.seq_length
        print(f"qa: {len(records)} code-alpaca examples, seq_length {seq}; code: {len(files)} stdlib files, "
              f"FIM 0.9; workers {args.workers}; best of {args.repeats}")

        sides = {
            "qa/cllama": lambda d: prepare_qa(qa_src, d, seq_length=seq, workers=args.workers, progress=False),
            "qa/cllama_1proc": lambda d: prepare_qa(qa_src, d, seq_length=seq, workers=1, progress=False),
            "qa/single": lambda d: single_qa(qa_src, d, bundled_tokenizer_path(), seq),
            "code/cllama": lambda d: prepare_code(files, d, seq_length=seq, tokenizer=tok_fim, fim_rate=0.9,
                                                  workers=args.workers, progress=False),
            "code/cllama_1proc": lambda d: prepare_code(files, d, seq_length=seq, tokenizer=tok_fim, fim_rate=0.9,
                                                        workers=1, progress=False),
            "code/single": lambda d: single_code(files, d, tok_fim, seq, 0.9, 0),
        }
        tokens = {"qa": single_qa(qa_src, tmp / "warm_qa.mindrecord", bundled_tokenizer_path(), seq),
                  "code": single_code(files, tmp / "warm_code.mindrecord", tok_fim, seq, 0.9, 0)}  # warm-up
        best = {name: float("inf") for name in sides}
        for rep in range(args.repeats):
            for name, run in sides.items():  # interleaved
                dst = tmp / f"{name.replace('/', '_')}.mindrecord"
                for old in tmp.glob(dst.name + "*"):
                    old.unlink()
                start = time.perf_counter()
                run(dst)
                best[name] = min(best[name], time.perf_counter() - start)
            if rep == 0:
                for kind in ("qa", "code"):
                    same_rows(tmp / f"{kind}_cllama.mindrecord", tmp / f"{kind}_single.mindrecord")
                    same_rows(tmp / f"{kind}_cllama_1proc.mindrecord", tmp / f"{kind}_single.mindrecord")
                print("outputs identical: cllama (pool and 1 process) == single-process loop, qa and code")
        for name, seconds in best.items():
            kind = name.split("/")[0]
            print(f"{name:18s} {seconds:7.2f} s  {tokens[kind] / seconds / 1e3:8.1f} k tokens/s")
        for kind in ("qa", "code"):
            ratio = best[kind + '/single'] / best[kind + '/cllama_1proc']
            print(f"{kind}: cllama in one process vs the loop {ratio:.2f}x "
                  "(batched writes only)")
        for kind in ("qa", "code"):
            print(f"RESULT {kind}_vs_single {best[kind + '/single'] / best[kind + '/cllama']:.2f}x (goal 1.7x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
