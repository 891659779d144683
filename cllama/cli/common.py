"""Helpers the `cllama` subcommand modules share."""
from __future__ import annotations

import argparse


def print_json(value) -> None:
    """Strict JSON on stdout (non-finite numbers as null)."""
    from cllama.fileio import dumps

    print(dumps(value))


def init_device(args) -> None:
    from cllama.runtime import init_context

    init_context(args.device)


def parse_set(pairs) -> dict:
    from cllama.train.runconfig import parse_overrides

    return parse_overrides(pairs)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k {text!r}: write comma-separated integers, e.g. --k 1,10,100") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {text!r}: every k must be >= 1")
    return ks


def check_ranges(args, *bounds: tuple) -> None:
    """Refuse out-of-range arguments before any work: each bound is (flag, low, high) with `high` None
    for no upper bound; an argument left at None (not given) is skipped. The error is one line
    (ValueError: `cllama` exits 2)."""
    for flag, low, high in bounds:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        if value != value or value < low or (high is not None and value > high):
            where = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{flag} {value}: must be {where}")


def command(sub, name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, **kwargs)
    p.set_defaults(func=func)
    return p


def device_arg(p) -> None:
    p.add_argument("--device", help="CPU or Ascend (default: detect)")
