"""OpenAPI 3 documents of the APIs, returned by `OPTIONS /` and `GET /api-description`.

`inference_document` and `management_document` are the JSON answers, serialised once (about
43 KB and 14 KB; a client asking again and again costs a write, not a `json.dumps`).
"""

from __future__ import annotations

import functools
import json
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


def _explain(with_version: bool) -> dict[str, Any]:
    """Like predictions, but the handler explains (BaseHandler's `explain_handle`)."""
    operation = {
        **_predict(with_version)["put"],
        "description": "Run the model's handler in explanation mode (it sees the request header "
        "`explain: True`; TorchServe's BaseHandler then answers `explain_handle`, e.g. Captum "
        "attributions). Same inputs as predictions.",
    }
    return {"post": {**operation, "operationId": "explanations"}, "put": operation}


def _wfpredict() -> dict[str, Any]:
    """A request through a registered workflow's DAG (docs/workflows.md)."""
    operation = {
        **_predict(False)["put"],
        "operationId": "wfpredict",
        "description": "Run the request through the workflow's DAG of models and functions; "
        "the answer is the last node's output, or a JSON object of the last nodes' outputs.",
        "parameters": [_path("workflow_name")],
    }
    return {"post": operation}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _url_path(api: str) -> dict[str, Any]:
    """`/{api}/{model}/{version}/{url_path}`: the extra path reaches the handler."""
    operation = {
        **(_predict(True) if api == "predictions" else _explain(True))["put"],
        "description": f"As /{api}/{{model_name}}/{{model_version}}; what follows the version "
        "reaches the handler as the request header `url_path` "
        "(`context.get_request_header(i, 'url_path')`), percent-decoded.",
    }
    operation["parameters"] = [
        *operation["parameters"],
        {"name": "url_path", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    return {"post": {**operation, "operationId": f"{api}UrlPath"}, "put": operation}


def _other_path(operation_id: str, description: str, params: list[Any]) -> dict[str, Any]:
    """SageMaker's and the legacy paths: the request path of predictions, query parameters
    as handler inputs."""
    operation = {
        **_predict(False)["put"],
        "description": description + " Query parameters are handler inputs too.",
        "parameters": params,
    }
    return {"post": {**operation, "operationId": operation_id}, "put": operation}


def inference_api_description() -> dict[str, Any]:
    model_name = _model_params(False)
    invocations = [_query("model_name", "string", "The model (see the description)")]
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
            "/explanations/{model_name}": _explain(False),
            "/explanations/{model_name}/{model_version}": _explain(True),
            "/predictions/{model_name}/{model_version}/{url_path}": _url_path("predictions"),
            "/explanations/{model_name}/{model_version}/{url_path}": _url_path("explanations"),
            "/invocations": _other_path(
                "invocations",
                "SageMaker's path: the model named by the query parameter `model_name`, else "
                "the only model loaded at start-up, else a `model_name` form field.",
                invocations,
            ),
            "/models/{model_name}/invoke": _other_path(
                "invoke", "SageMaker's multi-model path: the model's default version.", model_name
            ),
            "/{model_name}/predict": _other_path(
                "legacyPredict", "TorchServe's legacy path.", model_name
            ),
            "/{model_name}/{model_version}/predict": _other_path(
                "legacyPredictVersion", "TorchServe's legacy path.", _model_params(True)
            ),
            "/wfpredict/{workflow_name}": _wfpredict(),
        },
    }


def _op(operation_id: str, description: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "description": description,
        "parameters": params,
        "responses": {
            "200": {"description": "Done"},
            "202": {"description": "Accepted; the work goes on in the background"},
            "400": _ERROR,
            "404": _ERROR,
            "405": _ERROR,
            "409": _ERROR,
            "500": _ERROR,
        },
    }


def _query(name: str, kind: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": kind}, "description": description}


def management_api_description() -> dict[str, Any]:
    name = _model_params(False)
    name_version = _model_params(True)
    wf = _path("workflow_name")
    scale_params = [
        _query("min_worker", "integer", "Workers to keep"),
        _query("max_worker", "integer", "Upper bound"),
        _query("synchronous", "boolean", "Wait until done (default false)"),
        _query("timeout", "integer", "Seconds to wait (-1: forever)"),
    ]
    register_params = [
        _query("url", "string", "Archive in the model store, or an allowed http(s) URL"),
        _query("model_name", "string", "Name to register under (default: the manifest's)"),
        _query("handler", "string", "Override the manifest's handler"),
        _query("runtime", "string", "Override the manifest's runtime"),
        _query("batch_size", "integer", "Requests per batch"),
        _query("max_batch_delay", "integer", "Milliseconds a batch may wait to fill"),
        _query("initial_workers", "integer", "Workers to start"),
        _query("synchronous", "boolean", "Wait for the workers (default true)"),
        _query("response_timeout", "integer", "Seconds a request may take"),
        _query("startup_timeout", "integer", "Seconds a worker may take to load"),
    ]
    return {
        "openapi": "3.0.1",
        "info": {"title": "tsctl management API", "version": __version__},
        "paths": {
            "/": {"options": _op("apiDescription", "This document", [])},
            "/models": {
                "get": _op(
                    "listModels",
                    "Registered models, sorted by name",
                    [
                        _query("limit", "integer", "Page size (default 100)"),
                        _query("next_page_token", "string", "Where the page starts"),
                    ],
                ),
                "post": _op("registerModel", "Register a model archive", register_params),
            },
            "/models/{model_name}": {
                "get": _op("describeModel", "The default version's description", name),
                "put": _op("setAutoScale", "Scale the default version", name + scale_params),
                "delete": _op("unregisterModel", "Unregister the default version", name),
            },
            "/models/{model_name}/{model_version}": {
                "get": _op("describeModelVersion", "One version, or `all`", name_version),
                "put": _op("setAutoScaleVersion", "Scale one version", name_version + scale_params),
                "delete": _op("unregisterModelVersion", "Unregister one version", name_version),
            },
            "/models/{model_name}/{model_version}/set-default": {
                "put": _op("setDefault", "Make this version the default", name_version),
            },
            "/workflows": {
                "get": _op(
                    "listWorkflows",
                    "Registered workflows, sorted by name",
                    [
                        _query("limit", "integer", "Page size (default and at most 100)"),
                        _query("next_page_token", "string", "Where the page starts"),
                    ],
                ),
                "post": _op(
                    "registerWorkflow",
                    "Register a workflow archive (.war) and its models",
                    [
                        _query("url", "string", "A .war in the workflow store"),
                        _query("workflow_name", "string", "Name (default: the manifest's)"),
                        _query("response_timeout", "integer", "Seconds a node's request may take"),
                        _query("startup_timeout", "integer", "Seconds a worker may take to load"),
                    ],
                ),
            },
            "/workflows/{workflow_name}": {
                "get": _op("describeWorkflow", "The workflow's description", [wf]),
                "delete": _op("unregisterWorkflow", "Unregister it and its models", [wf]),
            },
        },
    }


@functools.cache
def inference_document() -> bytes:
    """The inference API's description as the JSON answer (built on first use, then kept)."""
    return json.dumps(inference_api_description(), indent=2).encode()


@functools.cache
def management_document() -> bytes:
    """The management API's description as the JSON answer (built on first use, then kept)."""
    return json.dumps(management_api_description(), indent=2).encode()
