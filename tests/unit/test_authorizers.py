"""The authorization chain (tsctl.server.auth): the token authorizer on the `Authorizer`
interface, plugin denials as errors with their status and gRPC code, a plugin that raises or
answers nonsense, and the API-key example's keys file."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.plugins import EXAMPLES
from tsctl.errors import TsctlError
from tsctl.plugins import Authorizer, Denied, RequestInfo
from tsctl.server.auth import (
    AUTHORIZER_FAILED,
    FAILED,
    TOKEN_API_FAILED,
    AccessDenied,
    TokenAuth,
    TokenAuthorizer,
    Unauthorized,
    run_chain,
)


def info(api: str = "inference", path: str = "/predictions/m", **headers: str) -> RequestInfo:
    return RequestInfo(api, "POST", path, headers, "127.0.0.1:5000", "m", "http")


class Answer(Authorizer):
    """Answers what it is given, and records that it was asked."""

    def __init__(self, name: str, answer: Any, asked: list[str]) -> None:
        self.name, self.answer, self.asked = name, answer, asked

    def authorize(self, request: RequestInfo) -> Denied | None:
        self.asked.append(self.name)
        if isinstance(self.answer, Exception):
            raise self.answer
        result: Denied | None = self.answer
        return result


def test_every_authorizer_is_asked_in_order_while_they_allow() -> None:
    asked: list[str] = []
    run_chain([Answer("a", None, asked), Answer("b", None, asked)], info())
    assert asked == ["a", "b"]
    asked.clear()
    chain = [Answer("a", Denied(401, "who?"), asked), Answer("b", None, asked)]
    with pytest.raises(AccessDenied) as caught:
        run_chain(chain, info())
    assert asked == ["a"]  # the first refusal answers
    assert caught.value.message == "who?" and caught.value.http_status == 401


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (429, "RESOURCE_EXHAUSTED"),
        (400, "PERMISSION_DENIED"),
        (418, "PERMISSION_DENIED"),
        (503, "PERMISSION_DENIED"),
    ],
)
def test_a_denial_keeps_its_status_and_maps_to_a_grpc_code(status: int, code: str) -> None:
    with pytest.raises(AccessDenied) as caught:
        run_chain([Answer("p", Denied(status, "no"), [])], info())
    error = caught.value
    assert (error.http_status, error.grpc_code, error.type_name) == (
        status,
        code,
        "AccessDeniedException",
    )


def test_a_raising_authorizer_is_a_generic_500_naming_it_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked: list[str] = []
    chain = [Answer("boom", KeyError("the plugin's secret"), asked), Answer("b", None, asked)]
    with caplog.at_level(logging.ERROR, logger="tsctl.server"), pytest.raises(TsctlError) as caught:
        run_chain(chain, info())
    error = caught.value
    assert type(error) is TsctlError and error.http_status == 500 and error.grpc_code == "INTERNAL"
    assert error.message == AUTHORIZER_FAILED and "secret" not in error.message
    assert error.__cause__ is None and error.__suppress_context__
    assert asked == ["boom"]
    [record] = caplog.records
    assert record.getMessage().startswith("authorizer boom failed on http POST /predictions/m")
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)
    caplog.clear()  # expected


@pytest.mark.parametrize(
    "answer", [True, "no", Denied(200, "fine?"), Denied(403, b"bytes"), Denied(True, "x")]
)
def test_an_answer_that_is_not_none_or_a_denied_is_a_500(
    answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tsctl.server"), pytest.raises(TsctlError) as caught:
        run_chain([Answer("odd", answer, [])], info())
    assert caught.value.http_status == 500 and caught.value.message == AUTHORIZER_FAILED
    assert "authorizer odd answered" in caplog.text
    caplog.clear()  # expected


def test_an_async_authorize_is_a_500_and_its_coroutine_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Async(Authorizer):
        name = "async"

        async def authorize(self, request: RequestInfo) -> Denied | None:  # type: ignore[override]
            return None

    # a coroutine never awaited would warn, and warnings are errors here
    with caplog.at_level(logging.ERROR, logger="tsctl.server"), pytest.raises(TsctlError):
        run_chain([Async()], info())
    assert "authorizer async answered <coroutine" in caplog.text
    caplog.clear()  # expected


@pytest.fixture
def token(tmp_path: Path) -> TokenAuthorizer:
    return TokenAuthorizer(TokenAuth.create(tmp_path, 60))


def bearer(token: TokenAuthorizer, kind: str) -> str:
    return f"Bearer {token.auth.keys[kind].value}"


def test_the_token_authorizer_asks_each_api_for_its_key(token: TokenAuthorizer) -> None:
    inference, management = bearer(token, "inference"), bearer(token, "management")
    assert token.authorize(info(authorization=inference)) is None
    assert token.authorize(info("management", "/models", authorization=management)) is None
    refused = token.authorize(info(authorization=management))
    assert refused is not None and (refused.status, refused.message) == (400, FAILED)
    assert token.authorize(info("metrics", "/metrics")) is None  # no key there, as TorchServe
    # /token needs the API key, with the token API's own message
    api = bearer(token, "API")
    assert token.authorize(info("management", "/token", authorization=api)) is None
    wrong = token.authorize(info("management", "/token", authorization=management))
    assert wrong is not None and wrong.message == TOKEN_API_FAILED


def test_the_token_denial_is_torchserves_error(token: TokenAuthorizer) -> None:
    with pytest.raises(Unauthorized) as caught:
        run_chain([token], info())
    error = caught.value
    assert (error.http_status, error.grpc_code, error.type_name, error.message) == (
        400,
        "UNAUTHENTICATED",
        "InvalidKeyException",
        FAILED,
    )


# --- the API-key example's keys file


@pytest.fixture
def apikey(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(EXAMPLES / "apikey_authorizer"))
    import tsctl_apikey

    yield tsctl_apikey
    sys.modules.pop("tsctl_apikey", None)


def test_the_example_checks_keys_and_models(
    apikey: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    digest = hashlib.sha256(b"k1").hexdigest()
    path.write_text(json.dumps({digest: ["m"], hashlib.sha256(b"k2").hexdigest(): ["*"]}))
    monkeypatch.setenv("TSCTL_API_KEYS", str(path))
    plugin = apikey.ApiKeyAuthorizer()
    plugin.setup(None)

    def ask(model: str | None, **headers: str) -> Any:
        return plugin.authorize(RequestInfo("inference", "GET", "/", headers, "", model))

    assert ask("m", **{"x-api-key": "k1"}) is None
    assert ask("n", **{"x-api-key": "k2"}) is None
    assert ask(None, **{"x-api-key": "k1"}) is None
    assert ask("m").status == 401
    assert ask("m", **{"x-api-key": "k3"}).status == 401
    assert ask("n", **{"x-api-key": "k1"}) == Denied(403, "this API key may not use model 'n'")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read"),
        ("{", "is not valid JSON"),
        ("[]", "must be an object"),
        ('{"abc": ["*"]}', "is not a SHA-256 hash"),
        (json.dumps({"0" * 64: "*"}), "must be a list of names"),
    ],
)
def test_a_bad_keys_file_fails_setup_saying_why(
    apikey: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, needle: str
) -> None:
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("TSCTL_API_KEYS", str(path))
    with pytest.raises(ValueError, match=needle):
        apikey.ApiKeyAuthorizer().setup(None)
    monkeypatch.delenv("TSCTL_API_KEYS")
    with pytest.raises(ValueError, match="set TSCTL_API_KEYS"):
        apikey.ApiKeyAuthorizer().setup(None)
