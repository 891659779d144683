"""Reading and tokenizing the data sources: Alpaca / conversation JSON, the qa chat templates with
label masks, WikiText cleaning, source trees. Pure functions plus picklable per-process encoders
(each loads the SentencePiece model once) that `cllama.data` runs in a process pool."""
from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cllama.fileio import read_text
from cllama.tokenizer import Tokenizer

IGNORE_ID = -100  # MindFormers' ignore_token_id: label positions that carry no loss
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("vicuna", "inst")
Turns = list[tuple[str, str]]  # [(question, answer), ...] of one conversation


# ---- JSON records -------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list:
    """A JSON file holding a non-empty list of records; errors name the file, the line and the fix."""
    path = Path(path)
    text = read_text(path, "JSON list of records (UTF-8)")
    if not text.strip():
        raise ValueError(f"{path}: file is empty; expected a JSON list of records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: holds no records (an empty list)")
    return records


def check_utf8(path: str | os.PathLike, what: str) -> None:
    """ValueError naming the first byte of `path` that is not UTF-8 (its offset and line), found by a
    streaming scan (for files too big to read whole); None when the file is all UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:  # err.object: the bytes held back from the last chunk + this one
                at = offset - (len(err.object) - len(chunk)) + err.start
                line = newlines + err.object.count(b"\n", 0, err.start) + 1
                raise ValueError(f"{path}: not a {what}: byte {at} (line {line}) is not UTF-8 "
                                 f"({err.object[err.start:err.start + 1]!r}); save it as UTF-8") from None
            offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a {what}: it ends inside a UTF-8 character; save it as UTF-8") from None


def alpaca_to_conversations(records: Sequence[dict], source: str = "alpaca") -> list[dict]:
    """Alpaca records {instruction, input?, output} -> conversations as MindFormers'
    alpaca_converter writes them: {"id": "1", "conversations": [{"from": "human", "value":
    PROMPT}, {"from": "gpt", "value": output}]}, PROMPT being the Stanford Alpaca text."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i} is a {type(rec).__name__}, not an object "
                             "with 'instruction', 'input', 'output'")
        for field in ("instruction", "output"):
            if field not in rec:
                raise ValueError(f"{source}: record {i} has no {field!r} field; Alpaca records need "
                                 "'instruction' and 'output' ('input' optional)")
        for field in ("instruction", "input", "output"):
            if field in rec and not isinstance(rec[field], str):
                raise ValueError(f"{source}: record {i} field {field!r} is a {type(rec[field]).__name__}, "
                                 "expected a string")
        prompt = (PROMPT_INPUT if rec.get("input", "") != "" else PROMPT_NO_INPUT).format_map(rec)
        out.append({"id": str(i + 1), "conversations": [{"from": "human", "value": prompt},
                                                         {"from": "gpt", "value": rec["output"]}]})
    return out


def conversation_turns(record: dict, index: int, source: str) -> Turns:
    """[(question, answer), ...] of one conversation record; human/gpt turns must alternate."""
    named = isinstance(record, dict) and "id" in record
    where = f"{source}: record {index}" + (f" (id {record['id']})" if named else "")
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError(f"{where}: needs a 'conversations' list of {{'from', 'value'}} turns "
                         "(convert Alpaca data with `cllama data alpaca`)")
    conv = record["conversations"]
    if len(conv) < 2 or len(conv) % 2:
        raise ValueError(f"{where}: 'conversations' has {len(conv)} turns; give human/gpt pairs")
    for j, turn in enumerate(conv):
        want = "human" if j % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"{where}: conversations[{j}].from is {got!r}, expected {want!r} "
                             "(turns alternate human, gpt, ...)")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: conversations[{j}].value must be a string")
    return [(conv[j]["value"], conv[j + 1]["value"]) for j in range(0, len(conv), 2)]


def qa_records_to_turns(records: Sequence, source: str) -> list[Turns]:
    """Conversation records, or Alpaca records (converted first), as lists of turns."""
    if isinstance(records[0], dict) and "conversations" not in records[0] and "instruction" in records[0]:
        records = alpaca_to_conversations(records, source)
    return [conversation_turns(rec, i, source) for i, rec in enumerate(records)]


# ---- qa templates -------------------------------------------------------------------------------
def qa_tokens(tok: Tokenizer, turns: Turns, template: str = "vicuna") -> tuple[list[int], list[int]]:
    """ids and labels (unpadded, same positions) of one conversation. Each text piece is encoded
    on its own; the answer's SentencePiece dummy space stands for the space after the role.
      vicuna: [bos] + enc("{system} USER: {q} ASSISTANT:") + enc(a) + [eos], later rounds
              enc("USER: {q} ASSISTANT:") + enc(a) + [eos]   (Vicuna v1.1, MindFormers' default)
      inst:   per round [bos] + enc("[INST] {q.strip()} [/INST]") + enc("{a.strip()} ") + [eos]
              (Code Llama - Instruct, as `Tokenizer.chat_prompt` lays out finished turns)
    Labels copy the answer ids (and eos) and are IGNORE_ID everywhere else."""
    if template not in TEMPLATES:
        raise ValueError(f"qa: template must be one of {TEMPLATES} (got {template!r})")
    if template == "inst":
        dialog = [{"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))]
        rounds = tok.chat_turns(dialog, answered=True)
    else:
        rounds = [((VICUNA_SYSTEM + " " if i == 0 else "") + f"USER: {q} ASSISTANT:", a)
                  for i, (q, a) in enumerate(turns)]
    ids, labels = [], []
    for i, (prompt_text, answer) in enumerate(rounds):
        prompt = ([tok.bos_id] if template == "inst" or i == 0 else []) + tok.sp.encode(prompt_text)
        reply = tok.sp.encode(answer) + [tok.eos_id]
        ids += prompt + reply
        labels += [IGNORE_ID] * len(prompt) + reply
    return ids, labels


def pad_sample(ids: list[int], labels: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Truncate/pad to `length` (pad id in ids, IGNORE_ID in labels); None when no answer token is left."""
    ids, labels = ids[:length], labels[:length]
    if all(x == IGNORE_ID for x in labels):
        return None
    pad = length - len(ids)
    return (np.array(ids + [pad_id] * pad, dtype=np.int32),
            np.array(labels + [IGNORE_ID] * pad, dtype=np.int32))


# ---- WikiText -----------------------------------------------------------------------------------
def clean_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation (MindFormers' / Megatron's wikitext_detokenizer rules)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in ":;.!?,":
        text = text.replace(f" {p} ", f"{p} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" " + chr(176) + " ", chr(176))
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ").replace(" 's", "'s")
    return text


def wiki_paragraphs(path: str | os.PathLike) -> Iterator[str]:
    """Raw paragraphs (blank-line separated) of a WikiText file, heading paragraphs ("= ... =")
    skipped; streamed, so wikitext-103 never sits in memory. Clean them with `clean_wikitext`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WikiText file not found (e.g. wikitext-2-raw/wiki.train.raw)")
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
                    continue
                if lines and not lines[0].strip().startswith("="):
                    yield "".join(lines)
                lines = []
    except UnicodeDecodeError:
        check_utf8(path, "WikiText file")  # names the byte and line
        raise
    if lines and not lines[0].strip().startswith("="):
        yield "".join(lines)


# ---- source trees -------------------------------------------------------------------------------
def code_files(src: str | os.PathLike | Sequence[str | os.PathLike], glob: str = "**/*.py",
               max_files: int | None = None) -> list[Path]:
    """Files under each folder matching `glob` (sorted by path; files given directly are kept, and
    must be UTF-8), the first `max_files` of them."""
    found: list[Path] = []
    for root in [src] if isinstance(src, (str, os.PathLike)) else src:
        root = Path(root)
        if root.is_file():  # named by the user: it must be text (files found by the glob are skipped if not)
            read_text(root, "source file (UTF-8)")
            found.append(root)
        elif root.is_dir():
            matched = sorted((p for p in root.glob(glob) if p.is_file()), key=lambda p: str(p))
            if not matched:
                raise ValueError(f"{root}: no files match --glob {glob!r} (use '**/*.py' to search subfolders)")
            found += matched
        else:
            raise FileNotFoundError(f"{root}: source folder not found")
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"code: max_files must be >= 1 (got {max_files})")
        found = found[:max_files]
    return found


# ---- per-process encoders (picklable; the tokenizer loads once per process) ---------------------
class Encoder:
    """Base: holds the tokenizer path, loads SentencePiece lazily, maps a chunk of units."""

    def __init__(self, tokenizer_path: str | os.PathLike) -> None:
        self.tokenizer_path = str(tokenizer_path)
        self._tok: Tokenizer | None = None

    @property
    def tok(self) -> Tokenizer:
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        return self._tok

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}

    def __call__(self, units: list) -> list:
        return [self.encode(unit) for unit in units]

    def encode(self, unit):
        raise NotImplementedError


class QAEncoder(Encoder):
    """turns -> (length before padding, ids, labels) or (length, None, None) when dropped."""

    def __init__(self, tokenizer_path, seq_length: int, template: str) -> None:
        super().__init__(tokenizer_path)
        self.length, self.template = seq_length + 1, template

    def encode(self, turns: Turns):
        ids, labels = qa_tokens(self.tok, turns, self.template)
        sample = pad_sample(ids, labels, self.length, self.tok.pad_id)
        return (len(ids), None, None) if sample is None else (len(ids), *sample)


class WikiEncoder(Encoder):
    """raw paragraph -> (length, bos + ids + eos, "plain")."""

    def encode(self, paragraph: str):
        text = clean_wikitext(paragraph).strip()
        if not text:
            return 0, None, "empty"
        ids = np.array(self.tok.encode(text, bos=True, eos=True), dtype=np.int32)
        return len(ids), ids, "plain"


class CodeEncoder(Encoder):
    """(index, file) -> (length, ids, layout) with layout plain/psm/spm, or (0, None, reason) for an
    empty or non-UTF-8 file. FIM draws come from a generator seeded by (seed, index), so the
    output does not depend on how files are spread over processes."""

    def __init__(self, tokenizer_path, fim_rate: float, seed: int) -> None:
        super().__init__(tokenizer_path)
        self.fim_rate, self.seed = fim_rate, seed

    def encode(self, unit: tuple[int, str]):
        from cllama.data.fim import document_ids

        index, path = unit
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return 0, None, "not_utf8"
        if not text.strip():
            return 0, None, "empty"
        ids, layout = document_ids(self.tok, text, np.random.default_rng([self.seed, index]), self.fim_rate)
        return len(ids), np.array(ids, dtype=np.int32), layout
