"""The metrics API: Prometheus text at `/metrics` (`?name[]=` picks families). Event-loop only."""

from __future__ import annotations

import tornado.web

from tsctl.server.api.rest import ApiHandler, NotFoundHandler, log_request
from tsctl.server.api.rest_management import request_info
from tsctl.server.state import ServerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHandler(ApiHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def prepare(self) -> None:
        """The plugin authorizers' leave (the token authorizer asks nothing here)."""
        if self.state.authorizers:
            self.state.authorize(request_info(self, "metrics", None))

    def get(self) -> None:
        stats = self.state.metrics
        # requests waiting per model version, now; a version no longer registered is dropped
        # (a stale value would keep an autoscaler on tsctl_queue_depth scaling)
        stats.queue_depth.values = {
            (mv.name, mv.version): float(len(mv.queue))
            for versions in self.state.registry.models.values()
            for mv in versions.values()
        }
        names = {v.decode() for v in self.request.query_arguments.get("name[]", [])}
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(stats.render(names or None))


def make_app(state: ServerState) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/metrics", MetricsHandler, {"state": state})],
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        state=state,
    )
