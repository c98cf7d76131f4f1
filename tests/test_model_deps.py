"""Per-model Python dependencies (`install_py_dep_per_model`): real pip runs, offline, on a
tiny wheel shipped inside the model folder; then real daemons serving such an archive."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.server import Server, dedent
from tsctl.errors import ArchiveError
from tsctl.server import model_deps
from tsctl.server.config import ServerConfig
from tsctl.server.model_deps import DependencyInstallFailed

WHEEL = "tinydep-0.1-py3-none-any.whl"
#: pip reads options from the requirements file: nothing here needs the network
OFFLINE = "--no-index\n"


def make_wheel(folder: Path, value: int = 42) -> Path:
    """A pure-Python wheel of `tinydep` (`tinydep.VALUE == value`), written by hand."""
    files = {
        "tinydep/__init__.py": f"VALUE = {value}\n".encode(),
        "tinydep-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinydep\nVersion: 0.1\n",
        "tinydep-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tsctl-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }

    def digest(data: bytes) -> str:
        raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"sha256={raw}"

    record = "".join(f"{path},{digest(data)},{len(data)}\n" for path, data in files.items())
    record += "tinydep-0.1.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as wheel:  # fixed dates: the same wheel, the same bytes
        for name, data in [*files.items(), ("tinydep-0.1.dist-info/RECORD", record.encode())]:
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return path


def model_folder(root: Path, requirements: str, value: int = 42) -> Path:
    """An extracted model: a requirements file and the wheel it names."""
    make_wheel(root, value)
    (root / "requirements.txt").write_text(requirements)
    return root


def config(tmp_path: Path, **values: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "install_py_dep_per_model": True,
        "model_deps_dir": tmp_path / "deps",
        **values,
    }
    return ServerConfig(**settings)


def install(
    cfg: ServerConfig, model_dir: Path, requirements: str | None = "requirements.txt"
) -> Path | None:
    return asyncio.run(model_deps.install(cfg, "tiny", model_dir, requirements, model_dir))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".partial-"))


def test_installs_into_a_cache_entry_and_reuses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tsctl.server")
    cfg = config(tmp_path)
    model = model_folder(tmp_path / "m1", OFFLINE + f"./{WHEEL}\n")
    entry = install(cfg, model)
    assert entry is not None and entry.parent == tmp_path / "deps"
    assert (entry / "tinydep" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (entry / model_deps.RECORD_FILE).read_text() == OFFLINE + f"./{WHEEL}\n"
    assert leftovers(entry.parent) == []
    assert "installing the Python dependencies" in caplog.text
    caplog.clear()
    # a restart, or another model with the same requirements: no pip run
    other = model_folder(tmp_path / "m2", OFFLINE + f"./{WHEEL}\n")
    assert install(cfg, model) == entry
    assert install(cfg, other) == entry
    assert "installing" not in caplog.text
    assert caplog.text.count("reusing the Python dependencies") == 2


def test_the_key_follows_the_files_the_requirements_name(tmp_path: Path) -> None:
    first = model_folder(tmp_path / "a", OFFLINE + f"./{WHEEL}\n", value=1)
    same = model_folder(tmp_path / "b", OFFLINE + f"./{WHEEL}\n", value=1)
    changed = model_folder(tmp_path / "c", OFFLINE + f"./{WHEEL}\n", value=2)
    key = model_deps.cache_key(first / "requirements.txt", first)[0]
    assert model_deps.cache_key(same / "requirements.txt", same)[0] == key
    assert model_deps.cache_key(changed / "requirements.txt", changed)[0] != key
    # a nested requirements file counts with its content
    nested = model_folder(tmp_path / "d", "-r more.txt\n")
    (nested / "more.txt").write_text("tinydep==0.1\n")
    before = model_deps.cache_key(nested / "requirements.txt", nested)[0]
    (nested / "more.txt").write_text("tinydep==0.2\n")
    assert model_deps.cache_key(nested / "requirements.txt", nested)[0] != before


def test_concurrent_installs_of_the_same_requirements(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    models = [model_folder(tmp_path / f"m{i}", OFFLINE + f"./{WHEEL}\n") for i in range(2)]

    async def both() -> list[Path | None]:
        return list(
            await asyncio.gather(
                *(
                    model_deps.install(cfg, f"m{i}", m, "requirements.txt", m)
                    for i, m in enumerate(models)
                )
            )
        )

    first, second = asyncio.run(both())
    assert first is not None and first == second
    assert (first / "tinydep" / "__init__.py").is_file()
    assert leftovers(first.parent) == []


def test_pip_failure_names_the_requirement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path)
    model = model_folder(tmp_path / "m", OFFLINE + "nosuch-tsctl-test-package==1.0\n")
    with pytest.raises(DependencyInstallFailed) as failed:
        install(cfg, model)
    message = str(failed.value)
    assert "model tiny from requirements.txt failed: pip exited with status 1" in message
    assert "nosuch-tsctl-test-package" in message
    assert "\n" not in message
    assert failed.value.http_status == 400 and failed.value.type_name == "ModelException"
    assert leftovers(tmp_path / "deps") == [] and list((tmp_path / "deps").iterdir()) == []
    assert "pip failed installing requirements.txt" in caplog.text
    caplog.clear()  # the expected ERROR log


@pytest.fixture
def silent_index() -> Iterator[str]:
    """A package index that accepts connections and never answers: pip waits on it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/simple"


def pip_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "pip" in " ".join(p.cmdline())]


def test_timeout_stops_pip(tmp_path: Path, silent_index: str) -> None:
    cfg = config(tmp_path, install_py_dep_timeout=1)
    model = model_folder(tmp_path / "m", f"--index-url {silent_index}\ntinydep\n")
    with pytest.raises(DependencyInstallFailed, match=r"did not finish within 1 s \(install_py"):
        install(cfg, model)
    assert pip_children() == []
    assert list((tmp_path / "deps").iterdir()) == []


def test_cancelling_stops_pip(tmp_path: Path, silent_index: str) -> None:
    cfg = config(tmp_path)
    model = model_folder(tmp_path / "m", f"--index-url {silent_index}\ntinydep\n")

    async def cancel_while_pip_runs() -> None:
        task = asyncio.create_task(model_deps.install(cfg, "m", model, "requirements.txt", model))
        while not pip_children():
            await asyncio.sleep(0.02)  # readiness poll: pip has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_pip_runs())
    assert pip_children() == []
    assert list((tmp_path / "deps").iterdir()) == []


def test_off_by_default_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = model_folder(tmp_path / "m", OFFLINE + f"./{WHEEL}\n")
    assert ServerConfig().install_py_dep_per_model is False
    assert install(ServerConfig(model_deps_dir=tmp_path / "deps"), model) is None
    assert "install_py_dep_per_model is false" in caplog.text
    assert not (tmp_path / "deps").exists()


def test_nothing_to_install(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    model = model_folder(tmp_path / "m", "# nothing yet\n\n")
    assert install(cfg, model) is None
    assert install(cfg, model, None) is None


@pytest.mark.parametrize(
    ("name", "needle"),
    [("missing.txt", "cannot read the requirements file 'missing.txt'"), ("../x.txt", "outside")],
)
def test_bad_requirements_file(tmp_path: Path, name: str, needle: str) -> None:
    model = model_folder(tmp_path / "m", "x\n")
    (tmp_path / "x.txt").write_text("x\n")
    with pytest.raises(ArchiveError, match=needle):
        install(config(tmp_path), model, name)


def test_cache_location(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert (
        model_deps.cache_root(ServerConfig(model_deps_dir=tmp_path / "d"), work) == tmp_path / "d"
    )
    store = ServerConfig(model_store=tmp_path / "store")
    assert model_deps.cache_root(store, work) == tmp_path / "store" / ".tsctl-deps"
    assert model_deps.cache_root(ServerConfig(), work) == work / "deps"


# --- served by real daemons ----------------------------------------------------------------

HANDLER = dedent(
    """
    import tinydep


    def handle(data, context):
        if data is None:
            return None
        return [{"value": tinydep.VALUE, "file": tinydep.__file__} for _ in data]
    """
)


def archive(tma: Path, store: Path, work: Path, name: str, requirements: str) -> None:
    """`tiny.py` with `-r requirements.txt` and the wheel as an extra file (reference tool)."""
    work.mkdir(parents=True, exist_ok=True)
    make_wheel(work)
    (work / "tiny.py").write_text(HANDLER)
    (work / "requirements.txt").write_text(requirements)
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(tma), "--model-name", name, "--version", "1.0", "--handler", "tiny.py",
            "-r", "requirements.txt", "--extra-files", WHEEL,
            "--export-path", str(store), "--force",
        ],
        cwd=work,
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deps_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tma = Path(sys.executable).parent / "torch-model-archiver"
    srv = Server(
        tmp_path_factory.mktemp("deps"),
        {"install_py_dep_per_model": "true", "enable_model_api": "true"},
    )
    archive(tma, srv.store, srv.root / "src", "tiny", OFFLINE + f"./{WHEEL}\n")
    archive(tma, srv.store, srv.root / "bad", "broken", OFFLINE + "nosuch-tsctl-test-package\n")
    srv.start("tiny.mar")
    yield srv
    srv.stop()


def ts_log(server: Server) -> str:
    return (server.log_dir / "ts_log.log").read_text()


@pytest.mark.slow
def test_served_model_imports_its_dependency(deps_server: Server) -> None:
    response = deps_server.predict("tiny", b"x")
    assert response.status == 200, response.body
    doc = response.json()
    assert doc["value"] == 42
    cache = (deps_server.store / ".tsctl-deps").resolve()
    assert Path(doc["file"]).resolve().is_relative_to(cache)  # not the server's environment
    assert ts_log(deps_server).count("installing the Python dependencies") == 1


@pytest.mark.slow
def test_restart_reuses_the_installed_dependencies(deps_server: Server) -> None:
    assert deps_server.stop().returncode == 0
    deps_server.start("tiny.mar")
    response = deps_server.predict("tiny", b"x")
    assert response.status == 200 and response.json()["value"] == 42
    log = ts_log(deps_server)
    assert log.count("installing the Python dependencies") == 1  # pip did not run again
    assert "reusing the Python dependencies" in log


@pytest.mark.slow
def test_register_with_a_broken_requirement(deps_server: Server) -> None:
    response = deps_server.manage("POST", "/models?url=broken.mar&initial_workers=1")
    assert response.status == 400, response.body
    doc = response.json()
    assert doc["type"] == "ModelException"
    assert "pip exited with status 1" in doc["message"]
    assert "nosuch-tsctl-test-package" in doc["message"]
    assert deps_server.manage("GET", "/models/broken").status == 404


@pytest.mark.slow
def test_start_with_a_broken_requirement(tmp_path: Path, tma: Path) -> None:
    server = Server(tmp_path, {"install_py_dep_per_model": "true"})
    archive(tma, server.store, tmp_path / "bad", "broken", OFFLINE + "nosuch-tsctl-test-package\n")
    result = server.start("broken.mar", expect_ok=False)
    assert result.returncode != 0
    assert "pip exited with status 1" in result.stderr
    assert "nosuch-tsctl-test-package" in result.stderr
