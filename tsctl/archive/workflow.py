"""Workflow archives (`.war`), as torch-workflow-archiver 0.12 writes them and TorchServe reads.

A `.war` is a zip: the spec file, the handler file and each `--extra-files` item at its root
(a directory's files with their sub-folders, as `tsctl archive` does for a `.mar`), and
`WAR-INF/MANIFEST.json` (`{"createdOn", "workflow": {"workflowName", "specFile", "handler"},
"archiverVersion"}`, two-space indent). TorchServe refuses a manifest without a workflow, a
workflow name, `archiverVersion` or `createdOn`, and so does `open_workflow`.

Reading reuses the model archive's safe zip reader (`tsctl.archive.reader.ZipArchive`): its
checks (no absolute paths, `..`, links, duplicates, expansion past a limit) and its extractor.
Callers run this off the event loop: it does blocking file I/O.
"""

from __future__ import annotations

import json
import re
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsctl.archive.manifest import CREATED_ON_FORMAT
from tsctl.archive.reader import ZipArchive
from tsctl.archive.writer import (
    Entry,
    copy_file,
    extra_file_entries,
    remove_file,
    replace_file,
)
from tsctl.errors import ArchiveError
from tsctl.validation import first_problem

WAR_MANIFEST_PATH = "WAR-INF/MANIFEST.json"
#: the torch-workflow-archiver release whose format tsctl writes
WORKFLOW_ARCHIVER_VERSION = "0.2.15"
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$"
_WORKFLOW_NAME_RE = re.compile(WORKFLOW_NAME_PATTERN)


class WorkflowSection(BaseModel):
    """The manifest's `workflow` object."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    workflow_name: str | None = Field(default=None, alias="workflowName")
    spec_file: str | None = Field(default=None, alias="specFile")
    handler: str | None = None


class WorkflowManifest(BaseModel):
    """`WAR-INF/MANIFEST.json`. Unknown fields (`description`, ...) are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    created_on: str | None = Field(default=None, alias="createdOn")
    description: str | None = None
    workflow: WorkflowSection | None = None
    archiver_version: str | None = Field(default=None, alias="archiverVersion")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_json(self) -> str:
        """The reference tool's layout: createdOn, workflow, archiverVersion; indent 2."""
        doc = self.to_dict()
        order = ["createdOn", "description", "workflow", "archiverVersion"]
        ordered = {k: doc[k] for k in order if k in doc}
        ordered.update({k: v for k, v in doc.items() if k not in ordered})
        return json.dumps(ordered, indent=2)

    def checked(self, where: str) -> WorkflowManifest:
        """TorchServe's checks of a manifest it registers (`WorkflowArchive.validate`)."""
        if self.workflow is None:
            raise ArchiveError(f"{where}: Missing Workflow entry in manifest file.")
        if not self.workflow.workflow_name:
            raise ArchiveError(f"{where}: Workflow name is not defined.")
        if self.archiver_version is None:
            raise ArchiveError(f"{where}: Workflow archive version is not defined.")
        if self.created_on is None:
            raise ArchiveError(f"{where}: Workflow archive createdOn is not defined.")
        if not self.workflow.spec_file:
            raise ArchiveError(f"{where}: the manifest names no specFile")
        return self


def check_workflow_name(name: str) -> str:
    """`name` if it is a valid workflow name (torch-workflow-archiver's rule), else raise."""
    if not _WORKFLOW_NAME_RE.fullmatch(name):
        raise ArchiveError(
            f"invalid workflow name {name!r}: it must start with a letter or digit and contain "
            "only letters, digits, '_', '-' and '.'"
        )
    return name


def parse_workflow_manifest(data: bytes, where: str) -> WorkflowManifest:
    try:
        return WorkflowManifest.model_validate_json(data)
    except ValidationError as exc:
        field, detail = first_problem(exc)
        if exc.errors()[0]["type"] == "json_invalid":
            detail = "not valid JSON"
        raise ArchiveError(f"{where}: invalid {WAR_MANIFEST_PATH}: {field}: {detail}") from None


class WorkflowArchive(ZipArchive):
    """An opened `.war`: the model archive's zip reader, with the workflow's manifest (no
    model manifest)."""

    manifest_path = WAR_MANIFEST_PATH

    def _opened(self, path: Path) -> None:
        self.path = path
        self.workflow_manifest = parse_workflow_manifest(self._read_manifest(), str(path))

    def __enter__(self) -> WorkflowArchive:
        return self


def open_workflow(path: Path) -> WorkflowArchive:
    """Open a `.war` (a zip, whatever its name) and read its manifest."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(2)
    except FileNotFoundError:
        raise ArchiveError(f"workflow archive not found: {path}") from None
    except OSError as exc:
        raise ArchiveError(f"cannot read workflow archive {path}: {exc.strerror}") from None
    if magic != b"PK":
        raise ArchiveError(f"{path} is not a workflow archive: expected a zip .war")
    return WorkflowArchive(path)


@dataclass(frozen=True)
class WorkflowSpecArgs:
    """What to archive: torch-workflow-archiver's flags, as values."""

    workflow_name: str
    spec_file: Path
    handler: Path | None = None
    extra_files: Sequence[str] = ()
    export_path: Path = Path()
    force: bool = False


def new_workflow_manifest(
    workflow_name: str, spec_file: str, handler: str | None, created_on: datetime | None = None
) -> WorkflowManifest:
    section = WorkflowSection(workflowName=workflow_name, specFile=spec_file, handler=handler)
    return WorkflowManifest(
        createdOn=(created_on or datetime.now()).strftime(CREATED_ON_FORMAT),
        workflow=section,
        archiverVersion=WORKFLOW_ARCHIVER_VERSION,
    )


def write_workflow(args: WorkflowSpecArgs) -> Path:
    """Write `<export-path>/<workflow-name>.war`; `ArchiveError` on bad input."""
    check_workflow_name(args.workflow_name)
    if not args.export_path.is_dir():
        raise ArchiveError(f"export path {str(args.export_path)!r} is not a directory")
    destination = args.export_path / f"{args.workflow_name}.war"
    if (destination.exists() or destination.is_symlink()) and not args.force:
        raise ArchiveError(f"{destination} already exists; pass -f/--force to overwrite it")
    entries: dict[str, Entry] = {}
    for what, path in (("spec file", args.spec_file), ("handler file", args.handler)):
        if path is None:
            continue
        if not path.is_file():
            raise ArchiveError(f"{what} not found or not a file: {path}")
        entries[path.name] = Entry(path.name, path, path.stat().st_size)
    for arcname, source in extra_file_entries(args.extra_files):
        entries[arcname] = Entry(arcname, source, source.stat().st_size)
    if WAR_MANIFEST_PATH in entries:
        raise ArchiveError(f"extra files contain {WAR_MANIFEST_PATH}; the archiver writes it")
    manifest = new_workflow_manifest(
        args.workflow_name, args.spec_file.name, args.handler.name if args.handler else None
    )
    produced = destination.resolve()
    kept = [e for e in entries.values() if e.source.resolve() != produced]
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for entry in kept:
                info = zipfile.ZipInfo.from_file(
                    entry.source, entry.arcname, strict_timestamps=False
                )
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=entry.size >= zipfile.ZIP64_LIMIT) as sink:
                    copy_file(entry.source, sink, lambda _n: None)
            zf.writestr(WAR_MANIFEST_PATH, manifest.to_json())
        replace_file(temporary, destination)
    except BaseException as exc:
        remove_file(temporary)
        if isinstance(exc, OSError):
            where = exc.filename or destination
            raise ArchiveError(f"cannot write {destination}: {where}: {exc.strerror}") from None
        raise
    return destination
