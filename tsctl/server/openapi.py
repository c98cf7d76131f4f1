"""OpenAPI 3 documents of the APIs, returned by `OPTIONS /` and `GET /api-description`."""

from __future__ import annotations

from typing import Any

from tsctl import __version__

_ERROR = {
    "description": "An error in TorchServe's shape",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["code", "type", "message"],
                "properties": {
                    "code": {"type": "integer"},
                    "type": {"type": "string"},
                    "message": {"type": "string"},
                },
            }
        }
    },
}


def _model_params(with_version: bool) -> list[dict[str, Any]]:
    params = [{"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if with_version:
        params.append(
            {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    return params


def _predict(with_version: bool) -> dict[str, Any]:
    operation = {
        "description": "Run the model's handler on the request body: raw bytes of any content "
        "type, or multipart/form-data with several files and fields.",
        "parameters": _model_params(with_version),
        "requestBody": {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "The handler's answer, in the content type it chose"},
            "400": _ERROR,
            "404": _ERROR,
            "413": _ERROR,
            "500": _ERROR,
            "503": _ERROR,
            "504": _ERROR,
        },
    }
    return {"post": {**operation, "operationId": "predictions"}, "put": operation}


def inference_api_description() -> dict[str, Any]:
    return {
        "openapi": "3.0.1",
        "info": {"title": "tsctl inference API", "version": __version__},
        "paths": {
            "/": {
                "options": {
                    "operationId": "apiDescription",
                    "responses": {"200": {"description": "This document"}},
                }
            },
            "/api-description": {
                "get": {
                    "operationId": "apiDescription",
                    "responses": {"200": {"description": "This document"}},
                }
            },
            "/ping": {
                "get": {
                    "operationId": "ping",
                    "responses": {"200": {"description": 'Health: {"status": "Healthy"}'}},
                }
            },
            "/predictions/{model_name}": _predict(False),
            "/predictions/{model_name}/{model_version}": _predict(True),
        },
    }
