"""Durations as SREs write them (`500ms`, `10s`, `5m`, `2h`, `1h30m`).

Config files are reviewed by humans, so a bare number is refused: `timeout: 3` could mean
seconds or milliseconds, and guessing wrong moves production traffic.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Return seconds for a duration string; raise ValueError with the accepted forms."""
    s = text.strip().replace(" ", "")
    pos = 0
    total = 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not s or pos != len(s):
        raise ValueError(f"a duration like 500ms, 10s, 5m or 2h, found {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way people read them in timelines: 850ms, 12.3s, 4m05s, 1h02m."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _coerce(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a duration like 500ms, 10s, 5m or 2h, found {value!r}")
    raise ValueError(f"a duration with a unit (e.g. '{value}s'), found the bare number {value!r}")


def schema_text(seconds: float) -> str:
    """A duration as the README writes it: 1800 -> '30m', 0.25 -> '250ms', 60 -> '60s', 3600 -> '1h'."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _serialize(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(_coerce),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: 500ms, 10s, 5m, 2h, 1h30m.",
        },
        mode="validation",
    ),
    PlainSerializer(_serialize, return_type=str, when_used="json"),
]
"""A duration field: accepts '10s', stores float seconds."""
