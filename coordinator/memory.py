"""What the coordinator's model costs in host memory, and the start-up check against the host.

Contract: the coordinator holds at most COPIES fp32 copies of the model at once (global weights,
outer momentum, the merge's per-tensor working set and bounded buffers: downlink history, pending
compressed deltas), so `required_bytes(params)` = COPIES x 4 x params. `check_fits` runs before the
model is allocated (coordinator/state.py) and raises ValueError naming both figures when the host
cannot hold it, which the CLI prints as one line.
"""

from __future__ import annotations

import os

import torch

COPIES = 3  # fp32 model copies the coordinator may hold at its peak


def count_params(model_config) -> int:
    """Parameters of common/model.py GPT(model_config) (tied weights once), without allocating them."""
    from geotrain.common.model import GPT

    with torch.device("meta"):
        model = GPT(model_config)
    return sum(p.numel() for p in model.parameters())


def required_bytes(params: int) -> int:
    return COPIES * 4 * int(params)


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by a cgroup limit when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            used = 0
            for usage in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(usage).read().strip())
                    break
                except (OSError, ValueError):
                    continue
            available = min(available, max(0, int(text) - used))
        break
    return int(available)


def check_fits(params: int, preset: str, available: int | None = None) -> None:
    """ValueError when `params` fp32 parameters (COPIES copies) exceed the host's available memory."""
    if params <= 0:
        raise ValueError(f"params must be > 0, got {params}")
    need = required_bytes(params)
    have = available_bytes() if available is None else int(available)
    if need > have:
        raise ValueError(
            f"model {preset!r} ({params / 1e6:.0f}M parameters) needs {need / 2**30:.1f} GiB of memory "
            f"on the coordinator ({COPIES} fp32 copies) but this host has {have / 2**30:.1f} GiB available"
        )


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 when unknown)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


MMAP_THRESHOLD_BYTES = 1 << 20  # glibc: allocations from 1 MiB up are mmapped, so freeing returns them


def tune_malloc() -> bool:
    """Make glibc return freed large buffers to the system. Its default threshold for mmapped
    allocations grows to 32 MiB after the first large free, after which pushed blobs and decode
    buffers (MBs to tens of MBs) land in per-thread heaps that keep their pages: the coordinator's
    RSS then grows with the gRPC threads that ever held a blob. A fixed threshold (M_MMAP_THRESHOLD,
    which also ends the growth) keeps them mmapped. Returns False where glibc is not there."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
