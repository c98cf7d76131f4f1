"""Finding and loading plugins: installed entry points and a plugins folder.

Installed packages declare plugins as entry points in the group `tsctl.plugins`; each names a
plugin class (made with no arguments) or instance. A folder (`--plugins-path`, setting
`plugins_path`) holds `.py` files and packages (folders with `__init__.py`); each is imported
as its own module, which lists its plugins in `PLUGINS` (classes or instances). Names starting
with `_` or `.` are skipped; a `.jar` is named in a warning (TorchServe's Java plugins cannot
load here). `discover` lists everything found with whether it loaded (`tsctl plugins list`);
`load` is the daemon's start-up: the first plugin that fails to import or validate stops it
with one line naming the plugin and the error.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from tsctl.errors import StartFailed
from tsctl.plugins.api import APIS, Authorizer, BatchingStrategy, Endpoint, Plugin

GROUP = "tsctl.plugins"
KINDS = (Endpoint, Authorizer, BatchingStrategy)
#: a plugin's name: also a model-config value (`batchingStrategy`) and a log field
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*")


class PluginError(StartFailed):
    """A plugin that cannot be used: its message is the start-up error's one line."""


@dataclass
class Found:
    """One plugin found: where, what, and whether it loaded (`plugin` then set) or why not."""

    name: str
    source: str  # "entry point NAME (DIST VERSION)" or "folder PATH"
    kind: str = ""
    plugin: Plugin | None = None
    error: str = ""


@dataclass
class Discovery:
    found: list[Found] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def plugins(self) -> list[Plugin]:
        return [f.plugin for f in self.found if f.plugin is not None]


def discover(plugins_path: Path | None = None) -> Discovery:
    """Everything installed and in `plugins_path`, each loaded and checked (never raises for
    a plugin's own failure: it is recorded in its `Found`)."""
    result = Discovery()
    for entry in _entry_points():
        dist = entry.dist
        where = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"
        found = Found(entry.name, f"entry point {entry.value} ({where})")
        try:
            _accept(found, entry.load())
        except Exception as exc:  # a plugin's import may raise anything
            found.error = _describe(exc)
        result.found.append(found)
    if plugins_path is not None:
        _scan_folder(plugins_path, result)
    _check_names(result)
    return result


def load(plugins_path: Path | None = None) -> Discovery:
    """The plugins to run with (and the warnings to log); `PluginError` (one line) for the
    first that cannot be used."""
    if plugins_path is not None and not plugins_path.is_dir():
        raise PluginError(f"plugins_path {str(plugins_path)!r} is not a directory")
    result = discover(plugins_path)
    for found in result.found:
        if found.error:
            raise PluginError(f"plugin {found.name} ({found.source}): {found.error}")
    return result


def _entry_points() -> Iterator[metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    for entry in metadata.entry_points(group=GROUP):
        key = (entry.name, entry.value)  # a dist on sys.path twice lists it twice
        if key not in seen:
            seen.add(key)
            yield entry


def _scan_folder(folder: Path, result: Discovery) -> None:
    if not folder.is_dir():
        result.warnings.append(f"plugins_path {str(folder)!r} is not a directory")
        return
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        if path.suffix == ".jar":
            result.warnings.append(
                f"{path.name}: a TorchServe Java plugin; tsctl loads Python plugins only "
                "(docs/plugins.md says how each Java plugin kind maps onto them)"
            )
            continue
        if not (path.suffix == ".py" or (path / "__init__.py").is_file()):
            continue
        source = f"folder {path}"
        try:
            module = _import(path)
            listed = getattr(module, "PLUGINS", None)
            if not isinstance(listed, (list, tuple)) or not listed:
                raise TypeError("the module has no PLUGINS list")
        except Exception as exc:  # a plugin's import may raise anything
            result.found.append(Found(path.stem, source, error=_describe(exc)))
            continue
        for item in listed:
            found = Found(str(getattr(item, "name", "") or path.stem), source)
            try:
                _accept(found, item)
            except Exception as exc:
                found.error = _describe(exc)
            result.found.append(found)


def _import(path: Path) -> ModuleType:
    """Import a plugin file or package under its own module name (`tsctl_plugin_<stem>`)."""
    name = f"tsctl_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    location = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(
        name, location, submodule_search_locations=[str(path)] if path.is_dir() else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _accept(found: Found, item: Any) -> None:
    """Make `item` (a plugin class or instance) the plugin of `found`, or raise why not."""
    if inspect.isclass(item):
        if not issubclass(item, KINDS):
            raise TypeError(f"{item.__name__} is not an Endpoint, Authorizer or BatchingStrategy")
        item = item()
    if not isinstance(item, KINDS):
        raise TypeError(f"{type(item).__name__} is not an Endpoint, Authorizer or BatchingStrategy")
    found.kind = item.kind
    if not item.name:
        item.name = found.name
    found.name = item.name
    _validate(item)
    found.plugin = item


def _validate(plugin: Plugin) -> None:
    if not _NAME.fullmatch(plugin.name):
        raise ValueError(f"invalid plugin name {plugin.name!r} (letters, digits, '.', '_', '-')")
    if isinstance(plugin, Endpoint):
        if plugin.api not in APIS[:2]:
            raise ValueError(f"endpoint api {plugin.api!r}: 'inference' or 'management'")
        if not _PATH.fullmatch(plugin.path or ""):
            raise ValueError(f"endpoint path {plugin.path!r} is not an absolute URL path")
        methods = tuple(m.upper() for m in plugin.methods)
        if not methods or not all(m.isalpha() for m in methods):
            raise ValueError(f"endpoint methods {plugin.methods!r}")
        plugin.methods = methods
    if isinstance(plugin, Authorizer) and inspect.iscoroutinefunction(plugin.authorize):
        raise TypeError("authorize must be a plain function (def), not async: it runs inline")
    if isinstance(plugin, BatchingStrategy):
        if not inspect.iscoroutinefunction(plugin.next_batch):
            raise TypeError("next_batch must be a coroutine function (async def)")
        if plugin.name == "default":
            raise ValueError("the name 'default' is the built-in batching strategy's")


def _check_names(result: Discovery) -> None:
    seen: dict[str, Found] = {}
    for found in result.found:
        if found.plugin is None:
            continue
        other = seen.get(found.name)
        if other is not None:
            found.plugin, found.error = None, f"the name is taken by {other.source}"
        else:
            seen[found.name] = found


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
