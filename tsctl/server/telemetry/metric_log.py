"""Periodic lines in ts_metrics.log, in TorchServe's `Name.Unit:value|#dims|#hostname:...` form.

Once a minute (and at shutdown) the daemon writes the host's CPU, memory and disk figures, as
TorchServe does, and the requests answered since the last report by status class. TorchServe
writes a line per request for the latter; tsctl sums them per interval so that logging never
costs the request path anything. Linux `/proc` is read; elsewhere those figures are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

from tsctl.server.telemetry.prometheus import HOSTNAME

log = logging.getLogger("tsctl.metrics.ts")


class MetricLog:
    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self.requests: Counter[str] = Counter()
        self._cpu = _cpu_times()

    def count(self, status: int) -> None:
        self.requests[f"Requests{status // 100}XX"] += 1

    def report(self) -> None:
        stamp = int(time.time())

        def line(name: str, unit: str, value: float) -> None:
            log.info(
                "%s.%s:%s|#Level:Host|#hostname:%s,timestamp:%d", name, unit, value, HOSTNAME, stamp
            )

        cpu = _cpu_times()
        if cpu and self._cpu:
            busy = (cpu[0] - self._cpu[0]) / max(1, cpu[1] - self._cpu[1]) * 100
            line("CPUUtilization", "Percent", round(busy, 1))
        self._cpu = cpu
        memory = _meminfo()
        if memory:
            total, available = memory
            line("MemoryUsed", "Megabytes", round((total - available) / 1024, 1))
            line("MemoryAvailable", "Megabytes", round(available / 1024, 1))
            line("MemoryUtilization", "Percent", round((total - available) / total * 100, 1))
        disk = shutil.disk_usage(self.disk_path)
        line("DiskAvailable", "Gigabytes", round(disk.free / 2**30, 1))
        line("DiskUsage", "Gigabytes", round(disk.used / 2**30, 1))
        line("DiskUtilization", "Percent", round(disk.used / disk.total * 100, 1))
        for name in ("Requests2XX", "Requests4XX", "Requests5XX"):
            line(name, "Count", float(self.requests.pop(name, 0)))

    async def run(self, interval: float = 60) -> None:
        while True:
            await asyncio.sleep(interval)
            self.report()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _meminfo() -> tuple[int, int] | None:
    """(total, available) kB, from /proc/meminfo."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for row in fh:
                key, _, rest = row.partition(":")
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in values or "MemAvailable" not in values:
        return None
    return values["MemTotal"], values["MemAvailable"]
