"""`ts.handler_utils.timer.timed`: time a handler method when model-config.yaml asks for it.

With `handler: {profile: true}` in the model's model-config.yaml, each call of a decorated
method (BaseHandler's `preprocess`, `inference`, `postprocess`) adds a
`ts_handler_<method>` time metric in ms; otherwise the method runs untouched.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _profiling(handler: Any) -> bool:
    context = getattr(handler, "context", None)
    config = getattr(context, "model_yaml_config", None) or {}
    section = config.get("handler") if isinstance(config, dict) else None
    return isinstance(section, dict) and bool(section.get("profile"))


def timed(func: F) -> F:
    """Decorate a handler method so its duration is recorded when profiling is on."""

    @functools.wraps(func)
    def wrap_func(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _profiling(self):
            return func(self, *args, **kwargs)
        import torch

        if torch.cuda.is_available():
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            result = func(self, *args, **kwargs)
            end.record()
            torch.cuda.synchronize()
            duration = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            result = func(self, *args, **kwargs)
            duration = (time.perf_counter() - began) * 1000
        self.context.metrics.add_time("ts_handler_" + func.__name__, duration)
        return result

    return wrap_func  # type: ignore[return-value]
