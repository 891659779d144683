"""The `cllama` command line: one subcommand group per stage; handlers import lazily."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cllama import __version__
from cllama.runtime import quiet_mindspore_logs


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---- tokenizer ----------------------------------------------------------------------------------
def _tokenizer_extend(args) -> int:
    from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer

    dst = extend_tokenizer(args.src or bundled_tokenizer_path(), args.dst)
    tok = Tokenizer(dst)
    _print_json({"tokenizer": str(dst), "vocab_size": tok.vocab_size, "prefix_id": tok.prefix_id,
                 "suffix_id": tok.suffix_id, "middle_id": tok.middle_id, "eot_id": tok.eot_id})
    return 0


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer utilities")
    cmds = p.add_subparsers(dest="action", required=True)
    ext = cmds.add_parser("extend", help="Llama 2 tokenizer (32000) -> Code Llama-style (32016, infill pieces)")
    ext.add_argument("--src", help="32000-piece SentencePiece model (default: the bundled Llama 2 one)")
    ext.add_argument("--dst", required=True, help="where to write the 32016-piece model")
    ext.set_defaults(func=_tokenizer_extend)


# ---- model --------------------------------------------------------------------------------------
def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE, e.g. --set seq_length=1024")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _model_init(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.config import ModelConfig
    from cllama.tokenizer import bundled_tokenizer_path, extend_tokenizer
    from cllama.weights import random_model, save_model_dir

    config = ModelConfig.from_name(args.preset, **_parse_overrides(args.set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = bundled_tokenizer_path()
        if config.vocab_size == 32016:
            tokenizer = extend_tokenizer(tokenizer, out / "tokenizer.model")
    save_model_dir(random_model(config, seed=args.seed), out, tokenizer)
    _print_json({"model_dir": str(out), "preset": args.preset, "params": config.num_params(),
                 "random_weights": True, "seed": args.seed})
    return 0


def _model_info(args) -> int:
    from cllama.config import PRESETS, ModelConfig

    config = ModelConfig.from_name(args.source) if args.source in PRESETS else ModelConfig.load(args.source)
    _print_json({"params": config.num_params(), "head_dim": config.head_dim,
                 "ffn_hidden_size": config.ffn_hidden_size, "config": config.to_dict()})
    return 0


def _add_model(sub) -> None:
    from cllama.config import PRESETS

    p = sub.add_parser("model", help="model presets and model directories")
    cmds = p.add_subparsers(dest="action", required=True)
    init = cmds.add_parser("init", help="write a model directory with random weights")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--out", required=True, help="model directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", help="tokenizer.model to copy in (default: bundled, extended to "
                                          "32016 pieces when the vocabulary is 32016)")
    init.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    init.add_argument("--device", help="CPU or Ascend (default: detect)")
    init.set_defaults(func=_model_init)
    info = cmds.add_parser("info", help="config and parameter count of a preset or model directory")
    info.add_argument("source", help="preset name or model directory")
    info.set_defaults(func=_model_info)


# ---- generate -----------------------------------------------------------------------------------
def _generate(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.generate import Generator

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    gen = Generator.from_dir(args.model, args.tokenizer)
    stop_ids: list[int] = []
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated integers, "
                             "e.g. --prompt-ids 1,822,285") from None
        if args.mode != "completion":
            raise ValueError("--prompt-ids feeds ids as they are: use it with --mode completion")
    else:
        prompt_ids, stop_ids = gen.prompt_for(args.prompt, args.mode, args.suffix or "", args.system)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=args.stop or (), stop_ids=stop_ids)
    if args.json or gen.tokenizer is None:
        result = gen.generate([prompt_ids], **kwargs)[0]
    else:  # stream the text as it is decoded
        result = gen.generate([prompt_ids], on_text=lambda _, piece: print(piece, end="", flush=True),
                              **kwargs)[0]
        print()
    text = result.text.lstrip() if (args.mode == "chat" and result.text) else result.text
    if args.json:
        _print_json({"mode": args.mode, "prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                     "text": text, "finish_reason": result.finish_reason,
                     "tokens_per_s": round(result.tokens_per_s, 2)})
    elif gen.tokenizer is None:
        print(",".join(map(str, result.output_ids)))
    print(f"[{len(result.output_ids)} tokens, {result.tokens_per_s:.1f} tok/s, {result.finish_reason}]",
          file=sys.stderr)
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete, infill or chat with a model directory")
    p.add_argument("--model", required=True, help="model directory (config.json + model.ckpt)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the model directory's)")
    p.add_argument("--prompt", help="prompt text (the prefix in infill mode, the user turn in chat)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of --prompt")
    p.add_argument("--mode", default="completion", choices=["completion", "infill", "chat"])
    p.add_argument("--suffix", help="infill mode: the text after the gap")
    p.add_argument("--system", help="chat mode: a system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", nargs="*", help="stop strings (the text is cut before the first)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, output_ids, text, ...)")
    p.add_argument("--device", help="CPU or Ascend (default: detect)")
    p.set_defaults(func=_generate)


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllama", description="Code Llama research workbench on MindSpore")
    parser.add_argument("--version", action="version", version=f"cllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenizer(sub)
    _add_model(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_mindspore_logs()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"cllama {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
