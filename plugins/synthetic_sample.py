"""The value every synthetic generator returns for one document (before formatting)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Sample(NamedTuple):
    prompt: str
    """The task as a user would ask it (the chat format's user turn)."""
    response: str
    """The worked answer (the chat format's assistant turn)."""
    text: str
    """The whole document for the text format."""
    meta: dict[str, Any]
    """Task data for verifiers (answer, tests…)."""
