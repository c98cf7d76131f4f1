"""The system metrics, sampled at start-up and then every `metric_time_interval` seconds.

The host's CPU, memory and disk figures, and each GPU's when the server uses GPUs, under
TorchServe's names (`CPUUtilization`, `MemoryUsed`, `MemoryAvailable`, `MemoryUtilization`,
`DiskUsage`, `DiskUtilization`, `DiskAvailable`, `GPUUtilization`, `GPUMemoryUsed`,
`GPUMemoryUtilization`). They are gauges of `prometheus.Metrics`, so `metrics_mode` decides
where they go (ts_metrics.log lines, the metrics API, or both) and the metrics configuration
whether each is recorded at all. Linux `/proc` is read (fast, on the loop); GPUs are asked
through `nvidia-smi` as a subprocess. Off with `disable_system_metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from tsctl.server.telemetry.prometheus import HOSTNAME, Metrics

log = logging.getLogger("tsctl.server")

HOST = ("Level", "Hostname")
GPU = ("Level", "DeviceId", "Hostname")
#: TorchServe's units for each system metric
UNITS = {
    "CPUUtilization": "Percent",
    "MemoryUsed": "Megabytes",
    "MemoryAvailable": "Megabytes",
    "MemoryUtilization": "Percent",
    "DiskUsage": "Gigabytes",
    "DiskUtilization": "Percent",
    "DiskAvailable": "Gigabytes",
}
GPU_UNITS = {
    "GPUUtilization": "Percent",
    "GPUMemoryUsed": "Megabytes",
    "GPUMemoryUtilization": "Percent",
}


class MetricLog:
    def __init__(self, disk_path: Path, metrics: Metrics | None = None, gpus: int = 0) -> None:
        self.disk_path = disk_path
        self.metrics = metrics or Metrics()
        self.gpus = gpus
        self._cpu: tuple[int, int] | None = (0, 0)  # since boot, for the first sample
        self.gauges = {
            name: self.metrics.server_family(name, "gauge", f"{name} ({unit})", HOST)
            for name, unit in UNITS.items()
        }
        self.gpu_gauges = {
            name: self.metrics.server_family(name, "gauge", f"{name} ({unit})", GPU)
            for name, unit in GPU_UNITS.items()
        }
        self._gpu_failed = False

    def report(self) -> None:
        """Sample the host figures (not the GPUs': `sample` does those too)."""
        values: dict[str, float] = {}
        cpu = _cpu_times()
        if cpu and self._cpu:
            busy = (cpu[0] - self._cpu[0]) / max(1, cpu[1] - self._cpu[1]) * 100
            values["CPUUtilization"] = round(busy, 1)
        self._cpu = cpu
        memory = _meminfo()
        if memory:
            total, available = memory
            values["MemoryUsed"] = round((total - available) / 1024, 1)
            values["MemoryAvailable"] = round(available / 1024, 1)
            values["MemoryUtilization"] = round((total - available) / total * 100, 1)
        with contextlib.suppress(OSError):
            disk = shutil.disk_usage(self.disk_path)
            values["DiskUsage"] = round(disk.used / 2**30, 1)
            values["DiskUtilization"] = round(disk.used / disk.total * 100, 1)
            values["DiskAvailable"] = round(disk.free / 2**30, 1)
        labels = ("Host", HOSTNAME)
        for name, value in values.items():
            self.gauges[name].set(labels, value)

    async def sample(self) -> None:
        self.report()
        await self.sample_gpus()

    async def sample_gpus(self) -> None:
        if self.gpus and not self._gpu_failed:
            for device, (util, used, total) in enumerate(await self._query_gpus()):
                labels = ("Host", str(device), HOSTNAME)
                self.gpu_gauges["GPUUtilization"].set(labels, util)
                self.gpu_gauges["GPUMemoryUsed"].set(labels, used)
                self.gpu_gauges["GPUMemoryUtilization"].set(
                    labels, round(used / total * 100, 1) if total else 0.0
                )

    async def _query_gpus(self) -> list[tuple[float, float, float]]:
        """(utilization %, memory used MiB, memory total MiB) per GPU this server uses."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used,memory.total",
                "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            rows = [
                tuple(float(v) for v in line.split(","))
                for line in out.decode().splitlines()
                if line.strip()
            ]
        except (OSError, ValueError, TimeoutError) as exc:
            self._gpu_failed = True
            log.warning("GPU metrics are off: nvidia-smi failed (%s)", exc)
            return []
        return [(r[0], r[1], r[2]) for r in rows if len(r) == 3][: self.gpus]

    async def run(self, interval: float = 60) -> None:
        """The GPUs now (the host was sampled before the server said it was ready), then
        everything every `interval` seconds."""
        await self.sample_gpus()
        while True:
            await asyncio.sleep(interval)
            await self.sample()


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
