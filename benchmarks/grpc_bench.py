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

One server runs at a time (benchmarks/lib/servers.py: the server classes serve_bench.py uses,
process tracking and clean stop); which server goes first alternates between batch sizes.

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

Its runs and tables live in benchmarks/lib (grpc_runs.py, grpc_report.py).

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import MLP_BODY, mlp_archives
from benchmarks.lib.grpc_report import print_report
from benchmarks.lib.grpc_runs import Plan, Results, grpc_frame, measure_server, request_message
from benchmarks.lib.procs import machine_line
from benchmarks.lib.quiet import QuietGate
from benchmarks.lib.script import ROOT, log, missing, programs, stopped_at_end, workspace
from benchmarks.lib.servers import (
    SERVERS,
    Server,
    TorchServeServer,
    TsctlServer,
    server_order,
    threads_for,
)


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
        servers=["tsctl"] if args.no_torchserve else list(SERVERS),
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
    python, tsctl, needed = programs(args.venv, args.ts_venv, not args.no_torchserve)
    tools = ["h2load"] + ["wrk"] * (plan.wrk or (plan.ts_rest and len(plan.servers) > 1))
    problem = missing(needed, tools, {"h2load": " (Debian: apt-get install nghttp2-client)"})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    gate = QuietGate(
        args.quiet_budget if args.quiet_budget is not None else (30 if args.quick else 120)
    )
    results = Results()
    began = time.monotonic()
    with workspace("grpc-bench-", args.workdir, args.keep) as work:
        store = work / "store"
        servers: dict[str, Server] = {"tsctl": TsctlServer(work, store, tsctl, grpc=True)}
        if not args.no_torchserve:
            servers["TorchServe"] = TorchServeServer(work, store, args.ts_venv, grpc=True)
        with stopped_at_end(servers.values()):
            log(f"work dir {work}; machine: {machine_line()}; {tool_versions()}")
            body = json.dumps(MLP_BODY).encode()
            files = {"body": work / "mlp_body.json", "frame": work / "mlp_request.grpc"}
            files["body"].write_bytes(body)
            files["frame"].write_bytes(grpc_frame(request_message(body)))
            mlp_archives(python, tsctl, work, store, {(1, batch) for batch in plan.batches})
            threads = {1: threads_for(1)}
            for turn, batch in enumerate(plan.batches):
                for name in server_order(plan.servers, turn):
                    log(f"batch={batch}: {name}")
                    try:
                        measure_server(
                            plan, servers[name], batch, threads, files, work, results, gate
                        )
                    except (RuntimeError, OSError) as exc:
                        results.errors.append(f"{name} batch={batch}: {exc}")
                        log(f"  ERROR: {exc}")

    print(f"\ngrpc_bench: {machine_line()}; Python {sys.version.split()[0]}")
    print(f"load generators: {tool_versions()}")
    print(
        f"{time.monotonic() - began:.0f} s in all ({gate.waited_s:.0f} s of it waiting "
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
