"""Generation speed: cllama (MindSpore graphs, static KV cache) vs transformers on CPU.

Both sides hold identical random weights of the `small` preset (about 134M parameters, float32)
and use the same threads. Figures, best of --reps after a warm-up, sides interleaved:
- decode tokens/s at batch 1 and 8 (128-token prompts, 128 new tokens, greedy, eos ignored):
  new tokens after the first over the time from the first to the last new token
  (transformers: `generate` with a timing streamer; cllama: Generator.generate's decode loop);
- end-to-end generate time ratio for the same requests;
- prefill tokens/s (batch 1, 128 tokens): cllama's compiled prefill vs transformers' forward
  with use_cache=True;
- decode at batch 1 as a fraction of the memory-bandwidth floor: weight bytes read per token
  (every parameter but the input embedding, x4 bytes) over numpy's a.sum() bandwidth on 1 GiB.

    python bench/generate.py [--reps 5] [--new-tokens 128] [--preset small]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def read_bandwidth(reps: int = 5) -> float:
    """Bytes/s of numpy a.sum() over a 1 GiB float32 array (best of reps)."""
    a = np.ones(2 ** 28, np.float32)
    a.sum()
    best = min(_timed(a.sum) for _ in range(reps))
    return a.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class TimingStreamer:
    """transformers streamer noting when each generated step arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build(preset: str, seed: int):
    """(cllama model, transformers model) with the same random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama.checkpoint.model_dir import random_model, state_dict
    from cllama.checkpoint.names import ms_to_hf_name
    from cllama.config import ModelConfig

    config = ModelConfig.from_name(preset)
    model = random_model(config, seed=seed)
    model.set_train(False)
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    hf.load_state_dict({ms_to_hf_name(n): torch.from_numpy(p.asnumpy()) for n, p in state_dict(model).items()},
                       strict=True)
    return model, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from cllama.runtime import init_context

    init_context("CPU")
    import torch
    from mindspore import Tensor

    from cllama.checkpoint.names import param_shapes
    from cllama.generation.generator import Generator

    torch.set_num_threads(args.threads)
    print(f"threads: torch {torch.get_num_threads()}, cpu_count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes skew absolute figures)")
    model, hf = build(args.preset, seed=0)
    gen = Generator(model)
    shapes = param_shapes(model.config)
    weight_bytes = 4 * sum(int(np.prod(s)) for n, s in shapes.items() if n != "model.tok_embeddings.embedding_weight")
    print(f"{args.preset}: {sum(int(np.prod(s)) for s in shapes.values()) / 1e6:.1f}M parameters, "
          f"{weight_bytes / 1e6:.0f} MB of weights read per decoded token")
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, 32000, (b, args.prompt_tokens)) for b in (1, 8)}
    new = args.new_tokens

    def ms_generate(b: int) -> tuple[float, float]:
        start = time.perf_counter()
        gen.generate(prompts[b].tolist(), max_new_tokens=new, ignore_eos=True)
        total = time.perf_counter() - start
        return total, gen.stats["decode_s"]

    def hf_generate(b: int) -> tuple[float, float]:
        streamer = TimingStreamer()
        ids = torch.from_numpy(prompts[b])
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0, streamer=streamer)
            total = time.perf_counter() - start
        return total, streamer.times[-1] - streamer.times[1]

    steps = gen.engine.steps_for(1, 256, logits=False)
    prompt1 = Tensor(prompts[1].astype(np.int32))
    no_pads = Tensor(np.zeros(1, np.int32))

    def ms_prefill() -> float:
        return _timed(lambda: steps.prefill(prompt1, no_pads).asnumpy())

    def hf_prefill() -> float:
        ids = torch.from_numpy(prompts[1])
        with torch.inference_mode():
            return _timed(lambda: hf(ids, use_cache=True).logits[:, -1].numpy())

    compile_s = {}
    for b in (1, 8):  # warm-up: compiles cllama's graphs, warms torch
        compile_s[b] = _timed(lambda b=b: gen.generate(prompts[b].tolist(), max_new_tokens=new, ignore_eos=True))
        hf_generate(b)
    print(f"cllama first call (compile + run): batch 1 {compile_s[1]:.1f} s, batch 8 {compile_s[8]:.1f} s")

    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, float("inf")), value)

    bandwidth = 0.0
    for rep in range(args.reps):
        for b in (1, 8):
            total, decode = ms_generate(b)
            keep(f"ms_total_{b}", total)
            keep(f"ms_decode_{b}", decode)
            total, decode = hf_generate(b)
            keep(f"hf_total_{b}", total)
            keep(f"hf_decode_{b}", decode)
        keep("ms_prefill", ms_prefill())
        keep("hf_prefill", hf_prefill())
        bandwidth = max(bandwidth, read_bandwidth(3))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()), flush=True)

    tok = {}
    for side in ("ms", "hf"):
        for b in (1, 8):
            tok[f"{side}_decode_{b}"] = b * (new - 1) / best[f"{side}_decode_{b}"]
        tok[f"{side}_prefill"] = args.prompt_tokens / best[f"{side}_prefill"]
    floor = bandwidth / weight_bytes
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> floor {floor:.1f} tokens/s at batch 1")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    for b in (1, 8):
        print(f"batch {b}: cllama {tok[f'ms_decode_{b}']:.1f} tok/s, transformers {tok[f'hf_decode_{b}']:.1f} "
              f"tok/s decode; generate {best[f'ms_total_{b}']:.2f} s vs {best[f'hf_total_{b}']:.2f} s")
    print(f"prefill: cllama {tok['ms_prefill']:.0f} tok/s, transformers {tok['hf_prefill']:.0f} tok/s")
    print(f"RESULT decode_bs1_tok_s {tok['ms_decode_1']:.1f}")
    print(f"RESULT hf_decode_bs1_tok_s {tok['hf_decode_1']:.1f}")
    print(f"RESULT decode_bs1_vs_hf {tok['ms_decode_1'] / tok['hf_decode_1']:.2f}x (goal 1.5x)")
    print(f"RESULT decode_bs1_floor_fraction {tok['ms_decode_1'] / floor:.2f} (goal 0.75)")
    print(f"RESULT decode_bs8_tok_s {tok['ms_decode_8']:.1f}")
    print(f"RESULT hf_decode_bs8_tok_s {tok['hf_decode_8']:.1f}")
    print(f"RESULT decode_bs8_vs_hf {tok['ms_decode_8'] / tok['hf_decode_8']:.2f}x (goal 2x)")
    for b in (1, 8):
        print(f"RESULT generate_bs{b}_vs_hf {best[f'hf_total_{b}'] / best[f'ms_total_{b}']:.2f}x")
    print(f"RESULT prefill_tok_s {tok['ms_prefill']:.0f}")
    print(f"RESULT prefill_vs_hf {tok['ms_prefill'] / tok['hf_prefill']:.2f}x (goal 1x)")
    print(f"RESULT read_bandwidth_gb_s {bandwidth / 1e9:.1f}")
    print(f"RESULT compile_s {compile_s[1] + compile_s[8]:.1f}")


if __name__ == "__main__":
    main()
