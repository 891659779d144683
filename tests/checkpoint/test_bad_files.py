"""Damaged weights files: cllama's readers check .ckpt records and safetensors headers against the
file itself, so a truncated or damaged file is one line naming it (exit 2, no traceback) and nothing
is written; `ckpt transform --rank` outside the destination layout writes nothing either.

The valid bases come from the real writers (MindSpore's save_checkpoint, .ckpt and safetensors; the
safetensors library for a Hugging Face folder); each test damages a copy."""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from cllama.cli import main

TEMPORARY = (".partial-", ".work-", ".old-")


@pytest.fixture(scope="module")
def bases(make_model_dir, tmp_path_factory):
    """{"ckpt": model dir with model.ckpt, "ms_st": with model.safetensors (both MindSpore's
    save_checkpoint), "hf": a Hugging Face folder written by safetensors.numpy.save_file}."""
    from safetensors.numpy import save_file

    from cllama.checkpoint.ckpt_file import CkptFile
    from cllama.checkpoint.model_dir import load_model_dir, save_model_dir
    from cllama.checkpoint.names import ms_to_hf_name
    from cllama.config import ModelConfig

    ckpt = make_model_dir(seed=3, tokenizer=False)
    root = tmp_path_factory.mktemp("bases")
    save_model_dir(load_model_dir(ckpt), root / "ms_st", fmt="safetensors")
    (root / "hf").mkdir()
    f = CkptFile(ckpt / "model.ckpt")
    save_file({ms_to_hf_name(n): f.get(n) for n in f.keys()}, str(root / "hf" / "model.safetensors"),
              metadata={"format": "pt"})
    (root / "hf" / "config.json").write_text(json.dumps(ModelConfig.load(ckpt).to_hf()))
    return {"ckpt": ckpt, "ms_st": root / "ms_st", "hf": root / "hf"}


# ---- damage -------------------------------------------------------------------------------------
def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(path: Path, header, body: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _edit(change):
    """A damage that edits the parsed header (`change(header)`) and writes the file again."""
    def damage(path: Path) -> None:
        header, body = _header(path)
        _rewrite(path, change(header) or header, body)
    return damage


def _first(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _overlap(header: dict) -> None:
    """The second of two same-shaped tensors points at the first's bytes."""
    by_shape: dict = {}
    for name, entry in header.items():
        if name != "__metadata__":
            by_shape.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(entry)
    a, b = next(group for group in by_shape.values() if len(group) > 1)[:2]
    b["data_offsets"] = list(a["data_offsets"])


def _bytes(change):
    def damage(path: Path) -> None:
        path.chmod(0o644)
        path.write_bytes(change(path.read_bytes()))
    return damage


def _not_json(data: bytes) -> bytes:
    return data[:8] + b"\xff" + data[9:]


SAFETENSORS_DAMAGE = {  # name: (damage, what the one line says)
    "truncated": (_bytes(lambda d: d[:-100]), "truncated safetensors file: tensor '.*': data_offsets .* reach "
                                              "outside the file"),
    "first 1000 bytes": (_bytes(lambda d: d[:1000]), "truncated safetensors file: the header length says"),
    "header length past the end": (_bytes(lambda d: struct.pack("<Q", len(d)) + d[8:]), "the header length says"),
    "first 4 bytes": (_bytes(lambda d: d[:4]), "shorter than the 8-byte header length"),
    "header not JSON": (_bytes(_not_json), "header is not JSON"),
    "header a JSON list": (lambda p: _rewrite(p, [1, 2], _header(p)[1]), "the header is not a JSON object"),
    "overlapping offsets": (_edit(_overlap), r"data_offsets \[\d+, \d+\] overlap those of tensor"),
    "unknown dtype": (_edit(lambda h: _first(h).update(dtype="F99")), "unknown dtype 'F99'"),
    "size mismatch": (_edit(lambda h: _first(h)["shape"].__setitem__(0, _first(h)["shape"][0] + 1)),
                      r"hold \d+ bytes but F32 of shape \[\d+.*\] needs \d+"),
    "negative dim": (_edit(lambda h: _first(h)["shape"].__setitem__(0, -1)), "not a list of non-negative integers"),
    "offsets reversed": (_edit(lambda h: _first(h).update(data_offsets=_first(h)["data_offsets"][::-1])),
                         r"are not \[begin, end\] with 0 <= begin <= end"),
}

CKPT_DAMAGE = {
    "truncated": (_bytes(lambda d: d[:-100]), r"truncated: an entry at offset \d+ needs \d+ bytes, the file has"),
    "first 1000 bytes": (_bytes(lambda d: d[:1000]), "truncated: an entry at offset 0 needs"),
    "unknown tensor type": (_bytes(lambda d: d.replace(b"Float32", b"Float99", 1)), "unknown tensor type 'Float99'"),
    "dims against content": (_bytes(lambda d: d.replace(b"\x08\x40\x12\x07Float32", b"\x08\x41\x12\x07Float32", 1)),
                             r"of shape \(\d+, 65\) has \d+ bytes, needs \d+"),
    "content length past its record": (_bytes(lambda d: d.replace(b"Float32\x1a\x80\x02", b"Float32\x1a\x80\x03", 1)),
                                       r"declares 384 bytes but its record ends at offset \d+"),
}


def _damaged(base: Path, tmp_path: Path, name: str, damage) -> Path:
    folder = shutil.copytree(base, tmp_path / "bad")
    damage(folder / name)
    return folder / name


def _one_line_error(argv: list[str], capfd, prefix: str, bad: Path, fragment: str, out: Path) -> str:
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prefix}: error: {bad}: "), err
    assert re.search(fragment, err), err
    assert not out.exists()
    left = [p.name for p in out.parent.iterdir() if any(t in p.name for t in TEMPORARY)]
    assert not left, left
    return err


# ---- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE)
@pytest.mark.parametrize("base, direction", [("hf", "hf2ms"), ("ms_st", "ms2hf")], ids=["hugging-face", "mindspore"])
def test_damaged_safetensors_is_one_line(bases, base, direction, damage, tmp_path, capfd):
    change, fragment = SAFETENSORS_DAMAGE[damage]
    bad = _damaged(bases[base], tmp_path, "model.safetensors", change)
    out = tmp_path / "out"
    _one_line_error(["convert", direction, "--src", str(bad.parent), "--dst", str(out), "--no-progress"], capfd,
                    "cllama convert", bad, fragment, out)


@pytest.mark.parametrize("damage", CKPT_DAMAGE)
def test_damaged_ckpt_is_one_line(bases, damage, tmp_path, capfd):
    change, fragment = CKPT_DAMAGE[damage]
    bad = _damaged(bases["ckpt"], tmp_path, "model.ckpt", change)
    out = tmp_path / "out"
    err = _one_line_error(["convert", "ms2hf", "--src", str(bad.parent), "--dst", str(out), "--no-progress"],
                          capfd, "cllama convert", bad, fragment, out)
    assert "not a complete unencrypted MindSpore checkpoint" in err


@pytest.mark.parametrize("base, name, damage", [("ckpt", "model.ckpt", "truncated"),
                                                ("ms_st", "model.safetensors", "overlapping offsets")])
def test_transform_of_a_damaged_file_is_one_line(bases, base, name, damage, tmp_path, capfd):
    change, fragment = (CKPT_DAMAGE if name.endswith(".ckpt") else SAFETENSORS_DAMAGE)[damage]
    bad = _damaged(bases[base], tmp_path, name, change)
    out = tmp_path / "shards"
    _one_line_error(["ckpt", "transform", "--src", str(bad.parent), "--dst", str(out), "--mp", "2"], capfd,
                    "cllama ckpt", bad, fragment, out)


def test_loading_a_damaged_model_dir_names_the_file(bases, tmp_path):
    from cllama.checkpoint.model_dir import load_model_dir

    bad = _damaged(bases["ms_st"], tmp_path, "model.safetensors", SAFETENSORS_DAMAGE["truncated"][0])
    with pytest.raises(ValueError, match=rf"^{bad}: truncated safetensors file: .*download it again"):
        load_model_dir(bad.parent)


def test_the_real_writers_files_pass_the_checks(bases):
    from cllama.checkpoint.ckpt_file import CkptFile
    from cllama.checkpoint.safetensors_file import SafetensorsFile

    assert len(CkptFile(bases["ckpt"] / "model.ckpt").keys()) == 21
    assert len(SafetensorsFile(bases["ms_st"] / "model.safetensors").keys()) == 21
    assert len(SafetensorsFile(bases["hf"] / "model.safetensors").keys()) == 21


@pytest.mark.parametrize("argv, message", [
    (["--mp", "2", "--rank", "5"], "--rank 5: the destination layout dp1 mp2 pp1 has ranks 0-1; give one of them"),
    (["--dp", "2", "--mp", "2", "--rank", "4"], "--rank 4: the destination layout dp2 mp2 pp1 has ranks 0-3"),
    (["--rank", "1"], "--rank 1: the destination layout a full checkpoint .* has only rank 0;"),
])
def test_transform_rank_outside_the_layout_writes_nothing(bases, argv, message, tmp_path, capfd):
    out = tmp_path / "T"
    capfd.readouterr()
    assert main(["ckpt", "transform", "--src", str(bases["ckpt"]), "--dst", str(out), *argv]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_transform_rank_in_the_layout_writes_only_its_shard(bases, tmp_path, capfd):
    out = tmp_path / "T"
    assert main(["ckpt", "transform", "--src", str(bases["ckpt"]), "--dst", str(out), "--mp", "2", "--rank", "1"]) == 0
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "T", "T/rank_1", "T/rank_1/checkpoint_1.ckpt"]


def test_merge_of_a_damaged_shard_is_one_line(bases, tmp_path, capfd):
    from cllama.config import ModelConfig
    from cllama.distributed.strategy import make_parallel, param_layouts
    from cllama.distributed.transform import transform

    layouts = param_layouts(ModelConfig.load(bases["ckpt"]), make_parallel(model_parallel=2))
    transform(bases["ckpt"], tmp_path / "shards", dst_strategy=layouts, verify=False, progress=False)
    bad = tmp_path / "shards" / "rank_1" / "checkpoint_1.ckpt"
    CKPT_DAMAGE["truncated"][0](bad)
    out = tmp_path / "merged"
    _one_line_error(["ckpt", "merge", "--src", str(tmp_path / "shards"), "--dst", str(out)], capfd, "cllama ckpt",
                    bad, CKPT_DAMAGE["truncated"][1], out)
