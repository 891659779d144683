import json

import pytest

from cllama.cli import main
from cllama.distributed import ranktable
from cllama.distributed.ranktable import make_rank_table, merge_rank_tables, parse_device_range, write_rank_table

HCCN = "".join(f"address_{i}=192.98.{92 + i // 4}.{100 + i}\nnetmask_{i}=255.255.255.0\n" for i in range(8))


@pytest.fixture
def hccn_conf(tmp_path):
    path = tmp_path / "hccn.conf"
    path.write_text(HCCN)
    return path


@pytest.mark.parametrize("text, ids", [("[0,8)", list(range(8))), ("[0,8]", list(range(8))),
                                       ("[4,8)", [4, 5, 6, 7]), ("[ 0 , 2 )", [0, 1]), ("[0,4]", [0, 1, 2, 3])])
def test_device_ranges(text, ids):
    assert parse_device_range(text) == ids


@pytest.mark.parametrize("text, why", [("0,8", "write a range"), ("[0,9)", "up to 8"), ("[3,3)", "empty"),
                                       ("[5,2)", "empty"), ("[2,6)", "within"), ("[-1,4)", "write a range"),
                                       ("(0,8)", "write a range")])
def test_bad_device_ranges(text, why):
    with pytest.raises(ValueError, match=why):
        parse_device_range(text)


def test_make_from_hccn_conf(hccn_conf):
    table = make_rank_table("[0,8)", server_ip="10.0.0.1", hccn_conf=hccn_conf)
    assert table["server_count"] == "1" and table["status"] == "completed" and table["version"] == "1.0"
    server = table["server_list"][0]
    assert server["server_id"] == "10.0.0.1" and server["host_nic_ip"] == "reserve"
    assert server["device"][5] == {"device_id": "5", "device_ip": "192.98.93.105", "rank_id": "5"}
    half = make_rank_table("[4,8]", server_ip="10.0.0.1", hccn_conf=hccn_conf)["server_list"][0]["device"]
    assert [d["device_id"] for d in half] == ["4", "5", "6", "7"] and half[0]["rank_id"] == "0"
    assert all(isinstance(v, str) for d in half for v in d.values())


def test_missing_ip_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="hccn-conf .*not found"):
        make_rank_table("[0,8)", "1.2.3.4", hccn_conf=tmp_path / "nope.conf")
    partial = tmp_path / "partial.conf"
    partial.write_text("address_0=1.1.1.1\n")
    with pytest.raises(ValueError, match="no address_<id> line for devices \\[1\\]"):
        make_rank_table("[0,2)", "1.2.3.4", hccn_conf=partial)
    monkeypatch.setattr(ranktable, "HCCN_CONF", tmp_path / "etc_hccn.conf")
    monkeypatch.setenv("PATH", str(tmp_path))  # no hccn_tool
    with pytest.raises(FileNotFoundError, match="no source of device IPs"):
        make_rank_table("[0,8)", "1.2.3.4")


def test_merge_renumbers_in_argument_order(tmp_path, hccn_conf):
    a = write_rank_table(make_rank_table("[0,8)", "10.0.0.1", hccn_conf), tmp_path / "a.json")
    b = write_rank_table(make_rank_table("[0,4)", "10.0.0.2", hccn_conf), tmp_path / "b.json")
    merged = merge_rank_tables([b, a])
    assert merged["server_count"] == "2"
    assert [s["server_id"] for s in merged["server_list"]] == ["10.0.0.2", "10.0.0.1"]
    ranks = [d["rank_id"] for s in merged["server_list"] for d in s["device"]]
    assert ranks == [str(i) for i in range(12)]
    assert json.loads(a.read_text())["server_list"][0]["device"][0]["rank_id"] == "0"  # inputs untouched
    with pytest.raises(ValueError, match="already comes from"):
        merge_rank_tables([a, a])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"server_count": "2", "server_list": [{"server_id": "x", "device": []}]}))
    with pytest.raises(ValueError, match="server_count='2' but server_list has 1"):
        merge_rank_tables([a, bad])


def test_cli(tmp_path, hccn_conf, capsys, monkeypatch):
    monkeypatch.setattr(ranktable, "MODELARTS_RANK_TABLE", tmp_path / "absent.json")
    out_a, out_b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    assert main(["ranktable", "make", "--device-num", "[0,8]", "--server-ip", "10.0.0.1",
                 "--hccn-conf", str(hccn_conf), "--out", str(out_a)]) == 0
    assert main(["ranktable", "make", "--device-num", "[0,8)", "--server-ip", "10.0.0.2",
                 "--hccn-conf", str(hccn_conf), "--out", str(out_b)]) == 0
    assert main(["ranktable", "merge", str(out_a), str(out_b), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["server_list"][1]["device"][7]["rank_id"] == "15"
    assert main(["ranktable", "make", "--device-num", "[0,9)", "--hccn-conf", str(hccn_conf)]) == 2
    assert "cllama ranktable: error: --device-num '[0,9)'" in capsys.readouterr().err


def test_modelarts_table_is_used_when_present(tmp_path, monkeypatch, capsys):
    platform = tmp_path / "jobstart_hccl.json"
    platform.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                                    "server_list": [{"server_id": "7.7.7.7", "device": [
                                        {"device_id": "0", "device_ip": "1.1.1.1", "rank_id": "0"}]}]}))
    monkeypatch.setattr(ranktable, "MODELARTS_RANK_TABLE", platform)
    out = tmp_path / "t.json"
    assert main(["ranktable", "make", "--device-num", "[0,8)", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["server_list"][0]["server_id"] == "7.7.7.7"
    assert "ModelArts" in capsys.readouterr().out
