"""Turn a pydantic `ValidationError` into one line that names the field and the bad value."""

from __future__ import annotations

from pydantic import ValidationError


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """(dotted field name, "what is wrong") for the first error, e.g. ("batch_size", ...)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return where, first["msg"]


def describe(exc: ValidationError, what: str = "setting") -> str:
    """`invalid setting key='value': message`."""
    first = exc.errors()[0]
    where, message = first_problem(exc)
    return f"invalid {what} {where}={first.get('input')!r}: {message}"
