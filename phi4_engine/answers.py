"""Reading a final answer out of model text (shared by evaluations, judges and verifiers)."""

from __future__ import annotations

import re

_ANSWER = re.compile(r"Answer:\s*(-?[\d,]+(?:\.\d+)?)")


def extract_answer(text: str) -> str | None:
    """The number after the last ``Answer:`` in ``text`` (commas removed), or None."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None
