"""Plugins found and loaded by real daemons: a plugins folder (`--plugins-path`, setting
`plugins_path`), installed entry points, and what stops a start (issue 17). The three kinds
have their own tests: test_plugin_authorizers.py, test_plugin_endpoints.py,
test_plugin_batching.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.cli import run_tsctl
from tests.support.daemon import Server, make_archive
from tests.support.plugins import write_plugin
from tsctl.local import pidfile

pytestmark = pytest.mark.slow

ALLOW = """
from tsctl.plugins import Authorizer

class Allow(Authorizer):
    name = "allow-all"

    def setup(self, server):
        self.store = server.setting("model_store")

    def authorize(self, request):
        return None

PLUGINS = [Allow]
"""


@pytest.fixture
def server(tmp_path: Path) -> Server:
    srv = Server(tmp_path / "srv")
    make_archive(srv.store, "swiss", "swiss")
    return srv


def _ts_log(server: Server) -> str:
    return (server.log_dir / "ts_log.log").read_text()


def _site_with_entry_point(site: Path) -> Path:
    """An installed package declaring the ALLOW authorizer as an entry point."""
    site.mkdir(parents=True)
    (site / "allow_plugin.py").write_text(ALLOW)
    dist = site / "allow_plugin-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: allow-plugin\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[tsctl.plugins]\nallow-all = allow_plugin:Allow\n")
    return site


def test_a_folder_plugin_is_loaded_at_start_and_listed(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    write_plugin(folder, "allow", ALLOW)
    server.start("swiss.mar", flags=("--plugins-path", str(folder)))
    assert "plugin allow-all (authorizer) loaded" in _ts_log(server)
    assert server.predict("swiss", {}).status == 200
    listed = server.tsctl("plugins", "list", "--plugins-path", folder, "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row == {
        "name": "allow-all",
        "kind": "authorizer",
        "source": f"folder {folder / 'allow.py'}",
        "loaded": True,
        "error": "",
    }
    server.stop()


def test_plugins_path_in_config_properties(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "from-properties"
    write_plugin(folder, "allow", ALLOW)
    server.properties["plugins_path"] = str(folder)
    server.start("swiss.mar")
    assert "plugin allow-all (authorizer) loaded" in _ts_log(server)
    server.stop()


@pytest.mark.daemon_errors(r"start-up failed: plugin broken \(folder .*\): ModuleNotFoundError")
def test_a_plugin_that_fails_to_import_stops_the_start_with_one_line(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "plugins"
    write_plugin(folder, "broken", "import module_that_is_not_installed\n")
    result = server.start("swiss.mar", expect_ok=False, flags=("--plugins-path", str(folder)))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("tsctl: error: ") and "Traceback" not in result.stderr
    assert f"plugin broken (folder {folder / 'broken.py'}): ModuleNotFoundError" in lines[0]
    assert not pidfile.pid_path(server.state_dir).exists()  # never a half-started server


@pytest.mark.daemon_errors(r"start-up failed: plugin picky: setup failed: ValueError: no keys")
def test_a_plugin_whose_setup_fails_stops_the_start(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    source = ALLOW.replace('"allow-all"', '"picky"').replace(
        'self.store = server.setting("model_store")', 'raise ValueError("no keys")'
    )
    write_plugin(folder, "picky", source)
    result = server.start("swiss.mar", expect_ok=False, flags=("--plugins-path", str(folder)))
    assert result.returncode == 1
    assert "plugin picky: setup failed: ValueError: no keys" in result.stderr.splitlines()[0]
    assert not pidfile.pid_path(server.state_dir).exists()


@pytest.mark.daemon_errors(r"start-up failed: plugins_path '.*nowhere' is not a directory")
def test_a_missing_plugins_path_is_one_clear_error(server: Server, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = server.start("swiss.mar", expect_ok=False, flags=("--plugins-path", str(missing)))
    assert result.returncode != 0
    assert f"plugins_path {str(missing)!r} is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
    listed = server.tsctl("plugins", "list", "--plugins-path", missing)
    assert listed.returncode == 2 and "is not a directory" in listed.stderr


def test_a_java_plugin_jar_is_named_in_a_warning(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "endpoints-1.0.jar").write_bytes(b"PK\x03\x04")
    server.start("swiss.mar", flags=("--plugins-path", str(folder)))
    log = _ts_log(server)
    assert "endpoints-1.0.jar: a TorchServe Java plugin; tsctl loads Python plugins only" in log
    listed = server.tsctl("plugins", "list", "--plugins-path", folder)
    assert listed.returncode == 0 and "No plugins found." in listed.stdout
    assert "endpoints-1.0.jar" in listed.stderr
    server.stop()


def test_an_installed_entry_point_is_listed_and_loaded(server: Server, tmp_path: Path) -> None:
    site = _site_with_entry_point(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    server.start("swiss.mar", env=env)
    assert "plugin allow-all (authorizer) loaded" in _ts_log(server)
    assert server.predict("swiss", {}).status == 200
    server.stop()
    listed = run_tsctl("plugins", "list", "--json", env=env)
    [row] = [r for r in json.loads(listed.stdout) if r["name"] == "allow-all"]
    assert row["source"] == "entry point allow_plugin:Allow (allow-plugin 0.3)" and row["loaded"]
    unlisted = run_tsctl("plugins", "list", "--json")  # without the package on the path
    assert all(r["name"] != "allow-all" for r in json.loads(unlisted.stdout))
