"""Find a model's handler the way TorchServe does, and make it one callable.

`handler` in the manifest is a module in the model directory (`my_handler` or
`my_handler.py`), optionally `module:function`, or a built-in name (`base`,
`image_classifier`, ...). A module file in the model directory wins over a built-in of the same
name; a name that is neither is looked up in `ts.torch_handler` as TorchServe does. A module
with the named function (default `handle`) is used as a function: TorchServe calls it once as
`handle(None, context)` at load, and so do we. Otherwise the module must define exactly one
class; it is instantiated, its `initialize(context)` is called, and its method of that name
handles batches (request envelopes are applied around it by `tsctl.worker.envelope.wrap`).

An asynchronous handler (`async def handle`, an `async def initialize`) loads only for a model
with `asyncCommunication: true`: the worker then passes its event loop's `run_until_complete`
as `run`, which awaits what the load step returns; without it, loading fails with the
configuration error naming the setting (`tsctl.worker.awaiting`).

Before any handler is imported, `install_compat_path` puts tsctl's own `ts` package
(tsctl/worker/compat) first on `sys.path`, so handlers written for TorchServe import it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tsctl.worker.awaiting import NOT_ASYNC, NotAsync, settled_at_load
from tsctl.worker.context import Context

Entry = Callable[[Any, Context], Any]

#: the folder holding tsctl's `ts` package (TorchServe's handler API)
COMPAT_PATH = str(Path(__file__).resolve().parent / "compat")

#: built-in handler names and the module that implements each (`ts.*` ones are tsctl's own,
#: in tsctl/worker/compat)
BUILTIN_MODULES = {
    "base": "tsctl.worker.handlers.base",
    "base_handler": "tsctl.worker.handlers.base",
    "image_classifier": "ts.torch_handler.image_classifier",
    "object_detector": "ts.torch_handler.object_detector",
    "image_segmenter": "ts.torch_handler.image_segmenter",
    "text_classifier": "ts.torch_handler.text_classifier",
}


class HandlerLoadError(Exception):
    """The handler cannot be found or has the wrong shape; the message says which."""


def install_compat_path() -> None:
    """Make `import ts` find tsctl's `ts` package, also when TorchServe's is installed.

    Idempotent. A `ts` imported from elsewhere earlier is forgotten, so the next import
    resolves to ours.
    """
    if sys.path[:1] != [COMPAT_PATH]:
        while COMPAT_PATH in sys.path:
            sys.path.remove(COMPAT_PATH)
        sys.path.insert(0, COMPAT_PATH)
    ours = COMPAT_PATH + os.sep
    for name in [n for n in sys.modules if n == "ts" or n.startswith("ts.")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not origin.startswith(ours):
            del sys.modules[name]


def load_entry(
    handler: str,
    model_dir: str,
    context: Context,
    run: Callable[[Awaitable[Any]], Any] | None = None,
) -> Entry:
    """Import the handler, initialize it with `context`, and return what handles batches;
    `run` awaits an asynchronous handler's load step (None: asynchronous is refused)."""
    try:
        return _load(handler, model_dir, context, run)
    except NotAsync as exc:
        raise HandlerLoadError(str(exc)) from None


def _load(
    handler: str, model_dir: str, context: Context, run: Callable[[Awaitable[Any]], Any] | None
) -> Entry:
    install_compat_path()
    module_part, _, function_name = handler.partition(":")
    function_name = function_name or "handle"
    module = _find_module(module_part.removesuffix(".py").split("/")[-1], model_dir)

    candidate = getattr(module, function_name, None)
    if candidate is not None and inspect.isfunction(candidate):
        entry: Entry = candidate
        settled_at_load(entry(None, context), run, f"handler function {function_name!r}")
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
    method: Entry = getattr(service, function_name)
    what = f"{classes[0].__name__}.{function_name}"
    if run is None and inspect.iscoroutinefunction(method):
        raise NotAsync(NOT_ASYNC.format(what=what))
    initialize = getattr(service, "initialize", None)
    if initialize is not None:
        settled_at_load(initialize(context), run, f"{classes[0].__name__}.initialize")
    return method


def _find_module(name: str, model_dir: str) -> ModuleType:
    """The handler module `name`: a file of the model directory, else a built-in, else
    TorchServe's `ts.torch_handler.<name>`."""
    in_archive = os.path.isfile(os.path.join(model_dir, f"{name}.py")) or os.path.isdir(
        os.path.join(model_dir, name)
    )
    if not in_archive and name in BUILTIN_MODULES:
        return importlib.import_module(BUILTIN_MODULES[name])
    try:
        return _import_from(name, model_dir)
    except HandlerLoadError:
        if in_archive or not name.isidentifier():
            raise
    try:
        return importlib.import_module(f"ts.torch_handler.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"ts.torch_handler.{name}", name):
            raise HandlerLoadError(
                f"handler module {name!r} not found in the model archive, and it is not a "
                "built-in handler"
            ) from None
        raise


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
