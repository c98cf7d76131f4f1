"""serve_bench's tables, one per section, printed to stdout from its Results."""

from __future__ import annotations

import statistics

from benchmarks.lib.load import Load
from benchmarks.lib.procs import MIB
from benchmarks.lib.serve_plan import FLOOR_NAME, MlpRow, Plan, Results
from benchmarks.lib.servers import SERVERS
from benchmarks.lib.table import print_head, ratio, same_answers


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
    print_head(
        f"{'workers':>7} {'thr':>3} {'batch':>5} {'conc':>4} | {'tsctl req/s':>11} "
        f"{'p50 ms':>7} {'p99 ms':>7} | {'TS req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'req/s ratio':>11} {'p99 ratio':>9} {'others':>9}"
    )
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
    print_cpu(grouped, plan)
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
        print(f"answers match: {'yes' if same_answers(a, b) else 'NO'}")
    if notes:
        print("details:\n" + "\n".join(notes))


def print_cpu(grouped: dict[tuple[str, int, int, int], list[MlpRow]], plan: Plan) -> None:
    """Where the CPU went per answered request (medians over rounds): the frontend process
    (tsctl's daemon, TorchServe's JVM) and the workers, and the mean batch tsctl's workers got
    (TorchServe has no batch-size metric)."""
    print(
        "\nCPU per answered request, µs (fe = frontend process, wk = workers; "
        "batch = tsctl's mean batch size from tsctl_batch_size)\n"
    )
    print_head(
        f"{'workers':>7} {'batch':>5} {'conc':>4} | {'tsctl fe':>8} {'wk':>6} {'batch':>5} | "
        f"{'TS fe':>7} {'wk':>6} | {'fe ratio':>8}"
    )
    for w in plan.workers:
        for b in plan.batches:
            for c in plan.concs:
                ours = grouped.get(("tsctl", w, b, c), [])
                ref = grouped.get(("TorchServe", w, b, c), [])
                if not ours and not ref:
                    continue

                def med(rows: list[MlpRow], key: str) -> float:
                    values = [getattr(r, key) for r in rows if getattr(r, key)]
                    return statistics.median(values) if values else 0.0

                line = f"{w:>7} {b:>5} {c:>4} | "
                line += f"{med(ours, 'fe_us'):>8.0f} {med(ours, 'wk_us'):>6.0f} "
                line += f"{med(ours, 'mean_batch'):>5.2f} | "
                line += f"{med(ref, 'fe_us'):>7.0f} {med(ref, 'wk_us'):>6.0f} | "
                fe_ours, fe_ref = med(ours, "fe_us"), med(ref, "fe_us")
                line += f"{ratio(fe_ours, fe_ref) if fe_ours and fe_ref else '-':>8}"
                print(line)


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
    print_head(
        f"{'server':<11} {'thr':>3} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'loop':>6} {'÷ loop':>7} {'others':>6}"
    )
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
    print_head(f"{'server':<11} {'first 200 s':>11} {'launcher returned s':>19}  trials")
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
    print_head(f"{'server':<11} {'idle MiB':>9} {'peak MiB':>9} {'processes':>9} {'samples':>7}")
    peaks: dict[str, int] = {}
    for r in results.rss:
        peaks[r.server] = max(peaks.get(r.server, 0), r.peak_bytes)
        print(
            f"{r.server:<11} {r.idle_bytes / MIB:>9.1f} {r.peak_bytes / MIB:>9.1f} "
            f"{r.processes:>9} {r.samples:>7}"
        )
    if len(peaks) == 2:
        print(f"tsctl / TorchServe peak RSS: {ratio(peaks['tsctl'], peaks['TorchServe'])}")
