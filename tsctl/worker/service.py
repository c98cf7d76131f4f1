"""Run one batch through the handler and turn its answers into wire responses.

Each request is read by its protocol (`Service` says how): a KServe v1 request gives one row
per instance, an Open Inference Protocol request one row of tensors (`tsctl.worker.oip`), and
a TorchServe request one row of its parts, decoded as below.

Inputs are decoded as TorchServe does: a part whose content type is `application/json` becomes
the parsed object, `text/*` a `str`, anything else stays a `bytearray`. Each answer becomes
bytes: `bytes`/`bytearray` as they are, `str` as UTF-8, anything else as JSON. A request whose
input cannot be decoded at all (JSON nested deeper than Python's recursion limit) fails alone
as invalid input; the handler runs on the rest of its batch. A handler that raises, or returns
the wrong number of answers, fails the whole batch with a message saying which; an answer that
cannot be serialised fails only its own request. Failures are reported
by kind (`FailureKind`); the frontend chooses the status. A handler that raises TorchServe's
`PredictionException(message, code)` reports the code it asked for with its failure.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tsctl.ipc.messages import (
    Batch,
    Chunk,
    Described,
    Failure,
    FailureKind,
    Part,
    Result,
    WireRequest,
    WireResponse,
)
from tsctl.ipc.oip import KSERVE_V1_MEDIA, OIP_MEDIA, PART_NAME
from tsctl.worker import awaiting, oip, ranks
from tsctl.worker.context import Context, RequestProcessor
from tsctl.worker.envelope import EnvelopeInputError, split, unwrap_handler
from tsctl.worker.loader import Entry
from tsctl.worker.metrics import MetricsCache
from tsctl.worker.oip import OipInputError, OipRequest

log = logging.getLogger("tsctl.worker")


class PredictionException(Exception):
    """Raised by a handler to answer every request of its batch with `error_code` and
    `message` (TorchServe's `ts.utils.util.PredictionException` is this class)."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


def _out_of_memory(exc: BaseException) -> bool:
    """Host or accelerator memory ran out (TorchServe answers these 507 "Out of resources").

    torch names the accelerator's error `torch.OutOfMemoryError` in recent releases and
    `torch.cuda.OutOfMemoryError` in older ones (recent ones keep it as an alias); either
    counts, and neither is looked up unless the handler has imported torch.
    """
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    candidates = (
        getattr(torch, "OutOfMemoryError", None),
        getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
    )
    return any(isinstance(kind, type) and isinstance(exc, kind) for kind in candidates)


def _chosen_status(code: Any) -> int:
    """The HTTP status a `PredictionException` asks for: its `error_code` as an int (text
    such as "404" counts), or 500 when it is none (`None`, "oops", 0). A handler's odd code
    must not take the worker down; the frontend answers a code that is no error status 500."""
    try:
        status = int(code)
    except (TypeError, ValueError, OverflowError):
        return 500
    return status if status > 0 else 500


def failure_of(exc: Exception) -> Failure:
    """How a batch whose handler raised `exc` is reported to the frontend."""
    if isinstance(exc, PredictionException):
        # a subclass may skip PredictionException.__init__: read what it set, if anything
        message = getattr(exc, "message", None)
        if message is None:
            message = exc.args[0] if exc.args else type(exc).__name__
        code = getattr(exc, "error_code", None)
        return Failure(FailureKind.PREDICTION_EXCEPTION, str(message), status=_chosen_status(code))
    if _out_of_memory(exc):
        return Failure(FailureKind.OUT_OF_MEMORY, f"Out of resources: {type(exc).__name__}: {exc}")
    return Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")


def _last_of(produced: Iterator[Any], intermediate: Callable[[Sequence[Any]], None]) -> Any:
    """Send every list a generator handler yields but the last, which is the final answer."""
    last: Any = None
    for item in produced:
        if last is not None:
            intermediate(last)
        last = item
    return [] if last is None else last


class UndecodableInput(Exception):
    """A request's part that cannot be handed to the handler (a client's mistake)."""


def decode_value(part: Part) -> Any:
    """A part as the handler receives it; text that is not JSON (or UTF-8) stays bytes, as
    TorchServe hands it over. `UndecodableInput` for JSON that Python cannot hold."""
    media = part.content_type.split(";", 1)[0].strip().lower()
    data = part.data
    if media == "application/json":
        try:
            return json.loads(bytes(data))
        except ValueError:
            return data
        except RecursionError:
            raise UndecodableInput(f"input {part.name!r}: JSON nested too deeply") from None
    if media.startswith("text"):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return data
    return data


@dataclass
class _Plan:
    """How one request of a batch reaches the handler: its rows, which entry reads them
    (`wrapped`: through the model's envelope), and its protocol (to encode its answer)."""

    rows: list[Any]
    wrapped: bool = True
    protocol: str = ""  # "": TorchServe's; else "oip" or "v1"
    oip: OipRequest | None = None
    explain: bool = False


class Service:
    """A loaded handler and its context; `run` is called once per batch.

    A batch may mix protocols: `/predictions` requests (rows as TorchServe builds them, through
    the model's envelope when it has one), OIP requests (one `OipInputs` row each; through the
    envelope only when it is `kservev2`, as TorchServe's) and KServe v1 requests (one row per
    instance, answers regrouped into `{"predictions": [...]}`; the handler's own entry, which is
    what TorchServe's `kserve` envelope gives it too). Without an envelope the whole batch is one
    handler call; with one, the requests that bypass it are a second call.
    """

    def __init__(self, entry: Entry, context: Context) -> None:
        self.entry = entry
        self.context = context
        #: the handler's awaitables are awaited (its worker runs an event loop:
        #: `asyncCommunication`); else one is a configuration error
        self.awaits = False
        self.plain_entry, self.envelope = split(entry)
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        self.model_version = str(model.get("modelVersion") or "")
        declared = (getattr(context, "model_yaml_config", None) or {}).get("outputs")
        self.declared_outputs = [
            o["name"]
            for o in declared or ()
            if isinstance(o, dict) and isinstance(o.get("name"), str)
        ]

    def run(self, batch: Batch, send: Callable[[Chunk], None] | None = None) -> Result:
        """Run one batch (`run_batch`) with a handler that is not asynchronous: nothing in it
        awaits, so it runs to its end at once."""
        running = self.run_batch(batch, send)
        try:
            running.send(None)
        except StopIteration as done:
            result: Result = done.value
            if result.failure is not None and ranks.current is not None:
                ranks.current.batch_failed(result)  # a tp instance's rank 0: it ends
            return result
        running.close()  # only `awaits` (an asyncCommunication worker) awaits: not here
        raise RuntimeError("a batch awaited outside the worker's event loop")

    async def run_batch(self, batch: Batch, send: Callable[[Chunk], None] | None = None) -> Result:
        """Run one batch. A handler that streams (yields lists, or calls
        `context.send_intermediate(answers)`) has each intermediate list sent through `send`
        as a `Chunk`; its last list is the final answer. Requests whose input cannot be
        decoded are answered with their failure and left out of the handler's batch. An
        asynchronous handler's answer is awaited when `awaits` (its worker's event loop runs
        this coroutine), else it is the configuration error `awaiting.NOT_ASYNC`."""
        responses: dict[int, WireResponse] = {}
        plans: dict[int, _Plan] = {}
        for i, request in enumerate(batch.requests):
            try:
                plans[i] = self._plan(request)
            except (UndecodableInput, OipInputError) as exc:
                responses[i] = WireResponse(failure=Failure(FailureKind.INVALID_INPUT, str(exc)))
        groups = [
            [i for i, p in plans.items() if p.wrapped],
            [i for i, p in plans.items() if not p.wrapped],
        ]
        if self.plain_entry is self.entry:
            groups = [sorted(plans)]
        groups = [g for g in groups if g]
        if not groups:
            return Result(batch.batch_id, [responses[i] for i in range(len(batch.requests))])
        handler_ms = 0.0
        metrics: list[Any] = []
        for members in groups:
            entry = self.entry if plans[members[0]].wrapped else self.plain_entry
            streams = send if len(groups) == 1 else None
            outcome = await self._call(entry, batch, members, plans, responses, streams)
            handler_ms += outcome.handler_ms
            metrics.extend(outcome.metrics)
            if outcome.failure is None:
                continue
            if len(groups) == 1 and not responses:
                return outcome  # the whole batch failed, as before protocols mixed
            for i in members:
                responses[i] = WireResponse(failure=outcome.failure)
        ordered = [responses[i] for i in range(len(batch.requests))]
        return Result(batch.batch_id, ordered, handler_ms=handler_ms, metrics=metrics)

    def _plan(self, request: WireRequest) -> _Plan:
        parts = request.parts
        media = parts[0].content_type.lower() if len(parts) == 1 else ""
        if media.startswith(OIP_MEDIA):
            read = oip.read(parts[0].content_type, parts[0].data)
            if self.envelope == "kservev2":
                return _Plan([{PART_NAME: oip.envelope_body(read)}], True, "oip", read)
            return _Plan([oip.inputs(read)], False, "oip", read)
        if media.startswith(KSERVE_V1_MEDIA):
            explain = any(k.lower() == "explain" and v == "True" for k, v in request.headers)
            return _Plan(_instances(parts[0]), False, "v1", explain=explain)
        return _Plan([{p.name: decode_value(p) for p in parts}])

    async def _call(
        self,
        entry: Entry,
        batch: Batch,
        members: list[int],
        plans: dict[int, _Plan],
        responses: dict[int, WireResponse],
        send: Callable[[Chunk], None] | None,
    ) -> Result:
        """Call `entry` with the rows of the requests `members`; their answers go into
        `responses`. The returned `Result` carries the timing, the metrics and the failure of
        the call as a whole, if it failed."""
        rows: list[Any] = []
        spans: list[tuple[int, int, int]] = []  # (request, first row, row count)
        processors: list[RequestProcessor] = []
        ids: dict[int, str] = {}
        for i in members:
            request, plan = batch.requests[i], plans[i]
            processor = RequestProcessor(
                {
                    **{p.name: {"content-type": p.content_type} for p in request.parts},
                    **dict(request.headers),
                }
            )
            spans.append((i, len(rows), len(plan.rows)))
            for row in plan.rows:
                ids[len(rows)] = request.request_id
                processors.append(processor)
                rows.append(row)
        context = self.context
        context.request_ids = ids
        context.request_processor = processors

        def encoded(answers: Sequence[Any], partial: bool = False) -> None:
            for i, first, count in spans:
                plan = plans[i]
                if partial and plan.protocol:
                    continue
                mine = answers[first : first + count]
                if plan.protocol == "v1":
                    responses[i] = self._v1_response(first, mine, plan.explain)
                elif plan.protocol == "oip":
                    assert plan.oip is not None
                    responses[i] = self._oip_response(plan.oip, mine[0], plan.wrapped)
                else:
                    responses[i] = self._response(first, mine[0])

        def intermediate(answers: Sequence[Any]) -> None:
            if send is None or len(answers) != len(rows):
                return
            before = dict(responses)
            encoded(answers, partial=True)
            chunk = [responses.get(i) or WireResponse() for i in range(len(batch.requests))]
            responses.clear()
            responses.update(before)
            send(Chunk(batch.batch_id, chunk))

        context.send_intermediate = intermediate
        if not rows:  # KServe v1 requests without instances
            encoded([])
            return Result(batch.batch_id)
        started = time.perf_counter()
        try:
            answers = entry(rows, context)
            if inspect.isgenerator(answers):
                answers = _last_of(answers, intermediate)
            elif awaiting.is_async(answers):
                if not self.awaits:
                    awaiting.discard(answers)
                    message = awaiting.NOT_ASYNC.format(what="the handler's answer")
                    failure = Failure(FailureKind.MISCONFIGURED, message)
                    return Result(batch.batch_id, failure=failure)
                answers = await awaiting.settle(answers, intermediate)
        except Exception as exc:
            ids_text = ", ".join(batch.requests[i].request_id for i in members)
            log.error(
                "handler raised on the batch of request ids %s:\n%s",
                ids_text,
                traceback.format_exc(),
            )
            return Result(batch.batch_id, failure=failure_of(exc), metrics=self._metrics())
        elapsed = (time.perf_counter() - started) * 1000
        if isinstance(answers, (str, bytes, bytearray)) or not isinstance(answers, Sequence):
            message = f"handler returned {type(answers).__name__}, expected a list of {len(rows)}"
            return Result(
                batch.batch_id, failure=Failure(FailureKind.BAD_OUTPUT, message), handler_ms=elapsed
            )
        if len(answers) != len(rows):
            message = f"handler returned {len(answers)} results for a batch of {len(rows)} requests"
            return Result(
                batch.batch_id, failure=Failure(FailureKind.BAD_OUTPUT, message), handler_ms=elapsed
            )
        encoded(answers)
        return Result(batch.batch_id, handler_ms=elapsed, metrics=self._metrics())

    def describe(self) -> Described:
        """The handler object's `describe_handle()` answer, encoded like a prediction."""
        describe = getattr(unwrap_handler(self.entry), "describe_handle", None)
        if describe is None:
            return Described(
                failure=Failure(FailureKind.NOT_SUPPORTED, "the handler has no describe_handle")
            )
        try:
            answer = describe()
        except Exception as exc:
            log.error("describe_handle raised:\n%s", traceback.format_exc())
            return Described(
                failure=Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            )
        if answer is None:  # BaseHandler's default: nothing to describe
            return Described(
                failure=Failure(FailureKind.NOT_SUPPORTED, "describe_handle returned None")
            )
        if isinstance(answer, (bytes, bytearray)):
            return Described(answer)
        if isinstance(answer, str):
            return Described(answer.encode("utf-8"))
        try:
            return Described(json.dumps(answer, indent=2).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            return Described(failure=Failure(FailureKind.BAD_OUTPUT, f"not serialisable: {exc}"))

    def _metrics(self) -> list[Any]:
        cache = self.context.metrics
        return cache.take() if isinstance(cache, MetricsCache) else []

    def _response(self, idx: int, answer: Any) -> WireResponse:
        if isinstance(answer, EnvelopeInputError):
            return WireResponse(failure=Failure(FailureKind.INVALID_INPUT, answer.message))
        processor = self.context.request_processor[idx]
        if self.context.stopping_criteria:
            _stream_next(self.context.stopping_criteria, processor, idx, answer)
        headers = processor.get_response_headers()
        content_type = headers.get("content-type") or headers.get("Content-Type") or ""
        extra = [(k, v) for k, v in headers.items() if k.lower() != "content-type"]
        status = processor.get_response_status_code()
        reason = processor.get_response_status_phrase() or ""
        if isinstance(answer, (bytes, bytearray)):
            body = answer
        elif isinstance(answer, str):
            body = answer.encode("utf-8")
        else:
            try:
                body = json_indented(answer)
            except (TypeError, ValueError) as exc:
                message = f"handler output for request {idx} is not serialisable: {exc}"
                return WireResponse(failure=Failure(FailureKind.BAD_OUTPUT, message))
            content_type = content_type or "application/json"
        return WireResponse(status, content_type, body, extra, reason)

    def _v1_response(self, first: int, answers: Sequence[Any], explain: bool) -> WireResponse:
        """A KServe v1 request's answer: its instances' results, in order."""
        for answer in answers:
            if isinstance(answer, EnvelopeInputError):
                return WireResponse(failure=Failure(FailureKind.INVALID_INPUT, answer.message))
        key = "explanations" if explain else "predictions"
        try:
            body = json.dumps({key: list(answers)}, default=_jsonable).encode("utf-8")
        except (TypeError, ValueError) as exc:
            message = f"handler output is not serialisable: {exc}"
            return WireResponse(failure=Failure(FailureKind.BAD_OUTPUT, message))
        status, extra, reason = 200, [], ""
        if answers:
            processor = self.context.request_processor[first]
            status = processor.get_response_status_code()
            reason = processor.get_response_status_phrase() or ""
            headers = processor.get_response_headers()
            extra = [(k, v) for k, v in headers.items() if k.lower() != "content-type"]
        return WireResponse(status, "application/json", body, extra, reason)

    def _oip_response(self, request: OipRequest, answer: Any, enveloped: bool) -> WireResponse:
        """An OIP request's answer: the handler's (or the kservev2 envelope's) encoded."""
        if isinstance(answer, EnvelopeInputError):
            return WireResponse(failure=Failure(FailureKind.INVALID_INPUT, answer.message))
        base: dict[str, Any] = {
            "model_name": self.context.model_name,
            "model_version": self.model_version,
        }
        if request.id is not None:
            base["id"] = request.id
        try:
            if enveloped:
                if not isinstance(answer, dict):
                    raise TypeError(f"the kservev2 envelope answered {type(answer).__name__}")
                own, answer = oip.from_envelope(answer)
                base.update({k: v for k, v in own.items() if k in ("id", "parameters")})
            reply = oip.respond(request, answer, base, self.declared_outputs)
        except OipInputError as exc:
            return WireResponse(failure=Failure(FailureKind.INVALID_INPUT, str(exc)))
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            message = f"handler output is no OIP answer: {type(exc).__name__}: {exc}"
            return WireResponse(failure=Failure(FailureKind.BAD_OUTPUT, message))
        return WireResponse(200, reply.content_type, reply.body, reply.headers)


def json_indented(answer: Any) -> bytes:
    """`json.dumps(answer, indent=2)` as UTF-8 (TorchServe's encoding of a handler's answer),
    byte for byte. A flat list of finite floats and ints (a small model's usual answer) is
    written from its `repr`, which is the same text, without `json`'s pure-Python encoder
    (the one `indent` calls for): a few µs per answer on the worker's path of every batch."""
    if type(answer) is list and answer and all(type(v) is float or type(v) is int for v in answer):
        text = repr(answer)
        if "n" not in text:  # no nan or inf, which JSON writes otherwise
            return ("[\n  " + text[1:-1].replace(", ", ",\n  ") + "\n]").encode()
    return json.dumps(answer, indent=2).encode("utf-8")


def _stream_next(criteria: Any, processor: RequestProcessor, idx: int, answer: Any) -> None:
    """TorchServe's continuous batching: the handler's stopping criterion for request `idx`
    says whether its stream ends (True: `ts_stream_next: false`), goes on (False: `true`, the
    frontend sends the request again with the next batch) or is none (None: a plain answer)."""
    try:
        stop = criteria[idx](answer)
    except Exception:
        log.error("the stopping criterion of request %s raised:\n%s", idx, traceback.format_exc())
        return
    if stop is not None:
        processor.add_response_property("ts_stream_next", "false" if stop else "true")


def _instances(part: Part) -> list[Any]:
    """A KServe v1 body's instances, each a row of the handler's batch."""
    try:
        body = json.loads(bytes(part.data))
    except (ValueError, RecursionError) as exc:
        raise UndecodableInput(f"the request body is not JSON: {exc}") from None
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list):
        raise UndecodableInput('the request body must be a JSON object {"instances": [...]}')
    return instances


def _jsonable(value: Any) -> Any:
    """JSON for what handlers commonly answer with beyond JSON's types: tensors and arrays
    (as nested lists), bytes (as UTF-8 text)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
