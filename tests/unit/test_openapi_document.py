"""The API descriptions are serialised once: `GET /` and `/api-description` answer the same
bytes every time instead of re-serialising a 43 KB document per request."""

from __future__ import annotations

import json

from tsctl.server.api import openapi


def test_inference_document_is_built_once() -> None:
    first = openapi.inference_document()
    assert openapi.inference_document() is first
    assert json.loads(first) == openapi.inference_api_description()


def test_management_document_is_built_once() -> None:
    first = openapi.management_document()
    assert openapi.management_document() is first
    assert json.loads(first) == openapi.management_api_description()
