"""benchmarks/request_path_cost.py drives the daemon's own request path (the pool's `_Chain`,
its groups, the codec, the metrics in log mode) against a stand-in worker: kept running here,
at a few requests, so that a change to that path cannot leave the benchmark broken unnoticed
(it was once, for a stop). The figure it prints is not checked: a benchmark, not a test."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import request_path_cost

HANG_GUARD = 60.0  # seconds


@pytest.mark.parametrize(("batch", "depth"), [(1, 1), (1, 4), (8, 1)])
def test_every_request_is_answered(batch: int, depth: int) -> None:
    # `per_request` asserts that each of the requests reached its answer callback; a path
    # that loses one would leave it waiting for more: a hang guard, not a timing
    run = asyncio.wait_for(request_path_cost.per_request(batch, 64, depth), HANG_GUARD)
    assert asyncio.run(run) > 0
