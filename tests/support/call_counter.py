"""Run the `tsctl` CLI in this process with a profiler that signals switch on and off.

    TSCTL_CALL_PROFILE=/path/out python -m tests.support.call_counter serve start --foreground ...

SIGUSR1 starts cProfile on the main thread (the daemon's event loop) and creates
`out.armed`; SIGUSR2 stops it and writes `out.json`: `{"calls": {function: calls}, "total":
n, "garbage": g}`, Python functions only (no C builtins), `g` the objects the garbage
collector freed in between (reference cycles: a full collection at each signal), and
`out.prof`, cProfile's own stats with builtins, for `pstats`. Used by
tests/e2e/test_call_budget.py (the daemon's Python calls and cyclic garbage per request, the
issue-16 regression guard). Profiling slows the daemon; the counts, not the times, are what a
test may read.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

_OUT = Path(os.environ["TSCTL_CALL_PROFILE"])
_profiler = cProfile.Profile()  # one per thread at a time: a second would replace it
_garbage = [0]  # objects the collector found unreachable (cyclic garbage) while armed


def _collected(phase: str, info: dict[str, int]) -> None:
    if phase == "stop":
        _garbage[0] += info["collected"]


def _start(signum: int, frame: FrameType | None) -> None:
    gc.collect()  # what was garbage before is not counted
    _garbage[0] = 0
    gc.callbacks.append(_collected)
    _profiler.enable()
    _OUT.with_suffix(".armed").touch()


def _stop(signum: int, frame: FrameType | None) -> None:
    _profiler.disable()
    gc.collect()  # the cycles left since arming, found now
    gc.callbacks.remove(_collected)
    _profiler.create_stats()
    calls: dict[str, int] = {}
    for (filename, line, name), (_primitive, total, *_rest) in _profiler.stats.items():  # type: ignore[attr-defined]
        if filename == "~" or (name == "_stop" and filename == __file__):
            continue  # a C builtin, or this handler
        calls[f"{filename}:{line}({name})"] = total
    _profiler.dump_stats(str(_OUT.with_suffix(".prof")))
    done = _OUT.with_suffix(".tmp")
    found = {"calls": calls, "total": sum(calls.values()), "garbage": _garbage[0]}
    done.write_text(json.dumps(found))
    done.replace(_OUT.with_suffix(".json"))


def main() -> None:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    from tsctl.cli.entry import main as tsctl_main

    sys.argv = ["tsctl", *sys.argv[1:]]
    sys.exit(tsctl_main())


if __name__ == "__main__":
    main()
