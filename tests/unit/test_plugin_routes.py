"""Plugin endpoints' routes (`tsctl.server.endpoint_routes`): patterns, precedence, the
shadowing rule, the built-in route table against the real routers, and how a handler's answer
is run and sent (`tsctl.server.api.plugin_routes`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import tornado.httputil

from tsctl.errors import NotFound
from tsctl.plugins import Endpoint, EndpointRequest, Reply, RequestInfo
from tsctl.plugins.loader import PluginError
from tsctl.server.api import http1
from tsctl.server.api.plugin_routes import (
    BadReply,
    EndpointFailed,
    EndpointTimeout,
    answer_of,
    call,
)
from tsctl.server.api.rest import NotFoundHandler
from tsctl.server.api.rest_exchange import FixedExchange
from tsctl.server.api.rest_inference import InferenceApi
from tsctl.server.api.rest_management import make_app
from tsctl.server.config import ServerConfig
from tsctl.server.endpoint_routes import (
    BUILTIN,
    DaemonThreads,
    EndpointRoutes,
    Pattern,
    segments,
)
from tsctl.server.registry import Registry
from tsctl.server.state import ServerState
from tsctl.server.telemetry.logs import LineLog
from tsctl.server.telemetry.metric_log import MetricLog
from tsctl.server.telemetry.prometheus import Metrics


def endpoint(
    path: str, methods: tuple[str, ...] = ("GET",), api: str = "management", name: str = "p"
) -> Endpoint:
    class Made(Endpoint):
        def handle(self, request: EndpointRequest) -> Reply:
            return Reply("hi")

    made = Made()
    made.name, made.path, made.methods, made.api = name, path, methods, api
    return made


# --- patterns


def test_segments_ignore_one_trailing_slash() -> None:
    assert segments("/") == []
    assert segments("/models/") == ["models"]
    assert segments("/models/m/stats") == ["models", "m", "stats"]
    assert segments("/models//x") == ["models", "", "x"]


def test_a_pattern_captures_whole_segments_percent_decoded() -> None:
    pattern = Pattern.parse("/models/{name}/stats")
    assert pattern.shape == ("models", None, "stats") and pattern.names == ("name",)
    assert pattern.match(segments("/models/my%20model/stats")) == {"name": "my model"}
    assert pattern.match(segments("/models/m/stats/")) == {"name": "m"}
    assert pattern.match(segments("/models//stats")) is None  # a capture is never empty
    assert pattern.match(segments("/models/m/other")) is None
    assert pattern.match(segments("/models/m/stats/x")) is None


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/models/x{name}", "a parameter is a whole segment"),
        ("/a/{x}/{x}", "names {x} twice"),
        ("/a//b", "an empty segment"),
        ("models", "does not start with '/'"),
    ],
)
def test_bad_patterns_are_refused_naming_the_problem(path: str, problem: str) -> None:
    with pytest.raises(PluginError, match=r"^plugin p: endpoint path .*") as caught:
        EndpointRoutes([endpoint(path)])
    assert problem in str(caught.value)


# --- the shadowing rule


@pytest.mark.parametrize(
    ("api", "path", "builtin"),
    [
        ("inference", "/ping", "/ping"),
        ("inference", "/{anything}", "/ping"),
        ("inference", "/", "/"),
        ("inference", "/api-description", "/api-description"),
        ("inference", "/predictions/{m}", "/predictions/{model}"),
        ("inference", "/{x}/{y}", "/predictions/{model}"),
        ("inference", "/v2/health/{probe}", "/v2/health/live"),
        ("inference", "/v1/models", "/v1/models"),
        ("inference", "/metrics", "/metrics"),
        ("management", "/models", "/models"),
        ("management", "/models/", "/models"),
        ("management", "/token", "/token"),
        ("management", "/models/{a}/{b}", "/models/{model}/{version}"),
        ("management", "/{what}/{name}/stats", "/models/{model}/{version}"),
    ],
)
def test_a_plugin_may_not_shadow_a_built_in_route(api: str, path: str, builtin: str) -> None:
    with pytest.raises(PluginError) as caught:
        EndpointRoutes([endpoint(path, api=api, name="greedy")])
    assert str(caught.value) == (
        f"plugin greedy: endpoint {path} would shadow the built-in route {builtin} of the {api} API"
    )


@pytest.mark.parametrize(
    ("api", "path"),
    [
        ("management", "/models/{name}/stats"),  # more specific than /models/{m}/{v}
        ("management", "/models/{name}/{version}/stats"),
        ("management", "/stats"),
        ("management", "/ping"),  # only the inference API has /ping
        ("inference", "/predictions/{model}/stats"),
        ("inference", "/v2/models/{model}/stats"),
        ("inference", "/health/{probe}"),
    ],
)
def test_a_plugin_may_sit_beside_the_built_in_routes(api: str, path: str) -> None:
    routes = EndpointRoutes([endpoint(path, api=api)])
    assert routes.api(api) is not None
    assert routes.api("inference" if api == "management" else "management") is None


def test_two_plugins_with_one_pattern_and_a_common_method_are_refused() -> None:
    first = endpoint("/x/{a}", ("GET", "POST"), name="first")
    second = endpoint("/x/{b}", ("POST",), name="second")
    with pytest.raises(PluginError) as caught:
        EndpointRoutes([first, second])
    assert str(caught.value) == (
        "plugin second: endpoint POST /x/{b} of the management API is also plugin first's (/x/{a})"
    )


def test_one_pattern_with_other_methods_or_on_the_other_api_is_fine() -> None:
    getter = endpoint("/x/{a}", ("GET",), name="getter")
    putter = endpoint("/x/{a}", ("PUT",), name="putter")
    other = endpoint("/x/{a}", ("GET",), api="inference", name="other")
    routes = EndpointRoutes([getter, putter, other])
    management = routes.api("management")
    assert management is not None
    put = management.match("PUT", "/x/1")
    assert put is not None and put.endpoint is putter and put.params == {"a": "1"}
    get = management.match("GET", "/x/1")
    assert get is not None and get.endpoint is getter


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(PluginError, match="endpoint method 'PURGE' is not one of GET, HEAD"):
        EndpointRoutes([endpoint("/x", ("PURGE",))])


# --- precedence and methods


def test_the_more_specific_plugin_route_is_tried_first() -> None:
    general = endpoint("/x/{a}/{b}", name="general")
    special = endpoint("/x/{a}/stats", name="special")
    literal = endpoint("/x/fixed/stats", name="literal")
    routes = EndpointRoutes([general, special, literal]).api("management")
    assert routes is not None
    assert [r.endpoint.name for r in routes.routes] == ["literal", "special", "general"]
    found = routes.match("GET", "/x/fixed/stats")
    assert found is not None and found.endpoint is literal
    found = routes.match("GET", "/x/y/stats")
    assert found is not None and found.endpoint is special and found.params == {"a": "y"}
    found = routes.match("GET", "/x/y/z")
    assert found is not None and found.endpoint is general


def test_an_unlisted_method_goes_to_a_built_in_route_or_is_405() -> None:
    stats = endpoint("/models/{name}/stats", ("GET",))
    own = endpoint("/custom/{name}", ("GET",), name="own")
    routes = EndpointRoutes([stats, own]).api("management")
    assert routes is not None
    found = routes.match("PUT", "/models/m/stats")  # scaling version "stats": built-in
    assert found is not None and found.endpoint is None and found.builtin
    found = routes.match("POST", "/custom/x")  # nothing else has this path: 405
    assert found is not None and found.endpoint is None and not found.builtin
    assert routes.match("GET", "/models/m") is None  # not a plugin's path at all


# --- the built-in table against the real routers


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    config = ServerConfig(log_dir=tmp_path, state_dir=tmp_path)
    metrics = Metrics()
    registry = Registry(config, metrics, work_dir=tmp_path / "work")
    access_log = LineLog(tmp_path / "access_log.log")
    yield ServerState(config, registry, metrics, MetricLog(tmp_path), access_log)
    access_log.close()


class _Conn:
    client = "127.0.0.1:5000"


def _filled(pattern: str) -> str:
    return "/".join("x" if s.startswith("{") else s for s in pattern.split("/")) or "/"


def _tornado_request(method: str, path: str) -> tornado.httputil.HTTPServerRequest:
    line = tornado.httputil.RequestStartLine(method, path, "HTTP/1.1")
    headers = tornado.httputil.HTTPHeaders({"Host": "127.0.0.1"})
    return tornado.httputil.HTTPServerRequest(start_line=line, headers=headers)


def _unrouted(exchange: http1.Exchange) -> bool:
    return isinstance(exchange, FixedExchange) and type(exchange.fixed) is NotFound


@pytest.mark.parametrize("pattern", [p for p in BUILTIN["inference"] if p != "/metrics"])
def test_every_listed_inference_route_is_routed(state: ServerState, pattern: str) -> None:
    api = InferenceApi(state)
    for method in ("GET", "POST"):
        head = http1.RequestHead(method, _filled(pattern), "HTTP/1.1", [])
        exchange = api.route(cast(http1.Connection, _Conn()), head)
        assert not _unrouted(exchange), f"{method} {pattern} is not a built-in route"


@pytest.mark.parametrize("pattern", [p for p in BUILTIN["management"] if p != "/metrics"])
def test_every_listed_management_route_is_routed(state: ServerState, pattern: str) -> None:
    app = make_app(state)
    delegate: Any = app.find_handler(_tornado_request("GET", _filled(pattern)))
    assert delegate.handler_class is not NotFoundHandler, f"{pattern} is not a built-in route"


def test_plugin_routes_come_first_on_the_management_api(state: ServerState) -> None:
    stats = endpoint("/models/{name}/stats")
    state.plugins.endpoints.append(stats)
    state.plugins.routes = EndpointRoutes([stats])
    app = make_app(state)
    found: Any = app.find_handler(_tornado_request("GET", "/models/m/stats"))
    assert found.handler_class.__name__ == "PluginHandler"
    assert found.path_kwargs == {"name": "m"}
    scale: Any = app.find_handler(_tornado_request("PUT", "/models/m/stats"))
    assert scale.handler_class.__name__ == "ModelHandler"


def test_an_unlisted_method_of_a_plugin_path_is_405_on_the_inference_api(
    state: ServerState,
) -> None:
    own = endpoint("/custom/{name}", ("GET",), api="inference")
    state.plugins.routes = EndpointRoutes([own])
    api = InferenceApi(state)
    post = api.route(
        cast(http1.Connection, _Conn()), http1.RequestHead("POST", "/custom/a", "HTTP/1.1", [])
    )
    assert isinstance(post, FixedExchange) and post.fixed.http_status == 405
    get = api.route(
        cast(http1.Connection, _Conn()), http1.RequestHead("GET", "/custom/a", "HTTP/1.1", [])
    )
    assert type(get).__name__ == "EndpointExchange"


# --- replies


def test_reply_bodies_and_their_content_types() -> None:
    as_json = answer_of(Reply({"a": [1, 2]}))
    assert as_json.content_type == "application/json" and b'"a"' in as_json.body
    assert answer_of(Reply(["x"])).content_type == "application/json"
    text = answer_of(Reply("héllo"))
    assert text.body == "héllo".encode() and text.content_type == "text/plain; charset=utf-8"
    raw = answer_of(Reply(b"\x00\x01", status=201))
    assert raw.content_type == "application/octet-stream" and raw.status == 201
    typed = answer_of(Reply(b"<p>", content_type="text/html", headers={"X-Mine": "1"}))
    assert typed.content_type == "text/html" and typed.headers == {"X-Mine": "1"}
    # a header named like one every answer has replaces it, whatever its case
    cached = answer_of(Reply("x", headers={"cache-control": "max-age=5", "content-type": "a/b"}))
    assert cached.headers == {"Cache-Control": "max-age=5"} and cached.content_type == "a/b"
    assert answer_of(Reply(status=204)).body == b""


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ("not a reply", "str is not a Reply"),
        (Reply(status=99), "status 99"),
        (Reply(status=600), "status 600"),
        (Reply(body=3), "a body of type int"),
        (Reply({"a": object()}), "cannot be sent as JSON"),
        (Reply(headers={"Bad Name": "x"}), "is not a token"),
        (Reply(headers={"X-Split": "a\r\nSet-Cookie: b"}), "not a valid field value"),
        (Reply(headers={"Content-Length": "3"}), "the server sets it"),
        (Reply(content_type="a\nb"), "content_type"),
        (Reply("body", status=204), "a 204 answer has no body"),
    ],
)
def test_replies_that_cannot_be_sent_are_refused(reply: Any, problem: str) -> None:
    with pytest.raises(BadReply, match=problem):
        answer_of(reply)


# --- running a handler


class _State:
    def __init__(self, timeout: float) -> None:
        self.config = ServerConfig(default_response_timeout=timeout)


def _request() -> EndpointRequest:
    return EndpointRequest(RequestInfo("inference", "GET", "/x", {}), {}, {}, b"")


def _call(handler: Endpoint, timeout: float = 30) -> Any:
    routes = EndpointRoutes([])
    state = cast(ServerState, _State(timeout))
    return asyncio.run(call(state, routes, handler, _request(), "rid-1"))


def test_a_coroutine_runs_on_the_loop_and_a_plain_function_on_a_thread() -> None:
    seen: list[str] = []

    class Async(Endpoint):
        name = "async-one"

        async def handle(self, request: EndpointRequest) -> Reply:
            seen.append(threading.current_thread().name)
            return Reply({"ok": True})

    class Plain(Endpoint):
        name = "plain-one"

        def handle(self, request: EndpointRequest) -> Reply:
            seen.append(threading.current_thread().name)
            return Reply("plain")

    assert _call(Async()).body == b'{\n  "ok": true\n}'
    assert _call(Plain()).body == b"plain"
    assert seen[0] == threading.main_thread().name
    assert seen[1].startswith("tsctl-endpoint-")


def test_past_the_deadline_is_504_naming_it() -> None:
    release = threading.Event()

    class Slow(Endpoint):
        name = "slow"

        async def handle(self, request: EndpointRequest) -> Reply:
            await asyncio.sleep(60)
            return Reply("late")

    class Blocking(Endpoint):
        name = "blocking"

        def handle(self, request: EndpointRequest) -> Reply:
            release.wait(60)
            return Reply("late")

    for handler in (Slow(), Blocking()):
        with pytest.raises(EndpointTimeout) as caught:
            _call(handler, timeout=0.05)
        assert caught.value.http_status == 504
        assert str(caught.value) == (
            "the endpoint did not answer within default_response_timeout (0.05 s)"
        )
    release.set()


def test_an_exception_is_500_without_its_text_and_logged_with_the_plugin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raising(Endpoint):
        name = "raiser"

        def handle(self, request: EndpointRequest) -> Reply:
            raise RuntimeError("secret detail")

    with caplog.at_level(logging.ERROR, "tsctl.server"), pytest.raises(EndpointFailed) as caught:
        _call(Raising())
    assert caught.value.http_status == 500
    assert "secret" not in str(caught.value)
    assert str(caught.value) == (
        "internal server error in plugin endpoint raiser (request id rid-1); "
        "the server log (ts_log.log) has the details"
    )
    [record] = [r for r in caplog.records if r.name == "tsctl.server"]
    assert record.getMessage() == "plugin raiser: GET /x failed (request id rid-1)"
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])
    caplog.clear()


def test_daemon_threads_skip_a_call_cancelled_while_it_waited() -> None:
    threads = DaemonThreads(1, "t")
    gate = threading.Event()
    first = threads.submit(gate.wait, 30)
    ran: list[int] = []
    second = threads.submit(ran.append, 1)
    assert second.cancel()  # still waiting behind the first
    third = threads.submit(ran.append, 3)
    gate.set()
    assert first.result(30) is True and third.result(30) is None
    assert ran == [3]
    assert all(t.daemon for t in threads._threads)


@pytest.mark.parametrize("plain", [False, True])
def test_a_plugin_s_own_timeout_error_is_a_500_not_a_504(
    plain: bool, caplog: pytest.LogCaptureFixture
) -> None:
    class OwnTimeout(Endpoint):
        name = "own-timeout"

        async def handle(self, request: EndpointRequest) -> Reply:
            raise TimeoutError("its own socket")

    class PlainTimeout(Endpoint):
        name = "own-timeout"

        def handle(self, request: EndpointRequest) -> Reply:
            raise TimeoutError("its own socket")

    with caplog.at_level(logging.ERROR, "tsctl.server"), pytest.raises(EndpointFailed):
        _call(PlainTimeout() if plain else OwnTimeout())
    assert "plugin own-timeout: GET /x failed" in caplog.text
    caplog.clear()
