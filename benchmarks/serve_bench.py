"""Benchmark: serving with tsctl vs TorchServe 0.12, side by side, same model, workers and load.

Run from the repository root (about 7 minutes on 2 cores; `--quick` about 3):

    .venv/bin/python benchmarks/serve_bench.py [--quick] [--no-torchserve]
        [--sections a,b,c,d] [--ts-venv /work/ts-venv] [--ts-threads matched|default]
        [--venv .venv] [--repeat N]
        [--duration S] [--warmup S] [--retries N] [--quiet-budget S]
        [--json-out FILE] [--workdir DIR] [--keep]

Sections:

(a) throughput and latency: a tiny TorchScript MLP (16→64→64→4, JSON body of 16 floats) with
    1 and 2 workers, batch size 1 and 8 (maxBatchDelay 5 ms), at concurrency 1, 8 and 32; and
    per row the CPU µs per answered request of the frontend process (tsctl's daemon,
    TorchServe's JVM) and of the workers (/proc, over the measured run), and the mean batch
    tsctl's workers got (`tsctl_batch_size`; TorchServe has no such metric).
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
OMP_NUM_THREADS/MKL_NUM_THREADS in its environment (its workers inherit it): this is
`--ts-threads matched`, the default, TorchServe's best case. `--ts-threads default` leaves
them unset, so each TorchServe worker keeps torch's default of one thread per core, as
TorchServe runs out of the box: its worst case, the condition of issue 16's own harness.
With 2 workers on 2 cores that oversubscribes the cores and TorchServe's 2-worker batch-8
rows drop about 4x (3,628 and 3,785 against 906 and 848 req/s at w2 b8 c32, 2026-12-07),
while its 1-worker rows are the same either way (2 threads in both). A result against
TorchServe holds only with both runs. Load comes from
wrk (`-t1 --latency`, connections = concurrency) with `benchmarks/models/post_file.lua`,
after a warm-up run per row. Only one server runs at a time; each is stopped (and its process
tree killed if it lingers) before the next starts. Everything generated (models, archives,
images, logs, temp dirs) lives in one temporary directory, removed at the end.

The machine may be shared, so every measurement also records how much CPU *other* processes
used meanwhile (/proc/stat busy time minus the server tree, wrk and this script), shown as
`others` in cores. Before each measurement the script waits (within `--quiet-budget` seconds
in all) for the machine to go quiet, and a run during which others used more than 0.25 cores
is repeated (`--retries`, default 2), keeping the least disturbed attempt.

The sections live in benchmarks/lib (serve_mlp.py, serve_resnet.py, serve_startup.py, their
tables in serve_report.py), on the servers, load generators and /proc helpers it shares with
grpc_bench.py.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import MLP_BODY, mlp_archives, resnet_archive
from benchmarks.lib.procs import machine_line
from benchmarks.lib.quiet import DISTURBED_CORES, QuietGate
from benchmarks.lib.script import (
    ROOT,
    log,
    missing,
    programs,
    stopped_at_end,
    workspace,
)
from benchmarks.lib.serve_mlp import section_mlp
from benchmarks.lib.serve_plan import SECTIONS, Plan, Results
from benchmarks.lib.serve_report import print_mlp, print_resnet, print_rss, print_startup
from benchmarks.lib.serve_resnet import section_resnet
from benchmarks.lib.serve_startup import section_startup, startup_floor
from benchmarks.lib.servers import SERVERS, Server, TorchServeServer, TsctlServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer rows")
    parser.add_argument("--no-torchserve", action="store_true", help="tsctl only")
    parser.add_argument("--sections", default="a,b,c,d", help="any of a,b,c,d (default all)")
    parser.add_argument(
        "--ts-venv", type=Path, default=Path("/work/ts-venv"), help="TorchServe 0.12's venv"
    )
    parser.add_argument(
        "--ts-threads",
        choices=("matched", "default"),
        default="matched",
        help="TorchServe's torch threads per worker: tsctl's (OMP_NUM_THREADS, the default) "
        "or torch's own default, one per core (TorchServe out of the box)",
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
    built = []
    body_file = work / "mlp_body.json"
    body_file.write_text(json.dumps(MLP_BODY))
    if plan.sections & {"a", "c", "d"}:
        combos = {(w, b) for w in plan.workers for b in plan.batches} | {(1, 1)}
        built += mlp_archives(python, tsctl, work, store, combos)
    if "b" in plan.sections:
        built.append(resnet_archive(python, tsctl, work, store))
    return body_file, built


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    python, tsctl, needed = programs(args.venv, args.ts_venv, not args.no_torchserve)
    problem = missing(needed, ["wrk"], {})
    if problem:
        print(problem, file=sys.stderr)
        return 2

    gate = QuietGate(
        args.quiet_budget if args.quiet_budget is not None else 60 * (1 + 4 * (not args.quick))
    )
    tsctl_env = dict(item.split("=", 1) for item in args.tsctl_env)
    results = Results()
    began = time.monotonic()
    with workspace("serve-bench-", args.workdir, args.keep) as work:
        store = work / "store"
        servers: dict[str, Server] = {"tsctl": TsctlServer(work, store, tsctl, tsctl_env)}
        if not args.no_torchserve:
            servers["TorchServe"] = TorchServeServer(
                work, store, args.ts_venv, match_threads=args.ts_threads == "matched"
            )
        with stopped_at_end(servers.values()):
            log(f"work dir {work}; machine: {machine_line()}")
            body_file, built = prepare(plan, work, python, tsctl, store)
            log(f"archives: {', '.join(built)}")
            steps: list[tuple[str, Callable[[], None]]] = [
                ("ad", lambda: section_mlp(plan, servers, body_file, results, gate)),
                ("b", lambda: section_resnet(plan, servers, python, work, results, gate)),
                (
                    "c",
                    lambda: section_startup(
                        plan,
                        servers,
                        body_file.read_bytes(),
                        results,
                        lambda threads: startup_floor(python, work / "mlp.pt", threads),
                        gate,
                    ),
                ),
            ]
            for keys, step in steps:
                if plan.sections & set(keys):
                    step()

    print(f"\nserve_bench: {machine_line()}; Python {sys.version.split()[0]}")
    print(
        f"sections {','.join(sorted(plan.sections))}; "
        f"{'quick' if args.quick else 'full'} run, {time.monotonic() - began:.0f} s in all "
        f"({gate.waited_s:.0f} s of it waiting for other processes to go quiet); "
        f"TorchServe's torch threads: --ts-threads {args.ts_threads}"
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
