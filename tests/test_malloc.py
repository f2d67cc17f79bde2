"""glibc malloc settings for CPU training (gptkit.malloc)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Run in a fresh interpreter: what earlier tests loaded (and how they left the heap) must
# not decide where the next allocation comes from.
PROBE = """
import ctypes, json, resource, torch
from gptkit import malloc

def faults_per_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(768, 1024).fill_(1.0)  # 3 MB, written in full
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(malloc.M_MMAP_THRESHOLD, 128 << 10)  # glibc's starting values, held fixed
libc.mallopt(malloc.M_TRIM_THRESHOLD, 128 << 10)
faults_per_round()
default = faults_per_round()
took = malloc.keep_freed_memory()
faults_per_round()  # the first round may still grow the heap
print(json.dumps({"default": default, "took": took, "kept": faults_per_round()}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_freed_activations_come_back_without_page_faults():
    """Guards what the setting is for: a 3 MB tensor allocated, written and freed over and
    over is faulted in afresh every round under glibc's starting thresholds (128 KB), and
    not at all once keep_freed_memory() has run."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["took"]
    assert result["default"] > 100  # 768 pages of 4 KB, mapped afresh each round
    assert result["kept"] < 10
