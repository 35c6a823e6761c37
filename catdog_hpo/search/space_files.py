"""Reading a search space: a built-in name or a YAML/JSON/Python file -> a checked ``Space``.

Every mistake (unknown key, low > high, log with low <= 0, empty choices, a value the config
refuses) is a one-line ConfigError naming the file and the key, raised when the space loads,
not in the middle of a study. The space model, ``resolve`` and the grid: ``search.spaces``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import runpy
from importlib import resources
from pathlib import Path
from typing import Any

from catdog_hpo.config import TrialConfig, from_dict, parse_file, replace_path, to_dict
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search.spaces import REPEATS, Dist, Repeat, Space

_DIST_KEYS = ("int", "float", "choices")
_OPTION_KEYS = ("log", "step", "grid", "when")


def builtin_spaces() -> dict[str, Path]:
    """Built-in space name -> file: the YAML files shipped in search_spaces/."""
    folder = resources.files("catdog_hpo.search_spaces")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def load_space(name_or_path: str) -> Space:
    """A built-in space by name, or a space file by path (.yaml/.yml/.json data, or .py)."""
    spaces = builtin_spaces()
    if name_or_path in spaces:
        return parse_space(_read(spaces[name_or_path]), name=name_or_path, source=str(spaces[name_or_path]))
    path = Path(name_or_path)
    if not path.exists():
        raise UserError(f"--space {name_or_path}: no built-in space of that name ({', '.join(sorted(spaces))}) and no such file")
    return parse_space(_read(path), name=str(path), source=str(path))


def _read(path: Path) -> dict:
    if path.suffix == ".py":
        # A Python space is code the user chose to run by passing its path; data files never run.
        try:
            namespace = runpy.run_path(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: error while running it: {type(exc).__name__}: {exc}") from None
        if not isinstance(namespace.get("SPACE"), dict):
            raise ConfigError(f"{path}: a Python space must define SPACE = {{...}}")
        return namespace["SPACE"]
    from catdog_hpo.config import read_mapping

    return read_mapping(path)


def parse_space(data: dict, name: str, source: str) -> Space:
    """Validate a space definition; every error names the file and the key."""
    known = {"name", "description", "base", *REPEATS, "params", "baseline"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base: expected a mapping")
    try:
        from_dict(TrialConfig, base, where=f"{source}: base")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None
    template = to_dict(TrialConfig())
    repeats = tuple(_parse_repeat(section, data[section], source)
                    for section in REPEATS if data.get(section) is not None)
    params: list[Dist] = []
    seen: set[str] = {r.kind.count for r in repeats}
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ConfigError(f"{source}: params: expected a mapping of dotted config keys to distributions")
    for key, spec in raw_params.items():
        where = f"{source}: params.{key}"
        if not _path_exists(template, key) or any(key.startswith(k.path) for k in REPEATS.values()):
            raise ConfigError(f"{where}: unknown config key (searchable keys are dotted paths like optim.lr; "
                              f"blocks go under blocks:, stages under stages:)")
        dist = _parse_dist(key, spec, where)
        for cond, _allowed in dist.when:
            if cond not in seen:
                raise ConfigError(f"{where}: when: {cond!r} is not a parameter defined above it")
        seen.add(key)
        params.append(dist)
    # The baseline is a point of the space, not part of its definition: it is not fingerprinted.
    defined = {k: v for k, v in data.items() if k != "baseline"}
    fingerprint = hashlib.sha256(json.dumps(defined, sort_keys=True, default=str).encode()).hexdigest()[:16]
    space = Space(name=name, source=source, base=base, repeats=repeats, params=tuple(params),
                  fingerprint=fingerprint, baseline=_parse_baseline(data.get("baseline"), source))
    _check_resolves(space)
    if space.baseline is not None:
        check_params(space, space.baseline, f"{source}: baseline")
    return space


def _parse_baseline(raw: Any, source: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: baseline: expected a mapping of parameter names to values")
    return dict(raw)


def check_params(space: Space, params: dict[str, Any], where: str) -> None:
    """ConfigError naming ``where`` unless ``params`` is one point of ``space``: every parameter
    the point needs is given, within its distribution, and nothing else is given."""
    import optuna

    from catdog_hpo.search.spaces import resolve

    unknown = sorted(set(params) - set(space.param_names()))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not a parameter of space {space.name} "
                          f"(its parameters: {', '.join(space.param_names())})")
    try:
        resolve(space, _strict_replay(optuna)(params))
    except ValueError as exc:  # a parameter the point needs is missing, or outside its distribution
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _strict_replay(optuna: Any) -> type:
    """Optuna's FixedTrial, strict: a value outside its distribution is a ValueError naming the
    parameter (FixedTrial only warns for a number out of range, and names no parameter for a
    choice), so a point that does not fit the space is refused, not trained as another point.
    Made on first use: this module does not import Optuna when it loads."""

    class Strict(optuna.trial.FixedTrial):
        def __init__(self, params: dict[str, Any]) -> None:
            super().__init__(params)
            self._given = params

        def _check(self, name: str, fits: bool, what: str) -> None:
            if name in self._given and not fits:
                raise ValueError(f"{name}: {self._given[name]!r} is not {what}")

        def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
            v = self._given.get(name)
            self._check(name, isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
                        and (v - low) % step == 0, f"a whole number in [{low}, {high}]"
                        + (f" in steps of {step}" if step != 1 else ""))
            return super().suggest_int(name, low, high, step=step, log=log)

        def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                          log: bool = False) -> float:
            v = self._given.get(name)
            self._check(name, isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high,
                        f"a number in [{low}, {high}]")
            return super().suggest_float(name, low, high, step=step, log=log)

        def suggest_categorical(self, name: str, choices: Any) -> Any:
            self._check(name, self._given.get(name) in choices, f"one of {', '.join(map(str, choices))}")
            return super().suggest_categorical(name, choices)

    return Strict


def _parse_repeat(section: str, raw: Any, source: str) -> Repeat:
    """A ``blocks:`` or ``stages:`` section: ``depth`` (how many), then per-item keys."""
    kind = REPEATS[section]
    keys = tuple(f.name for f in dataclasses.fields(kind.item))
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping")
    item: dict[str, Any] = {}
    count: Dist | int | None = None
    for key, spec in raw.items():
        where = f"{source}: {section}.{key}"
        if key not in ("depth", *keys):
            raise ConfigError(f"{where}: unknown key (known: depth, {', '.join(keys)})")
        name = kind.count if key == "depth" else f"{kind.prefix}0.{key}"
        value = _parse_dist(name, spec, where) if isinstance(spec, dict) else spec
        if isinstance(value, Dist) and value.when:
            raise ConfigError(f"{where}: when: is not supported for {kind.prefix} parameters")
        if key == "depth":
            count = value
        else:
            _check_item_values(section, key, value, source)
            item[key] = value
    if count is None:
        raise ConfigError(f"{source}: {section}: needs depth (a number or a distribution)")
    _check_count(section, count, source)
    return Repeat(section=section, count=count, item=item)


def _check_item_values(section: str, key: str, spec: Dist | Any, source: str) -> None:
    """Every choice and both ends of a range of one per-item key, through the item's config check."""
    kind = REPEATS[section]
    values = (spec,) if not isinstance(spec, Dist) else spec.choices if spec.kind == "choices" else (spec.low, spec.high)
    for value in values:
        try:
            from_dict(kind.item, {key: value}, where=kind.prefix)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {section}.{key}: value {value!r}: {exc}") from None


def _check_count(section: str, count: Dist | int, source: str) -> None:
    top = REPEATS[section].max_count
    if isinstance(count, Dist):
        values = count.choices if count.kind == "choices" else (count.low, count.high)
        if count.kind == "float" or any(not isinstance(v, int) or not 1 <= v <= top for v in values):
            raise ConfigError(f"{source}: {section}.depth: must be whole numbers from 1 to {top}")
    elif not isinstance(count, int) or not 1 <= count <= top:
        raise ConfigError(f"{source}: {section}.depth: {count!r} must be a whole number from 1 to {top}")


def _parse_dist(name: str, spec: Any, where: str) -> Dist:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a distribution like {{float: [low, high]}}, got {spec!r}")
    kinds = [k for k in _DIST_KEYS if k in spec]
    unknown = [k for k in spec if k not in _DIST_KEYS + _OPTION_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_DIST_KEYS + _OPTION_KEYS)})")
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of int: [low, high], float: [low, high], choices: [...]")
    kind = kinds[0]
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log: {log!r} must be true or false")
    when = _parse_when(spec.get("when"), where)
    grid = spec.get("grid")
    if grid is not None and (not isinstance(grid, list) or not grid):
        raise ConfigError(f"{where}: grid: must be a non-empty list of values")
    if kind == "choices":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices: must be a non-empty list")
        if any(not isinstance(c, (bool, int, float, str)) and c is not None for c in choices):
            raise ConfigError(f"{where}: choices: only numbers, strings, booleans and null can be choices")
        if grid is not None and any(g not in choices for g in grid):
            raise ConfigError(f"{where}: grid: every grid value must be one of the choices")
        return Dist(name=name, kind=kind, choices=tuple(choices), grid=tuple(grid) if grid else None, when=when)
    bounds = spec[kind]
    number = int if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or any(isinstance(b, bool) or not isinstance(b, number) for b in bounds)):
        raise ConfigError(f"{where}: {kind}: expected [low, high] as {'integers' if kind == 'int' else 'numbers'}, got {bounds!r}")
    low, high = bounds
    if low > high:
        raise ConfigError(f"{where}: low {low} > high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise ConfigError(f"{where}: step: {step!r} must be a positive {'integer' if kind == 'int' else 'number'}")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be used together")
    if grid is not None:
        for g in grid:
            if isinstance(g, bool) or not isinstance(g, number) or not low <= g <= high:
                raise ConfigError(f"{where}: grid value {g!r} is outside [{low}, {high}]")
    return Dist(name=name, kind=kind, low=low, high=high, step=step, log=log,
                grid=tuple(grid) if grid else None, when=when)


def _parse_when(raw: Any, where: str) -> tuple[tuple[str, tuple], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: when: expected a mapping like {{optim.name: [sgd]}}")
    return tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in raw.items())


def _path_exists(template: dict, dotted: str) -> bool:
    node: Any = template
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return not isinstance(node, dict)


def _check_resolves(space: Space) -> None:
    """Try every choice and both ends of every range in the base config, so a bad value (say,
    a string for optim.lr or an unknown optimizer) is reported when the space loads, not in the
    middle of a study. (Per-item values are tried as their section is read: _check_item_values.)"""
    for dist in space.params:
        values = dist.choices if dist.kind == "choices" else (dist.low, dist.high)
        for value in values:
            cfg = json.loads(json.dumps(space.base))
            replace_path(cfg, dist.name, value)
            try:
                from_dict(TrialConfig, cfg, where="config")
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: params.{dist.name}: value {value!r}: {exc}") from None


def base_image_size(space: Space) -> int:
    """The image size of the space's base config: the size the study fingerprints its data at."""
    return from_dict(TrialConfig, space.base, where=space.source).image_size


def read_params_file(path: Path, flag: str = "--enqueue") -> tuple[dict[str, Any], ...]:
    """Parameter sets from a YAML/JSON file: one mapping of parameter -> value, a list of them,
    or an export file (its ``params``); a ConfigError naming ``flag`` otherwise."""
    data = parse_file(Path(path), f"{flag} {path}")
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        data = data["params"]  # an export file
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(p, dict) and p for p in items):
        raise ConfigError(f"{flag} {path}: expected a mapping of parameter names to values, or a list of them")
    return tuple(dict(p) for p in items)


def check_installed(space: Space, overrides: dict[str, Any]) -> None:
    """A space whose models need an optional extra is refused before the study starts, with the
    install command, instead of failing every trial. Judged on the space's baseline (or its base
    config): the families a space searches share their needs."""
    import copy

    import optuna  # FixedTrial replays the baseline (only the run command gets here)

    from catdog_hpo.engine.models import check_installed as check_model_installed
    from catdog_hpo.search.spaces import resolve

    if space.baseline is not None:
        cfg = resolve(space, optuna.trial.FixedTrial(space.baseline), overrides)
    else:
        fixed = copy.deepcopy(space.base)
        for path, value in overrides.items():
            replace_path(fixed, path, value)
        cfg = from_dict(TrialConfig, fixed)
    check_model_installed(cfg.model)
