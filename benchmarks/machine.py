"""The machine a benchmark runs on: CPU name, load, and peak resident memory of a call (Linux)."""

from __future__ import annotations

import platform
import re
from typing import Callable


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        if match:
            return match.group(1)
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: other processes on the machine skew timings."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1))


def peak_rss(fn: Callable[[], object]) -> tuple[int, int]:
    """Run ``fn()``; return this process's peak resident set size during it, in bytes, and the
    growth of that peak over the resident size just before (``VmHWM`` is reset to ``VmRSS``
    through ``/proc/self/clear_refs`` first).

    Freed tensor memory leaves the resident set at once only when the process runs with
    ``MALLOC_MMAP_THRESHOLD_`` low (the benchmarks start their memory children with 65536).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    return peak * 1024, (peak - before) * 1024
