"""Fill-in-the-middle training documents as in the Code Llama paper (arXiv 2308.12950, 2.3).

A document is split at two uniformly drawn character positions into prefix, middle and suffix and
laid out, half the time each, as (ids; `enc` adds SentencePiece's dummy space, `enc_nospace` not)
  PSM: [bos, PRE] + enc(prefix) + [SUF] + enc_nospace(suffix) + [MID] + enc_nospace(middle) + [EOT]
  SPM: [bos, PRE, SUF] + enc_nospace(suffix) + [MID] + enc(prefix + middle) + [EOT]
PSM starts with exactly `Tokenizer.infill_prompt(prefix, suffix)`; SPM encodes prefix and middle
together ("we concatenate the prefix and the middle part before encoding", the paper), so it starts
with `infill_prompt(prefix, suffix, suffix_first=True)` whenever the prefix ends on a token boundary.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cllama.tokenizer import SENTINEL, Tokenizer


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two uniform character positions in [0, len(text)]."""
    a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:a], text[a:b], text[b:]


def fim_ids(tok: Tokenizer, prefix: str, middle: str, suffix: str, spm: bool) -> list[int]:
    """One FIM training document in PSM (spm=False) or SPM layout, ending with EOT."""
    tok.require_infill()
    if spm:
        return ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix) + [tok.middle_id]
                + tok.encode(prefix + middle, bos=False) + [tok.eot_id])
    return tok.infill_prompt(prefix, suffix) + tok.encode_infilling(middle) + [tok.eot_id]


def document_ids(tok: Tokenizer, text: str, rng: np.random.Generator, fim_rate: float) -> tuple[list[int], str]:
    """bos + ids + eos, or with probability fim_rate a FIM layout (PSM or SPM, 50/50).
    Returns (ids, layout) with layout "plain", "psm" or "spm"."""
    if fim_rate > 0 and rng.random() < fim_rate:
        spm = bool(rng.random() < 0.5)
        return fim_ids(tok, *fim_split(text, rng), spm=spm), "spm" if spm else "psm"
    return tok.encode(text, bos=True, eos=True), "plain"


def decode_nospace(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Inverse of `encode_infilling`: decode without dropping a leading space."""
    sentinel = tok.sp.piece_to_id(SENTINEL)
    return tok.sp.decode([sentinel] + [int(i) for i in ids])[len(SENTINEL):]


def fim_undo(tok: Tokenizer, ids: Sequence[int], layout: str | None = None) -> str:
    """The original document of a training document: undoes the PSM/SPM permutation (or strips
    bos/eos of a plain one) and decodes. `layout` ("psm", "spm", "plain") is read from the ids when
    not given; the one ambiguous case is PSM with an empty prefix, which looks like SPM."""
    ids = [int(i) for i in ids]
    if layout is None:
        layout = "plain" if ids[1:2] != [tok.prefix_id] else "spm" if ids[2:3] == [tok.suffix_id] else "psm"
    if layout == "spm":
        mid, eot = ids.index(tok.middle_id), ids.index(tok.eot_id)
        return tok.decode(ids[mid + 1:eot]) + decode_nospace(tok, ids[3:mid])
    if layout == "psm":
        suf, mid, eot = ids.index(tok.suffix_id), ids.index(tok.middle_id), ids.index(tok.eot_id)
        return tok.decode(ids[2:suf]) + decode_nospace(tok, ids[mid + 1:eot]) + decode_nospace(tok, ids[suf + 1:mid])
    if ids[:1] != [tok.bos_id] or ids[-1:] != [tok.eos_id]:
        raise ValueError("fim_undo: not a training document (bos + PRE ... EOT, or bos ... eos)")
    return tok.decode(ids[1:-1])
