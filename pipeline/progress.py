"""How the core says what it is doing: a message for people, fields for machines (a JSON log)."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def __call__(self, message: str, /, **fields: Any) -> None:
        """``message`` for people; ``fields`` (``event``, ``batch``, ``table``, ``rows``, ...) for logs."""


def quiet(message: str, /, **fields: Any) -> None:
    """Say nothing."""
