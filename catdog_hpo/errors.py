"""The one exception type that reaches the user as a one-line message (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a flag, a file, a config value. The message names the culprit.

    The CLI prints ``error: <message>`` and exits with status 2. Raise it at the boundary
    (parsing flags, reading files, building configs); use ``assert`` for internal invariants.
    """


class ConfigError(UserError):
    """A config that cannot work (unknown key, bad value, a model that cannot fit the image)."""
