"""Property tests in two sizes: a quick run in the normal suite, a deep one under `-m fuzz`.

A fuzz module says `pytest_generate_tests = fuzzing.pytest_generate_tests` and gives each
property test an `examples` argument. A plain `pytest` run parametrises it with `QUICK`
(id `quick`); a run whose `-m` expression selects the `fuzz` marker gets `DEEP` instead (id
`deep`, marked `fuzz`), so `pytest -m fuzz tests/unit` runs only the deep variants and the
normal suite never pays for them. The test body wraps its check with `explore(examples)`:
hypothesis settings with no per-example deadline (the machine is shared; a slow example is not
a failure). The quick variant is derandomized, so the normal suite is deterministic (a strict
xfail pinned on a known bug stays an xfail); the deep one explores anew each run and keeps
its examples database in the temporary directory, not in the work tree.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from _pytest.mark.expression import Expression
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

#: examples per property in the normal suite, and under `-m fuzz`
QUICK = int(os.environ.get("TSCTL_FUZZ_QUICK", "60"))
DEEP = int(os.environ.get("TSCTL_FUZZ_EXAMPLES", "3000"))

_DATABASE = DirectoryBasedExampleDatabase(
    os.path.join(tempfile.gettempdir(), f"tsctl-hypothesis-{os.getuid()}")
)

F = TypeVar("F", bound=Callable[..., Any])


def fuzz_selected(config: pytest.Config) -> bool:
    """Whether the run's `-m` expression selects tests marked `fuzz` (`-m fuzz`,
    `-m "fuzz and not slow"`), as pytest itself would evaluate it for such a test."""
    markexpr = config.getoption("markexpr", "") or ""
    if "fuzz" not in markexpr:
        return False
    return Expression.compile(markexpr).evaluate(lambda name, **_: name == "fuzz")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "examples" not in metafunc.fixturenames:
        return
    if fuzz_selected(metafunc.config):
        param = pytest.param(DEEP, id="deep", marks=pytest.mark.fuzz)
    else:
        param = pytest.param(QUICK, id="quick")
    metafunc.parametrize("examples", [param])


def explore(examples: int, **overrides: Any) -> Callable[[F], F]:
    """The hypothesis settings of one property run with `examples` examples."""
    quick = examples <= QUICK
    return settings(  # type: ignore[return-value]
        max_examples=examples,
        deadline=None,
        derandomize=quick,
        database=None if quick else _DATABASE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **overrides,
    )
