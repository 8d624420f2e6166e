"""How much memory this process can still use: for checks that refuse work that cannot fit, up front."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def available_memory() -> int:
    """Bytes this process can still use: MemAvailable, capped by a cgroup (container) limit and by the
    process's address-space limit (ulimit -v)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    limit_as = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit_as != resource.RLIM_INFINITY:
        try:
            status = Path("/proc/self/status").read_text()
            mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            mapped = 0
        available = min(available, limit_as - mapped)
    return max(available, 0)
