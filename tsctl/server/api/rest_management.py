"""The REST management API (TorchServe's paths and JSON shapes). Event-loop only.

Thin adapters: parameters come from the query string (or a JSON body for registration), the
operations themselves live in `tsctl.server.management`. Plugin endpoints of this API
(`PluginHandler`) are tried before the built-in routes, which no plugin can shadow
(`tsctl.server.endpoint_routes`); a path of a plugin's with a method no endpoint lists, and no
built-in route for it, is answered 405 by the last rule.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web

from tsctl.errors import NOT_ALLOWED_MESSAGE, BadRequest, MethodNotAllowed
from tsctl.plugins.api import EndpointRequest, RequestInfo
from tsctl.server import management, workflows
from tsctl.server.api import plugin_routes
from tsctl.server.api.openapi import management_document
from tsctl.server.api.rest import ApiHandler, NotFoundHandler, log_request
from tsctl.server.endpoint_routes import ApiRoutes, EndpointRoutes
from tsctl.server.state import ServerState


def request_info(handler: tornado.web.RequestHandler, api: str, model: str | None) -> RequestInfo:
    """What the authorizers know of a request to a tornado API (management, metrics)."""
    request = handler.request
    address = getattr(getattr(request.connection, "context", None), "address", None)
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else request.remote_ip
    headers = MappingProxyType({k.lower(): v for k, v in request.headers.items()})
    return RequestInfo(api, request.method or "", request.path, headers, peer or "", model)


class ManagementHandler(ApiHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def prepare(self) -> None:
        if self.state.authorizers:
            self.state.authorize(request_info(self, "management", self.model_name()))

    def model_name(self) -> str | None:
        """The model the request is about: the path's first capture (`/models/{name}...`)."""
        return self.path_args[0] if self.path_args else None

    def params(self) -> dict[str, Any]:
        """Query parameters (last value wins), then a JSON body's keys on top."""
        values: dict[str, Any] = {
            k: v[-1].decode("utf-8", "replace") for k, v in self.request.query_arguments.items()
        }
        content_type = self.request.headers.get("Content-Type", "")
        if self.request.body and content_type.startswith("application/json"):
            try:
                body = json.loads(self.request.body)
            except ValueError as exc:
                raise BadRequest(f"the JSON body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object of parameters")
            values.update(body)
        return values

    def page(self) -> tuple[int, int]:
        """A list's `limit` and `next_page_token` (TorchServe's pagination)."""
        try:
            limit = int(self.get_query_argument("limit", "100"))
            start = int(self.get_query_argument("next_page_token", "0") or 0)
        except ValueError:
            raise BadRequest("limit and next_page_token must be integers") from None
        return limit, start

    def status(self, outcome: management.Outcome) -> None:
        """TorchServe's `{"status": ...}` answer: 202 when the work goes on after it."""
        self.write_json({"status": outcome.message}, 202 if outcome.accepted else 200)


class ModelsHandler(ManagementHandler):
    def get(self) -> None:
        self.write_json(management.list_models(self.state, *self.page()))

    async def post(self) -> None:
        params = management.parse(management.RegisterParams, self.params())
        self.status(await management.register(self.state, params))


class ModelHandler(ManagementHandler):
    async def put(self, name: str, version: str | None = None) -> None:
        params = management.parse(management.ScaleParams, self.params())
        self.status(await management.scale(self.state, name, version, params))

    async def delete(self, name: str, version: str | None = None) -> None:
        self.status(await management.unregister(self.state, name, version))

    async def get(self, name: str, version: str | None = None) -> None:
        customized = self.get_query_argument("customized", "false").lower() == "true"
        self.write_json(await management.describe_models(self.state, name, version, customized))


class SetDefaultHandler(ManagementHandler):
    def put(self, name: str, version: str) -> None:
        self.status(management.set_default(self.state, name, version))


class WorkflowApiHandler(ManagementHandler):
    """TorchServe's workflow management API (`tsctl.server.workflows`), authorized as the
    model API is."""

    def model_name(self) -> str | None:
        return None  # a workflow is no model (authorizers see no model)


class WorkflowsHandler(WorkflowApiHandler):
    """`/workflows`: list, register."""

    def get(self) -> None:
        self.write_json(workflows.list_workflows(self.state, *self.page()))

    async def post(self) -> None:
        params = management.parse(workflows.RegisterWorkflowParams, self.params())
        message = await workflows.register(
            self.state,
            params.url,
            params.workflow_name,
            params.response_timeout,
            params.startup_timeout,
        )
        self.write_json({"status": message})


class WorkflowHandler(WorkflowApiHandler):
    """`/workflows/{name}`: describe, unregister."""

    def get(self, name: str) -> None:
        self.write_json(workflows.describe(self.state, name))

    async def delete(self, name: str) -> None:
        self.write_json({"status": await workflows.unregister(self.state, name)})


class DescriptionHandler(ManagementHandler):
    def options(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(management_document())


class TokenHandler(ManagementHandler):
    """`/token?type=management|inference`: rotate a key (needs the API key: the token
    authorizer asks for it on this path)."""

    def get(self) -> None:
        kind = self.get_query_argument("type", "")
        if self.state.auth is None:
            raise BadRequest("token authorization is disabled on this server")
        if kind not in ("management", "inference"):
            raise BadRequest(f"type must be management or inference, not {kind!r}")
        self.write_json({kind: self.state.auth.rotate(kind)})

    put = post = get


class PluginHandler(ManagementHandler):
    """A plugin endpoint (`tsctl.plugins.Endpoint` with api "management"): authorized as every
    management route (`ManagementHandler.prepare`), run by `plugin_routes.call`. Also the
    target of the last rule, which answers 405 for a plugin's path with a method no endpoint
    lists."""

    def initialize(  # type: ignore[override]  # the routes too
        self, state: ServerState, routes: EndpointRoutes, plugins: ApiRoutes
    ) -> None:
        super().initialize(state)
        self.routes = routes
        self.plugins = plugins

    def model_name(self) -> str | None:
        """The `{model}` or `{name}` capture of the endpoint's path, if it has one."""
        return plugin_routes.model_of(self.path_kwargs)

    async def serve(self, **params: str) -> None:
        request = self.request
        method, path = request.method or "", request.path
        found = self.plugins.match(method, path)
        if found is None or found.endpoint is None:
            raise MethodNotAllowed(NOT_ALLOWED_MESSAGE)
        info = request_info(self, "management", self.model_name())
        query = plugin_routes.query_of(request.query)
        asked = EndpointRequest(info, found.params, query, request.body)
        answer = await plugin_routes.call(
            self.state, self.routes, found.endpoint, asked, self.request_id
        )
        self.set_status(answer.status)
        if answer.content_type:
            self.set_header("Content-Type", answer.content_type)
        else:
            self.clear_header("Content-Type")
        for name, value in answer.headers.items():
            self.set_header(name, value)
        self.finish(answer.body)

    get = post = put = delete = patch = head = options = serve


class _PluginPaths(tornado.routing.Matcher):
    """Matches a path of a plugin endpoint's: with a method it lists (`any_method` false), or
    with any method (the 405 rule)."""

    def __init__(self, plugins: ApiRoutes, any_method: bool) -> None:
        self.plugins = plugins
        self.any_method = any_method

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        found = self.plugins.match(request.method or "", request.path)
        if found is None or (found.endpoint is None and not self.any_method):
            return None
        return {"path_kwargs": found.params}


def make_app(state: ServerState) -> tornado.web.Application:
    kwargs = {"state": state}
    rules: list[Any] = [
        (r"/", DescriptionHandler, kwargs),
        (r"/token", TokenHandler, kwargs),
        (r"/models/?", ModelsHandler, kwargs),  # TorchServe lists at /models/ too
        (r"/models/([^/]+)/([^/]+)/set-default", SetDefaultHandler, kwargs),
        (r"/models/([^/]+)", ModelHandler, kwargs),
        (r"/models/([^/]+)/([^/]+)", ModelHandler, kwargs),
        (r"/workflows/?", WorkflowsHandler, kwargs),
        (r"/workflows/([^/]+)", WorkflowHandler, kwargs),
    ]
    routes = state.plugins.routes
    plugins = routes.api("management") if routes is not None else None
    if routes is not None and plugins is not None:
        found = {"state": state, "routes": routes, "plugins": plugins}
        first = tornado.routing.Rule(_PluginPaths(plugins, False), PluginHandler, found)
        last = tornado.routing.Rule(_PluginPaths(plugins, True), PluginHandler, found)
        rules = [first, *rules, last]
    return tornado.web.Application(
        rules,
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        state=state,
    )
