"""Benchmark: `cllama convert hf2ms` against the load-everything converter, peak RSS and wall time.

The checkpoint: Code Llama 7B layer shapes (hidden 4096, ffn 11008, vocab 32016) with 4 layers,
bfloat16 random weights (about 2.1 GB), written here as Hugging Face safetensors + config.json.
Baseline (what MindFormers' converter does): transformers `from_pretrained` in float32, the whole
state dict turned into MindSpore tensors in memory, then `mindspore.save_checkpoint`. Both write a
bfloat16 MindSpore checkpoint with MindFormers names; the outputs are checked equal tensor by tensor.
Each side runs as its own subprocess; its peak RSS comes from wait4's rusage. Sides interleaved,
after one warm-up run that puts the source in the page cache; best of --reps.

    python bench/convert.py [--workdir /tmp/cllama_bench_convert] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HF_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32016, max_position_embeddings=16384,
                 rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2, torch_dtype="bfloat16")


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama parameter names and shapes, in save_pretrained's order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_checkpoint(folder: Path) -> None:
    """Random bfloat16 weights (normal, std 0.02; norms 1), streamed into model.safetensors."""
    from cllama.checkpoint.safetensors_file import SafetensorsWriter, float32_to_bf16_bits

    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(HF_CONFIG)
    rng = np.random.default_rng(0)
    print(f"writing a synthetic 7B-shaped 4-layer bfloat16 checkpoint to {folder} ...", flush=True)
    with SafetensorsWriter(folder / "model.safetensors", [(n, "BF16", s) for n, s in shapes.items()]) as w:
        for name, shape in shapes.items():
            w.begin(name)
            rows = max(1, (16 << 20) // int(np.prod(shape[1:], dtype=np.int64)))
            for r in range(0, shape[0], rows):
                block = (shape[0] if len(shape) == 1 else min(rows, shape[0] - r),) + shape[1:]
                values = np.ones(block, np.float32) if len(shape) == 1 else \
                    rng.standard_normal(block, dtype=np.float32) * np.float32(0.02)
                w.write(float32_to_bf16_bits(values))
                if len(shape) == 1:
                    break
    (folder / "config.json").write_text(json.dumps(HF_CONFIG, indent=2))


def baseline(src: str, dst: str) -> None:
    """MindFormers' way: the whole model in float32, every tensor converted in memory, then saved."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    from cllama.checkpoint.names import hf_to_ms_name

    logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    ckpt = [{"name": hf_to_ms_name(name), "data": ms.Tensor(value.detach().numpy(), ms.bfloat16)}
            for name, value in model.state_dict().items()]
    Path(dst).mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(ckpt, str(Path(dst) / "model.ckpt"))


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one subprocess."""
    os.sync()  # earlier runs' dirty pages are not this run's cost
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024  # KiB on Linux


def same_weights(a: Path, b: Path) -> bool:
    from cllama.checkpoint.ckpt_file import CkptFile

    fa, fb = CkptFile(a), CkptFile(b)
    if sorted(fa.keys()) != sorted(fb.keys()):
        return False
    for name in fa.keys():
        if fa.shape(name) != fb.shape(name) or fa.dtype(name) != fb.dtype(name):
            return False
        for x, y in zip(fa.chunks(name, 64 << 20), fb.chunks(name, 64 << 20)):
            if not np.array_equal(x, y):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/cllama_bench_convert")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(*args.baseline)
    work = Path(args.workdir)
    src = work / "hf"
    write_checkpoint(src)
    size = (src / "model.safetensors").stat().st_size
    ours_cmd = [sys.executable, "-m", "cllama", "convert", "hf2ms", "--src", str(src),
                "--dst", str(work / "ours"), "--no-progress"]
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline", str(src), str(work / "base")]
    print(f"source: {size / 1e9:.2f} GB bfloat16; machine load {os.getloadavg()[0]:.1f}", flush=True)
    run(ours_cmd)  # warm-up: the source file into the page cache
    results = {"cllama": [], "baseline": []}
    for rep in range(args.reps):
        for side, cmd in (("cllama", ours_cmd), ("baseline", base_cmd)):
            seconds, rss = run(cmd)
            results[side].append((seconds, rss))
            print(f"rep {rep + 1} {side:9s} {seconds:7.2f} s  peak RSS {rss / 2**30:6.2f} GiB", flush=True)
    equal = same_weights(work / "ours" / "model.ckpt", work / "base" / "model.ckpt")
    print(f"outputs hold the same tensors (names, shapes, bfloat16 bits): {equal}")
    if not equal:
        raise SystemExit("the two converters disagree")
    best = {side: (min(s for s, _ in r), min(m for _, m in r)) for side, r in results.items()}
    for side, (seconds, rss) in best.items():
        print(f"best {side:9s} {seconds:7.2f} s  peak RSS {rss / 2**30:6.2f} GiB")
    shutil.rmtree(work / "base", ignore_errors=True)
    shutil.rmtree(work / "ours", ignore_errors=True)
    print(f"RESULT convert_peak_rss_vs_baseline {best['cllama'][1] / best['baseline'][1]:.2f}x (goal <=0.25x)")
    print(f"RESULT convert_time_vs_baseline {best['cllama'][0] / best['baseline'][0]:.2f}x (goal <=1.0x)")


if __name__ == "__main__":
    main()
