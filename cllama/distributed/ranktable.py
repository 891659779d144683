"""HCCL rank tables for Ascend clusters (REFERENCE.md section 6): make one per server, merge them.

A table lists, per server, each NPU's id, its RoCE IP (from `hccn_tool -i ID -ip -g` or the
`address_ID=IP` lines of /etc/hccn.conf) and its global rank; every value is a string.
On ModelArts the platform provides the table at /user/config/jobstart_hccl.json: use that.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cllama.fileio import read_json, write_json

MODELARTS_RANK_TABLE = Path("/user/config/jobstart_hccl.json")
HCCN_CONF = Path("/etc/hccn.conf")
_RANGE = re.compile(r"^\[\s*(\d+)\s*,\s*(\d+)\s*[)\]]$")


def parse_device_range(text: str) -> list[int]:
    """Device ids of MindFormers' `--device_num` range, e.g. "[0,8)" -> 0..7. A closing "]" reads
    the same as ")" (MindFormers' hccl_tools takes range(first, last) either way). Ids lie in
    0..8 and a range crossing 4 must be the whole server [0,8) (HCCS groups of 4 NPUs)."""
    m = _RANGE.match(text.strip())
    if not m:
        raise ValueError(f"--device-num {text!r}: write a range like \"[0,8)\" (devices 0-7) or \"[4,8)\"")
    first, last = int(m.group(1)), int(m.group(2))
    if last > 8:
        raise ValueError(f"--device-num {text!r}: device ids go up to 8 on one server")
    if first >= last:
        raise ValueError(f"--device-num {text!r}: the first id must be below the last (an empty range)")
    if first < 4 < last and (first, last) != (0, 8):
        raise ValueError(f"--device-num {text!r}: a range must stay within [0,4) or [4,8), or be all of [0,8)")
    return list(range(first, last))


def read_hccn_conf(path: str | os.PathLike = HCCN_CONF) -> dict[int, str]:
    """Device IPs from an hccn.conf (`address_<id>=<ip>` lines)."""
    path = Path(path)
    ips = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*address_(\d+)\s*=\s*(\S+)\s*$", line)
        if m:
            ips[int(m.group(1))] = m.group(2)
    return ips


def _hccn_tool_ip(device: int) -> Optional[str]:
    try:
        out = subprocess.run(["hccn_tool", "-i", str(device), "-ip", "-g"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"ipaddr:\s*(\S+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else None


def device_ips(devices: Sequence[int], hccn_conf: str | os.PathLike | None = None) -> dict[int, str]:
    """IP of every device: from `hccn_conf` when given, else hccn_tool, else /etc/hccn.conf."""
    if hccn_conf is not None:
        path = Path(hccn_conf)
        if not path.is_file():
            raise FileNotFoundError(f"--hccn-conf {path}: file not found; it needs lines address_<id>=<ip>")
        return _pick(devices, read_hccn_conf(path), str(path))
    if shutil.which("hccn_tool"):
        found = {d: _hccn_tool_ip(d) for d in devices}
        if all(found.values()):
            return found
    if HCCN_CONF.is_file():
        return _pick(devices, read_hccn_conf(HCCN_CONF), str(HCCN_CONF))
    raise FileNotFoundError(
        "no source of device IPs: hccn_tool is not on PATH (or gave no ipaddr) and /etc/hccn.conf does "
        "not exist; run this on the Ascend server, or pass --hccn-conf FILE with lines address_<id>=<ip>")


def _pick(devices: Sequence[int], ips: dict[int, str], source: str) -> dict[int, str]:
    missing = [d for d in devices if d not in ips]
    if missing:
        raise ValueError(f"{source}: no address_<id> line for devices {missing}; it lists {sorted(ips)}")
    return {d: ips[d] for d in devices}


def host_ip() -> str:
    """This machine's IP as its hostname resolves."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        raise ValueError("cannot resolve this host's IP; pass --server-ip") from None


def make_rank_table(device_num: str, server_ip: Optional[str] = None,
                    hccn_conf: str | os.PathLike | None = None) -> dict:
    """A one-server rank table for the devices of `device_num` (e.g. "[0,8)")."""
    devices = parse_device_range(device_num)
    ips = device_ips(devices, hccn_conf)
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server_ip or host_ip(),
                             "device": [{"device_id": str(d), "device_ip": ips[d], "rank_id": str(i)}
                                        for i, d in enumerate(devices)],
                             "host_nic_ip": "reserve"}],
            "status": "completed"}


def read_rank_table(path: str | os.PathLike) -> dict:
    """Read and check a rank table (server_count matches server_list; device entries complete)."""
    path = Path(path)
    table = read_json(path, "HCCL rank table", "write one with `cllama ranktable make`")
    servers = table.get("server_list") if isinstance(table, dict) else None
    if not isinstance(servers, list) or not servers:
        raise ValueError(f"{path}: no server_list; is this an hccl rank table?")
    if str(table.get("server_count")) != str(len(servers)):
        raise ValueError(f"{path}: server_count={table.get('server_count')!r} but server_list has "
                         f"{len(servers)} entries")
    for i, server in enumerate(servers):
        if "server_id" not in server or not isinstance(server.get("device"), list):
            raise ValueError(f"{path}: server_list[{i}] needs server_id and a device list")
        for j, dev in enumerate(server["device"]):
            missing = [k for k in ("device_id", "device_ip", "rank_id") if k not in dev]
            if missing:
                raise ValueError(f"{path}: server_list[{i}].device[{j}] lacks {missing}")
    return table


def merge_rank_tables(paths: Sequence[str | os.PathLike]) -> dict:
    """Concatenate server_list in argument order, sum server_count, renumber rank_id from 0."""
    if len(paths) < 2:
        raise ValueError("ranktable merge: give at least two rank tables")
    servers, seen = [], {}
    for path in paths:
        for server in read_rank_table(path)["server_list"]:
            if server["server_id"] in seen:
                raise ValueError(f"{path}: server {server['server_id']} already comes from {seen[server['server_id']]}")
            seen[server["server_id"]] = str(path)
            servers.append(json.loads(json.dumps(server)))
    rank = 0
    for server in servers:
        for dev in server["device"]:
            dev["rank_id"] = str(rank)
            rank += 1
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}


def write_rank_table(table: dict, path: str | os.PathLike) -> Path:
    """Write a table as JSON (atomically)."""
    return write_json(path, table, indent=4)


def default_name(table: dict) -> str:
    """MindFormers' file name: hccl_<N>p_<device ids>_<server ip>.json (first server)."""
    server = table["server_list"][0]
    ids = "".join(d["device_id"] for d in server["device"])
    count = sum(len(s["device"]) for s in table["server_list"])
    return f"hccl_{count}p_{ids}_{server['server_id']}.json"


def platform_rank_table() -> Optional[Path]:
    """ModelArts' own rank table when this runs on ModelArts, else None."""
    return MODELARTS_RANK_TABLE if MODELARTS_RANK_TABLE.is_file() else None


def node_rank_table(device_num: str, server_ip: Optional[str] = None, hccn_conf: str | os.PathLike | None = None,
                    use_platform: bool = True) -> tuple[dict, Optional[Path]]:
    """This node's table and where it came from: ModelArts' own when present (and `use_platform`),
    else one built for `device_num` (source None)."""
    platform = platform_rank_table() if use_platform else None
    if platform is not None:
        return read_rank_table(platform), platform
    return make_rank_table(device_num, server_ip, hccn_conf), None
