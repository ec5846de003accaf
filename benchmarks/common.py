"""What the benchmark scripts share: the machine, timing, peak memory, the revision, formatting.

Machine: CPU name, load average and the peak resident memory of a call (Linux ``/proc``).
Timing: :func:`timed` measures wall-clock and CPU time of one call, :func:`alternate` runs
several functions in turn (order flipped every repeat), :func:`summarise` and :func:`medians`
reduce the runs. Memory: :func:`measure_peak` (one call, CPU or CUDA) and
:func:`run_memory_child` (a fresh child process with ``MALLOC_MMAP_THRESHOLD_=65536``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The machine


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (a VM's "AMD EPYC" is Zen 2, 4
    or 5 by them)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {
        key: re.search(rf"^{key}\s*:\s*(.*)$", info, re.M)
        for key in ("model name", "cpu family", "model")
    }
    name = fields["model name"].group(1) if fields["model name"] else platform.processor()
    if fields["cpu family"] and fields["model"]:
        name += f" (family {fields['cpu family'].group(1)}, model {fields['model'].group(1)})"
    return name or "unknown CPU"


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: other processes on the machine skew timings."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def progress(message: str) -> None:
    """A time-stamped progress line on standard error."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing

# time.perf_counter (wall clock) and time.process_time (CPU seconds of all threads of this
# process; on a CPU shared with other jobs it counts the work done rather than the time spent
# waiting for a core).
CLOCKS = ("wall", "cpu")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``, and the CPU seconds of this process (all threads)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each run by clock and name: one warm-up each, then repeats alternating, the
    order flipped each time. ``{"wall": {name: [...]}, "cpu": {name: [...]}}``."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {c: {name: [] for name in names} for c in CLOCKS}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = timed(fns[name], device)
            for clock in CLOCKS:
                times[clock][name].append(seconds[clock])
    return times


def medians(by_name: dict[str, list[float]]) -> dict[str, float]:
    """The median of each name's runs."""
    return {name: statistics.median(ts) for name, ts in by_name.items()}


def summarise(
    times: dict[str, dict[str, list[float]]], reference: str = "baseline", other: str = "nl"
) -> dict[str, dict[str, float]]:
    """Per clock: medians (``<name>_s``), and the median, min and max over repeats of the ratio
    other / reference of the runs of one repeat."""
    summary = {}
    for clock, by_name in times.items():
        ratios = [o / r for r, o in zip(by_name[reference], by_name[other])]
        summary[clock] = {
            f"{reference}_s": statistics.median(by_name[reference]),
            f"{other}_s": statistics.median(by_name[other]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return summary


# ---------------------------------------------------------------------------------------------
# Peak memory


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
    ``MALLOC_MMAP_THRESHOLD_`` low (:func:`run_memory_child` starts its children with 65536).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    return peak * 1024, (peak - before) * 1024


def measure_peak(fn: Callable[[], object], device: str) -> dict[str, int]:
    """Peak memory of ``fn()``: absolute (``peak_bytes``), and its growth over the memory in use
    just before (``growth_bytes``). On CUDA ``torch.cuda.max_memory_allocated``, on CPU the
    resident set size (:func:`peak_rss`)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "growth_bytes": peak - before}
    peak, growth = peak_rss(fn)
    return {"peak_bytes": peak, "growth_bytes": growth}


def run_memory_child(script: str, *args: str) -> list[dict[str, Any]]:
    """Run ``script --memory-child <args>`` in a fresh process; return the JSON lines it prints.

    The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: tensors come from mmap, so that glibc
    returns freed memory to the system at once and the resident set follows live memory.
    """
    cmd = [sys.executable, script, "--memory-child", *args]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------------------
# Revision and formatting


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def git_revision(source: str = "nl_detectron/layers/non_local_block.py") -> str:
    """The checkout's revision, and the last commit of ``source`` (+ "uncommitted changes")."""
    try:
        commit = _git("log", "-1", "--format=%h", "--", source)
        modified = _git("status", "--porcelain", "--", source) != ""
        return (
            f"{_git('describe', '--always', '--dirty')}, {source} at {commit}"
            f"{' + uncommitted changes' if modified else ''}"
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt_mb(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def fmt_pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%" if old else "—"


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}x"
