"""Finding and checking plugins (`tsctl.plugins.loader`): a plugins folder and entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.plugins import write_plugin
from tsctl.plugins import loader

ALLOW = """
from tsctl.plugins import Authorizer

class Allow(Authorizer):
    name = "allow-all"

    def authorize(self, request):
        return None

PLUGINS = [Allow]
"""


def test_a_folder_plugin_is_found_and_loaded(tmp_path: Path) -> None:
    write_plugin(tmp_path, "allow", ALLOW)
    found = loader.discover(tmp_path).found
    assert [(f.name, f.kind, f.error) for f in found] == [("allow-all", "authorizer", "")]
    assert found[0].source == f"folder {tmp_path / 'allow.py'}"
    assert [p.name for p in loader.load(tmp_path).plugins] == ["allow-all"]


def test_a_package_in_the_folder_is_a_plugin_module(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .impl import PLUGINS\n")
    (package / "impl.py").write_text(ALLOW)
    assert [f.name for f in loader.load(tmp_path).plugins] == ["allow-all"]


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named"),
        ("x = 1\n", "TypeError: the module has no PLUGINS list"),
        ("PLUGINS = [object]\n", "is not an Endpoint, Authorizer or BatchingStrategy"),
        ("raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom"),
    ],
)
def test_a_broken_plugin_stops_the_start_with_one_line(
    tmp_path: Path, source: str, error: str
) -> None:
    write_plugin(tmp_path, "broken", source)
    [found] = loader.discover(tmp_path).found
    assert found.plugin is None and error in found.error
    with pytest.raises(loader.PluginError) as caught:
        loader.load(tmp_path)
    message = caught.value.message
    assert message.startswith(f"plugin broken (folder {tmp_path / 'broken.py'}): ")
    assert error in message and "\n" not in message


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('api = "metrics"\n    path = "/x"', "endpoint api 'metrics'"),
        ('path = "stats"', "endpoint path 'stats' is not an absolute URL path"),
        ('path = "/x"\n    methods = ()', "endpoint methods ()"),
    ],
)
def test_endpoints_are_checked(tmp_path: Path, body: str, error: str) -> None:
    source = (
        "from tsctl.plugins import Endpoint, Reply\n"
        f"class E(Endpoint):\n    name = 'e'\n    {body}\n"
        "    def handle(self, request):\n        return Reply()\n"
        "PLUGINS = [E]\n"
    )
    write_plugin(tmp_path, "e", source)
    [found] = loader.discover(tmp_path).found
    assert error in found.error


def test_a_batching_strategy_must_be_a_coroutine(tmp_path: Path) -> None:
    source = (
        "from tsctl.plugins import BatchingStrategy\n"
        "class B(BatchingStrategy):\n    name = 'b'\n"
        "    def next_batch(self, queue, batch_size, max_delay_ms, worker):\n        return []\n"
        "PLUGINS = [B]\n"
    )
    write_plugin(tmp_path, "b", source)
    [found] = loader.discover(tmp_path).found
    assert "next_batch must be a coroutine function" in found.error


def test_two_plugins_may_not_share_a_name(tmp_path: Path) -> None:
    write_plugin(tmp_path, "one", ALLOW)
    write_plugin(tmp_path, "two", ALLOW)
    first, second = loader.discover(tmp_path).found
    assert first.plugin is not None and second.plugin is None
    assert second.error == f"the name is taken by folder {tmp_path / 'one.py'}"


def test_a_jar_is_named_in_a_warning_and_hidden_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "endpoint.jar").write_bytes(b"PK")
    write_plugin(tmp_path, "_private", "raise SystemExit\n")
    (tmp_path / "notes.txt").write_text("not a plugin")
    result = loader.discover(tmp_path)
    assert result.found == []
    [warning] = result.warnings
    assert warning.startswith("endpoint.jar: a TorchServe Java plugin")


def test_a_missing_folder_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(loader.PluginError, match="is not a directory"):
        loader.load(tmp_path / "nope")


def test_entry_points_of_installed_packages_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "allow_plugin.py").write_text(ALLOW)
    dist = tmp_path / "allow_plugin-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: allow-plugin\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text("[tsctl.plugins]\nallow-all = allow_plugin:Allow\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [f for f in loader.discover().found if f.name == "allow-all"]
    assert len(found) == 1 and found[0].kind == "authorizer" and found[0].plugin is not None
    assert found[0].source == "entry point allow_plugin:Allow (allow-plugin 1.2)"


def test_a_batching_strategy_may_not_take_the_default_name(tmp_path: Path) -> None:
    source = (
        "from tsctl.plugins import BatchingStrategy\n"
        "class B(BatchingStrategy):\n    name = 'default'\n"
        "    async def next_batch(self, queue, batch_size, max_delay_ms, worker):\n"
        "        return []\n"
        "PLUGINS = [B]\n"
    )
    write_plugin(tmp_path, "b", source)
    [found] = loader.discover(tmp_path).found
    assert found.error == "ValueError: the name 'default' is the built-in batching strategy's"


def test_an_authorizer_must_be_a_plain_function(tmp_path: Path) -> None:
    write_plugin(tmp_path, "a", ALLOW.replace("def authorize", "async def authorize"))
    [found] = loader.discover(tmp_path).found
    assert "authorize must be a plain function (def), not async" in found.error
