"""serve_bench's section (a), throughput and latency of the MLP with wrk, and (d), the peak RSS
of the server's process tree, sampled during (a)'s 1-worker batch-1 concurrency-32 row."""

from __future__ import annotations

import contextlib
import functools
import http.client
from pathlib import Path

from benchmarks.lib.archives import mlp_archive_name
from benchmarks.lib.load import run_wrk, with_cpu
from benchmarks.lib.procs import RssSampler
from benchmarks.lib.quiet import QuietGate
from benchmarks.lib.rest import batch_stats
from benchmarks.lib.script import log
from benchmarks.lib.serve_plan import MlpRow, Plan, Results, RssResult
from benchmarks.lib.servers import Server, running, server_order, threads_for


def check_answer(server: Server, body: bytes, results: Results) -> None:
    """One prediction must answer 200; the first answer of each server is kept."""
    reply = server.post("/predictions/mlp", body, "application/json", timeout=30)
    if reply.status != 200:
        raise RuntimeError(
            f"{server.name}: POST /predictions/mlp → {reply.status}: {reply.body[:300]!r}"
        )
    results.answers.setdefault(server.name, reply.json())


def section_mlp(
    plan: Plan, servers: dict[str, Server], body_file: Path, results: Results, gate: QuietGate
) -> None:
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
            for name in server_order(plan.servers, turn):
                log(f"(a) round {rep + 1}/{plan.repeat} workers={workers} batch={batch}: {name}")
                try:
                    mlp_rows(plan, servers[name], body_file, body, workers, batch, concs,
                             threads, rep, results, gate)  # fmt: skip
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
    gate: QuietGate,
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
            metrics = f"http://127.0.0.1:{server.metrics_port}"
            before = batch_stats(metrics)
            with sampler or contextlib.nullcontext():
                measured = functools.partial(
                    run_wrk, server.inference_port, "/predictions/mlp", body_file,
                    "application/json", conc, plan.duration, 10,
                )  # fmt: skip
                load = gate.measured(
                    lambda m=measured: with_cpu(m, server.root_pid),  # type: ignore[misc]
                    server.root_pid, plan.retries, f"c={conc}",
                )  # fmt: skip
            after = batch_stats(metrics)
            if sampler is not None:
                results.rss.append(
                    RssResult(server.name, idle, sampler.peak, sampler.peak_processes,
                              sampler.samples)
                )  # fmt: skip
            row = MlpRow(server.name, workers, batch, conc, observed, load, rep)
            answered = load.rps * load.seconds
            if answered:  # with_cpu's cores are over the run's wall time, about `seconds`
                row.fe_us = load.fe_cores * load.seconds / answered * 1e6
                row.wk_us = load.wk_cores * load.seconds / answered * 1e6
            if after[1] > before[1]:
                row.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
            if "a" in plan.sections:
                results.mlp.append(row)
            log(
                f"    c={conc}: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                f"p99 {load.p99_ms:.2f} ms, frontend {row.fe_us:.0f} µs/req, workers "
                f"{row.wk_us:.0f} µs/req, mean batch {row.mean_batch or float('nan'):.2f} "
                f"{load.problems()}"
            )
