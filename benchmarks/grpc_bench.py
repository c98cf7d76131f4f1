"""Benchmark: gRPC inference with tsctl vs TorchServe 0.12, side by side, same model and load.

Run from the repository root (about 6 minutes on 2 cores; `--quick` about 2):

    .venv/bin/python benchmarks/grpc_bench.py [--quick] [--no-torchserve]
        [--batches 1,8] [--concs 1,8,32] [--duration S] [--warmup S]
        [--no-ts-rest] [--no-wrk] [--retries N] [--quiet-budget S]
        [--ts-venv /work/ts-venv] [--venv .venv] [--json-out FILE] [--workdir DIR] [--keep]

What it measures: the tiny TorchScript MLP of serve_bench.py's section (a) (16→64→64→4, the
shared handler benchmarks/models/mlp_handler.py, one worker with the same torch threads on
both servers), with batch size 1 and batch size 8 (maxBatchDelay 5 ms), at concurrency 1, 8
and 32, through

- tsctl's gRPC inference API (`InferenceAPIsService/Predictions`),
- tsctl's REST API (`POST /predictions/mlp`), same server, same run,
- TorchServe 0.12's gRPC inference API,
- TorchServe 0.12's REST API, with wrk (context for its gRPC-vs-REST ratio; `--no-ts-rest`
  skips it).

One server runs at a time (serve_bench.py's server classes, process tracking and clean stop);
which server goes first alternates between batch sizes.

Load generator: h2load (nghttp2), one thread (`-t1`), one stream per connection (`-m1`),
connections = concurrency, for `--duration` seconds (`-D`) after a separate warm-up run of
`--warmup` seconds; the same binary and options for both servers. gRPC is plain HTTP/2 to h2load:
it POSTs one prebuilt gRPC message frame (flag byte 0, 4-byte big-endian length, the serialized
PredictionsRequest{model_name="mlp", input={"data": <the 16 floats as JSON>}}) with
`content-type: application/grpc` and `te: trailers`. REST uses the same h2load over HTTP/1.1
(`--h1`, keep-alive, no pipelining), POSTing the same JSON as `application/json`, so gRPC and
REST are compared with one tool on tsctl. TorchServe's REST runs use wrk (`-t1 --latency`, as
in serve_bench.py): h2load 1.52's HTTP/1.1 parser rejects TorchServe's status line
(`HTTP/1.1 200 ` with an empty reason phrase) and records every answer as failed. tsctl's REST
row is therefore also run with wrk, which ties the two tools together and to serve_bench.py's
numbers (`--no-wrk` skips that cross-check; TorchServe's REST row still uses wrk). Throughput is
the successful answers over the measured seconds; p50/p99 come from h2load's per-request log
(`--log-file`, the elapsed time of every request of the measured part).

h2load counts HTTP 200 even when a gRPC call fails (grpc-status travels in the trailers), so:
before measuring, one call per server through grpcio and tsctl's generated stubs must come back
with status OK and the prediction the REST API gives; after every gRPC run the same call is
made again; and every successful gRPC response must have carried its prediction: the DATA bytes
h2load received must be at least (successful answers) times (the size of that one gRPC response
frame). A failed call is a trailers-only response with no DATA, so any shortfall is reported
as `N answers without a prediction`.

Besides throughput and latency, each run records the CPU used (in cores) by the load generator
(`lg`), by the server's frontend process (`fe`: tsctl's daemon, TorchServe's JVM) and by its
worker(s) (`wk`), and, as serve_bench.py does, by other processes on the machine (`oth`); it
waits for the machine to go quiet before each run and repeats a disturbed one.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb

ROOT = sb.ROOT
GRPC_PATH = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
REST_PATH = "/predictions/mlp"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
#: (key, server, protocol, tool): every kind of measured run, in table order
TARGETS = [
    ("tsctl gRPC", "tsctl", "grpc", "h2load"),
    ("tsctl REST", "tsctl", "rest", "h2load"),
    ("tsctl REST wrk", "tsctl", "rest", "wrk"),
    ("TS gRPC", "TorchServe", "grpc", "h2load"),
    ("TS REST", "TorchServe", "rest", "wrk"),
]
LABELS = {
    "tsctl gRPC": "tsctl gRPC (h2load)",
    "tsctl REST": "tsctl REST (h2load --h1)",
    "tsctl REST wrk": "tsctl REST (wrk)",
    "TS gRPC": "TorchServe gRPC (h2load)",
    "TS REST": "TorchServe REST (wrk)",
}


# ----------------------------------------------------------------------------- servers


class TsctlGrpcServer(sb.TsctlServer):
    """serve_bench's tsctl server with its gRPC APIs on (free ports, read from the pid file)."""

    grpc_address = ""

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        self.inference_port, self.management_port, metrics_port = sb.free_ports(3)
        config = run / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{metrics_port}\n"
            "enable_grpc=true\n"
            "grpc_inference_address=127.0.0.1\n"
            "grpc_inference_port=0\n"
            "grpc_management_address=127.0.0.1\n"
            "grpc_management_port=0\n"
            f"default_workers_per_model={workers}\n"
        )
        command = [
            str(self.tsctl), "serve", "start", "--ncs", "--disable-token-auth",
            "--model-store", str(self.store), "--models", models,
            "--ts-config", str(config),
            "--state-dir", str(run / "state"), "--log-dir", str(run / "logs"),
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(run)}
        with (run / "start.out").open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def finish_start(self, model: str, workers: int) -> None:
        super().finish_start(model, workers)
        info = json.loads((self.run_dir / "state" / ".tsctl.pid").read_text())
        self.grpc_address = str(info.get("grpc_inference_address") or "")
        if not self.grpc_address:
            raise RuntimeError("tsctl: no grpc_inference_address in the pid file")


class TorchServeGrpcServer(sb.TorchServeServer):
    """serve_bench's TorchServe server with its gRPC inference API on a free port."""

    grpc_address = ""

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        ports = sb.free_ports(5)
        self.inference_port, self.management_port, metrics_port, grpc_inf, grpc_mgmt = ports
        self.grpc_address = f"127.0.0.1:{grpc_inf}"
        config = run / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{metrics_port}\n"
            "grpc_inference_address=127.0.0.1\n"
            f"grpc_inference_port={grpc_inf}\n"
            "grpc_management_address=127.0.0.1\n"
            f"grpc_management_port={grpc_mgmt}\n"
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
        with (run / "start.out").open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=run,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


# ----------------------------------------------------------------------------- gRPC


def request_message(body: bytes) -> bytes:
    from tsctl.proto_gen import inference_pb2

    message = inference_pb2.PredictionsRequest(model_name="mlp", input={"data": body})
    return bytes(message.SerializeToString())


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\0" + struct.pack(">I", len(message)) + message


@dataclass
class GrpcCheck:
    code: str
    prediction: bytes
    frame_len: int  # bytes of the response's gRPC message frame (what h2load counts as DATA)


def grpc_call(address: str, body: bytes, timeout: float = 30) -> GrpcCheck:
    """One Predictions call through grpcio and tsctl's generated stubs."""
    import grpc

    from tsctl.proto_gen import inference_pb2, inference_pb2_grpc

    request = inference_pb2.PredictionsRequest(model_name="mlp", input={"data": body})
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            reply, call = stub.Predictions.with_call(request, timeout=timeout)
        except grpc.RpcError as exc:
            return GrpcCheck(f"{exc.code().name}: {exc.details()}", b"", 0)
        return GrpcCheck(call.code().name, bytes(reply.prediction), 5 + reply.ByteSize())


# ----------------------------------------------------------------------------- load


@dataclass
class Run(sb.Load):
    """One measured run: serve_bench's Load plus where the CPU went."""

    lg_cores: float = 0.0  # the load generator
    fe_cores: float = 0.0  # the server's frontend process (its root)
    wk_cores: float = 0.0  # the server's other processes (workers)
    missing: int = 0  # successful gRPC answers that carried no prediction

    def problems(self) -> str:
        parts = [super().problems()] if super().problems() else []
        if self.missing:
            parts.append(f"{self.missing} answers without a prediction")
        return ", ".join(parts)


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _split_cpu(root: int | None) -> tuple[float, float]:
    """(root process, its descendants) CPU seconds."""
    if root is None:
        return 0.0, 0.0
    fe = wk = 0.0
    for pid in sb.process_tree(root):
        fields = sb._stat_fields(pid)
        if fields and len(fields) > 14:
            secs = (int(fields[11]) + int(fields[12])) / sb.CLOCK_TICKS
            if pid == root:
                fe = secs
            else:
                wk += secs
    return fe, wk


def with_cpu(run: Callable[[], sb.Load], root: int | None) -> Run:
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
) -> sb.Load | Run:
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


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    batches: list[int]
    concs: list[int]
    duration: float
    warmup: float
    retries: int
    servers: list[str]
    ts_rest: bool
    wrk: bool


@dataclass
class Row:
    target: str  # a TARGETS key
    batch: int
    conc: int
    threads: list[int]
    load: Run


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def wanted(plan: Plan, server: str) -> list[tuple[str, str, str]]:
    """(key, protocol, tool) of the runs to make on `server`."""
    keep = []
    for key, name, protocol, tool in TARGETS:
        if name != server:
            continue
        if key == "tsctl REST wrk" and not plan.wrk:
            continue
        if name == "TorchServe" and protocol == "rest" and not plan.ts_rest:
            continue
        keep.append((key, protocol, tool))
    return keep


def measure_server(
    plan: Plan,
    server: Any,
    batch: int,
    threads: dict[int, int],
    files: dict[str, Path],
    work: Path,
    results: Results,
) -> None:
    """Start `server` with the batch-size archive, check it, and make all its runs."""
    models = f"mlp={sb.mlp_archive_name(1, batch)}.mar"
    body = files["body"].read_bytes()
    with sb.running(server, models, "mlp", 1, threads[1]):
        observed = server.worker_threads()
        if server.name == "tsctl" and observed and observed[0] != threads[1]:
            sb.log(f"  note: tsctl gives its worker {observed[0]} threads, not {threads[1]}")
            threads[1] = observed[0]
        # the correctness gate: REST 200, gRPC OK with the same prediction bytes
        status, rest_answer = sb.http_request(
            server.inference_port, "POST", REST_PATH, body, "application/json", timeout=30
        )
        if status != 200:
            raise RuntimeError(f"{server.name}: POST {REST_PATH} → {status}: {rest_answer[:300]!r}")
        check = grpc_call(server.grpc_address, body)
        if check.code != "OK":
            raise RuntimeError(f"{server.name}: gRPC Predictions → {check.code}")
        if check.prediction != rest_answer:
            raise RuntimeError(
                f"{server.name}: gRPC prediction {check.prediction[:200]!r} differs from the "
                f"REST answer {rest_answer[:200]!r}"
            )
        results.answers.setdefault(server.name, check.prediction.decode(errors="replace"))
        sb.log(f"  gRPC check: {check.code}, response frame {check.frame_len} bytes")
        grpc_url = f"http://{server.grpc_address}{GRPC_PATH}"
        rest_url = f"http://127.0.0.1:{server.inference_port}{REST_PATH}"

        def run_once(protocol: str, tool: str, conc: int, seconds: float) -> sb.Load:
            if tool == "wrk":
                return sb.run_wrk(
                    server.inference_port, REST_PATH, files["body"], "application/json",
                    conc, seconds, 10,
                )  # fmt: skip
            if protocol == "grpc":
                return run_h2load(
                    grpc_url, files["frame"], GRPC_HEADERS, conc, seconds, False, work,
                    check.frame_len,
                )  # fmt: skip
            return run_h2load(
                rest_url, files["body"], ["content-type: application/json"], conc, seconds,
                True, work,
            )  # fmt: skip

        for conc in plan.concs:
            for key, protocol, tool in wanted(plan, server.name):
                run_once(protocol, tool, conc, plan.warmup)  # warm-up, not recorded
                load = sb.measured(
                    lambda p=protocol, t=tool, c=conc: with_cpu(  # type: ignore[misc]
                        lambda: run_once(p, t, c, plan.duration), server.root_pid
                    ),
                    server.root_pid,
                    plan.retries,
                    f"{key} c={conc}",
                )
                assert isinstance(load, Run)
                if protocol == "grpc":
                    after = grpc_call(server.grpc_address, body)
                    if after.code != "OK" or after.prediction != check.prediction:
                        load.error = (load.error + "; " if load.error else "") + (
                            f"gRPC check after the run: {after.code}"
                        )
                results.rows.append(Row(key, batch, conc, observed, load))
                sb.log(
                    f"    {key:<15} c={conc:<3} {load.rps:7.0f} req/s  p50 {load.p50_ms:6.2f} ms"
                    f"  p99 {load.p99_ms:6.2f} ms  lg/fe/wk {load.lg_cores:.2f}/"
                    f"{load.fe_cores:.2f}/{load.wk_cores:.2f}  {load.problems()}"
                )
                if load.problems():
                    results.errors.append(f"{key} batch={batch} c={conc}: {load.problems()}")


# ----------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if a > 0 and b > 0 else "n/a"


def print_report(results: Results, plan: Plan) -> None:
    by = {(r.target, r.batch, r.conc): r for r in results.rows}
    print(
        f"\nMLP 16→64→64→4, 1 worker, JSON body of 16 floats (gRPC: the same bytes as input "
        f'"data"); {plan.duration:g} s per run after a {plan.warmup:g} s warm-up run; '
        "h2load -t1 -m1 -c<conc> (gRPC over h2c; tsctl REST also with --h1), "
        "wrk -t1 -c<conc> --latency (REST); "
        "batch 8 with maxBatchDelay 5 ms\n"
        "cores: lg = load generator, fe = frontend process, wk = worker, oth = other "
        "processes on the machine\n"
    )
    head = (
        f"{'batch':>5} {'conc':>4}  {'target':<30} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}  "
        f"{'lg':>4} {'fe':>4} {'wk':>4} {'oth':>4}  problems"
    )
    print(head)
    print("-" * len(head))
    for b in plan.batches:
        for c in plan.concs:
            for key, *_ in TARGETS:
                row = by.get((key, b, c))
                if row is None:
                    continue
                x = row.load
                print(
                    f"{b:>5} {c:>4}  {LABELS[key]:<30} {x.rps:>7.0f} {x.p50_ms:>7.2f} "
                    f"{x.p99_ms:>7.2f}  {x.lg_cores:>4.2f} {x.fe_cores:>4.2f} "
                    f"{x.wk_cores:>4.2f} {x.other_cores:>4.2f}  {x.problems()}"
                )
            print()
    print("Ratios (req/s: higher is better for the first; p99: lower is better for the first)\n")
    pairs = [
        ("tsctl gRPC", "TS gRPC", "gRPC tsctl/TS"),
        ("tsctl gRPC", "tsctl REST", "tsctl gRPC/REST"),
        ("TS gRPC", "TS REST", "TS gRPC/REST (wrk)"),
        ("tsctl REST wrk", "TS REST", "REST tsctl/TS (wrk)"),
        ("tsctl REST", "tsctl REST wrk", "tsctl REST h2load/wrk"),
    ]
    head = f"{'batch':>5} {'conc':>4}  " + "  ".join(f"{name:>23}" for *_, name in pairs)
    print(head)
    sub = f"{'':>5} {'':>4}  " + "  ".join(f"{'req/s':>11} {'p99':>11}" for _ in pairs)
    print(sub)
    print("-" * len(head))
    for b in plan.batches:
        for c in plan.concs:
            cells = []
            for a, z, _ in pairs:
                ra, rz = by.get((a, b, c)), by.get((z, b, c))
                if ra is None or rz is None:
                    cells.append(f"{'-':>11} {'-':>11}")
                    continue
                cells.append(
                    f"{ratio(ra.load.rps, rz.load.rps):>11} "
                    f"{ratio(ra.load.p99_ms, rz.load.p99_ms):>11}"
                )
            print(f"{b:>5} {c:>4}  " + "  ".join(cells))
    threads = {r.target.split()[0]: r.threads for r in results.rows if r.threads}
    print(f"\ntorch threads per worker (tsctl / TorchServe): {threads}")
    for name, answer in results.answers.items():
        print(f"{name} gRPC prediction: {json.loads(answer)}")
    if len(results.answers) == 2:
        a, b2 = (json.loads(v) for v in results.answers.values())
        same = len(a) == len(b2) and all(abs(x - y) < 1e-5 for x, y in zip(a, b2, strict=False))
        print(f"predictions match: {'yes' if same else 'NO'}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, conc 1 and 32, 3 s runs")
    parser.add_argument("--no-torchserve", action="store_true", help="tsctl only")
    parser.add_argument("--batches", default=None, help="batch sizes (default 1,8)")
    parser.add_argument("--concs", default=None, help="concurrencies (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run")
    parser.add_argument("--no-ts-rest", action="store_true", help="skip TorchServe's REST runs")
    parser.add_argument("--no-wrk", action="store_true", help="skip tsctl's REST run with wrk")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run")
    parser.add_argument(
        "--quiet-budget", type=float, default=None,
        help="seconds in all to wait for other processes to go quiet (default 120, quick 30)",
    )  # fmt: skip
    parser.add_argument("--ts-venv", type=Path, default=Path("/work/ts-venv"))
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="tsctl's venv")
    parser.add_argument("--json-out", type=Path, default=None, help="also write raw results")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for its logs)")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    return Plan(
        batches=_ints(args.batches) if args.batches else ([1] if quick else [1, 8]),
        concs=_ints(args.concs) if args.concs else ([1, 32] if quick else [1, 8, 32]),
        duration=args.duration or (3.0 if quick else 8.0),
        warmup=args.warmup or (1.0 if quick else 2.0),
        retries=max(0, args.retries),
        servers=["tsctl"] if args.no_torchserve else list(sb.SERVERS),
        ts_rest=not args.no_ts_rest,
        wrk=not args.no_wrk,
    )


def tool_versions() -> str:
    versions = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions.append(
            subprocess.run(
                ["h2load", "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        versions.append((out.stdout + out.stderr).strip().splitlines()[0].split(" Copyright")[0])
    with contextlib.suppress(ImportError):
        import grpc

        versions.append(f"grpcio {grpc.__version__} (tsctl)")
    return "; ".join(versions)


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
    for tool in ["h2load"] + ["wrk"] * (plan.wrk or (plan.ts_rest and len(plan.servers) > 1)):
        if shutil.which(tool) is None:
            hint = " (Debian: apt-get install nghttp2-client)" if tool == "h2load" else ""
            print(f"{tool} is not on PATH{hint}", file=sys.stderr)
            return 2
    sb.GATE = sb.QuietGate(
        args.quiet_budget if args.quiet_budget is not None else (30 if args.quick else 120)
    )
    signal.signal(signal.SIGTERM, sb._raise_on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="grpc-bench-", dir=args.workdir))
    store = work / "store"
    store.mkdir()
    servers: dict[str, Any] = {"tsctl": TsctlGrpcServer(work, store, tsctl)}
    if not args.no_torchserve:
        servers["TorchServe"] = TorchServeGrpcServer(work, store, args.ts_venv)
    results = Results()
    began = time.monotonic()
    try:
        sb.log(f"work dir {work}; machine: {sb.machine_line()}; {tool_versions()}")
        body = json.dumps(sb.MLP_BODY).encode()
        files = {"body": work / "mlp_body.json", "frame": work / "mlp_request.grpc"}
        files["body"].write_bytes(body)
        files["frame"].write_bytes(grpc_frame(request_message(body)))
        sb.run_checked([python, sb.BUILD_MLP, "--out", work / "mlp.pt"], timeout=120)
        for batch in sorted(set(plan.batches)):
            sb.archive(
                tsctl, store, work / "src", "mlp", sb.mlp_archive_name(1, batch),
                work / "mlp.pt", sb.MLP_HANDLER, sb.mlp_settings(1, batch),
            )  # fmt: skip
        threads = {1: sb.threads_for(1)}
        for turn, batch in enumerate(plan.batches):
            order = plan.servers if turn % 2 == 0 else plan.servers[::-1]
            for name in order:
                sb.log(f"batch={batch}: {name}")
                try:
                    measure_server(plan, servers[name], batch, threads, files, work, results)
                except (RuntimeError, OSError) as exc:
                    results.errors.append(f"{name} batch={batch}: {exc}")
                    sb.log(f"  ERROR: {exc}")
    finally:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        if args.keep:
            sb.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ngrpc_bench: {sb.machine_line()}; Python {sys.version.split()[0]}")
    print(f"load generators: {tool_versions()}")
    print(
        f"{time.monotonic() - began:.0f} s in all ({sb.GATE.waited_s:.0f} s of it waiting "
        "for other processes to go quiet)"
    )
    print_report(results, plan)
    if results.errors:
        print("\nERRORS:\n" + "\n".join(f"  {e}" for e in results.errors))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"plan": asdict(plan), **asdict(results)}, indent=2, default=str)
        )
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
