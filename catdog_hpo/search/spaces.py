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
duplicate grid points. Reading and checking a space file: ``search.space_files``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Protocol

from catdog_hpo.config import TrialConfig, from_dict, replace_path
from catdog_hpo.errors import ConfigError

MAX_GRID_POINTS = 10_000  # a larger grid is refused: at minutes per trial it would never finish
_AUTO_INT_GRID = 16  # an int range this small needs no explicit grid: every value is a point


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
    baseline: dict | None = None  # a known-good point of the space (parameter -> value), run first

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
