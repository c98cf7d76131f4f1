"""A model store made of symlinks, as Kubernetes volumes and TorchServe's own test utilities make
them: the links an operator put in the store are followed, while a name a client sends that
escapes the store is still refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("links"), properties={"enable_model_api": "true"})
    store = srv.store
    # a config map's layout: store/mnist.mar -> ..data/mnist.mar, ..data -> ..2026_12_06/
    make_archive(store / "..2026_12_06", "mnist", "swiss")
    (store / "..data").symlink_to("..2026_12_06/", target_is_directory=True)
    (store / "mnist.mar").symlink_to("..data/mnist.mar")
    # an operator's link to an archive kept elsewhere on the machine
    elsewhere = srv.root / "elsewhere"
    make_archive(elsewhere, "beta", "swiss")
    (store / "beta.mar").symlink_to(elsewhere / "beta.mar")
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("url", ["mnist.mar", "..data/mnist.mar", "beta.mar", "file://beta.mar"])
def test_links_in_the_store_are_followed(server: Server, url: str) -> None:
    response = server.manage("POST", f"/models?url={url}")
    assert response.status == 200, response.body
    [name] = [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
    try:
        assert server.predict(name, {}).status == 200
    finally:
        assert server.manage("DELETE", f"/models/{name}").status == 200


def test_an_absolute_path_through_the_store_is_followed(server: Server) -> None:
    response = server.manage("POST", f"/models?url={server.store / 'mnist.mar'}")
    assert response.status == 200, response.body
    assert server.manage("DELETE", "/models/mnist").status == 200


@pytest.mark.parametrize(
    "url",
    [
        "../elsewhere/beta.mar",
        "..data/../../elsewhere/beta.mar",
        "./../elsewhere/beta.mar",
        "{root}/elsewhere/beta.mar",
        "file://{root}/elsewhere/beta.mar",
        "{store}/../elsewhere/beta.mar",
    ],
)
def test_names_that_escape_the_store_are_refused(server: Server, url: str) -> None:
    url = url.format(root=server.root, store=server.store)
    assert_error(
        server.manage("POST", f"/models?url={url}"),
        400,
        "BadRequestException",
        "is outside the model store",
    )
    assert server.manage("GET", "/models").json()["models"] == []


def test_the_store_itself_is_not_a_model(server: Server) -> None:
    for url in (".", str(server.store), "..data"):
        response = server.manage("POST", f"/models?url={url}")
        assert response.status == 400, response.body
    assert server.manage("GET", "/models").json()["models"] == []


def test_the_links_are_still_there(server: Server) -> None:
    """Unregistering a model read through a link leaves the operator's files alone."""
    assert (server.store / "mnist.mar").is_symlink()
    assert Path(server.store / "..data").is_symlink()
    assert (server.root / "elsewhere" / "beta.mar").is_file()
