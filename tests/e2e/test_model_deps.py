"""Per-model Python dependencies (`install_py_dep_per_model`): real pip runs, offline, on a
tiny wheel shipped inside the model folder; then real daemons serving such an archive."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemon import Server, dedent
from tsctl.errors import ArchiveError, DependencyInstallFailed
from tsctl.server.config import ServerConfig
from tsctl.server.deps import install as model_deps
from tsctl.server.deps.cache_key import cache_key
from tsctl.server.deps.pip import RECORD_FILE

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
    assert (entry / RECORD_FILE).read_text() == OFFLINE + f"./{WHEEL}\n"
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
    key = cache_key(first / "requirements.txt", first)[0]
    assert cache_key(same / "requirements.txt", same)[0] == key
    assert cache_key(changed / "requirements.txt", changed)[0] != key
    # a nested requirements file counts with its content
    nested = model_folder(tmp_path / "d", "-r more.txt\n")
    (nested / "more.txt").write_text("tinydep==0.1\n")
    before = cache_key(nested / "requirements.txt", nested)[0]
    (nested / "more.txt").write_text("tinydep==0.2\n")
    assert cache_key(nested / "requirements.txt", nested)[0] != before


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
        give_up = time.monotonic() + 120  # a guard against hanging, not a measurement
        while not pip_children():  # readiness poll: pip has started
            if task.done():
                await task  # raises what stopped the install before pip started
                pytest.fail("install returned before pip started")
            assert time.monotonic() < give_up, "pip did not start"
            await asyncio.sleep(0.02)
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


# --- what the cache key reads ---------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the model's: a wheel, a requirements file and a package."""
    folder = tmp_path / "outside"
    make_wheel(folder)
    (folder / "more.txt").write_text("tinydep\n")
    (folder / "pkg").mkdir()
    (folder / "pkg" / "setup.py").write_text("raise SystemExit('never built')\n")
    return folder


@pytest.mark.parametrize(
    "line",
    [
        "-r {outside}/more.txt",
        "-r ../outside/more.txt",
        "--requirement=../outside/more.txt",
        "-r../outside/more.txt",
        "-c ../outside/more.txt",
        "-e {outside}/pkg",
        "--editable ../outside/pkg",
        "{outside}/pkg",
        "../outside/" + WHEEL,
        "file://{outside}/" + WHEEL,
        "tinydep @ file://{outside}/" + WHEEL,
        "git+file://{outside}/pkg",
        "tinydep @ git+file://{outside}/pkg@main",
        "-e git+file://{outside}/pkg#egg=tinydep",
        "hg+file://{outside}/pkg",
        "GIT+FILE://{outside}/pkg",
        "svn+file://localhost{outside}/pkg",
        "-f ../outside",
        "--find-links {outside}",
        "./link/" + WHEEL,
        "-r link/more.txt",
        "-r ${{HOME}}/more.txt",
        "./${{TSCTL_TEST_WHEEL}}",
    ],
)
def test_paths_outside_the_model_folder_are_refused(
    tmp_path: Path, outside: Path, line: str
) -> None:
    text = line.format(outside=outside)
    model = model_folder(tmp_path / "m", OFFLINE + "# a comment\n" + text + "\n")
    (model / "link").symlink_to(outside)
    with pytest.raises(DependencyInstallFailed) as failed:
        install(config(tmp_path), model)
    message = str(failed.value)
    assert f"requirements.txt: {text!r}" in message
    assert "outside the model's folder" in message or "environment variable" in message
    assert failed.value.http_status == 400 and failed.value.type_name == "ModelException"
    assert not (tmp_path / "deps").exists()  # refused before pip, before the cache


def test_a_nested_file_is_named_in_the_error(tmp_path: Path, outside: Path) -> None:
    model = model_folder(tmp_path / "m", "-r sub/more.txt\n")
    (model / "sub").mkdir()
    (model / "sub" / "more.txt").write_text("-r ../../outside/more.txt\n")
    with pytest.raises(DependencyInstallFailed, match=r"sub/more.txt: '-r \.\./\.\./outside"):
        cache_key(model / "requirements.txt", model)


def test_local_references_inside_the_model_folder(tmp_path: Path) -> None:
    """Every form pip reads as a local path counts with its content (and nothing is refused)."""
    changes = {  # a line: the file it names, or a file in the folder it names
        "-r sub/more.txt": "sub/more.txt",
        "-e ./pkg[extra]": "pkg/setup.py",
        "pkg-tool @ file:./pkg2": "pkg2/setup.py",
        "--find-links ./links": "links/index.txt",
        "--constraint=sub/constraints.txt": "sub/constraints.txt",
    }
    model = model_folder(tmp_path / "m", "\n".join([*changes, "wheels/" + WHEEL]) + "\n")
    make_wheel(model / "wheels")
    for name in changes.values():
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_text("tinydep\n")
    key = cache_key(model / "requirements.txt", model)[0]
    for name in [*changes.values(), "wheels/" + WHEEL]:
        (model / name).write_bytes((model / name).read_bytes() + b"\n")
        changed = cache_key(model / "requirements.txt", model)[0]
        assert changed != key, name
        key = changed
    # files no line names do not count
    (model / "weights.bin").write_bytes(b"weights")
    assert cache_key(model / "requirements.txt", model)[0] == key


def test_symlinks_in_a_local_folder_are_not_followed(tmp_path: Path, outside: Path) -> None:
    model = model_folder(tmp_path / "m", "./pkg\n")
    (model / "pkg").mkdir()
    (model / "pkg" / "setup.py").write_text("# a package\n")
    (model / "pkg" / "data").symlink_to(outside / "more.txt")
    (model / "pkg" / "tree").symlink_to(outside, target_is_directory=True)
    key = cache_key(model / "requirements.txt", model)[0]
    (outside / "more.txt").write_text("changed outside: not read\n")
    (outside / "new.txt").write_text("not walked\n")
    assert cache_key(model / "requirements.txt", model)[0] == key
    (model / "pkg" / "data").unlink()
    (model / "pkg" / "data").symlink_to(outside / "new.txt")  # where the link points counts
    assert cache_key(model / "requirements.txt", model)[0] != key


def never_opened(fifo: Path, work: Any) -> Any:
    """Run `work` in a thread and fail if it opens `fifo` (which would block it for good):
    a reader waiting on a FIFO lets a non-blocking writer open it, which also frees it."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    opened = False
    while thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            opened = True  # somebody was reading it
        except OSError as exc:
            assert exc.errno == errno.ENXIO  # no reader: the expected case
        thread.join(0.01)
    assert not opened, f"{fifo} was opened"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_fifos_are_never_opened(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m", "./pkg\n")
    (model / "pkg").mkdir()
    os.mkfifo(model / "pkg" / "pipe")
    requirements = model / "requirements.txt"
    key = never_opened(model / "pkg" / "pipe", lambda: cache_key(requirements, model))[0]
    assert len(key) == 64
    # a FIFO that a line names is refused
    os.mkfifo(model / "more.txt")
    (model / "requirements.txt").write_text("-r more.txt\n")
    with pytest.raises(DependencyInstallFailed, match=r"requirements.txt: '-r more.txt'.*not a "):
        never_opened(model / "more.txt", lambda: install(config(tmp_path), model))
    # so is a requirements file that is one
    os.mkfifo(model / "fifo.txt")
    with pytest.raises(ArchiveError, match=r"'fifo.txt'.*not a regular file"):
        never_opened(model / "fifo.txt", lambda: install(config(tmp_path), model, "fifo.txt"))


def test_the_bytes_hashed_are_bounded(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m", OFFLINE + f"./{WHEEL}\n")
    size = (model / WHEEL).stat().st_size
    cache_key(model / "requirements.txt", model, max_bytes=size + 100)
    with pytest.raises(DependencyInstallFailed, match=rf"requirements.txt: './{WHEEL}'.* {size} "):
        cache_key(model / "requirements.txt", model, max_bytes=size)


def test_reading_counts_against_the_timeout(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "m", OFFLINE + f"./{WHEEL}\n")
    with pytest.raises(DependencyInstallFailed, match="install_py_dep_timeout"):
        cache_key(model / "requirements.txt", model, deadline=time.monotonic())
    cfg = config(tmp_path, install_py_dep_timeout=1e-9)
    with pytest.raises(DependencyInstallFailed, match=r"reading .* within 1e-09 s"):
        install(cfg, model)
    assert pip_children() == []
    assert not (tmp_path / "deps").exists()


SHADOW = "raise SystemExit('a pip that is not the server\\'s ran')\n"


@pytest.mark.parametrize("where", ["model folder", "PYTHONPATH"])
def test_pip_is_the_servers_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An archive's `pip/` folder, or the daemon's PYTHONPATH, cannot stand in for pip."""
    model = model_folder(tmp_path / "m", OFFLINE + f"./{WHEEL}\n")
    shadow = model if where == "model folder" else tmp_path / "path"
    (shadow / "pip").mkdir(parents=True)
    (shadow / "pip" / "__init__.py").write_text(SHADOW)
    (shadow / "pip" / "__main__.py").write_text(SHADOW)
    if where == "PYTHONPATH":
        monkeypatch.setenv("PYTHONPATH", str(shadow))
    entry = install(config(tmp_path), model)
    assert entry is not None
    assert (entry / "tinydep" / "__init__.py").read_text() == "VALUE = 42\n"


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
def test_registering_a_registered_version_skips_pip(deps_server: Server) -> None:
    """The 409 comes before pip runs: `broken.mar` would fail pip with a 400."""
    response = deps_server.manage("POST", "/models?url=broken.mar&model_name=tiny")
    assert response.status == 409, response.body
    assert response.json()["type"] == "ConflictStatusException"
    assert ts_log(deps_server).count("model tiny: installing") == 1


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
@pytest.mark.daemon_errors(r"model broken: pip failed installing requirements\.txt")
def test_register_with_a_broken_requirement(deps_server: Server) -> None:
    response = deps_server.manage("POST", "/models?url=broken.mar&initial_workers=1")
    assert response.status == 400, response.body
    doc = response.json()
    assert doc["type"] == "ModelException"
    assert "pip exited with status 1" in doc["message"]
    assert "nosuch-tsctl-test-package" in doc["message"]
    assert deps_server.manage("GET", "/models/broken").status == 404


@pytest.mark.slow
@pytest.mark.daemon_errors(
    r"model broken: pip failed installing requirements\.txt",
    r"start-up failed: installing the Python dependencies of model broken",
)
def test_start_with_a_broken_requirement(tmp_path: Path, tma: Path) -> None:
    server = Server(tmp_path, {"install_py_dep_per_model": "true"})
    archive(tma, server.store, tmp_path / "bad", "broken", OFFLINE + "nosuch-tsctl-test-package\n")
    result = server.start("broken.mar", expect_ok=False)
    assert result.returncode != 0
    assert "pip exited with status 1" in result.stderr
    assert "nosuch-tsctl-test-package" in result.stderr
