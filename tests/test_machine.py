"""machine.py's memory helpers, in fresh processes: freed heap blocks stay resident until released
(release_free_heap) or are never pooled (unpool_large_blocks)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from lorakit.machine import release_free_heap, unpool_large_blocks

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "unpool":
    assert unpool_large_blocks(1 << 20)
big = b"x" * (8 << 20)
del big  # glibc raises its mmap threshold past 8 MB: the 2 MB blocks below come from its heap
blocks = [b"y" * (2 << 20) for _ in range(150)]
pin = b"z" * (2 << 20)  # after them on the heap, so freeing them cannot shrink the heap from the top
start = rss_mb()
del blocks
freed = rss_mb()
released = release_free_heap()
print(start - freed, start - rss_mb(), released)
"""


def run(mode: str) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    freed, released, flag = out.stdout.split()
    return float(freed), float(released), int(flag)


def test_freed_heap_blocks_stay_resident_until_released():
    freed, released, flag = run("pooled")
    assert freed < 100  # 300 MB freed, still resident
    assert released > 250 and flag == 1


def test_unpooled_blocks_leave_the_process_when_freed():
    freed, _, _ = run("unpool")
    assert freed > 250
