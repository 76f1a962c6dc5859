"""How much memory a device has left, and byte counts as text."""

from __future__ import annotations

import os

import torch

GiB = 2**30


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when unknown.

    CUDA: free device memory plus what torch's caching allocator holds unused. CPU: MemAvailable
    from /proc/meminfo (else available physical pages from sysconf).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None



def size_text(nbytes: float) -> str:
    """Bytes as '1.23 GiB' / '45.60 MiB' / '3.00 KiB' / '12 B'."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
