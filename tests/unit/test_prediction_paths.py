"""The inference router's pattern for `/predictions/...` and `/explanations/...`: model,
version and the url path TorchServe hands the handler, trailing `/`s dropped."""

from __future__ import annotations

import pytest

from tsctl.server.api.rest_inference import _PREDICTIONS


@pytest.mark.parametrize(
    ("path", "groups"),
    [
        ("/predictions/m", ("predictions", "m", None, "")),
        ("/predictions/m/", ("predictions", "m", None, "")),
        ("/predictions/m//", ("predictions", "m", None, "")),
        ("/predictions/m/1.0", ("predictions", "m", "1.0", "")),
        ("/predictions/m/1.0///", ("predictions", "m", "1.0", "")),
        ("/predictions/m/1.0/a", ("predictions", "m", "1.0", "a")),
        ("/predictions/m/1.0/a/b/", ("predictions", "m", "1.0", "a/b")),
        ("/predictions/m/1.0//a", ("predictions", "m", "1.0", "/a")),
        ("/predictions/m/1.0/a//b///", ("predictions", "m", "1.0", "a//b")),
        ("/explanations/m/v/x/y/z", ("explanations", "m", "v", "x/y/z")),
        ("/predictions/m/1.0/%2Fa", ("predictions", "m", "1.0", "%2Fa")),
    ],
)
def test_paths_split_as_torchserve_splits_them(path: str, groups: tuple[str | None, ...]) -> None:
    match = _PREDICTIONS.match(path)
    assert match is not None
    api, model, version, url_path = match.groups()
    assert (api, model, version, url_path or "") == groups


@pytest.mark.parametrize("path", ["/predictions", "/predictions/", "/predictions//1.0", "/ping"])
def test_other_paths_do_not_match(path: str) -> None:
    assert _PREDICTIONS.match(path) is None


def test_a_head_full_of_slashes_routes() -> None:
    """A request head's worth (64 KiB) of `/`s: the url path keeps its inner run and loses the
    trailing one. (The lazy pattern this replaced took seconds here, on the event loop.)"""
    inner = "/predictions/m/v/a" + "/" * 60_000 + "b"
    match = _PREDICTIONS.match(inner)
    assert match is not None and match[4] == "a" + "/" * 60_000 + "b"
    trailing = _PREDICTIONS.match("/predictions/m/v/a" + "/" * 60_000)
    assert trailing is not None and trailing[4] == "a"
