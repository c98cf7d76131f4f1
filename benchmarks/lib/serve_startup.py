"""serve_bench's section (c): start to first answered prediction, from launching `tsctl serve
start` / `torchserve --start` with the MLP until the first POST /predictions/mlp answers 200,
next to the floor any Python server has: a fresh Python process that imports torch, loads the
MLP and runs it once."""

from __future__ import annotations

import http.client
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.lib.quiet import DISTURBED_CORES, CpuMeter, QuietGate
from benchmarks.lib.script import log, run_checked
from benchmarks.lib.serve_plan import FLOOR_NAME, Plan, Results, StartupResult
from benchmarks.lib.servers import Server, server_order, threads_for
from benchmarks.lib.torchserve import START_TIMEOUT_S

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
    gate: QuietGate,
) -> None:
    outcomes = {name: StartupResult(name) for name in plan.servers}
    results.startup.extend(outcomes.values())
    plain = StartupResult(FLOOR_NAME)
    results.startup.append(plain)
    threads = threads_for(1)
    for trial in range(plan.startup_trials):
        gate.wait(None)
        with CpuMeter(None) as meter:
            seconds = floor(threads)
        log(f"(c) floor, trial {trial + 1}: {seconds:.2f} s (others {meter.other_cores:.2f})")
        plain.first_200_s.append(seconds)
        plain.launcher_s.append(seconds)
        plain.other_cores.append(meter.other_cores)
        for name in server_order(plan.servers, trial):
            server = servers[name]
            log(f"(c) start to first prediction: {name}, trial {trial + 1}")
            best: tuple[float, float, float] | None = None
            try:
                for _attempt in range(plan.retries + 1):
                    gate.wait(None)
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
    proc: subprocess.Popen[bytes] | None = server.proc
    launcher = float("nan")
    deadline = started + START_TIMEOUT_S
    while True:
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"{server.name}: no 200 within {START_TIMEOUT_S:.0f} s")
        if launcher != launcher and proc is not None and proc.poll() is not None:
            launcher = now - started
        try:
            reply = server.post("/predictions/mlp", body, "application/json", START_TIMEOUT_S)
            if reply.status == 200:
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
