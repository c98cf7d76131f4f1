"""Benchmark: serving with tsctl vs TorchServe 0.12, side by side, same model, workers and load.

Run from the repository root (about 7 minutes on 2 cores; `--quick` about 3):

    .venv/bin/python benchmarks/serve_bench.py [--quick] [--no-torchserve]
        [--sections a,b,c,d] [--ts-venv /work/ts-venv] [--venv .venv] [--repeat N]
        [--duration S] [--warmup S] [--retries N] [--quiet-budget S]
        [--json-out FILE] [--workdir DIR] [--keep]

Sections:

(a) throughput and latency: a tiny TorchScript MLP (16→64→64→4, JSON body of 16 floats) with
    1 and 2 workers, batch size 1 and 8 (maxBatchDelay 5 ms), at concurrency 1, 8 and 32.
(b) resnet_faces (examples/resnet_faces), batch size 8, maxBatchDelay 50 ms, 1 worker,
    concurrency 16, one JPEG per request: served images/s against a plain in-process loop that
    calls the same handler on batches of 8 raw JPEGs with the worker's torch thread count.
(c) start to first answered prediction: from launching `tsctl serve start` / `torchserve
    --start` with the MLP until the first POST /predictions/mlp answers 200.
(d) peak RSS of the whole server process tree (frontend plus workers), sampled every 100 ms
    through /proc during the 1-worker, batch-1, concurrency-32 row of (a).

Both servers get the same archive (built with `tsctl archive`), the same handler file
(`benchmarks/models/mlp_handler.py`, or the example's handler for (b)), per-model settings in
its model-config.yaml, and the same torch threads per worker: tsctl gives each worker
cores / total workers threads, and TorchServe, which has no such setting, gets that number as
OMP_NUM_THREADS/MKL_NUM_THREADS in its environment (its workers inherit it). Load comes from
wrk (`-t1 --latency`, connections = concurrency) with `benchmarks/models/post_file.lua`,
after a warm-up run per row. Only one server runs at a time; each is stopped (and its process
tree killed if it lingers) before the next starts. Everything generated (models, archives,
images, logs, temp dirs) lives in one temporary directory, removed at the end.

The machine may be shared, so every measurement also records how much CPU *other* processes
used meanwhile (/proc/stat busy time minus the server tree, wrk and this script), shown as
`others` in cores. Before each measurement the script waits (within `--quiet-budget` seconds
in all) for the machine to go quiet, and a run during which others used more than 0.25 cores
is repeated (`--retries`, default 2), keeping the least disturbed attempt.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(__file__).resolve().parent / "models"
LUA_SCRIPT = MODELS_DIR / "post_file.lua"
MLP_HANDLER = MODELS_DIR / "mlp_handler.py"
BUILD_MLP = MODELS_DIR / "build_mlp.py"
RESNET_DIR = ROOT / "examples" / "resnet_faces"
SECTIONS = ("a", "b", "c", "d")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
MLP_BODY = [round(0.1 * i - 0.75, 3) for i in range(16)]
SERVERS = ("tsctl", "TorchServe")


# ----------------------------------------------------------------------------- processes


def cpu_count() -> int:
    """The cores this process may use (what tsctl divides among its workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...], or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
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


def kill_tracked(tracked: dict[int, int | None]) -> list[int]:
    """SIGKILL every tracked pid still alive (and still the same process); return them."""
    killed = []
    for pid, ticks in tracked.items():
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if ticks is not None and start_ticks(pid) != ticks:
            continue  # the pid was reused by an unrelated process
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def wait_gone(tracked: dict[int, int | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            p
            for p, t in tracked.items()
            if (f := _stat_fields(p)) is not None
            and f[0] not in ("Z", "X")
            and (t is None or start_ticks(p) == t)
        ]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def free_ports(count: int) -> list[int]:
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


# ----------------------------------------------------------------------------- HTTP


def http_request(
    port: int, method: str, path: str, body: bytes = b"", ctype: str = "", timeout: float = 10
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": ctype} if ctype else {}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def ready_workers(port: int, model: str) -> int:
    """Workers the management API reports READY for `model` (0 if it cannot tell yet)."""
    try:
        status, body = http_request(port, "GET", f"/models/{model}", timeout=5)
        if status != 200:
            return 0
        described = json.loads(body)
        return sum(1 for w in described[0].get("workers", []) if w.get("status") == "READY")
    except (OSError, http.client.HTTPException, ValueError, LookupError):
        return 0


# ----------------------------------------------------------------------------- servers


class Server(Protocol):
    name: str
    inference_port: int
    root_pid: int | None

    def launch(self, models: str, workers: int, threads: int) -> None: ...

    def finish_start(self, model: str, workers: int) -> None: ...

    def stop(self) -> None: ...

    def worker_threads(self) -> list[int]: ...


class _Base:
    """What both servers share: a run folder per start, process tracking, clean stop."""

    name = ""

    def __init__(self, work: Path, store: Path) -> None:
        self.work = work
        self.store = store
        self.runs = 0
        self.run_dir = work
        self.inference_port = 0
        self.management_port = 0
        self.root_pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.tracked: dict[int, int | None] = {}

    def _new_run(self) -> Path:
        self.runs += 1
        slug = self.name.lower()
        self.run_dir = self.work / f"{slug}-run{self.runs}"
        self.run_dir.mkdir(parents=True)
        self.root_pid = None
        self.tracked = {}
        return self.run_dir

    def track(self) -> list[int]:
        """Remember the current process tree (so stop() can kill what lingers)."""
        if self.root_pid is None:
            return []
        pids = process_tree(self.root_pid)
        for pid in pids:
            self.tracked.setdefault(pid, start_ticks(pid))
        return pids

    def workers(self) -> list[int]:
        return [p for p in self.track() if p != self.root_pid]

    def _wait_ready(self, model: str, workers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready_workers(self.management_port, model) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {workers} workers not ready in time")
            if self.root_pid is not None and _stat_fields(self.root_pid) is None:
                raise RuntimeError(f"{self.name}: the server exited during start-up")
            time.sleep(0.1)
        self.track()

    def _finish_stop(self) -> None:
        if not wait_gone(self.tracked, 30):
            killed = kill_tracked(self.tracked)
            log(f"  {self.name}: killed lingering processes {killed}")
            wait_gone(self.tracked, 10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self.root_pid = None


class TsctlServer(_Base):
    name = "tsctl"

    def __init__(
        self, work: Path, store: Path, tsctl: Path, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(work, store)
        self.tsctl = tsctl
        self.env = env or {}

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        self.inference_port, self.management_port, metrics_port = free_ports(3)
        config = run / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{metrics_port}\n"
            "enable_grpc=false\n"
            f"default_workers_per_model={workers}\n"
        )
        command = [
            str(self.tsctl), "serve", "start", "--ncs", "--disable-token-auth",
            "--model-store", str(self.store), "--models", models,
            "--ts-config", str(config),
            "--state-dir", str(run / "state"), "--log-dir", str(run / "logs"),
        ]  # fmt: skip
        env = {**os.environ, **self.env, "TMPDIR": str(run)}
        out = (run / "start.out").open("wb")
        with out:
            self.proc = subprocess.Popen(
                command, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def finish_start(self, model: str, workers: int) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("tsctl serve start did not return in time") from None
        output = (self.run_dir / "start.out").read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"tsctl serve start failed ({code}): {output.strip()[-2000:]}")
        info = json.loads((self.run_dir / "state" / ".tsctl.pid").read_text())
        self.root_pid = int(info["pid"])
        self.track()
        self._wait_ready(model, workers)

    def worker_threads(self) -> list[int]:
        """Each live worker's torch threads, from its `worker ready (pid P, N threads)` line
        (the daemon writes the model log in batches: wait a little for the lines)."""
        deadline = time.monotonic() + 5
        while True:
            log_text = (self.run_dir / "logs" / "model_log.log").read_text(errors="replace")
            ready = dict(re.findall(r"worker ready \(pid (\d+), (\d+) threads\)", log_text))
            pids = self.workers()
            if all(str(pid) in ready for pid in pids) or time.monotonic() > deadline:
                return [int(ready[str(pid)]) for pid in pids if str(pid) in ready]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.root_pid is None and self.proc is None:
            return
        self.track()
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(self.tsctl), "serve", "stop", "--state-dir", str(self.run_dir / "state")],
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
            )
        self._finish_stop()


class TorchServeServer(_Base):
    name = "TorchServe"

    def __init__(self, work: Path, store: Path, venv: Path) -> None:
        super().__init__(work, store)
        self.venv = venv
        self.env: dict[str, str] = {}

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        self.inference_port, self.management_port, metrics_port = free_ports(3)
        config = run / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{metrics_port}\n"
            f"default_workers_per_model={workers}\n"
            "install_py_dep_per_model=false\n"
        )
        tmp = run / "tmp"
        tmp.mkdir()
        self.env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            # tsctl's per-worker torch threads; TorchServe's workers inherit this environment
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self.env.pop("VIRTUAL_ENV", None)
        command = [
            str(self.venv / "bin" / "torchserve"), "--start", "--ncs", "--disable-token-auth",
            "--model-store", str(self.store), "--models", models, "--ts-config", str(config),
        ]  # fmt: skip
        out = (run / "start.out").open("wb")  # the launcher's and then java's stdout
        with out:
            self.proc = subprocess.Popen(
                command,
                cwd=run,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finish_start(self, model: str, workers: int) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("torchserve --start did not return in time") from None
        if code != 0:
            output = (self.run_dir / "start.out").read_text(errors="replace")
            raise RuntimeError(f"torchserve --start failed ({code}): {output.strip()[-2000:]}")
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.root_pid = int(pid_file.read_text().strip())
        self.track()
        self._wait_ready(model, workers)

    def worker_threads(self) -> list[int]:
        found = []
        for pid in self.workers():
            if "model_service_worker" in cmdline(pid):
                value = environ_value(pid, "OMP_NUM_THREADS")
                found.append(int(value) if value and value.isdigit() else 0)
        return found

    def stop(self) -> None:
        if self.root_pid is None and self.proc is None:
            return
        self.track()
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(self.venv / "bin" / "torchserve"), "--stop"],
                cwd=self.run_dir,
                env=self.env,
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
            )
        self._finish_stop()


# ----------------------------------------------------------------------------- load


@dataclass
class Load:
    """One wrk run."""

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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: a run during which other processes used more CPU than this (in cores) is tried again
DISTURBED_CORES = 0.25


def busy_seconds() -> float:
    """CPU time the whole machine has spent not idle, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
    return (sum(values) - idle - guest) / CLOCK_TICKS


def tree_cpu_seconds(root: int | None) -> float:
    """CPU time of a process tree (and of the children its root has reaped)."""
    if root is None:
        return 0.0
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields and len(fields) > 14:
            total += int(fields[11]) + int(fields[12])
            if pid == root:
                total += int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS


class CpuMeter:
    """How much CPU others used while the block ran: machine busy time minus ours."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.other_cores = 0.0

    def _ours(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, a loop, once reaped
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return cpu + tree_cpu_seconds(self.root)

    def __enter__(self) -> CpuMeter:
        self._start = (time.perf_counter(), busy_seconds(), self._ours())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start[0]
        others = (busy_seconds() - self._start[1]) - (self._ours() - self._start[2])
        self.other_cores = max(0.0, others / wall) if wall > 0 else 0.0


class QuietGate:
    """Waits, within a total budget, for other processes on the machine to go quiet."""

    def __init__(self, budget_s: float, per_wait_s: float = 45.0) -> None:
        self.budget_s = budget_s
        self.per_wait_s = per_wait_s
        self.waited_s = 0.0

    def wait(self, root: int | None) -> float:
        """Block until others used < DISTURBED_CORES / 2 over one second; return that load."""
        limit = min(self.per_wait_s, self.budget_s - self.waited_s)
        started = time.monotonic()
        while True:
            with CpuMeter(root) as meter:
                time.sleep(1.0)
            spent = time.monotonic() - started
            if meter.other_cores < DISTURBED_CORES / 2 or spent >= limit:
                self.waited_s += max(0.0, spent - 1.0)
                if spent > 1.5:
                    log(f"    waited {spent:.0f} s for the machine to go quiet")
                return meter.other_cores


GATE = QuietGate(0.0)  # replaced in main() with the --quiet-budget


def measured(run: Callable[[], Load], root: int | None, retries: int, what: str) -> Load:
    """`run()` under a CpuMeter; again (up to `retries` times) while others disturbed it.

    Before each attempt it waits (bounded by GATE's budget) for the machine to go quiet.
    Keeps the least disturbed attempt.
    """
    best: Load | None = None
    for attempt in range(1, retries + 2):
        GATE.wait(root)
        with CpuMeter(root) as meter:
            load = run()
        load.other_cores = meter.other_cores
        load.attempts = attempt
        if best is None or load.other_cores < best.other_cores:
            best = load
        if load.other_cores <= DISTURBED_CORES or load.error:
            break
        log(f"    {what}: other processes used {load.other_cores:.2f} cores; running it again")
    assert best is not None
    return best


def run_wrk(
    port: int, path: str, body_file: Path, ctype: str, conc: int, seconds: float, timeout_s: int
) -> Load:
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


# ----------------------------------------------------------------------------- results


@dataclass
class MlpRow:
    server: str
    workers: int
    batch: int
    conc: int
    threads: list[int]
    load: Load
    rep: int = 0


@dataclass
class ResnetResult:
    loop_items_s: list[float] = field(default_factory=list)
    loop_threads: int = 0
    loop_base: dict[str, float] = field(default_factory=dict)  # mean of the loops around it
    loop_other_cores: list[float] = field(default_factory=list)
    served: dict[str, Load] = field(default_factory=dict)
    threads: dict[str, list[int]] = field(default_factory=dict)


FLOOR_NAME = "floor"


@dataclass
class StartupResult:
    server: str
    first_200_s: list[float] = field(default_factory=list)
    launcher_s: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class RssResult:
    server: str
    idle_bytes: int = 0
    peak_bytes: int = 0
    processes: int = 0
    samples: int = 0


@dataclass
class Results:
    mlp: list[MlpRow] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=dict)
    resnet: ResnetResult | None = None
    startup: list[StartupResult] = field(default_factory=list)
    rss: list[RssResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- setup


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_checked(command: Sequence[object], timeout: float, **kw: Any) -> str:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kw
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stderr[-2000:]}")
    return str(done.stdout)


def archive(
    tsctl: Path,
    store: Path,
    src: Path,
    name: str,
    archive_name: str,
    serialized: Path,
    handler: Path,
    settings: dict[str, Any],
) -> str:
    """A .mar in `store` named `archive_name`.mar (model name `name`) with a model-config.yaml."""
    folder = src / archive_name
    folder.mkdir(parents=True)
    config = folder / "model-config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    out = folder / "out"
    out.mkdir()
    run_checked(
        [
            tsctl, "archive", "--model-name", name, "--version", "1.0",
            "--serialized-file", serialized, "--handler", handler, "--config-file", config,
            "--export-path", out, "-f",
        ],
        timeout=120,
    )  # fmt: skip
    target = store / f"{archive_name}.mar"
    shutil.move(out / f"{name}.mar", target)
    return target.name


def mlp_archive_name(workers: int, batch: int) -> str:
    return "mlp" if (workers, batch) == (1, 1) else f"mlp_w{workers}_b{batch}"


def mlp_settings(workers: int, batch: int) -> dict[str, Any]:
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch,
        "maxBatchDelay": 5 if batch > 1 else 100,
    }


# ----------------------------------------------------------------------------- sections


@dataclass
class Plan:
    workers: list[int]
    batches: list[int]
    concs: list[int]
    duration: float
    warmup: float
    resnet_duration: float
    startup_trials: int
    repeat: int
    retries: int
    sections: set[str]
    servers: list[str]


def threads_for(workers: int) -> int:
    """What tsctl gives each worker (used for TorchServe when tsctl's own is unknown)."""
    return max(1, cpu_count() // max(1, workers))


@contextlib.contextmanager
def running(
    server: Server, models: str, model: str, workers: int, threads: int
) -> Iterator[Server]:
    log(f"  starting {server.name} ({models}, {workers} worker(s), {threads} thread(s) each)")
    try:
        server.launch(models, workers, threads)
        server.finish_start(model, workers)
        yield server
    finally:
        server.stop()


def check_answer(server: Server, body: bytes, results: Results) -> None:
    status, answer = http_request(
        server.inference_port, "POST", "/predictions/mlp", body, "application/json", timeout=30
    )
    if status != 200:
        raise RuntimeError(f"{server.name}: POST /predictions/mlp → {status}: {answer[:300]!r}")
    results.answers.setdefault(server.name, json.loads(answer))


def server_order(plan: Plan, index: int) -> list[str]:
    """The servers in turn: alternate who goes first, so slow drift hits both alike."""
    return plan.servers if index % 2 == 0 else plan.servers[::-1]


def section_mlp(plan: Plan, servers: dict[str, Server], body_file: Path, results: Results) -> None:
    """(a), and (d) on its 1-worker batch-1 concurrency-32 row."""
    body = body_file.read_bytes()
    configs = [(w, b) for w in plan.workers for b in plan.batches]
    if "a" not in plan.sections:  # (d) alone: just the row it samples
        configs = [(1, 1)]
    concs = plan.concs if "a" in plan.sections else [32]
    threads = {w: threads_for(w) for w in plan.workers}
    turn = 0
    for rep in range(plan.repeat):
        for workers, batch in configs:
            for name in server_order(plan, turn):
                log(f"(a) round {rep + 1}/{plan.repeat} workers={workers} batch={batch}: {name}")
                try:
                    mlp_rows(plan, servers[name], body_file, body, workers, batch, concs,
                             threads, rep, results)  # fmt: skip
                except (RuntimeError, OSError, http.client.HTTPException) as exc:
                    results.errors.append(f"(a) {name} workers={workers} batch={batch}: {exc}")
                    log(f"  ERROR: {exc}")
            turn += 1


def mlp_rows(
    plan: Plan,
    server: Server,
    body_file: Path,
    body: bytes,
    workers: int,
    batch: int,
    concs: list[int],
    threads: dict[int, int],
    rep: int,
    results: Results,
) -> None:
    """Start `server` with one (workers, batch) archive and run every concurrency on it."""
    models = f"mlp={mlp_archive_name(workers, batch)}.mar"
    with running(server, models, "mlp", workers, threads[workers]):
        observed = server.worker_threads()
        if server.name == "tsctl" and observed and observed[0] != threads[workers]:
            # tsctl's own choice is the reference; TorchServe gets it from now on
            log(f"  note: tsctl gives workers {observed[0]} threads, not {threads[workers]}")
            threads[workers] = observed[0]
        check_answer(server, body, results)
        assert server.root_pid is not None
        idle = RssSampler(server.root_pid).sample()
        for conc in concs:
            run_wrk(
                server.inference_port, "/predictions/mlp", body_file, "application/json",
                conc, plan.warmup, 10,
            )  # fmt: skip
            sample_rss = (workers, batch, conc) == (1, 1, 32) and "d" in plan.sections
            sampler = RssSampler(server.root_pid) if sample_rss else None
            with sampler or contextlib.nullcontext():
                load = measured(
                    functools.partial(
                        run_wrk, server.inference_port, "/predictions/mlp", body_file,
                        "application/json", conc, plan.duration, 10,
                    ),
                    server.root_pid, plan.retries, f"c={conc}",
                )  # fmt: skip
            if sampler is not None:
                results.rss.append(
                    RssResult(server.name, idle, sampler.peak, sampler.peak_processes,
                              sampler.samples)
                )  # fmt: skip
            if "a" in plan.sections:
                results.mlp.append(MlpRow(server.name, workers, batch, conc, observed, load, rep))
            log(
                f"    c={conc}: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                f"p99 {load.p99_ms:.2f} ms {load.problems()}"
            )


_RESNET_LOOP = r"""
import importlib.util, json, sys, time, types, warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
handler_path, model_dir, serialized, image, threads, batch, warmup, duration = sys.argv[1:9]
torch.set_num_threads(int(threads))
spec = importlib.util.spec_from_file_location("bench_handler", handler_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
classes = [c for c in vars(module).values()
           if isinstance(c, type) and c.__module__ == module.__name__]
assert len(classes) == 1, classes
handler = classes[0]()
context = types.SimpleNamespace(
    system_properties={"model_dir": model_dir, "batch_size": int(batch), "gpu_id": None},
    manifest={"model": {"serializedFile": serialized}},
)
handler.initialize(context)
with open(image, "rb") as fh:
    raw = fh.read()
batch = int(batch)
def rows():
    return [{"body": bytearray(raw)} for _ in range(batch)]
end = time.perf_counter() + float(warmup)
while time.perf_counter() < end:
    handler.handle(rows(), context)
count, start = 0, time.perf_counter()
end = start + float(duration)
while True:
    answers = handler.handle(rows(), context)
    assert len(answers) == batch
    count += batch
    now = time.perf_counter()
    if now >= end:
        break
print(json.dumps({"items": count, "seconds": now - start, "threads": torch.get_num_threads()}))
"""


def resnet_loop(python: Path, work: Path, image: Path, threads: int, plan: Plan) -> Load:
    model_dir = work / "resnet"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = run_checked(
        [
            python, "-c", _RESNET_LOOP, RESNET_DIR / "handler.py", model_dir,
            "resnet_faces.pt", image, threads, 8, plan.warmup, plan.resnet_duration,
        ],
        timeout=plan.resnet_duration + plan.warmup + 120,
        env=env,
    )  # fmt: skip
    report = json.loads(out.strip().splitlines()[-1])
    seconds = float(report["seconds"])
    return Load(requests=int(report["items"]), seconds=seconds, rps=report["items"] / seconds)


def section_resnet(
    plan: Plan, servers: dict[str, Server], python: Path, work: Path, results: Results
) -> None:
    image = work / "images" / "face_a.jpg"
    threads = threads_for(1)
    res = ResnetResult(loop_threads=threads)
    results.resnet = res

    def loop(label: str) -> float:
        log(f"(b) plain loop ({label}), {threads} torch threads")
        load = measured(
            lambda: resnet_loop(python, work, image, threads, plan), None, plan.retries, "loop"
        )
        res.loop_items_s.append(load.rps)
        res.loop_other_cores.append(load.other_cores)
        log(f"    {load.rps:.1f} images/s (others used {load.other_cores:.2f} cores)")
        return load.rps

    # loop, server, loop, server, loop: each server is judged against the loops around it,
    # so host-side drift during the section hits both sides of its ratio
    before = loop("first")
    for name in plan.servers:
        server = servers[name]
        log(f"(b) resnet_faces: {name}")
        try:
            with running(server, "resnet_faces.mar", "resnet_faces", 1, threads):
                res.threads[name] = server.worker_threads()
                run_wrk(
                    server.inference_port, "/predictions/resnet_faces", image,
                    "image/jpeg", 16, plan.warmup, 30,
                )  # fmt: skip
                load = measured(
                    functools.partial(
                        run_wrk, server.inference_port, "/predictions/resnet_faces", image,
                        "image/jpeg", 16, plan.resnet_duration, 30,
                    ),
                    server.root_pid, plan.retries, name,
                )  # fmt: skip
                res.served[name] = load
                log(f"    {load.rps:.1f} images/s, p99 {load.p99_ms:.0f} ms {load.problems()}")
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            results.errors.append(f"(b) {name}: {exc}")
            log(f"  ERROR: {exc}")
        after = loop(f"after {name}")
        res.loop_base[name] = (before + after) / 2
        before = after


#: what any Python server's worker must do before its first answer: import torch, load the
#: model, run it once (with the collector off during the import, as tsctl's worker does)
_FLOOR = (
    "import gc, sys; gc.disable(); import torch; gc.enable(); "
    "m = torch.jit.load(sys.argv[1]); m(torch.zeros(1, 16)); import time; print(time.time())"
)


def startup_floor(python: Path, model: Path, threads: int) -> float:
    """Seconds from launching a fresh Python process to its having imported torch, loaded the
    MLP and run it once (the wall clock it prints then: its exit, slow with torch, is not
    counted)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    out = run_checked(
        [python, "-W", "ignore", "-c", _FLOOR, model], timeout=START_TIMEOUT_S, env=env
    )
    return float(out.strip().splitlines()[-1]) - started


def section_startup(
    plan: Plan,
    servers: dict[str, Server],
    body: bytes,
    results: Results,
    floor: Callable[[int], float],
) -> None:
    outcomes = {name: StartupResult(name) for name in plan.servers}
    results.startup.extend(outcomes.values())
    plain = StartupResult(FLOOR_NAME)
    results.startup.append(plain)
    threads = threads_for(1)
    for trial in range(plan.startup_trials):
        GATE.wait(None)
        with CpuMeter(None) as meter:
            seconds = floor(threads)
        log(f"(c) floor, trial {trial + 1}: {seconds:.2f} s (others {meter.other_cores:.2f})")
        plain.first_200_s.append(seconds)
        plain.launcher_s.append(seconds)
        plain.other_cores.append(meter.other_cores)
        for name in server_order(plan, trial):
            server = servers[name]
            log(f"(c) start to first prediction: {name}, trial {trial + 1}")
            best: tuple[float, float, float] | None = None
            try:
                for _attempt in range(plan.retries + 1):
                    GATE.wait(None)
                    try:
                        with CpuMeter(None) as meter:
                            first, launcher = time_to_first_prediction(server, body, threads)
                            meter.root = server.root_pid  # the tree, now that it exists
                    finally:
                        server.stop()
                    log(
                        f"    first 200 after {first:.2f} s (launcher returned at "
                        f"{launcher:.2f} s; others used {meter.other_cores:.2f} cores)"
                    )
                    if best is None or meter.other_cores < best[2]:
                        best = (first, launcher, meter.other_cores)
                    if meter.other_cores <= DISTURBED_CORES:
                        break
            except (RuntimeError, OSError, http.client.HTTPException) as exc:
                outcomes[name].error = str(exc)
                results.errors.append(f"(c) {name}: {exc}")
                log(f"  ERROR: {exc}")
            if best is not None:
                outcomes[name].first_200_s.append(best[0])
                outcomes[name].launcher_s.append(best[1])
                outcomes[name].other_cores.append(best[2])


def time_to_first_prediction(server: Server, body: bytes, threads: int) -> tuple[float, float]:
    """Seconds from launch to the first 200, and to the launching command's exit."""
    started = time.perf_counter()
    server.launch("mlp.mar", 1, threads)
    proc: subprocess.Popen[bytes] | None = getattr(server, "proc", None)
    launcher = float("nan")
    deadline = started + START_TIMEOUT_S
    while True:
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"{server.name}: no 200 within {START_TIMEOUT_S:.0f} s")
        if launcher != launcher and proc is not None and proc.poll() is not None:
            launcher = now - started
        try:
            status, _ = http_request(
                server.inference_port, "POST", "/predictions/mlp", body, "application/json",
                timeout=START_TIMEOUT_S,
            )  # fmt: skip
            if status == 200:
                first = time.perf_counter() - started
                break
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            pass
        time.sleep(0.005)
    if launcher != launcher and proc is not None:
        proc.wait(START_TIMEOUT_S)
        launcher = time.perf_counter() - started
    server.finish_start("mlp", 1)
    return first, launcher


# ----------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if a > 0 and b > 0 else "n/a"


def _median_load(loads: list[Load]) -> Load | None:
    good = [x for x in loads if not x.error]
    if not good:
        return None
    return Load(
        requests=sum(x.requests for x in good),
        seconds=sum(x.seconds for x in good),
        rps=statistics.median(x.rps for x in good),
        p50_ms=statistics.median(x.p50_ms for x in good),
        p99_ms=statistics.median(x.p99_ms for x in good),
        non_2xx=sum(x.non_2xx for x in loads),
        socket_errors=sum(x.socket_errors for x in loads),
        error="; ".join(x.error for x in loads if x.error) or None,
        other_cores=max(x.other_cores for x in good),
        attempts=sum(x.attempts for x in loads),
    )


def print_mlp(results: Results, plan: Plan) -> None:
    grouped: dict[tuple[str, int, int, int], list[MlpRow]] = {}
    for r in results.mlp:
        grouped.setdefault((r.server, r.workers, r.batch, r.conc), []).append(r)
    rounds = f"median of {plan.repeat} rounds, " if plan.repeat > 1 else ""
    print(
        f"\n(a) MLP 16→64→64→4, JSON body of 16 floats; wrk -t1, {plan.duration:g} s per row "
        f"after a {plan.warmup:g} s warm-up ({rounds}alternating which server goes first); "
        "batch 8 with maxBatchDelay 5 ms; thr = torch threads per worker (tsctl/TorchServe)\n"
    )
    head = (
        f"{'workers':>7} {'thr':>3} {'batch':>5} {'conc':>4} | {'tsctl req/s':>11} "
        f"{'p50 ms':>7} {'p99 ms':>7} | {'TS req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'req/s ratio':>11} {'p99 ratio':>9} {'others':>9}"
    )
    print(head)
    print("-" * len(head))
    notes = []
    for w in plan.workers:
        for b in plan.batches:
            for c in plan.concs:
                rows = {n: grouped.get((n, w, b, c), []) for n in SERVERS}
                if not any(rows.values()):
                    continue
                loads = {n: _median_load([r.load for r in rows[n]]) for n in SERVERS}
                thr = "/".join(
                    str(rows[n][0].threads[0]) if rows[n] and rows[n][0].threads else "?"
                    for n in plan.servers
                )
                line = f"{w:>7} {thr:>3} {b:>5} {c:>4} | "
                for n, width in (("tsctl", 11), ("TorchServe", 9)):
                    x = loads[n]
                    if x is None:
                        line += f"{'n/a':>{width}} {'':>7} {'':>7} | "
                    else:
                        line += f"{x.rps:>{width}.0f} {x.p50_ms:>7.2f} {x.p99_ms:>7.2f} | "
                ours, ref = loads["tsctl"], loads["TorchServe"]
                if ours is not None and ref is not None:
                    line += f"{ratio(ours.rps, ref.rps):>11} {ratio(ours.p99_ms, ref.p99_ms):>9}"
                else:
                    line += f"{'':>11} {'':>9}"
                others = "/".join(
                    f"{x.other_cores:.2f}" if (x := loads[n]) is not None else "-"
                    for n in plan.servers
                )
                print(f"{line} {others:>9}")
                for n in SERVERS:
                    x = loads[n]
                    if x is not None and x.problems():
                        notes.append(f"  {n} w={w} b={b} c={c}: {x.problems()}")
                    if plan.repeat > 1 and rows[n]:
                        spread = ", ".join(
                            f"{r.load.rps:.0f} (others {r.load.other_cores:.2f}"
                            + (f", {r.load.attempts} tries)" if r.load.attempts > 1 else ")")
                            for r in rows[n]
                        )
                        notes.append(f"  {n} w={w} b={b} c={c} req/s by round: {spread}")
    print(
        "\nratios are tsctl / TorchServe (req/s: higher is better for tsctl; p99: lower); "
        "others = cores used by other processes on the machine during the run (tsctl/TS)"
    )
    for name in SERVERS:
        answer = results.answers.get(name)
        if answer is not None:
            print(f"{name} answer for the benchmark body: {answer}")
    if len(results.answers) == 2:
        a, b = (results.answers[n] for n in SERVERS)
        same = len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=False))
        print(f"answers match: {'yes' if same else 'NO'}")
    if notes:
        print("details:\n" + "\n".join(notes))


def print_resnet(results: Results) -> None:
    res = results.resnet
    if res is None:
        return
    print(
        "\n(b) resnet_faces, 1 worker, batchSize 8, maxBatchDelay 50 ms, concurrency 16, "
        "one JPEG per request\n"
    )
    loop_text = ", ".join(
        f"{v:.1f} (others {o:.2f})"
        for v, o in zip(res.loop_items_s, res.loop_other_cores, strict=False)
    )
    print(
        f"plain loop: the handler called in-process on batches of 8 raw JPEGs with "
        f"{res.loop_threads} torch threads, run before, between and after the servers: "
        f"{loop_text} images/s; each server is divided by the mean of the two loops around it\n"
    )
    head = (
        f"{'server':<11} {'thr':>3} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'loop':>6} {'÷ loop':>7} {'others':>6}"
    )
    print(head)
    print("-" * len(head))
    for name in SERVERS:
        load = res.served.get(name)
        if load is None:
            continue
        thr = res.threads.get(name)
        base = res.loop_base.get(name, 0.0)
        print(
            f"{name:<11} {thr[0] if thr else '?'!s:>3} {load.rps:>9.1f} {load.p50_ms:>8.0f} "
            f"{load.p99_ms:>8.0f} {base:>6.1f} {load.rps / base if base else 0:>7.2f} "
            f"{load.other_cores:>6.2f}" + (f"  {load.problems()}" if load.problems() else "")
        )
    if len(res.served) == 2:
        ours, ref = res.served["tsctl"], res.served["TorchServe"]
        print(f"tsctl / TorchServe images/s: {ratio(ours.rps, ref.rps)}")


def print_startup(results: Results) -> None:
    if not results.startup:
        return
    print("\n(c) start to first answered prediction (MLP, 1 worker; median of the trials)\n")
    head = f"{'server':<11} {'first 200 s':>11} {'launcher returned s':>19}  trials"
    print(head)
    print("-" * len(head))
    medians = {}
    for s in results.startup:
        if not s.first_200_s:
            print(f"{s.server:<11} {'n/a':>11}  {s.error}")
            continue
        medians[s.server] = statistics.median(s.first_200_s)
        trials = ", ".join(
            f"{v:.2f} (others {o:.2f})" for v, o in zip(s.first_200_s, s.other_cores, strict=False)
        )
        print(
            f"{s.server:<11} {medians[s.server]:>11.2f} {statistics.median(s.launcher_s):>19.2f}"
            f"  {trials}"
        )
    if "TorchServe" in medians:
        for name in ("tsctl", FLOOR_NAME):
            if name in medians:
                print(f"{name} / TorchServe: {ratio(medians[name], medians['TorchServe'])}")
    if FLOOR_NAME in medians:
        print(
            f"({FLOOR_NAME}: from launching a Python process to its having imported torch, "
            "loaded the MLP and run it once: what a Python worker must do before its first "
            "answer)"
        )


def print_rss(results: Results) -> None:
    if not results.rss:
        return
    print(
        "\n(d) RSS of the server process tree (frontend + workers), summed over processes, "
        "sampled every 100 ms during the 1-worker batch-1 concurrency-32 run\n"
    )
    head = f"{'server':<11} {'idle MiB':>9} {'peak MiB':>9} {'processes':>9} {'samples':>7}"
    print(head)
    print("-" * len(head))
    peaks: dict[str, int] = {}
    for r in results.rss:
        peaks[r.server] = max(peaks.get(r.server, 0), r.peak_bytes)
        print(
            f"{r.server:<11} {r.idle_bytes / MIB:>9.1f} {r.peak_bytes / MIB:>9.1f} "
            f"{r.processes:>9} {r.samples:>7}"
        )
    if len(peaks) == 2:
        print(f"tsctl / TorchServe peak RSS: {ratio(peaks['tsctl'], peaks['TorchServe'])}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer rows")
    parser.add_argument("--no-torchserve", action="store_true", help="tsctl only")
    parser.add_argument("--sections", default="a,b,c,d", help="any of a,b,c,d (default all)")
    parser.add_argument(
        "--ts-venv", type=Path, default=Path("/work/ts-venv"), help="TorchServe 0.12's venv"
    )
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="tsctl's venv")
    parser.add_argument("--duration", type=float, default=None, help="seconds per (a) row")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per row")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of (a), alternating who goes first"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"run a measurement again while other processes use > {DISTURBED_CORES} cores",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        help="seconds in all to wait for other processes to go quiet (default 300, quick 60)",
    )
    parser.add_argument(
        "--tsctl-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in tsctl's environment only (workers inherit it); repeatable",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write raw results")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for its logs)")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        parser.error(f"--sections: choose from {','.join(SECTIONS)}")
    args.sections = sections
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    duration = args.duration or (3.0 if quick else 8.0)
    warmup = args.warmup or (1.0 if quick else 2.0)
    return Plan(
        workers=[1] if quick else [1, 2],
        batches=[1, 8],
        concs=[1, 32] if quick else [1, 8, 32],
        duration=duration,
        warmup=warmup,
        resnet_duration=4.0 if quick else 10.0,
        startup_trials=1 if quick else 3,
        repeat=max(1, args.repeat),
        retries=max(0, args.retries),
        sections=args.sections,
        servers=["tsctl"] if args.no_torchserve else list(SERVERS),
    )


def prepare(
    plan: Plan, work: Path, python: Path, tsctl: Path, store: Path
) -> tuple[Path, list[str]]:
    """Build the models, images and archives the chosen sections need."""
    src = work / "src"
    built = []
    body_file = work / "mlp_body.json"
    body_file.write_text(json.dumps(MLP_BODY))
    if plan.sections & {"a", "c", "d"}:
        run_checked([python, BUILD_MLP, "--out", work / "mlp.pt"], timeout=120)
        combos = {(w, b) for w in plan.workers for b in plan.batches} | {(1, 1)}
        for w, b in sorted(combos):
            built.append(
                archive(
                    tsctl, store, src, "mlp", mlp_archive_name(w, b), work / "mlp.pt",
                    MLP_HANDLER, mlp_settings(w, b),
                )
            )  # fmt: skip
    if "b" in plan.sections:
        resnet = work / "resnet"
        resnet.mkdir()
        run_checked(
            [python, RESNET_DIR / "build_model.py", "--out", resnet / "resnet_faces.pt"],
            timeout=300,
        )
        run_checked(
            [python, RESNET_DIR / "make_images.py", "--out-dir", work / "images"], timeout=120
        )
        built.append(
            archive(
                tsctl, store, src, "resnet_faces", "resnet_faces", resnet / "resnet_faces.pt",
                RESNET_DIR / "handler.py",
                {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 50},
            )
        )  # fmt: skip
    return body_file, built


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def machine_line() -> str:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    python = args.venv / "bin" / "python"
    tsctl = args.venv / "bin" / "tsctl"
    needed = [python, tsctl] + ([args.ts_venv / "bin" / "torchserve"] * (not args.no_torchserve))
    for exe in needed:
        if not exe.exists():
            print(f"not found: {exe}", file=sys.stderr)
            return 2
    if shutil.which("wrk") is None:
        print("wrk is not on PATH", file=sys.stderr)
        return 2

    global GATE
    GATE = QuietGate(
        args.quiet_budget if args.quiet_budget is not None else 60 * (1 + 4 * (not args.quick))
    )
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the finally below still cleans up
    work = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=args.workdir))
    store = work / "store"
    store.mkdir()
    tsctl_env = dict(item.split("=", 1) for item in args.tsctl_env)
    servers: dict[str, Server] = {"tsctl": TsctlServer(work, store, tsctl, tsctl_env)}
    if not args.no_torchserve:
        servers["TorchServe"] = TorchServeServer(work, store, args.ts_venv)
    results = Results()
    began = time.monotonic()
    try:
        log(f"work dir {work}; machine: {machine_line()}")
        body_file, built = prepare(plan, work, python, tsctl, store)
        log(f"archives: {', '.join(built)}")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("ad", lambda: section_mlp(plan, servers, body_file, results)),
            ("b", lambda: section_resnet(plan, servers, python, work, results)),
            (
                "c",
                lambda: section_startup(
                    plan,
                    servers,
                    body_file.read_bytes(),
                    results,
                    lambda threads: startup_floor(python, work / "mlp.pt", threads),
                ),
            ),
        ]
        for keys, step in steps:
            if plan.sections & set(keys):
                step()
    finally:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nserve_bench: {machine_line()}; Python {sys.version.split()[0]}")
    print(
        f"sections {','.join(sorted(plan.sections))}; "
        f"{'quick' if args.quick else 'full'} run, {time.monotonic() - began:.0f} s in all "
        f"({GATE.waited_s:.0f} s of it waiting for other processes to go quiet)"
    )
    if "a" in plan.sections:
        print_mlp(results, plan)
    print_resnet(results)
    print_startup(results)
    print_rss(results)
    if results.errors:
        print("\nERRORS:\n" + "\n".join(f"  {e}" for e in results.errors))
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(results), indent=2))
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
