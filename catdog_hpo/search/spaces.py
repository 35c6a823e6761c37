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
    stages:                    # optional, resnet family: the same for each stage (stages, stageI.key)
      depth: {int: [2, 4]}
      channels: {choices: [16, 32, 64]}
    params:                    # dotted TrialConfig path -> distribution
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true, grid: [3.0e-4, 1.0e-3, 3.0e-3]}
      optim.name: {choices: [adam, sgd]}
      optim.momentum: {float: [0.8, 0.99], when: {optim.name: [sgd]}, grid: [0.9]}

A distribution is exactly one of ``int: [low, high]``, ``float: [low, high]`` or
``choices: [...]``, with optional ``log``, ``step``, ``grid`` (the grid sampler's values) and
``when`` (a condition on earlier parameters: the parameter exists only when it holds). Per-block
parameters exist only for blocks that exist (``block2.channels`` only when ``depth >= 3``); the
same for stages (``stage2.channels`` only when ``stages >= 3``).

``resolve(space, trial)`` is the one place a trial becomes a ``TrialConfig``. ``trial`` is
anything with Optuna's ``suggest_int``/``suggest_float``/``suggest_categorical``: an Optuna
trial, ``optuna.trial.FixedTrial`` (export replays a trial's params this way) or the grid walker
below, so the grid comes from the same definition and conditional parameters never make
duplicate grid points. Reading and checking a space file: ``search.space_files``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Protocol

from catdog_hpo.config import BlockConfig, StageConfig, TrialConfig, from_dict, replace_path
from catdog_hpo.errors import ConfigError

MAX_GRID_POINTS = 10_000  # a larger grid is refused: at minutes per trial it would never finish
_AUTO_INT_GRID = 16  # an int range this small needs no explicit grid: every value is a point


class NoGridValues(ConfigError):
    """A searched parameter without grid values, met while enumerating the grid."""


@dataclass(frozen=True)
class RepeatKind:
    """A list of the model a space searches item by item (a section of the space file)."""

    path: str  # the config list it fills
    count: str  # the parameter name of its length
    prefix: str  # item i's parameters are named <prefix><i>.<key>
    item: type  # the config class of one item
    max_count: int  # the most items the family takes


# Space file section -> what it fills: the cnn family's blocks, the resnet family's stages.
REPEATS = {
    "blocks": RepeatKind("model.blocks", "depth", "block", BlockConfig, 6),
    "stages": RepeatKind("model.stages", "stages", "stage", StageConfig, 6),
}


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
class Repeat:
    """One ``blocks:`` or ``stages:`` section: how many items, then what each item searches."""

    section: str  # a key of REPEATS
    count: Dist | int  # a Dist named REPEATS[section].count, or a fixed number
    item: dict  # item key -> Dist (per item, named <prefix><i>.<key>) or a fixed value

    @property
    def kind(self) -> RepeatKind:
        return REPEATS[self.section]

    def item_dist(self, i: int, key: str) -> Dist:
        return replace(self.item[key], name=f"{self.kind.prefix}{i}.{key}")

    def param_names(self) -> list[str]:
        names = [self.count.name] if isinstance(self.count, Dist) else []
        for i in range(self._max_count()):
            names += [f"{self.kind.prefix}{i}.{k}" for k, v in self.item.items() if isinstance(v, Dist)]
        return names

    def _max_count(self) -> int:
        if isinstance(self.count, Dist):
            # the range's top, not the grid's: the grid lists the grid sampler's points only
            return int(max((self.count.high, *(self.count.grid or ()))) if self.count.kind == "int"
                       else max(self.count.choices))
        return int(self.count)

    def resolve(self, trial: Suggester, picked: dict[str, Any]) -> list[dict[str, Any]]:
        """The section's items as config dicts; records the count in ``picked``."""
        count = self.count.suggest(trial) if isinstance(self.count, Dist) else self.count
        picked[self.kind.count] = count
        return [{key: self.item_dist(i, key).suggest(trial) if isinstance(spec, Dist) else spec
                 for key, spec in self.item.items()} for i in range(int(count))]


@dataclass(frozen=True)
class Space:
    name: str  # built-in name, or the file path it came from
    source: str  # where it was read from (shown in errors)
    base: dict  # fixed TrialConfig fields
    repeats: tuple[Repeat, ...]  # blocks, then stages, where the file has them; else from base
    params: tuple[Dist, ...]  # in definition order: a condition refers only to earlier ones
    fingerprint: str  # hash of the definition: reopening a study checks it
    baseline: dict | None = None  # a known-good point of the space (parameter -> value), run first

    def param_names(self) -> list[str]:
        return [n for r in self.repeats for n in r.param_names()] + [d.name for d in self.params]


# --------------------------------------------------------------------------- resolve


def resolve(space: Space, trial: Suggester, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Turn one trial's suggestions into a TrialConfig; ``overrides`` (dotted path -> value,
    e.g. the run's ``--epochs``) apply last. Raises ConfigError for a config that cannot exist."""
    cfg = json.loads(json.dumps(space.base))  # deep copy of plain data
    picked: dict[str, Any] = {}
    for repeat in space.repeats:
        replace_path(cfg, repeat.kind.path, repeat.resolve(trial, picked))
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
        self._prefix = prefix
        self.indices: list[int] = []
        self.counts: list[int] = []
        self.params: dict[str, Any] = {}
        self._dists = {d.name: d for d in space.params}
        self._counts = {r.kind.count: r.count for r in space.repeats if isinstance(r.count, Dist)}
        self._items = {r.kind.prefix: r for r in space.repeats}

    def _pick(self, name: str) -> Any:
        dist = self._dists.get(name) or self._counts.get(name) or self._item_dist(name)
        values = dist.grid_values()
        j = len(self.indices)
        index = self._prefix[j] if j < len(self._prefix) else 0
        self.indices.append(index)
        self.counts.append(len(values))
        self.params[name] = values[index]
        return values[index]

    def _item_dist(self, name: str) -> Dist:
        """``block3.channels`` -> the blocks section's channels distribution, so named."""
        head, key = name.split(".", 1)
        prefix = head.rstrip("0123456789")
        return self._items[prefix].item_dist(int(head[len(prefix):]), key)

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
