"""Durations as the CLI reads them (``--budget 45m``) and as the output prints them."""

from __future__ import annotations

import math
import re

from catdog_hpo.errors import UserError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, flag: str = "--budget") -> float:
    """Seconds from ``90s``, ``45m``, ``2h``, ``1.5h``, ``1d`` or plain seconds (``600``);
    UserError naming ``flag`` otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)\s*", str(text).lower())
    if m is None:
        raise UserError(f"{flag} {text!r}: expected a duration such as 90s, 45m, 2h or a number of seconds")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{flag} {text!r}: must be more than 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"
