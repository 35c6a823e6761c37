"""``run --config FILE``: a YAML file whose keys are the command's flags; the command line wins.

A key is a flag's long name without the dashes (``trials``, ``max-params``; ``max_params`` and an
alias such as ``n-trials`` work too). Values go through the flag's own type and choices, so a bad
value gets the same check as on the command line, named by file and key. A flag given on the
command line overrides the file's value (for --data/--dataset, giving either one overrides both).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from catdog_hpo.errors import UserError


def _long_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """"max-params" -> its action, for every long option (aliases included) but --help/--config."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        for opt in action.option_strings:
            if opt.startswith("--") and action.dest not in ("help", "config"):
                names[opt[2:]] = action
    return names


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line ``argv`` set itself (parsed again with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    explicit = set(given)
    for group in parser._mutually_exclusive_groups:  # --data on the command line beats dataset: in the file
        dests = {a.dest for a in group._group_actions}
        if explicit & dests:
            explicit |= dests
    return explicit


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from the file, checked and converted as the flag's own text would be."""
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001 (no public type for store_true)
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        return None  # the flag's "not given" (e.g. epochs: the space's own)
    if isinstance(value, (dict, bool)):
        raise UserError(f"{where}: expected a value such as the flag takes, got {value!r}")
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001 (a repeatable flag: one value or a list)
        return [_one(action, str(v), where) for v in (value if isinstance(value, list) else [value])]
    return _one(action, ",".join(str(v) for v in value) if isinstance(value, list) else str(value), where)


def _one(action: argparse.Action, text: str, where: str) -> Any:
    """One value's ``text``, through the flag's type and choices."""
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                      path: Path) -> dict[str, Any]:
    """Set on ``args`` every key of the file at ``path`` the command line ``argv`` left alone.

    Returns what the study records: ``{"path": ..., "values": the file's keys}``.
    """
    from catdog_hpo.config import read_mapping

    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    data = read_mapping(path)
    names = _long_names(parser)
    explicit = _explicit_dests(parser, argv)
    seen: dict[str, str] = {}  # dest -> the key that set it
    for key, value in data.items():
        name = str(key).replace("_", "-")
        action = names.get(name)
        if action is None:
            known = ", ".join(sorted(n for n, a in names.items() if f"--{n}" == a.option_strings[0]))
            raise UserError(f"{path}: unknown key {key!r} (the keys are run's flags: {known})")
        if action.dest in seen:
            raise UserError(f"{path}: keys {seen[action.dest]!r} and {key!r} set the same flag")
        seen[action.dest] = str(key)
        converted = _convert(action, value, f"{path}: {key}")
        if action.dest not in explicit:
            setattr(args, action.dest, converted)
    for group in parser._mutually_exclusive_groups:
        both = [seen[a.dest] for a in group._group_actions if a.dest in seen]
        if len(both) > 1:
            raise UserError(f"{path}: keys {' and '.join(map(repr, both))} exclude each other")
    return {"path": str(path), "values": {str(k): v for k, v in data.items()}}
