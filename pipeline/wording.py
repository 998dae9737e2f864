"""Counts in messages: '1 row', '2 rows'."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 row', '0 rows', '2 rows'; `nouns` for an irregular plural."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
