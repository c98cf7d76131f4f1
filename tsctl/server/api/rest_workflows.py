"""`POST /wfpredict/{workflow}` on the inference port: one request through a workflow's DAG.

Runs on the daemon's event loop. A `WorkflowExchange` is a prediction exchange (the same body
limit, early refusal from the head, token authorization with the inference key, form and
multipart parsing into parts) whose body goes to `tsctl.server.workflows.run` instead of one
model's queue; each node of the DAG is then one request on its model's queue. The run is a
task of its own; a client that goes away cancels it, and with it its nodes' queued requests.
"""

from __future__ import annotations

import asyncio
import re

from tsctl.errors import (
    NOT_ALLOWED_MESSAGE,
    MethodNotAllowed,
    NotFound,
    TsctlError,
)
from tsctl.server import workflows
from tsctl.server.api import http1
from tsctl.server.api.rest import NOT_FOUND_MESSAGE, log
from tsctl.server.api.rest_exchange import FixedExchange, PredictionExchange
from tsctl.server.request import Response
from tsctl.server.state import ServerState

#: `/wfpredict/{name}` (a trailing `/` allowed, as TorchServe's split of the path drops it)
WFPREDICT = re.compile(r"^/wfpredict/([^/]+)/*$")


class WorkflowExchange(PredictionExchange):
    """One workflow prediction, from its head to the answer."""

    streams = False

    def __init__(
        self, state: ServerState, conn: http1.Connection, head: http1.RequestHead, name: str
    ) -> None:
        super().__init__(state, conn, head, name, None, False)
        self.task: asyncio.Future[Response] | None = None

    def headers_received(self) -> None:
        """Refused before the body is read when not authorized, shutting down, or the
        workflow is unknown."""
        try:
            self.admit(None)
            self.state.workflows.get(self.model)
        except TsctlError as exc:
            self.refuse_early(exc)

    def finish(self) -> None:
        body = self.take_body()
        if body is None:
            return
        try:
            parts = self._parts(body)
        except TsctlError as exc:
            self.answer_error(exc)
            return
        run = workflows.run(self.state, self.model, parts, self.head.headers, self.request_id)
        self.task = asyncio.ensure_future(run)
        self.task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Future[Response]) -> None:
        if task.cancelled():
            return  # the client went away (`connection_lost` logged it)
        error = task.exception()
        if error is None:
            answer = task.result()
            self.answer(answer.status, answer.body, answer.content_type)
            return
        if not isinstance(error, TsctlError):
            log.error(
                "unexpected error in workflow %s, request %s",
                self.model,
                self.request_id,
                exc_info=(type(error), error, error.__traceback__),
            )
        self.answer_error(error)

    def connection_lost(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.done(499)


def route(
    state: ServerState, conn: http1.Connection, head: http1.RequestHead
) -> http1.Exchange | None:
    """The exchange of a `/wfpredict/...` path (405 for a method other than POST), else None."""
    if not head.path.startswith("/wfpredict/"):
        return None
    found = WFPREDICT.match(head.path)
    if found is None:
        return FixedExchange(state, conn, head, NotFound(NOT_FOUND_MESSAGE))
    if head.method != "POST":
        return FixedExchange(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
    return WorkflowExchange(state, conn, head, found.group(1))
