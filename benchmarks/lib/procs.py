"""Processes through Linux's /proc: a process tree, its CPU time and RSS, process groups,
killing what lingers, free ports, and one line that names the machine.

A pid is remembered with its start time (`start_ticks`), so that a pid reused by an unrelated
process is never taken for the one we started, nor killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def cpu_count() -> int:
    """The cores this process may use (what tsctl divides among its workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...], or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_group(pid: int) -> int | None:
    """The process group of a live (non-zombie) process, or None when it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (one pass over /proc)."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and process_group(int(entry)) == pgid
    ]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if stat_fields(pid) is None:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ_value(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                key, _, value = item.partition(b"=")
                if key.decode(errors="replace") == name:
                    return value.decode(errors="replace")
    except OSError:
        pass
    return None


def _still_ours(pid: int, ticks: int | None) -> bool:
    """`pid` is alive, not a zombie, and (when `ticks` is known) the process we tracked."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return ticks is None or start_ticks(pid) == ticks


def kill_tracked(tracked: dict[int, int | None]) -> list[int]:
    """SIGKILL every tracked pid still alive (and still the same process); return them."""
    killed = []
    for pid, ticks in tracked.items():
        if not _still_ours(pid, ticks):
            continue  # gone, or the pid was reused by an unrelated process
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def wait_gone(tracked: dict[int, int | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_still_ours(pid, ticks) for pid, ticks in tracked.items()):
            return True
        time.sleep(0.05)
    return False


def tree_cpu(root: int) -> tuple[float, float, float]:
    """CPU seconds of `root`'s tree: (root itself, its live descendants, the children root
    has reaped)."""
    own = rest = reaped = 0
    for pid in process_tree(root):
        fields = stat_fields(pid)
        if fields and len(fields) > 14:
            ticks = int(fields[11]) + int(fields[12])
            if pid == root:
                own, reaped = ticks, int(fields[13]) + int(fields[14])
            else:
                rest += ticks
    return own / CLOCK_TICKS, rest / CLOCK_TICKS, reaped / CLOCK_TICKS


def tree_cpu_seconds(root: int | None) -> float:
    """CPU time of a process tree (and of the children its root has reaped)."""
    return 0.0 if root is None else sum(tree_cpu(root))


def busy_seconds() -> float:
    """CPU time the whole machine has spent not idle, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
    return (sum(values) - idle - guest) / CLOCK_TICKS


class RssSampler:
    """Sum of RSS over a process tree, sampled every `interval` s in a thread; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        pids = process_tree(self.root)
        total = sum(rss_bytes(p) for p in pids)
        if total > self.peak:
            self.peak, self.peak_processes = total, len(pids)
        self.samples += 1
        return total

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def machine_line() -> str:
    """`N cores (CPU model), M GiB RAM`."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return f"{cpu_count()} cores ({model}), {mem / (1 << 30):.1f} GiB RAM"
