"""The worker pool's pure decisions: how long to wait before restarting a worker
(`restart_delay`), and which error a worker's `Failure` is answered with (`error_for`)."""

from __future__ import annotations

import pytest

from tsctl.errors import (
    BadRequest,
    HandlerChoseStatus,
    OutOfResources,
    PredictionFailed,
    TsctlError,
)
from tsctl.ipc.messages import Failure, FailureKind
from tsctl.server.workers.pool import MAX_BACKOFF, error_for, restart_delay


def test_restart_delay_doubles_from_nothing_up_to_max_backoff() -> None:
    # the pool asks before counting the failure at hand: 0 is the first restart in a row
    assert [restart_delay(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert MAX_BACKOFF == 30.0


@pytest.mark.parametrize("failures", [-1, 0])
def test_no_failures_means_no_wait(failures: int) -> None:
    assert restart_delay(failures) == 0.0


@pytest.mark.parametrize("failures", [6, 7, 50, 1000, 1024])
def test_restart_delay_never_passes_max_backoff(failures: int) -> None:
    assert restart_delay(failures) == MAX_BACKOFF


@pytest.mark.parametrize("failures", [1025, 10_000])
def test_restart_delay_after_very_many_failures(failures: int) -> None:
    assert restart_delay(failures) == MAX_BACKOFF


def test_restart_delay_never_shrinks() -> None:
    delays = [restart_delay(n) for n in range(40)]
    assert delays == sorted(delays)


#: (kind, the error class, HTTP status, gRPC code, TorchServe's error type)
ANSWERS = [
    (FailureKind.INVALID_INPUT, BadRequest, 400, "INVALID_ARGUMENT", "BadRequestException"),
    (FailureKind.OUT_OF_MEMORY, OutOfResources, 507, "INTERNAL", "InternalServerException"),
    (FailureKind.HANDLER_ERROR, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    (FailureKind.HANDLER_LOAD, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    (FailureKind.HANDLER_INIT, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    (FailureKind.BAD_OUTPUT, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    (FailureKind.NOT_SUPPORTED, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    (
        FailureKind.RESPONSE_TOO_LARGE,
        PredictionFailed,
        503,
        "UNAVAILABLE",
        "InternalServerException",
    ),
    (FailureKind.BAD_FRAME, PredictionFailed, 503, "UNAVAILABLE", "InternalServerException"),
    # an async handler without asyncCommunication: the operator's configuration to fix
    (FailureKind.MISCONFIGURED, TsctlError, 500, "INTERNAL", "InternalServerException"),
    # a PredictionException without a status of its own is a plain failed prediction
    (
        FailureKind.PREDICTION_EXCEPTION,
        PredictionFailed,
        503,
        "UNAVAILABLE",
        "InternalServerException",
    ),
]


def test_every_failure_kind_has_an_answer() -> None:
    assert {kind for kind, *_ in ANSWERS} == set(FailureKind)


@pytest.mark.parametrize(
    ("kind", "cls", "status", "code", "type_name"), ANSWERS, ids=[a[0].name for a in ANSWERS]
)
def test_error_for_each_failure_kind(
    kind: FailureKind, cls: type[TsctlError], status: int, code: str, type_name: str
) -> None:
    error = error_for(Failure(kind, f"what went wrong: {kind.value}", "Traceback: secret"))
    assert type(error) is cls
    assert (error.http_status, error.grpc_code, error.type_name) == (status, code, type_name)
    if kind is FailureKind.HANDLER_ERROR:
        # the handler's own exception: TorchServe's bare text, the rest in model_log.log
        assert error.message == "Prediction failed"
    else:
        assert error.message == f"what went wrong: {kind.value}"  # the detail stays in the logs
    assert "secret" not in str(error)


@pytest.mark.parametrize(
    ("chosen", "status", "code"),
    [
        (400, 400, "INVALID_ARGUMENT"),
        (404, 404, "NOT_FOUND"),
        (409, 409, "ABORTED"),
        (413, 507, "RESOURCE_EXHAUSTED"),  # TorchServe answers 413 as 507
        (418, 418, "FAILED_PRECONDITION"),  # a 4xx without a rule of its own
        (429, 429, "RESOURCE_EXHAUSTED"),
        (500, 500, "INTERNAL"),
        (503, 503, "UNAVAILABLE"),
        (504, 504, "DEADLINE_EXCEEDED"),
        (599, 599, "INTERNAL"),
        (200, 500, "INTERNAL"),  # not an error status: an error is answered as one
        (302, 500, "INTERNAL"),
        (600, 500, "INTERNAL"),
    ],
)
def test_a_handler_chosen_status_is_answered(chosen: int, status: int, code: str) -> None:
    error = error_for(Failure(FailureKind.PREDICTION_EXCEPTION, "no such thing", "", chosen))
    assert isinstance(error, HandlerChoseStatus) and isinstance(error, PredictionFailed)
    assert (error.http_status, error.grpc_code) == (status, code)
    assert error.type_name == "InternalServerException" and error.message == "no such thing"


def test_a_chosen_status_belongs_to_its_error_not_its_class() -> None:
    first = error_for(Failure(FailureKind.PREDICTION_EXCEPTION, "a", "", 404))
    second = error_for(Failure(FailureKind.PREDICTION_EXCEPTION, "b", "", 429))
    assert (first.http_status, second.http_status) == (404, 429)
    assert HandlerChoseStatus.http_status == 503  # the class keeps PredictionFailed's


def test_memory_and_bad_input_ignore_a_status() -> None:
    assert error_for(Failure(FailureKind.OUT_OF_MEMORY, "oom", "", 404)).http_status == 507
    assert error_for(Failure(FailureKind.INVALID_INPUT, "bad", "", 500)).http_status == 400
