"""`reuse_freed_memory`: the blocks a step frees are reused, not mapped fresh from the kernel."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from esper_func.core.allocator import reuse_freed_memory
torch.set_num_threads(1)
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
x = torch.ones(128, 64, 32, 32)  # 32 MiB: a packed activation of 8 cifar envs
faults, rss = [], []
for _ in range(12):  # an "iteration": two large temporaries, freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    z = torch.relu(y) + 1
    del y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20)
print(json.dumps({"applied": applied, "faults": faults, "rss_mib": rss}))
"""
BLOCK_PAGES = (32 << 20) // 4096


def probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults_and_memory_stops_growing() -> None:
    plain, reused = probe("plain"), probe("reuse")
    assert plain["applied"] is False and reused["applied"] is True
    # Without it every iteration maps its blocks afresh: each page faults in on first touch.
    assert all(count >= BLOCK_PAGES for count in plain["faults"])
    # With it the heap grows to the iteration's peak once, and later iterations reuse it.
    assert reused["faults"][0] >= BLOCK_PAGES
    assert all(count < BLOCK_PAGES // 100 for count in reused["faults"][-3:])
    assert len(set(reused["rss_mib"][-3:])) == 1
