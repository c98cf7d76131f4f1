"""Where plugin endpoints (`tsctl.plugins.Endpoint`) are mounted: their path patterns, the
built-in routes they may not shadow, the order they are tried in, and the threads their plain
(blocking) handlers run on.

Pure matching (no loop, no I/O), built once at start-up (`ServerPlugins.setup`, before any
plugin's own `setup`) and read on the event loop. The API adapters use it: the inference API's
router (`rest_inference`) and the management API's tornado rules (`rest_management`); how a
matched endpoint is run and answered lives in `tsctl.server.api.plugin_routes`.

The rules (/work/notes/plugins-endpoints.md):

- A pattern is an absolute path of segments; a segment `{name}` captures one whole non-empty
  segment, anything else is literal. A trailing `/` of a request's path is ignored.
- Precedence, segment by segment from the left: a literal beats a parameter. Plugin routes are
  tried before the built-in parameterised ones, so a plugin pattern may only overlap a
  built-in route where it is the more specific one at the first segment they differ
  (`/models/{name}/stats` beside the built-in `/models/{name}/{version}`). A pattern equal to
  a built-in one, or one with a parameter where the built-in route has a literal (`/{any}`
  against `/ping`), would shadow it: a start-up error naming the plugin.
- Two plugin endpoints with the same API, pattern (parameter names aside) and a common method
  are a start-up error. Among plugin routes the more specific is tried first.
- A request whose path matches a plugin pattern but whose method no such endpoint lists goes to
  the built-in routes when one matches the path, else it is answered 405.
"""

from __future__ import annotations

import concurrent.futures
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from tsctl.plugins.api import Endpoint
from tsctl.plugins.loader import PluginError

#: the methods an endpoint may list (what both HTTP layers dispatch)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
#: how many plain (blocking) endpoint handlers run at once; more wait for a thread
THREADS = 4

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: every API's built-in routes (parameters as `{x}`), which plugins may not shadow. `/metrics`
#: is the metrics API's path: reserved on both so that no scraper is misled.
BUILTIN: dict[str, tuple[str, ...]] = {
    "inference": (
        "/",
        "/ping",
        "/api-description",
        "/metrics",
        "/predictions/{model}",
        "/predictions/{model}/{version}",
        "/explanations/{model}",
        "/explanations/{model}/{version}",
        "/invocations",  # SageMaker
        "/models/{model}/invoke",
        "/{model}/predict",  # TorchServe's legacy path
        "/{model}/{version}/predict",
        "/wfpredict/{workflow}",
        "/v1/models",
        "/v1/models/{model}",  # also `{model}:predict` and `{model}:explain`
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}",
        "/v2/models/{model}/versions/{version}/ready",
        "/v2/models/{model}/versions/{version}/infer",
    ),
    "management": (
        "/",
        "/metrics",
        "/token",
        "/models",
        "/models/{model}",
        "/models/{model}/{version}",
        "/models/{model}/{version}/set-default",
        "/workflows",
        "/workflows/{workflow}",
    ),
}


def segments(path: str) -> list[str]:
    """A path's segments (`/a/b/` → `["a", "b"]`, `/` → `[]`)."""
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path.split("/")[1:] if path != "/" else []


@dataclass(frozen=True)
class Pattern:
    """A path pattern: each segment a literal, or None for a `{name}` parameter."""

    text: str
    shape: tuple[str | None, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """`ValueError` naming the problem for a pattern that cannot be used."""
        if not text.startswith("/"):
            raise ValueError(f"path {text!r} does not start with '/'")
        shape: list[str | None] = []
        names: list[str] = []
        for segment in segments(text):
            param = _PARAM.fullmatch(segment)
            if param is not None:
                if param.group(1) in names:
                    raise ValueError(f"path {text!r} names {{{param.group(1)}}} twice")
                names.append(param.group(1))
                shape.append(None)
            elif "{" in segment or "}" in segment:
                raise ValueError(
                    f"path {text!r}: a parameter is a whole segment, '{{name}}' (not {segment!r})"
                )
            elif not segment:
                raise ValueError(f"path {text!r} has an empty segment")
            else:
                shape.append(segment)
        return cls(text, tuple(shape), tuple(names))

    @property
    def specificity(self) -> tuple[int, ...]:
        """Sorts the more specific first: a literal (0) before a parameter (1), from the left."""
        return tuple(1 if s is None else 0 for s in self.shape)

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        """The captures (percent-decoded) when `parts` (a path's segments) match, else None."""
        shape = self.shape
        if len(parts) != len(shape):
            return None
        values = []
        for want, got in zip(shape, parts, strict=True):
            if want is None:
                if not got:
                    return None
                values.append(got)
            elif want != got:
                return None
        return {name: unquote(value) for name, value in zip(self.names, values, strict=True)}

    def shadows(self, builtin: Pattern) -> bool:
        """Whether this (a plugin's) pattern would take requests from `builtin`: equal to it,
        or a parameter where it has a literal at the first segment they differ."""
        if len(self.shape) != len(builtin.shape):
            return False
        for mine, theirs in zip(self.shape, builtin.shape, strict=True):
            if mine == theirs:
                continue
            if mine is not None and theirs is not None:
                return False  # different literals: no path matches both
            return mine is None  # a literal of mine is the more specific
        return True


@dataclass(frozen=True)
class Route:
    endpoint: Endpoint
    pattern: Pattern


@dataclass(frozen=True)
class Match:
    """A request's path matched a plugin pattern: `endpoint` (with the captures `params`) when
    one such endpoint lists the method; else None, and `builtin` says whether a built-in route
    takes the path instead (when not, the answer is 405)."""

    endpoint: Endpoint | None
    params: dict[str, str] = field(default_factory=dict)
    builtin: bool = False


class ApiRoutes:
    """One API's plugin routes, the more specific first."""

    def __init__(self, api: str, routes: list[Route]) -> None:
        self.api = api
        self.routes = sorted(routes, key=lambda r: r.pattern.specificity)
        self.builtin = [Pattern.parse(text) for text in BUILTIN[api]]

    def match(self, method: str, path: str) -> Match | None:
        """The plugin route for this request; None when no plugin pattern matches the path."""
        parts = segments(path)
        seen = False
        for route in self.routes:
            params = route.pattern.match(parts)
            if params is None:
                continue
            if method in route.endpoint.methods:
                return Match(route.endpoint, params)
            seen = True
        if not seen:
            return None
        return Match(None, builtin=any(b.match(parts) is not None for b in self.builtin))


class EndpointRoutes:
    """Every plugin endpoint, checked and placed: `api(name)` for one API's routes, and the
    threads plain handlers run on (`executor`)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        by_api: dict[str, list[Route]] = {}
        builtin = {api: [Pattern.parse(t) for t in texts] for api, texts in BUILTIN.items()}
        for endpoint in endpoints:
            route = Route(endpoint, _pattern(endpoint))
            _check_methods(endpoint)
            for other in builtin.get(endpoint.api, []):
                if route.pattern.shadows(other):
                    raise PluginError(
                        f"plugin {endpoint.name}: endpoint {route.pattern.text} would shadow "
                        f"the built-in route {other.text} of the {endpoint.api} API"
                    )
            for taken in by_api.get(endpoint.api, []):
                common = sorted(set(taken.endpoint.methods) & set(endpoint.methods))
                if taken.pattern.shape == route.pattern.shape and common:
                    raise PluginError(
                        f"plugin {endpoint.name}: endpoint {' '.join(common)} "
                        f"{route.pattern.text} of the {endpoint.api} API is also plugin "
                        f"{taken.endpoint.name}'s ({taken.pattern.text})"
                    )
            by_api.setdefault(endpoint.api, []).append(route)
        self._apis = {api: ApiRoutes(api, routes) for api, routes in by_api.items()}
        self._executor: DaemonThreads | None = None

    def api(self, name: str) -> ApiRoutes | None:
        """The routes of one API; None when no plugin has an endpoint there."""
        return self._apis.get(name)

    @property
    def executor(self) -> DaemonThreads:
        """The threads plain endpoint handlers run on (started at the first such request)."""
        if self._executor is None:
            self._executor = DaemonThreads(THREADS, "tsctl-endpoint")
        return self._executor


def _pattern(endpoint: Endpoint) -> Pattern:
    try:
        return Pattern.parse(endpoint.path)
    except ValueError as exc:
        raise PluginError(f"plugin {endpoint.name}: endpoint {exc}") from None


def _check_methods(endpoint: Endpoint) -> None:
    unknown = [m for m in endpoint.methods if m not in METHODS]
    if unknown:
        raise PluginError(
            f"plugin {endpoint.name}: endpoint method {unknown[0]!r} is not one of "
            + ", ".join(METHODS)
        )


class DaemonThreads(concurrent.futures.Executor):
    """Up to `size` daemon threads running submitted calls, for `loop.run_in_executor`.

    Not `ThreadPoolExecutor`: its threads are joined when the interpreter exits, so one plugin
    call that never returns would keep the daemon from stopping. A call whose future was
    cancelled before a thread took it (its deadline passed while it waited) is skipped."""

    def __init__(self, size: int, prefix: str) -> None:
        self.size = size
        self.prefix = prefix
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]]
        self._calls = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, lambda: fn(*args, **kwargs)))
        if not self._threads:
            for n in range(self.size):
                thread = threading.Thread(target=self._run, name=f"{self.prefix}-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def _run(self) -> None:
        while True:
            future, call = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the waiting request, as the pool does
                future.set_exception(exc)
            else:
                future.set_result(result)
