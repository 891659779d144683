import numpy as np
import torch

from cllama.checkpoint.sources import _torch_tensors


def _rss_file_kib() -> int:
    """Resident pages of this process that are backed by files (memory-mapped reads)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_torch_files_are_read_without_keeping_their_pages(tmp_path):
    """torch.load(mmap=True) maps the file: without releasing pages after each tensor, reading a
    64 MiB .bin would leave 64 MiB resident in this process; the data must stay readable."""
    gen = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1024, 2048, generator=gen).to(torch.bfloat16) for i in range(16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    before = _rss_file_kib()
    for _ in range(2):  # twice: released pages are read back from the file
        for name, source in _torch_tensors(tmp_path / "pytorch_model.bin"):
            got = np.concatenate([c.copy() for c in source.chunks(1 << 20)])
            assert np.array_equal(got, state[name].view(torch.int16).numpy().view(np.uint16).reshape(-1))
            del got
    assert _rss_file_kib() - before < 16 * 1024  # KiB; the file is 64 MiB
