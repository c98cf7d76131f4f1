"""grpc_bench's tables: every run (req/s, latency, where the CPU went), then the ratios between
targets, printed to stdout from its Results."""

from __future__ import annotations

import json

from benchmarks.lib.grpc_runs import TARGETS, Plan, Results
from benchmarks.lib.table import print_head, ratio, same_answers

LABELS = {
    "tsctl gRPC": "tsctl gRPC (h2load)",
    "tsctl REST": "tsctl REST (h2load --h1)",
    "tsctl REST wrk": "tsctl REST (wrk)",
    "TS gRPC": "TorchServe gRPC (h2load)",
    "TS REST": "TorchServe REST (wrk)",
}


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
    print_head(head)
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
        print(f"predictions match: {'yes' if same_answers(a, b2) else 'NO'}")
