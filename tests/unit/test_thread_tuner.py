"""The worker's torch thread tuner (tsctl/worker/threads.py): which count it keeps for how
a model's batch time depends on its threads. Real torch; the handler times are given."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from tsctl.worker.threads import FIRST, SAMPLES, WARMUP, Threads, ThreadTuner


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _serve(count: int, ms_for: Callable[[int], float], batches: int = 200) -> ThreadTuner:
    """A worker of `count` threads serving `batches` batches of 4 requests, each taking the
    handler `ms_for(threads it ran with)`."""
    threads = Threads(count, None)
    threads.apply()
    tuner = ThreadTuner(threads)
    for _ in range(batches):
        if tuner.done:
            break
        tuner.before()
        tuner.after(ms_for(torch.get_num_threads()), 4)
    return tuner


def test_a_model_that_gains_nothing_from_threads_gets_one() -> None:
    tuner = _serve(8, lambda threads: 2.0)
    assert tuner.done and tuner.kept == 1
    assert torch.get_num_threads() == 1


def test_a_model_that_scales_keeps_its_threads() -> None:
    tuner = _serve(4, lambda threads: 8.0 / threads)
    assert tuner.done and tuner.kept == 4
    assert torch.get_num_threads() == 4


def test_halving_stops_at_the_first_count_that_is_too_slow() -> None:
    # two threads are as fast as four, one takes half as long again
    tuner = _serve(4, lambda threads: 3.0 if threads == 1 else 2.0)
    assert tuner.done and tuner.kept == 2
    assert torch.get_num_threads() == 2


def test_a_little_slower_is_still_fewer_threads() -> None:
    tuner = _serve(2, lambda threads: 2.0 if threads == 2 else 2.1)  # 5% slower: kept
    assert tuner.kept == 1


def test_it_measures_after_the_warm_up_and_alternates() -> None:
    ran: list[int] = []

    def ms_for(threads: int) -> float:
        ran.append(threads)
        return 1.0

    tuner = _serve(2, ms_for)
    assert ran[:WARMUP] == [2] * WARMUP  # warm-up batches run with the given count
    assert ran[WARMUP : WARMUP + 4] == [2, 1, 2, 1]
    assert len(ran) == WARMUP + 2 * SAMPLES and tuner.done


def test_a_count_clearly_too_slow_loses_after_a_few_batches() -> None:
    ran: list[int] = []

    def ms_for(threads: int) -> float:
        ran.append(threads)
        return 8.0 / threads

    tuner = _serve(2, ms_for)
    assert tuner.done and tuner.kept == 2
    assert len(ran) == WARMUP + 2 * FIRST  # one thread ran only FIRST slow batches


def test_one_thread_is_not_tuned() -> None:
    tuner = ThreadTuner(Threads(1, None))
    assert tuner.done
