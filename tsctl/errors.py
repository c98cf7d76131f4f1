"""The errors tsctl raises on purpose, each carrying how it is reported.

Every front end maps these once: the CLI prints ``tsctl: error: <message>`` on stderr and exits
with ``exit_code``; the HTTP and gRPC servers (later) answer with ``http_status`` and
``grpc_code``. ``message`` is written for the person who caused the error and must name the bad
value; log detail never goes into it. Anything that is not a ``TsctlError`` is a bug.
"""

from __future__ import annotations

from typing import ClassVar


class TsctlError(Exception):
    """Base class: an error whose message is safe and useful to show to the user."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    #: the ``type`` field of TorchServe's JSON error shape
    type_name: ClassVar[str] = "InternalServerException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(TsctlError):
    """The caller gave a value that cannot be used (a bad flag, name, or file)."""

    exit_code = 2
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    type_name = "BadRequestException"


class ArchiveError(InvalidInput):
    """A model archive cannot be written, read or trusted; the message names the archive."""

    type_name = "InvalidModelException"


class UnsafeArchive(ArchiveError):
    """An archive entry would escape the target, is a link, or the archive expands too far."""
