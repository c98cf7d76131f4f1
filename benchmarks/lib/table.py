"""Printing result tables: a header with its rule, ratios, and whether two answers agree."""

from __future__ import annotations

from collections.abc import Sequence


def print_head(head: str) -> None:
    """A table's header line and a rule as wide."""
    print(head)
    print("-" * len(head))


def ratio(a: float, b: float) -> str:
    """`a / b` as `x1.23`, or `n/a` unless both are positive."""
    return f"x{a / b:.2f}" if a > 0 and b > 0 else "n/a"


def same_answers(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two predictions agree: as long, and every number within 1e-5."""
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=False))
