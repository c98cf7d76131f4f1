"""Find a model's handler the way TorchServe does, and make it one callable.

`handler` in the manifest is a built-in name (`base`, `image_classifier`, ...), a module in
the model directory (`my_handler` or `my_handler.py`), or `module:function`. A module with the
named function (default `handle`) is used as a function: TorchServe calls it once as
`handle(None, context)` at load, and so do we. Otherwise the module must define exactly one
class; it is instantiated, its `initialize(context)` is called, and its method of that name
handles batches.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from tsctl.worker.context import Context

Entry = Callable[[Any, Context], Any]

#: built-in handler names and the tsctl module that implements each
BUILTIN_MODULES = {
    "base": "tsctl.worker.handlers.base",
    "base_handler": "tsctl.worker.handlers.base",
    "image_classifier": "tsctl.worker.handlers.image_classifier",
}


class HandlerLoadError(Exception):
    """The handler cannot be found or has the wrong shape; the message says which."""


def load_entry(handler: str, model_dir: str, context: Context) -> Entry:
    """Import the handler, initialize it with `context`, and return what handles batches."""
    module_part, _, function_name = handler.partition(":")
    function_name = function_name or "handle"
    if module_part in BUILTIN_MODULES:
        module = importlib.import_module(BUILTIN_MODULES[module_part])
    else:
        module = _import_from(module_part.removesuffix(".py"), model_dir)

    candidate = getattr(module, function_name, None)
    if candidate is not None and inspect.isfunction(candidate):
        entry: Entry = candidate
        entry(None, context)
        return entry

    classes = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__
    ]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise HandlerLoadError(
            f"handler module {module.__name__!r} has no function {function_name!r} and "
            f"must then define exactly one class (found: {names})"
        )
    service = classes[0]()
    if not hasattr(service, function_name):
        raise HandlerLoadError(
            f"handler class {classes[0].__name__!r} has no method {function_name!r}"
        )
    initialize = getattr(service, "initialize", None)
    if initialize is not None:
        initialize(context)
    method: Entry = getattr(service, function_name)
    return method


def _import_from(name: str, model_dir: str) -> ModuleType:
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise HandlerLoadError(
                f"handler module {name!r} not found in the model archive"
            ) from None
        raise
