"""Small helpers shared by the protocol modules (private)."""

from __future__ import annotations


def show(value: object) -> str:
    """A short, safe rendering of a peer's value for an error message.

    Containers are named, not printed: a peer's nested JSON could be huge or deep.
    """
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return text
    return type(value).__name__
