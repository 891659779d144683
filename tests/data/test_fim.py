"""Fill-in-the-middle documents: layouts match the infill prompts, and undoing the permutation
gives back the document."""
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from cllama.data.corpus import CodeEncoder
from cllama.data.fim import decode_nospace, document_ids, fim_ids, fim_split, fim_undo
from cllama.tokenizer import Tokenizer

DOC = 'def add(a, b):\n    """Sum."""\n    return a + b\n\n\nprint(add(1, 2))  # é ☃\n'
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tok(codellama_tokenizer_path):
    return Tokenizer(codellama_tokenizer_path)


def test_psm_spm_layouts(tok):
    prefix, middle, suffix = "def add(a, b):\n", "    return a + b", "\n\nprint(1)\n"
    psm = fim_ids(tok, prefix, middle, suffix, spm=False)
    assert psm == tok.infill_prompt(prefix, suffix) + tok.encode_infilling(middle) + [32010]
    assert psm[:2] == [1, 32007] and psm.count(32008) == psm.count(32009) == 1
    spm = fim_ids(tok, prefix, middle, suffix, spm=True)
    # SPM encodes prefix + middle together; here the prefix ends on a token boundary, so the
    # sample starts with the SPM infill prompt
    assert spm == tok.infill_prompt(prefix, suffix, suffix_first=True) + tok.encode_infilling(middle) + [32010]
    assert spm[:3] == [1, 32007, 32008]


def test_split_points_are_characters():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        p, m, s = fim_split(DOC, rng)
        assert p + m + s == DOC
        seen.add(len(p))
    assert len(seen) > len(DOC) // 2  # all character positions reachable, not token boundaries


@pytest.mark.parametrize("text", [DOC, "x", "", "  leading spaces\n", "\ttab\n", "☃☃", "a" * 50])
def test_undo_recovers_document_every_split(tok, text):
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1, max(1, len(text) // 7)):
            for spm in (False, True):
                ids = fim_ids(tok, text[:a], text[a:b], text[b:], spm)
                assert fim_undo(tok, ids, "spm" if spm else "psm") == text, (a, b, spm)
                if a > 0:  # an empty prefix makes PSM look like SPM; otherwise the ids tell
                    assert fim_undo(tok, ids) == text


def test_undo_stdlib_documents_through_the_encoder(tok, codellama_tokenizer_path):
    files = sorted(STDLIB.glob("*.py"), key=str)[:20]
    encoder = CodeEncoder(codellama_tokenizer_path, fim_rate=0.9, seed=3)
    results = encoder([(i, str(f)) for i, f in enumerate(files)])
    layouts = [layout for _, _, layout in results]
    assert {"psm", "spm"} <= set(layouts)
    for f, (n, ids, layout) in zip(files, results):
        assert n == len(ids) and fim_undo(tok, ids, layout) == f.read_text()
        if layout == "plain":
            assert ids[0] == 1 and ids[-1] == 2
        else:
            assert ids[-1] == 32010 and ((ids[2] == 32008) == (layout == "spm"))


def test_rate_and_psm_spm_balance(tok):
    rng = np.random.default_rng(0)
    layouts = [document_ids(tok, "x = 1\n", rng, 0.9)[1] for _ in range(2000)]
    counts = {k: layouts.count(k) for k in ("plain", "psm", "spm")}
    assert 140 < counts["plain"] < 260 and abs(counts["psm"] - counts["spm"]) < 150
    assert document_ids(tok, "x = 1\n", rng, 0.0) == (tok.encode("x = 1\n", bos=True, eos=True), "plain")


def test_decode_nospace_inverts_encode_infilling(tok):
    for text in [" x", "  return y", "\n", "é"]:
        assert decode_nospace(tok, tok.encode_infilling(text)) == text


def test_fim_needs_infill_pieces(llama2_tokenizer_path):
    with pytest.raises(ValueError, match="no infilling pieces"):
        fim_ids(Tokenizer(llama2_tokenizer_path), "a", "b", "c", spm=False)
