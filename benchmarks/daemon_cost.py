"""Benchmark: the daemon's CPU cost per request, and where it goes (issue 16's yardstick).

Run from the repository root (about 1 minute; `--profile` adds py-spy's table):

    .venv/bin/python benchmarks/daemon_cost.py [--rows w1b1c32,w1b8c32] [--duration S]
        [--warmup S] [--profile] [--top N] [--venv .venv] [--keep]
        [--variant NAME=VALUE[,NAME=VALUE]|- ...] [--rounds N]

For each row (workers, batch size, concurrency) it starts tsctl with the MLP of serve_bench.py
(16→64→64→4, benchmarks/models/), drives `POST /predictions/mlp` with wrk (`-t1 -c<conc>`,
keep-alive, the 16-float JSON body as `application/json`) for `--duration` seconds after a
warm-up, and prints requests/s and the CPU the daemon process and its workers used per
answered request, in µs (from /proc/<pid>/stat before and after the run), plus the mean batch
size the workers got (from `tsctl_batch_size` on the metrics API). CPU per request is what the
daemon's work costs; it is less disturbed by other processes on a shared machine than
requests/s, but compare rows of one run, not runs of different days.

With `--profile`, py-spy samples the daemon during a second measured run of each row (which is
then slower: sampling costs CPU) and the functions with the most samples are printed, by own
time and by inclusive time. `pip install py-spy` first (it is not a dependency).

With `--variant` (repeatable; `-` is the daemon's own environment), each row is measured once
per variant with those variables in the daemon's environment, which its workers inherit (e.g.
`--variant - --variant OMP_WAIT_POLICY=PASSIVE`: an A/B of torch's idle threads), in `--rounds`
rounds, the variants' order reversed every other round so slow drift hits them alike.

With `--alternate SLICE` (two variants or more), the variants' daemons run side by side
instead, each started once per row, and the load moves from one to the next every SLICE
seconds (`--rounds` times round all of them, the order reversed every other round), so
that a machine whose speed drifts over minutes (a shared VM) slows them alike; each
variant's line adds its slices up, and the last line gives each one's CPU per request as a
ratio of the first variant's, overall and the median of the rounds' ratios.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import MLP_BODY, mlp_archive_name, mlp_archives
from benchmarks.lib.load import Load, run_wrk, with_cpu
from benchmarks.lib.procs import machine_line
from benchmarks.lib.rest import batch_stats
from benchmarks.lib.script import ROOT, log, missing, programs, stopped_at_end, workspace
from benchmarks.lib.servers import TsctlServer, running, threads_for

_ROW = re.compile(r"^w(\d+)b(\d+)c(\d+)$")


@dataclass
class Row:
    workers: int
    batch: int
    conc: int

    @property
    def name(self) -> str:
        return f"w{self.workers}b{self.batch}c{self.conc}"


def profile_table(raw: Path, top: int) -> str:
    """py-spy's raw (collapsed) stacks summed by function: own and inclusive shares."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            found = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
            if found:
                where = found.group(2).split("site-packages/")[-1]
                where = where.split(f"{ROOT}/")[-1]
                names.append(f"{found.group(1)} ({where})")
            else:
                names.append(frame)
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; own time:"]
    lines += [f"  {n / total * 100:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"  {n / total * 100:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def measure(server: TsctlServer, row: Row, body: Path, args: argparse.Namespace) -> str:
    """One measured wrk run of `row` after a warm-up: its line of figures."""
    port = server.inference_port

    def load(seconds: float) -> Load:
        return run_wrk(port, "/predictions/mlp", body, "application/json", row.conc, seconds, 10)

    load(args.warmup)
    before = batch_stats(f"http://127.0.0.1:{server.metrics_port}")
    run = with_cpu(lambda: load(args.duration), server.root_pid)
    after = batch_stats(f"http://127.0.0.1:{server.metrics_port}")
    answered = run.rps * run.seconds
    fe = run.fe_cores * run.seconds / answered * 1e6 if answered else 0.0
    wk = run.wk_cores * run.seconds / answered * 1e6 if answered else 0.0
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else 0.0
    return (
        f"{row.name:<10} {run.rps:8.0f} req/s  p99 {run.p99_ms:6.2f} ms  daemon {fe:5.0f} µs/req "
        f"({run.fe_cores:.2f} cores)  workers {wk:5.0f} µs/req ({run.wk_cores:.2f} cores)  "
        f"mean batch {mean_batch:.2f}  {run.problems()}"
    )


def profile(
    server: TsctlServer, row: Row, body: Path, raw: Path, spy: Path, seconds: float
) -> None:
    """py-spy's raw stacks of the daemon into `raw`, sampled during a wrk run of `row`."""
    wrk = subprocess.Popen(
        [
            "wrk", "-t1", f"-c{row.conc}", f"-d{seconds + 4:.0f}s",
            "-s", str(ROOT / "benchmarks" / "models" / "post_file.lua"),
            f"http://127.0.0.1:{server.inference_port}/predictions/mlp", "--", str(body),
            "application/json",
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2)
    subprocess.run(
        [
            spy, "record", "--pid", str(server.root_pid), "-d", f"{seconds:.0f}", "-r", "250",
            "--format", "raw", "-o", str(raw), "--nonblocking",
        ],
        capture_output=True,
        timeout=seconds + 60,
    )  # fmt: skip
    wrk.wait(timeout=seconds + 60)


def alternate(
    work: Path,
    tsctl: Path,
    row: Row,
    variants: list[dict[str, str]],
    body: Path,
    args: argparse.Namespace,
) -> None:
    """`--alternate`: one daemon per variant, all running; the load moves between them."""
    servers = []
    for index, env in enumerate(variants):
        home = work / f"{row.name}-v{index}"
        home.mkdir()
        servers.append(TsctlServer(home, work / "store", tsctl, env=env))
    names = [",".join(f"{k}={v}" for k, v in env.items()) or "-" for env in variants]
    archive = f"{mlp_archive_name(row.workers, row.batch)}.mar"
    threads = threads_for(row.workers)
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(running(server, f"mlp={archive}", "mlp", row.workers, threads))
        for server in servers:
            run_wrk(
                server.inference_port, "/predictions/mlp", body, "application/json",
                row.conc, args.warmup, 10,
            )  # fmt: skip
        answered = [0.0] * len(servers)
        cpu = [0.0] * len(servers)
        rounds: list[list[float]] = []  # each round's µs per request, per variant
        for index in range(args.rounds):
            order = list(range(len(servers)))
            if index % 2:
                order.reverse()
            figures = [0.0] * len(servers)
            for which in order:
                server = servers[which]
                run = with_cpu(
                    lambda server=server: run_wrk(  # type: ignore[misc]
                        server.inference_port, "/predictions/mlp", body, "application/json",
                        row.conc, args.alternate, 10,
                    ),
                    server.root_pid,
                )  # fmt: skip
                done = run.rps * run.seconds
                answered[which] += done
                cpu[which] += run.fe_cores * run.seconds
                figures[which] = run.fe_cores * run.seconds / done * 1e6 if done else 0.0
            rounds.append(figures)
            print(
                f"{row.name:<10} round {index + 1}: "
                + "  ".join(f"{figure:6.1f}" for figure in figures)
                + " µs/req",
                flush=True,
            )
        base = cpu[0] / answered[0] if answered[0] else 0.0
        for which, name in enumerate(names):
            per = cpu[which] / answered[which] * 1e6 if answered[which] else 0.0
            ratios = sorted(r[which] / r[0] for r in rounds if r[0])
            median = ratios[len(ratios) // 2] if ratios else 0.0
            ratio = per / (base * 1e6) if base else 0.0
            print(
                f"{row.name:<10} daemon {per:6.1f} µs/req  x{ratio:.3f} of the first "
                f"(median of rounds x{median:.3f}; {answered[which]:.0f} answered)  env {name}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", default="w1b1c32,w1b8c32", help="wWbBcC, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--profile", action="store_true", help="also sample with py-spy")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile table")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="tsctl's venv")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="an environment to A/B ('-': none); repeatable",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every variant")
    parser.add_argument(
        "--alternate",
        type=float,
        default=0.0,
        metavar="SLICE",
        help="run the variants' daemons side by side, the load moving every SLICE seconds",
    )
    args = parser.parse_args(argv)
    variants = [
        {} if text == "-" else dict(item.split("=", 1) for item in text.split(","))
        for text in args.variant or ["-"]
    ]
    rows = []
    for text in args.rows.split(","):
        found = _ROW.match(text.strip())
        if not found:
            print(f"a row is wWbBcC (e.g. w1b8c32), not {text!r}", file=sys.stderr)
            return 2
        rows.append(Row(*map(int, found.groups())))
    python, tsctl, needed = programs(args.venv, Path("/nonexistent"), False)
    spy = args.venv / "bin" / "py-spy"
    problem = missing(needed + ([spy] if args.profile else []), ["wrk"], {})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print(f"daemon_cost: {machine_line()}; Python {sys.version.split()[0]}")
    with workspace("daemon-cost-", None, args.keep) as work:
        body = work / "body.json"
        body.write_text(json.dumps(MLP_BODY))
        mlp_archives(python, tsctl, work, work / "store", {(r.workers, r.batch) for r in rows})
        if args.alternate and len(variants) > 1:
            for row in rows:
                alternate(work, tsctl, row, variants, body, args)
            return 0
        server = TsctlServer(work, work / "store", tsctl)
        with stopped_at_end([server]):
            for index in range(args.rounds * len(rows)):
                row = rows[index % len(rows)]
                order = variants if index // len(rows) % 2 == 0 else variants[::-1]
                for env in order:
                    server.env = env
                    archive = f"{mlp_archive_name(row.workers, row.batch)}.mar"
                    threads = threads_for(row.workers)
                    with running(server, f"mlp={archive}", "mlp", row.workers, threads):
                        line = measure(server, row, body, args)
                        name = ",".join(f"{k}={v}" for k, v in env.items()) or "-"
                        print(f"{line}  env {name}" if len(variants) > 1 else line, flush=True)
                        if args.profile:
                            raw = work / f"profile-{row.name}.txt"
                            profile(server, row, body, raw, spy, args.duration)
                            log(f"profile of {row.name} (py-spy, daemon only):")
                            print(profile_table(raw, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
