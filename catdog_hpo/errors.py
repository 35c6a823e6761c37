"""The one exception type that reaches the user as a one-line message (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a flag, a file, a config value. The message names the culprit.

    The CLI prints ``error: <message>`` and exits with status 2. Raise it at the boundary
    (parsing flags, reading files, building configs); use ``assert`` for internal invariants.
    """


class ConfigError(UserError):
    """A config that cannot work (unknown key, bad value, a model that cannot fit the image)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: what a one-line
    error shows of an exception from a library (an exporter, a file reader)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def format_warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                        line: str | None = None) -> str:
    """``warnings.formatwarning`` for the CLI: ``warning: <message>``, one line.

    Python's default shows the module path and source line of the ``warnings.warn`` call, which
    tell a user nothing; our own warnings (UserWarning) print bare, others keep their category.
    """
    text = " ".join(str(message).split())  # one line, whatever the message held
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    return f"warning: {text}\n"


def install_warning_format() -> None:
    """Format every warning this process prints with ``format_warning_line`` (to stderr).

    Only the format changes, not ``showwarning``: code that records warnings (pytest) still does.
    """
    import warnings

    warnings.formatwarning = format_warning_line
