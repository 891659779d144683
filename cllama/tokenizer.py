"""SentencePiece tokenizer for Code Llama: infilling pieces, suffix encoding, FIM and chat prompts."""
from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from cllama.fileio import atomic_write, check_destination

PREFIX, SUFFIX, MIDDLE, EOT = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
SENTINEL = "☺"  # prepended to the suffix and dropped, so the suffix gets no dummy leading space
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
MODES = ("completion", "infill", "chat")  # the prompt layouts a generation can take


def bundled_tokenizer_path() -> Path:
    """The Llama 2 SentencePiece model (32000 pieces) shipped with cllama."""
    return Path(str(resources.files("cllama") / "assets" / "llama2_tokenizer.model"))


def load_sentencepiece(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePiece model file, loaded; a file that is not one (random bytes, a Hugging Face
    tokenizer.json, an empty file) is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; pass its tokenizer.model (a SentencePiece model file)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a SentencePiece model ({reason[:120]}); pass a tokenizer.model "
                         "(Llama 2 / Code Llama's, or `cllama tokenizer extend --dst tokenizer.model`)") from None
    if sp.vocab_size() <= 0:
        raise ValueError(f"{path}: not a usable SentencePiece model (no pieces); pass a Llama tokenizer.model")
    return sp


def check_tokenizer(path: str | os.PathLike) -> Path:
    """`path` when it is a loadable SentencePiece model file (FileNotFoundError / ValueError naming it
    otherwise): check a tokenizer before copying it anywhere or starting work with it."""
    Tokenizer(path)
    return Path(path)


class Tokenizer:
    """Wraps a SentencePiece model. Infill ids are looked up by piece; absent pieces give None."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.path = Path(model_path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found; pass a SentencePiece "
                                    "tokenizer.model (cllama ships one: `cllama tokenizer extend`)")
        self.sp = load_sentencepiece(self.path)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0  # MindFormers uses <unk>=0
        self.prefix_id = self.piece_id(PREFIX)
        self.suffix_id = self.piece_id(SUFFIX)
        self.middle_id = self.piece_id(MIDDLE)
        self.eot_id = self.piece_id(EOT)
        sentinel = self.sp.encode(SENTINEL)
        self._sentinel = sentinel

    def piece_id(self, piece: str) -> int | None:
        """Id of a piece, or None when the vocabulary lacks it."""
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    @property
    def has_infill(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    def require_infill(self) -> None:
        if not self.has_infill:
            raise ValueError(
                f"{self.path}: this tokenizer has no infilling pieces ({PREFIX} {SUFFIX} {MIDDLE} {EOT}); "
                "Code Llama - Python and all 34B models cannot infill. Use a 7B/13B base or Instruct "
                "tokenizer, or build one with `cllama tokenizer extend`.")

    # ---- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_infilling(self, text: str) -> list[int]:
        """Encode without SentencePiece's dummy leading space (for the suffix)."""
        ids = self.sp.encode(SENTINEL + text)
        n = len(self._sentinel)
        if ids[:n] != self._sentinel:
            raise ValueError(f"encode_infilling: the sentinel merged with the text {text[:20]!r}")
        return ids[n:]

    # ---- prompts -----------------------------------------------------------------------------
    def infill_prompt(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """PSM: bos PRE prefix SUF suffix MID. SPM (suffix_first): bos PRE SUF suffix MID prefix."""
        self.require_infill()
        if suffix_first:
            return ([self.bos_id, self.prefix_id, self.suffix_id] + self.encode_infilling(suffix)
                    + [self.middle_id] + self.encode(prefix, bos=False))
        return ([self.bos_id, self.prefix_id] + self.encode(prefix, bos=False) + [self.suffix_id]
                + self.encode_infilling(suffix) + [self.middle_id])

    @staticmethod
    def chat_turns(dialog: Sequence[dict], answered: bool = False) -> list[tuple[str, Optional[str]]]:
        """The Code Llama - Instruct template, the one place it is written: (prompt text, answer
        text) per exchange, `"[INST] {user} [/INST]"` and `"{answer} "` (both stripped); the last
        user turn has answer None. An optional leading system message is folded into the first user
        turn as `<<SYS>>\n{system}\n<</SYS>>\n\n{user}`. Roles must alternate user/assistant
        (after the system message) and end with user, or with `answered` (training data) with the
        assistant, and then every exchange has its answer. Each exchange is encoded bos + prompt +
        answer + eos; an unanswered last one, bos + prompt."""
        dialog = list(dialog)
        if not dialog:
            raise ValueError("chat: empty dialog; give at least one {'role': 'user', 'content': ...}")
        for i, msg in enumerate(dialog):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"chat: message {i} must be a dict with 'role' and 'content'")
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError("chat: a system message must be followed by a user message")
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        for i, msg in enumerate(dialog):
            want = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != want:
                raise ValueError(f"chat: message {i} has role {msg['role']!r}, expected {want!r}; roles "
                                 "go (system), user, assistant, user, ... and end with user")
        last = "assistant" if answered else "user"
        if dialog[-1]["role"] != last:
            raise ValueError(f"chat: the last message must come from the {last}")
        turns: list[tuple[str, Optional[str]]] = [
            (f"{B_INST} {u['content'].strip()} {E_INST}", f"{a['content'].strip()} ")
            for u, a in zip(dialog[0::2], dialog[1::2])]
        return turns if answered else turns + [(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", None)]

    def chat_prompt(self, dialog: Sequence[dict]) -> list[int]:
        """Prompt ids of an Instruct dialog (chat_turns), each finished exchange encoded as one text
        the way Meta's chat_completion does: bos + enc(prompt + " " + answer) + eos, then bos + enc(last)."""
        ids: list[int] = []
        for prompt, answer in self.chat_turns(dialog):
            ids += self.encode(prompt if answer is None else f"{prompt} {answer}", bos=True, eos=answer is not None)
        return ids


def extended_model(src: str | os.PathLike) -> bytes:
    """The bytes of `src` (a 32000-piece Llama 2 SentencePiece model) with Code Llama's 16 pieces
    appended: infilling pieces at 32007..32010 (`▁<PRE>`, `▁<SUF>`, `▁<MID>`, `▁<EOT>`), reserved
    placeholders elsewhere."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    src = Path(src)
    check_tokenizer(src)  # the same one-line errors as every tokenizer load
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(src.read_bytes())
    except Exception as err:  # protobuf DecodeError
        raise ValueError(f"{src}: not a SentencePiece model ({err})") from None
    if len(proto.pieces) != 32000:
        raise ValueError(f"{src}: has {len(proto.pieces)} pieces; extend expects the 32000-piece "
                         "Llama 2 tokenizer")
    existing = {p.piece for p in proto.pieces}
    added = [f"<reserved_{i}>" for i in range(7)] + [PREFIX, SUFFIX, MIDDLE, EOT] + \
            [f"<reserved_{i}>" for i in range(7, 12)]
    clash = existing.intersection(added)
    if clash:
        raise ValueError(f"{src}: already has pieces {sorted(clash)}")
    for piece in added:
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def extend_tokenizer(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `extended_model(src)` to `dst` (atomically): Code Llama's 32016-piece tokenizer from Llama 2's.
    An existing `dst` is refused unless `overwrite` or it already holds exactly these bytes."""
    data = extended_model(src)
    dst = Path(dst)
    if not (dst.is_file() and dst.read_bytes() == data):
        check_destination(dst, overwrite)
    return atomic_write(dst, data)
