"""`MAR-INF/MANIFEST.json`: the model archive's manifest, as torch-model-archiver 0.12 writes it.

Field names, their order and the JSON layout (two-space indent, no trailing newline) match the
reference tool, so TorchServe reads tsctl's archives and tsctl reads TorchServe's. Unknown
fields (older MMS-era manifests carry a few more) are kept, not rejected.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsctl.errors import ArchiveError
from tsctl.validation import first_problem

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
#: the manifest format version tsctl writes: the torch-model-archiver release it matches
ARCHIVER_VERSION = "0.12.0"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$"
_MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
#: a model version: it names URL paths, worker ids and metric labels, as the name does
_MODEL_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.+]{0,63}")
#: TorchServe's `createdOn` format
CREATED_ON_FORMAT = "%d/%m/%Y %H:%M:%S"


class Runtime(str, Enum):
    PYTHON = "python"
    PYTHON3 = "python3"
    LSP = "LSP"


#: handler names that refer to code shipped with the server, not to a file in the archive
BUILTIN_HANDLERS: dict[Runtime, frozenset[str]] = {
    Runtime.PYTHON: frozenset(
        {
            "base",
            "base_handler",
            "image_classifier",
            "image_segmenter",
            "object_detector",
            "text_classifier",
            "dali_image_classifier",
            "vllm_handler",
            "trt_llm_handler",
        }
    ),
    Runtime.LSP: frozenset({"BaseHandler", "TorchScriptHandler"}),
}
BUILTIN_HANDLERS[Runtime.PYTHON3] = BUILTIN_HANDLERS[Runtime.PYTHON]


def is_builtin_handler(handler: str, runtime: Runtime = Runtime.PYTHON) -> bool:
    return handler in BUILTIN_HANDLERS[runtime]


def check_model_version(version: str) -> str:
    """Return `version` if it is a valid model version, else raise (`ArchiveError`)."""
    if not _MODEL_VERSION_RE.fullmatch(version):
        raise ArchiveError(
            f"invalid model version {version!r}: it must start with a letter or digit and "
            "contain at most 64 letters, digits, '_', '-', '+' and '.'"
        )
    return version


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model name (TorchServe's rule), else raise."""
    if not _MODEL_NAME_RE.fullmatch(name):  # `$` alone would let a trailing newline in
        raise ArchiveError(
            f"invalid model name {name!r}: it must start with a letter or digit and contain "
            "only letters, digits, '_', '-' and '.'"
        )
    return name


class ModelSection(BaseModel):
    """The manifest's `model` object."""

    model_config = ConfigDict(
        extra="allow", populate_by_name=True, frozen=True, protected_namespaces=()
    )

    model_name: str = Field(alias="modelName", pattern=MODEL_NAME_PATTERN)
    serialized_file: str | None = Field(default=None, alias="serializedFile")
    handler: str = Field(min_length=1)
    model_file: str | None = Field(default=None, alias="modelFile")
    model_version: str | None = Field(default=None, alias="modelVersion")
    extensions: str | None = None
    requirements_file: str | None = Field(default=None, alias="requirementsFile")
    config_file: str | None = Field(default=None, alias="configFile")


class Manifest(BaseModel):
    """The whole manifest. `to_json()` writes it as torch-model-archiver 0.12 does."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    created_on: str | None = Field(default=None, alias="createdOn")
    runtime: Runtime = Runtime.PYTHON
    model: ModelSection
    archiver_version: str | None = Field(default=None, alias="archiverVersion")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def new_manifest(
    *,
    model_name: str,
    handler: str,
    version: str | None,
    runtime: Runtime,
    serialized_file: str | None = None,
    model_file: str | None = None,
    requirements_file: str | None = None,
    config_file: str | None = None,
    created_on: datetime | None = None,
) -> Manifest:
    """Build the manifest for a new archive; file arguments are the names inside the archive."""
    model = ModelSection(
        modelName=check_model_name(model_name),
        serializedFile=serialized_file,
        handler=handler,
        modelFile=model_file,
        modelVersion=version or None,
        requirementsFile=requirements_file,
        configFile=config_file,
    )
    return Manifest(
        createdOn=(created_on or datetime.now()).strftime(CREATED_ON_FORMAT),
        runtime=runtime,
        model=model,
        archiverVersion=ARCHIVER_VERSION,
    )


def parse_manifest(data: bytes, archive: str) -> Manifest:
    """Validate manifest bytes read from `archive`; errors name the archive and the field."""
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        where, detail = first_problem(exc)
        if exc.errors()[0]["type"] == "json_invalid":
            detail = "not valid JSON"
        raise ArchiveError(f"{archive}: invalid {MANIFEST_PATH}: {where}: {detail}") from None
