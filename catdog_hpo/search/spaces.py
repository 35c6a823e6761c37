"""Search spaces: one declarative definition gives TPE/random suggestions, the grid and replay.

A space is a mapping (a YAML file in ``search_spaces/``, a YAML/JSON file by path, or a Python
file by path that defines ``SPACE = {...}``)::

    name: seed-cnn
    base:                      # fixed part of the TrialConfig (any subset of its keys)
      image_size: 64
      train: {epochs: 10}
    blocks:                    # optional, cnn family: depth, then what each block searches
      depth: {int: [2, 4]}
      channels: {choices: [32, 64, 128]}
      kernel_size: 3           # a plain value is fixed, not searched
    params:                    # dotted TrialConfig path -> distribution
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true, grid: [3.0e-4, 1.0e-3, 3.0e-3]}
      optim.name: {choices: [adam, sgd]}
      optim.momentum: {float: [0.8, 0.99], when: {optim.name: [sgd]}, grid: [0.9]}

A distribution is exactly one of ``int: [low, high]``, ``float: [low, high]`` or
``choices: [...]``, with optional ``log``, ``step``, ``grid`` (the grid sampler's values) and
``when`` (a condition on earlier parameters: the parameter exists only when it holds). Per-block
parameters exist only for blocks that exist (``block2.channels`` only when ``depth >= 3``).

``resolve(space, trial)`` is the one place a trial becomes a ``TrialConfig``. ``trial`` is
anything with Optuna's ``suggest_int``/``suggest_float``/``suggest_categorical``: an Optuna
trial, ``optuna.trial.FixedTrial`` (export replays a trial's params this way) or the grid walker
below, so the grid comes from the same definition and conditional parameters never make
duplicate grid points.
"""

from __future__ import annotations

import hashlib
import json
import runpy
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from catdog_hpo.config import TrialConfig, from_dict, replace_path, to_dict
from catdog_hpo.errors import ConfigError, UserError

MAX_GRID_POINTS = 10_000  # a larger grid is refused: at minutes per trial it would never finish
_AUTO_INT_GRID = 16  # an int range this small needs no explicit grid: every value is a point
_DIST_KEYS = ("int", "float", "choices")
_OPTION_KEYS = ("log", "step", "grid", "when")
_BLOCK_KEYS = ("channels", "kernel_size", "convs")


class NoGridValues(ConfigError):
    """A searched parameter without grid values, met while enumerating the grid."""


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Dist:
    """One searched parameter."""

    name: str  # the Optuna parameter name
    kind: str  # "int" | "float" | "choices"
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    grid: tuple | None = None  # explicit grid values
    when: tuple[tuple[str, tuple], ...] = ()  # (parameter name, allowed values) pairs

    def suggest(self, trial: Suggester) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def grid_values(self) -> tuple:
        """The values the grid sampler tries; a ConfigError when the space gives none."""
        if self.grid is not None:
            return self.grid
        if self.kind == "choices":
            return self.choices
        if self.kind == "int":
            step = int(self.step or 1)
            values = tuple(range(int(self.low), int(self.high) + 1, step))
            if len(values) <= _AUTO_INT_GRID and not self.log:
                return values
        elif self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            if n + 1 <= _AUTO_INT_GRID:
                return tuple(round(self.low + i * self.step, 12) for i in range(n + 1))
        raise NoGridValues(f"{self.name}: no grid values; add grid: [...] to search it with --sampler grid")


@dataclass(frozen=True)
class Space:
    name: str  # built-in name, or the file path it came from
    source: str  # where it was read from (shown in errors)
    base: dict  # fixed TrialConfig fields
    depth: Dist | int | None  # None: the blocks come from base
    block: dict  # "channels"/"kernel_size"/"convs" -> Dist (per block, named blockI.key) or a fixed value
    params: tuple[Dist, ...]  # in definition order: a condition refers only to earlier ones
    fingerprint: str  # hash of the definition: reopening a study checks it

    def param_names(self) -> list[str]:
        names = [self.depth.name] if isinstance(self.depth, Dist) else []
        max_depth = self._max_depth()
        for i in range(max_depth):
            names += [f"block{i}.{k}" for k, v in self.block.items() if isinstance(v, Dist)]
        return names + [d.name for d in self.params]

    def _max_depth(self) -> int:
        if isinstance(self.depth, Dist):
            return int(max(self.depth.grid or (self.depth.high,)) if self.depth.kind == "int" else max(self.depth.choices))
        return int(self.depth or 0)


# --------------------------------------------------------------------------- resolve


def resolve(space: Space, trial: Suggester, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Turn one trial's suggestions into a TrialConfig; ``overrides`` (dotted path -> value,
    e.g. the run's ``--epochs``) apply last. Raises ConfigError for a config that cannot exist."""
    cfg = json.loads(json.dumps(space.base))  # deep copy of plain data
    picked: dict[str, Any] = {}
    if space.depth is not None:
        depth = space.depth.suggest(trial) if isinstance(space.depth, Dist) else space.depth
        picked["depth"] = depth
        blocks = []
        for i in range(int(depth)):
            block = {}
            for key, spec in space.block.items():
                if isinstance(spec, Dist):
                    spec = replace(spec, name=f"block{i}.{key}")
                    block[key] = spec.suggest(trial)
                else:
                    block[key] = spec
            blocks.append(block)
        replace_path(cfg, "model.blocks", blocks)
    for dist in space.params:
        if all(picked.get(name, _MISSING) in allowed for name, allowed in dist.when):
            picked[dist.name] = value = dist.suggest(trial)
            replace_path(cfg, dist.name, value)
    for path, value in (overrides or {}).items():
        replace_path(cfg, path, value)
    return from_dict(TrialConfig, cfg, where=f"space {space.name}")


_MISSING = object()


class GridWalker:
    """A stand-in trial that picks grid values by index, for enumerating the grid (below)."""

    def __init__(self, space: Space, prefix: list[int]) -> None:
        self._space = space
        self._prefix = prefix
        self.indices: list[int] = []
        self.counts: list[int] = []
        self.params: dict[str, Any] = {}
        self._dists = {d.name: d for d in space.params}

    def _pick(self, name: str) -> Any:
        dist = self._dists.get(name) or self._block_dist(name)
        values = dist.grid_values()
        j = len(self.indices)
        index = self._prefix[j] if j < len(self._prefix) else 0
        self.indices.append(index)
        self.counts.append(len(values))
        self.params[name] = values[index]
        return values[index]

    def _block_dist(self, name: str) -> Dist:
        if name == "depth":
            assert isinstance(self._space.depth, Dist)
            return self._space.depth
        key = name.split(".", 1)[1]
        return replace(self._space.block[key], name=name)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._pick(name)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        return self._pick(name)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._pick(name)


def grid_points(space: Space, limit: int = MAX_GRID_POINTS) -> list[dict[str, Any]]:
    """Every distinct combination of grid values, conditional parameters included only where
    they exist (an odometer over the tree of suggestions). ConfigError past ``limit`` points."""
    points: list[dict[str, Any]] = []
    prefix: list[int] = []
    while True:
        walker = GridWalker(space, prefix)
        try:
            resolve(space, walker)
        except NoGridValues as exc:
            raise ConfigError(f"{space.source}: params.{exc}") from None
        except ConfigError:
            pass  # an impossible combination is still a grid point: the run turns it away
        points.append(walker.params)
        if len(points) > limit:
            raise ConfigError(f"{space.source}: the grid has more than {limit:,} points; give fewer grid values")
        for j in reversed(range(len(walker.indices))):
            if walker.indices[j] + 1 < walker.counts[j]:
                prefix = walker.indices[:j] + [walker.indices[j] + 1]
                break
        else:
            return points


# --------------------------------------------------------------------------- loading


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
    known = {"name", "description", "base", "blocks", "params"}
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
    depth, block = _parse_blocks(data.get("blocks"), source)
    params: list[Dist] = []
    seen: set[str] = {"depth"} if depth is not None else set()
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ConfigError(f"{source}: params: expected a mapping of dotted config keys to distributions")
    for key, spec in raw_params.items():
        where = f"{source}: params.{key}"
        if not _path_exists(template, key) or key.startswith("model.blocks"):
            raise ConfigError(f"{where}: unknown config key (searchable keys are dotted paths like optim.lr; blocks go under blocks:)")
        dist = _parse_dist(key, spec, where)
        for cond, _allowed in dist.when:
            if cond not in seen:
                raise ConfigError(f"{where}: when: {cond!r} is not a parameter defined above it")
        seen.add(key)
        params.append(dist)
    fingerprint = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    space = Space(name=name, source=source, base=base, depth=depth, block=block, params=tuple(params), fingerprint=fingerprint)
    _check_resolves(space)
    return space


def _parse_blocks(raw: Any, source: str) -> tuple[Dist | int | None, dict]:
    if raw is None:
        return None, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: blocks: expected a mapping")
    block: dict[str, Any] = {}
    depth: Dist | int | None = None
    for key, spec in raw.items():
        where = f"{source}: blocks.{key}"
        if key not in ("depth", *_BLOCK_KEYS):
            raise ConfigError(f"{where}: unknown key (known: depth, {', '.join(_BLOCK_KEYS)})")
        value = _parse_dist("depth" if key == "depth" else f"block0.{key}", spec, where) if isinstance(spec, dict) else spec
        if isinstance(value, Dist) and value.when:
            raise ConfigError(f"{where}: when: is not supported for block parameters")
        if key == "depth":
            depth = value
        else:
            block[key] = value
    if depth is None:
        raise ConfigError(f"{source}: blocks: needs depth (a number or a distribution)")
    if isinstance(depth, Dist):
        values = depth.choices if depth.kind == "choices" else (depth.low, depth.high)
        if depth.kind == "float" or any(not isinstance(v, int) or not 1 <= v <= 6 for v in values):
            raise ConfigError(f"{source}: blocks.depth: must be whole numbers from 1 to 6")
    elif not isinstance(depth, int) or not 1 <= depth <= 6:
        raise ConfigError(f"{source}: blocks.depth: {depth!r} must be a whole number from 1 to 6")
    return depth, block


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
    middle of a study."""
    from catdog_hpo.config import BlockConfig

    for dist in space.params:
        values = dist.choices if dist.kind == "choices" else (dist.low, dist.high)
        for value in values:
            cfg = json.loads(json.dumps(space.base))
            replace_path(cfg, dist.name, value)
            try:
                from_dict(TrialConfig, cfg, where="config")
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: params.{dist.name}: value {value!r}: {exc}") from None
    for key, spec in space.block.items():
        values = (spec,) if not isinstance(spec, Dist) else spec.choices if spec.kind == "choices" else (spec.low, spec.high)
        for value in values:
            try:
                from_dict(BlockConfig, {key: value}, where="block")
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: blocks.{key}: value {value!r}: {exc}") from None


def base_image_size(space: Space) -> int:
    """The image size of the space's base config: the size the study fingerprints its data at."""
    return from_dict(TrialConfig, space.base, where=space.source).image_size


def grid_size_line(points: list[dict[str, Any]]) -> str:
    dims = sorted({k for p in points for k in p})
    return f"{len(points):,} grid points over {len(dims)} parameters"
