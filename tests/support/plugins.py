"""Plugins for tests: an example package from examples/plugins/ made importable, with its
entry points, as `pip install` would make it (without pip, a build backend or the network).

`install_example("stats_endpoint", site)` copies the package's module into `site` and writes
its `<name>-<version>.dist-info` (METADATA and entry_points.txt, from the `pyproject.toml`'s
`[project.entry-points."tsctl.plugins"]`): with `site` on PYTHONPATH, the daemon finds the
plugins through `importlib.metadata`, exactly as it finds an installed package's.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from tests.support.paths import ROOT

EXAMPLES = ROOT / "examples" / "plugins"


def install_example(example: str, site: Path) -> Path:
    """Install examples/plugins/`example` into `site` (created); returns `site`."""
    source = EXAMPLES / example
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"]["tsctl.plugins"]
    modules = {value.split(":")[0].split(".")[0] for value in entry_points.values()}
    site.mkdir(parents=True, exist_ok=True)
    for module in modules:
        if (source / module).is_dir():
            shutil.copytree(source / module, site / module, dirs_exist_ok=True)
        else:
            shutil.copy2(source / f"{module}.py", site / f"{module}.py")
    name, version = project["name"], project["version"]
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[tsctl.plugins]\n{lines}")
    return site


def write_plugin(folder: Path, name: str, source: str) -> Path:
    """A plugins-path file `folder/name.py` with `source` (for --plugins-path tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source)
    return path
