"""The daemon's plugins once loaded (`tsctl.plugins.loader`): by kind, each `setup` with the
daemon's `ServerView`. Built at start-up, before any API listens; read on the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tsctl.plugins.api import Authorizer, BatchingStrategy, Endpoint, Plugin, ServerView
from tsctl.plugins.loader import PluginError
from tsctl.server.endpoint_routes import EndpointRoutes

if TYPE_CHECKING:
    from tsctl.server.state import ServerState

log = logging.getLogger("tsctl.server")


@dataclass
class ServerPlugins:
    """The loaded plugins by kind, in the order they were found."""

    endpoints: list[Endpoint] = field(default_factory=list)
    authorizers: list[Authorizer] = field(default_factory=list)
    strategies: dict[str, BatchingStrategy] = field(default_factory=dict)
    #: where the endpoints are mounted (`tsctl.server.endpoint_routes`), made by `setup`
    routes: EndpointRoutes | None = None

    @classmethod
    def of(cls, plugins: list[Plugin]) -> ServerPlugins:
        made = cls()
        for plugin in plugins:
            if isinstance(plugin, Endpoint):
                made.endpoints.append(plugin)
            elif isinstance(plugin, Authorizer):
                made.authorizers.append(plugin)
            elif isinstance(plugin, BatchingStrategy):
                made.strategies[plugin.name] = plugin
        return made

    @property
    def all(self) -> list[Plugin]:
        return [*self.endpoints, *self.authorizers, *self.strategies.values()]

    def setup(self, state: ServerState) -> None:
        """Each plugin's `setup`, once; `PluginError` naming the first that raises. The
        endpoints are placed first: one that would shadow a built-in route or another
        plugin's is a `PluginError` before any plugin is set up."""
        self.routes = EndpointRoutes(self.endpoints)
        view = DaemonView(state)
        for plugin in self.all:
            try:
                plugin.setup(view)
            except Exception as exc:  # a plugin's setup may raise anything
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
                raise PluginError(f"plugin {plugin.name}: setup failed: {detail}") from None
            log.info("plugin %s (%s) loaded", plugin.name, plugin.kind)


class DaemonView(ServerView):
    """What plugins may read of the daemon."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def setting(self, name: str, default: Any = None) -> Any:
        return getattr(self._state.config, name, default)

    def models(self) -> list[tuple[str, str]]:
        models = self._state.registry.models
        return [(name, version) for name, versions in models.items() for version in versions]

    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self._state.metrics.samples(name)
