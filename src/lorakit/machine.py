"""What this machine offers a job: memory the kernel can hand out and the cores this process may use."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any


def available_memory() -> int:
    """Bytes the kernel can hand out without swapping (MemAvailable), or free physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def usable_cores() -> int:
    """Physical cores this process may run on: its affinity mask (taskset, containers), hyperthreads of
    one core counted once, capped by a cgroup CPU quota (docker --cpus, Kubernetes limits)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = len(cores)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _glibc(name: str) -> Any:
    """The C library's function `name` (ctypes), or None where there is none (musl, macOS)."""
    libc_name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(libc_name), name) if libc_name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> int:
    """Hand memory that is free but still resident back to the kernel (glibc's malloc_trim); returns 1 if
    any was released, 0 if none or not on glibc.

    glibc serves allocations below its mmap threshold (which rises to 32 MB as large blocks are freed) from
    heaps it keeps: after many tensors of a few MB were read and freed (quantizing a model at load), their
    pages stay resident, measured 0.2-0.7 GB on a 1B model quantized to 8-bit."""
    trim = _glibc("malloc_trim")
    return int(trim(0)) if trim is not None else 0


M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def unpool_large_blocks(threshold: int) -> bool:
    """Have glibc map every block of at least `threshold` bytes on its own and unmap it when freed
    (mallopt M_MMAP_THRESHOLD, which also stops the threshold rising with each large free, up to 32 MB by
    default); returns whether it took effect (glibc only).

    Below the threshold, freed blocks go back to glibc's heaps, whose pages stay resident when the heap is
    fragmented. A quantized base is chosen to save memory, so `models/quantize.load_quantized` unpools
    blocks of 1 MB and up: the full-precision tensors read for quantizing, then the activations of every
    step. Measured on the 7B LLaMA shape in 8-bit, LoRA step without checkpointing: peak 8.74 GB, vs 9.38
    GB with a 4 MB threshold; the price is ~10% more s/step at 7B, ~35% at 1B (each activation is mapped
    afresh); docs/performance.md."""
    mallopt = _glibc("mallopt")
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) if mallopt is not None else False
