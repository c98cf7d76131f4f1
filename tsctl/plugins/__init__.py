"""tsctl's plugin interfaces (docs/plugins.md): import them from here.

from tsctl.plugins import Authorizer, BatchingStrategy, Denied, Endpoint, Reply
"""

from tsctl.plugins.api import (
    Authorizer,
    BatchingStrategy,
    Denied,
    Endpoint,
    EndpointRequest,
    Plugin,
    Reply,
    RequestInfo,
    ServerView,
)

__all__ = [
    "Authorizer",
    "BatchingStrategy",
    "Denied",
    "Endpoint",
    "EndpointRequest",
    "Plugin",
    "Reply",
    "RequestInfo",
    "ServerView",
]
