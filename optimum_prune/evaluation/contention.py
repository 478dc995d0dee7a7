"""Other work on the machine while we time: the CPU that other processes (and the hypervisor) used meanwhile.

A latency measured while other processes compete for the cores is the scheduler's, not the model's: a 2-thread
forward that shares 2 cores with one busy process runs 1.5-3x slower, unevenly. Timings alone only hint at it
(times that drift or fall as units are added); the kernel's CPU accounting says it outright. ``CpuMeter`` reads
the whole machine's busy time from ``/proc/stat`` and this process's own CPU time around a measurement; the
difference is the others'. Linux only: elsewhere nothing is known and nothing is refused on this ground.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

class BusyMachineError(RuntimeError):
    """Latency measurements that stayed disturbed (other work on the machine) after re-measuring."""


CHECK_FLOOR_MS = 5.0
"""Below this dense-model time, timings are noise-dominated and the disturbance checks are skipped."""
MIN_WINDOW_S = 0.1
"""Per core: /proc/stat counts in ticks (10 ms) per core, so shorter windows (times the core count) say nothing."""
CONTENTION_MARGIN = 0.5
"""Cores' worth of other work tolerated beyond the cores this measurement leaves free (a niced job, daemons)."""


@dataclass(frozen=True)
class CpuShare:
    """What the machine did during one measurement window."""

    wall_s: float
    own_cores: float
    """This process's CPU time / wall time (its threads' cores in use on average)."""
    others_cores: float
    """Busy CPU time of the whole machine (steal included) minus this process's, / wall time."""
    cpu_count: int

    def contended(self, threads: int, margin: float = CONTENTION_MARGIN) -> bool:
        """Other work took more than the cores ``threads`` leave free, plus ``margin``: our threads had to wait."""
        return self.others_cores > max(self.cpu_count - threads, 0) + margin

    def describe(self) -> str:
        return (f"other processes used {self.others_cores:.2f} of the {self.cpu_count} cores while timing "
                f"(this process {self.own_cores:.2f})")


def _machine_busy_s() -> float | None:
    """Seconds of busy CPU time of the whole machine since boot (all cores; idle and iowait excluded), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Context manager: ``with CpuMeter() as meter: ...; meter.share`` is the window's ``CpuShare`` (None off Linux,
    or for a window too short to count)."""

    def __init__(self) -> None:
        self.share: CpuShare | None = None

    def __enter__(self) -> "CpuMeter":
        self._busy, self._own, self._wall = _machine_busy_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
        elapsed = wall - self._wall
        cpus = os.cpu_count() or 1
        if busy is None or self._busy is None or elapsed < MIN_WINDOW_S * cpus:
            return
        own_s = own - self._own
        others = max(busy - self._busy - own_s, 0.0)
        self.share = CpuShare(wall_s=elapsed, own_cores=own_s / elapsed, others_cores=others / elapsed, cpu_count=cpus)
