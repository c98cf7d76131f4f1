"""Load generators, one run each: wrk (HTTP/1.1, with benchmarks/models/post_file.lua) and
h2load (HTTP/2 and gRPC, or HTTP/1.1 with `--h1`), parsed into a `Load`; `with_cpu` adds where
the CPU went during a run (load generator, server frontend, workers).

A failed run is a `Load` with `error` set, never an exception.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.lib.procs import tree_cpu

LUA_SCRIPT = Path(__file__).resolve().parent.parent / "models" / "post_file.lua"


@dataclass
class Load:
    """One load-generator run."""

    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0  # successful (2xx) answers per second
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    error: str | None = None
    #: CPU (in cores) used during the run by processes other than the server, wrk and us
    other_cores: float = 0.0
    attempts: int = 1

    def problems(self) -> str:
        parts = []
        if self.non_2xx:
            parts.append(f"{self.non_2xx} non-2xx")
        if self.socket_errors:
            parts.append(f"{self.socket_errors} socket errors")
        if self.error:
            parts.append(self.error)
        return ", ".join(parts)


@dataclass
class Run(Load):
    """One measured run: a Load plus where the CPU went."""

    lg_cores: float = 0.0  # the load generator
    fe_cores: float = 0.0  # the server's frontend process (its root)
    wk_cores: float = 0.0  # the server's other processes (workers)
    missing: int = 0  # successful gRPC answers that carried no prediction

    def problems(self) -> str:
        parts = [super().problems()] if super().problems() else []
        if self.missing:
            parts.append(f"{self.missing} answers without a prediction")
        return ", ".join(parts)


def run_wrk(
    port: int, path: str, body_file: Path, ctype: str, conc: int, seconds: float, timeout_s: int
) -> Load:
    """`wrk -t1 -c<conc> --latency` POSTing `body_file` as `ctype` to 127.0.0.1:`port`."""
    command = [
        "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s}s",
        "--latency", "-s", str(LUA_SCRIPT), f"http://127.0.0.1:{port}{path}",
        "--", str(body_file), ctype,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + timeout_s + 30
        )
    except subprocess.TimeoutExpired:
        return Load(error="wrk did not finish in time")
    match = re.search(r"^BENCH_JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return Load(error=f"wrk exit {done.returncode}: {' | '.join(tail)}")
    r = json.loads(match.group(1))
    secs = r["duration_us"] / 1e6
    socket_errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    good = r["requests"] - r["err_status"]
    return Load(
        requests=r["requests"],
        seconds=secs,
        rps=good / secs if secs > 0 else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        non_2xx=r["err_status"],
        socket_errors=socket_errors,
    )


def percentile(sorted_values: list[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def run_h2load(
    url: str,
    data_file: Path,
    headers: list[str],
    conc: int,
    seconds: float,
    h1: bool,
    work: Path,
    frame_len: int = 0,
) -> Load | Run:
    """One h2load run; `frame_len` > 0 checks that each success carried that many DATA bytes."""
    log_file = work / "h2load.log"
    log_file.unlink(missing_ok=True)
    command = ["h2load", "-t1", f"-c{conc}", "-m1", f"-D{max(1, round(seconds))}"]
    command += ["-d", str(data_file), f"--log-file={log_file}"]
    for header in headers:
        command += ["-H", header]
    if h1:
        command.append("--h1")
    command.append(url)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return Run(error="h2load did not finish in time (a hang?)")
    out = done.stdout
    finished = re.search(r"^finished in ([\d.]+)(us|ms|s),", out, re.MULTILINE)
    counts = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
        re.MULTILINE,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    traffic = re.search(r"^traffic: .*?, \S+ \((\d+)\) data", out, re.MULTILINE)
    if done.returncode != 0 or not (finished and counts and codes and traffic):
        tail = (out + done.stderr).strip().splitlines()[-3:]
        return Run(error=f"h2load exit {done.returncode}: {' | '.join(tail)}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[finished.group(2)]
    # with -D, "finished in" is the measured duration (h2load's own req/s uses it too)
    secs = float(finished.group(1)) * scale
    total, _started, _done, ok, failed, errored, timeouts = map(int, counts.groups())
    non_2xx = sum(int(x) for x in codes.groups()[1:])
    data = int(traffic.group(1))
    elapsed: list[int] = []
    with log_file.open(encoding="ascii", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and 200 <= int(parts[1]) < 300:
                elapsed.append(int(parts[2]))
    elapsed.sort()
    missing = max(0, ok - data // frame_len) if frame_len else 0
    return Run(
        requests=total,
        seconds=secs,
        rps=(ok - missing) / secs if secs > 0 else 0.0,
        p50_ms=percentile(elapsed, 50) / 1000,
        p99_ms=percentile(elapsed, 99) / 1000,
        non_2xx=non_2xx + max(0, failed - non_2xx),
        socket_errors=errored + timeouts,
        missing=missing,
    )


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _split_cpu(root: int | None) -> tuple[float, float]:
    """(root process, its descendants) CPU seconds."""
    if root is None:
        return 0.0, 0.0
    own, rest, _reaped = tree_cpu(root)
    return own, rest


def with_cpu(run: Callable[[], Load], root: int | None) -> Run:
    """Run `run()` and note the CPU of the load generator, the frontend and the workers."""
    t0, lg0, (fe0, wk0) = time.perf_counter(), _children_cpu(), _split_cpu(root)
    load = run()
    wall = time.perf_counter() - t0
    lg1, (fe1, wk1) = _children_cpu(), _split_cpu(root)
    result = Run(**asdict(load))
    if wall > 0:
        result.lg_cores = (lg1 - lg0) / wall
        result.fe_cores = (fe1 - fe0) / wall
        result.wk_cores = (wk1 - wk0) / wall
    return result
