"""Request envelopes (`service_envelope`): choosing one, and what every envelope keeps of the
handler (its load-time call, `describe_handle`, the per-request context lists). tsctl's
`ts.torch_handler.request_envelope` classes are called directly with a real `Context`; each
envelope's own reading and writing: test_envelopes_json.py, test_envelopes_kserve.py; served
by real daemons over real HTTP: test_envelopes_served.py."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.support.envelopes import Recorder, make_context, plain, wrapped
from tsctl.errors import InvalidInput
from tsctl.server.config import build_config
from tsctl.worker import envelope
from tsctl.worker.envelope import EnvelopeInputError
from tsctl.worker.loader import COMPAT_PATH, HandlerLoadError


def test_wrap_uses_tsctls_classes(compat: None) -> None:
    handle = wrapped("json")
    assert type(handle.__self__).__name__ == "JSONEnvelope"
    module = sys.modules[type(handle.__self__).__module__]
    assert module.__file__ is not None and module.__file__.startswith(COMPAT_PATH)


def test_no_envelope_leaves_the_entry_alone() -> None:
    entry = Recorder().handle
    assert envelope.wrap(entry, None) is entry
    assert envelope.wrap(entry, "") is entry


def test_unknown_envelope_is_a_load_error() -> None:
    with pytest.raises(HandlerLoadError, match="unknown service_envelope 'kfserving'"):
        envelope.wrap(Recorder().handle, "kfserving")


def test_config_names_a_known_envelope() -> None:
    assert build_config({"service_envelope": "kservev2"}, {}).service_envelope == "kservev2"
    assert build_config({}, {}).service_envelope == ""
    with pytest.raises(InvalidInput, match=r"service_envelope.*'grpc'.*json, kserve, kservev2"):
        build_config({"service_envelope": "grpc"}, {})


def test_load_time_call_and_describe_reach_the_handler(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kserve")
    assert handle(None, make_context()) == "initialized"
    assert recorder.calls == [None]
    assert handle.__self__.describe_handle() == "recorder"


def test_envelope_names_are_shared_with_the_frontend() -> None:
    from tsctl.ipc import messages as protocol

    assert envelope.ENVELOPES is protocol.ENVELOPES
    assert protocol.FailureKind.INVALID_INPUT.value == "InvalidInput"
    assert envelope.check_name("json") == "json"


class Described:
    """A handler object whose `handle` is a MicroBatching of itself (TorchServe's pattern)."""

    def __init__(self, micro_batching: Any) -> None:
        self.handle = micro_batching(self)

    def preprocess(self, data: Any) -> Any:
        return data

    inference = postprocess = preprocess

    def describe_handle(self) -> dict[str, Any]:
        return {"described": True}


def test_describe_reaches_a_micro_batching_handler_inside_an_envelope(compat: None) -> None:
    from ts.handler_utils.micro_batching import MicroBatching

    from tsctl.worker.service import Service

    handler = Described(MicroBatching)
    try:
        entry = envelope.wrap(handler.handle, "json")
        assert envelope.unwrap_handler(entry) is handler
        assert entry.__self__.describe_handle() == {"described": True}
        described = Service(entry, make_context()).describe()
        assert described.failure is None
        assert json.loads(described.body) == {"described": True}
        # and the pipeline still answers through the envelope
        answers = entry([{"body": {"instances": [1, 2]}}], make_context({}))
        assert answers == ['{"predictions": [1, 2]}']
    finally:
        handler.handle.shutdown()


def test_unwrap_handler_stops_at_the_handler() -> None:
    recorder = Recorder()
    assert envelope.unwrap_handler(recorder.handle) is recorder
    assert envelope.unwrap_handler(recorder) is recorder
    assert envelope.unwrap_handler(plain) is plain  # a function handler is its own answer


def test_handler_sees_only_the_requests_it_reads(compat: None) -> None:
    """A rejected request takes no part in the handler call, so the context's per-request
    lists hold only the others while it runs: index 0 is the first request it reads."""
    seen: list[Any] = []

    def handler(data: Any, context: Any) -> Any:
        if data is None:
            return None
        for idx in range(len(context.request_processor)):
            seen.append((context.get_request_id(idx), context.get_request_header(idx, "who")))
            context.set_response_status(201 + idx, "Chosen", idx)
        return [f"r{i}" for i in range(len(data))]

    handle = envelope.wrap(handler, "kserve")
    context = make_context({"who": "bad"}, {"who": "first", "explain": "True"}, {"who": "last"})
    rows = [
        {"body": {"wrong": 1}},
        {"body": {"instances": [1]}},
        {"body": {"instances": [2]}},
    ]
    answers = handle(rows, context)
    assert seen == [("req-1", "first"), ("req-2", "last")]
    assert isinstance(answers[0], EnvelopeInputError)
    # format_output reads the full lists again: request 1's explain header is its own
    assert answers[1:] == [{"explanations": ["r0"]}, {"predictions": ["r1"]}]
    assert context.request_ids == {0: "req-0", 1: "req-1", 2: "req-2"}
    assert [context.get_response_status(i) for i in range(3)] == [
        (200, None),  # the rejected request's answer is untouched
        (201, "Chosen"),
        (202, "Chosen"),
    ]
