"""Greedy HumanEval completions that change when only the batch size changes.

The same model and prompts, greedy, decoded three times with batch sizes 1, 8 and 32: the old way
(the prompts in batches of the batch size: each completion's batch-mates and padded shapes change with
it) against cllama's evaluation (fixed groups of 8 consecutive tasks whatever the batch size,
cllama.evaluation.protocols.DECODE_GROUP). Counted over all 164 problems on the tiny preset twice: with
random weights (flat logits, many near-ties) and with the demo-like peaked logits (lm_head scaled 40x);
and on the `small` preset (random weights) over the first `--small-limit` problems.

    python bench/eval_batch.py [--limit 164] [--small-limit 48] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 8, 32)


def flips(generator, tasks, params, decode_group, work: Path) -> int:
    """Tasks whose completion differs between batch size 1 and 8 or 32."""
    from cllama.evaluation.harness import generate_samples

    runs = []
    for b in BATCHES:
        path = generate_samples(generator, tasks, work / f"{decode_group}_{b}" / "samples.jsonl", params=params,
                                batch_size=b, progress=False, decode_group=decode_group)
        runs.append({r["task_id"]: r["completion"] for r in map(json.loads, path.read_text().splitlines())})
    return sum(any(run[t] != runs[0][t] for run in runs[1:]) for t in tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=164)
    parser.add_argument("--small-limit", type=int, default=48, help="problems for the small preset (0: skip it)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from cllama.runtime import init_context

    init_context("CPU", "graph")
    from mindspore import Tensor

    from cllama.checkpoint.model_dir import random_model
    from cllama.config import ModelConfig
    from cllama.evaluation.harness import build_tasks
    from cllama.evaluation.protocols import DECODE_GROUP
    from cllama.generation.generator import Generator
    from cllama.generation.sampling import SamplingParams
    from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer

    tasks = build_tasks(limit=args.limit)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = Tokenizer(extend_tokenizer(bundled_tokenizer_path(), work / "tokenizer.model"))
        results = {}
        cases = [("flat", "tiny", 1.0, tasks), ("peaked", "tiny", 40.0, tasks)]
        if args.small_limit:
            cases.append(("small", "small", 1.0, dict(list(tasks.items())[:args.small_limit])))
        for name, preset, scale, chosen in cases:
            model = random_model(ModelConfig.from_name(preset, seq_length=1024), seed=5)
            head = model.lm_head.weight
            head.set_data(Tensor(head.asnumpy() * scale, head.dtype))
            generator = Generator(model, tokenizer)
            results[name] = {"before": flips(generator, chosen, params, None, work / name),
                             "after": flips(generator, chosen, params, DECODE_GROUP, work / name)}
            print(f"{name} ({preset}): {results[name]['before']} of {len(chosen)} completions change with the batch "
                  f"size (1/8/32) when batches follow it; {results[name]['after']} with fixed groups of "
                  f"{DECODE_GROUP}", flush=True)
    for name, r in results.items():
        print(f"RESULT eval_batch_flips_{name}_before {r['before']} (goal -: the old way, measured)")
        print(f"RESULT eval_batch_flips_{name}_after {r['after']} (goal 0)")


if __name__ == "__main__":
    main()
