"""Model builder: shapes across the family, feasibility checks, cost, ResNet-18 weights; the knobs
of issue 23 (stride, padding, init, PReLU/tanh, L1) and the small ResNet family from scratch."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from catdog_hpo.config import BlockConfig, ModelConfig, OptimConfig, StageConfig, TrialConfig, from_dict
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.engine.cost import layer_stats
from catdog_hpo.engine.models import (
    ACTIVATIONS,
    FAMILIES,
    HEADS,
    PADDINGS,
    POOLS,
    build_model,
    check_model,
    model_cost,
)
from catdog_hpo.engine.layers import INITS
from catdog_hpo.engine.regularize import L1Penalised, with_l1
from catdog_hpo.engine.resnet import BasicBlock
from catdog_hpo import config as config_module


def _cnn(depth: int, kernel: int = 3, convs: int = 1, **kw) -> ModelConfig:
    blocks = tuple(BlockConfig(channels=4 + 2 * i, kernel_size=kernel, convs=convs) for i in range(depth))
    kw.setdefault("fc_hidden", 16)
    return ModelConfig(blocks=blocks, **kw)


def _forward(model: nn.Module, batch: int, size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def test_registries_match_config_choices() -> None:
    assert set(FAMILIES) == set(config_module.FAMILIES)
    assert set(ACTIVATIONS) == set(config_module.ACTIVATIONS)
    assert set(POOLS) == set(config_module.POOLS)
    assert set(HEADS) == set(config_module.HEADS)
    assert set(INITS) == set(config_module.INITS)
    assert set(PADDINGS) == set(config_module.PADDINGS)


# depth x kernel x convs x bn x head over image sizes the depth allows
SHAPE_CASES = [
    (depth, kernel, convs, bn, head, size)
    for depth, kernel, convs, bn, head in itertools.product(range(1, 7), (1, 3, 5, 7), (1, 2), (True, False), ("gap", "fc"))
    for size in (2 ** depth, 24, 33)
    if size >= 2 ** depth and (kernel + convs + depth + bn) % 2 == 0  # a spread-out half of the grid
]


@pytest.mark.parametrize("depth,kernel,convs,bn,head,size", SHAPE_CASES)
def test_cnn_output_shape(depth: int, kernel: int, convs: int, bn: bool, head: str, size: int) -> None:
    cfg = _cnn(depth, kernel, convs, batch_norm=bn, head=head)
    classes = 2 + 3 * (depth % 2)  # 2 and 5 classes
    out = _forward(build_model(cfg, classes, size), 2, size)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_activation_pool_head(activation: str, pool: str, head: str) -> None:
    cfg = _cnn(3, activation=activation, pool=pool, head=head, dropout=0.2)
    model = build_model(cfg, 5, 16)
    assert any(isinstance(m, type(ACTIVATIONS[activation]())) for m in model.modules())
    assert any(isinstance(m, type(POOLS[pool]())) for m in model.modules())
    out = _forward(model, 3, 16)
    assert out.shape == (3, 5)


def test_seed_cnn_defaults() -> None:
    model = build_model(ModelConfig(), 2, 64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(128 * 8 * 8, 512), (512, 2)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_fc_head_without_hidden_layer() -> None:
    model = build_model(_cnn(2, head="fc", fc_hidden=0), 2, 16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(6 * 4 * 4, 2)]


@pytest.mark.parametrize("depth,size", [(4, 8), (6, 32), (2, 2), (1, 1)])
def test_too_many_blocks_rejected(depth: int, size: int) -> None:
    cfg = _cnn(depth)
    with pytest.raises(ConfigError, match=rf"{depth} blocks need a larger image than {size} px"):
        check_model(cfg, size)
    with pytest.raises(ConfigError, match="blocks"):
        build_model(cfg, 2, size)
    with pytest.raises(ConfigError, match="blocks"):
        model_cost(cfg, 2, size)


def test_deepest_feasible_is_accepted() -> None:
    check_model(_cnn(3), 8)  # 8 -> 4 -> 2 -> 1
    check_model(_cnn(6), 64)
    check_model(_cnn(3), 9)  # pooling rounds down: 9 -> 4 -> 2 -> 1


def test_other_infeasible_configs_rejected() -> None:
    with pytest.raises(ConfigError, match="image_size: 24 px is too small for resnet18"):
        check_model(ModelConfig(family="resnet18"), 24)
    with pytest.raises(ConfigError, match="freeze_backbone"):
        check_model(ModelConfig(family="resnet18", freeze_backbone=True), 64)
    with pytest.raises(ConfigError, match="model.pretrained: applies to families resnet18, efficientnet_lite0 only"):
        check_model(ModelConfig(pretrained=True), 64)
    with pytest.raises(ConfigError, match="num_classes: 1"):
        build_model(_cnn(2), 1, 16)
    with pytest.raises(ConfigError, match="family"):
        check_model(ModelConfig(family="vit"), 64)


@pytest.mark.parametrize("cfg,size", [
    (_cnn(1), 8), (_cnn(3, kernel=5, convs=2, head="gap"), 32), (_cnn(2, batch_norm=False), 17),
    (ModelConfig(), 64), (ModelConfig(family="resnet18", fc_hidden=0), 32),
    (_cnn(2, activation="prelu"), 16), (ModelConfig(family="resnet", head="gap", activation="prelu"), 20),
    (ModelConfig(family="resnet", stages=(StageConfig(8, 2, 1), StageConfig(12, 2, 2)), head="fc", fc_hidden=16), 16),
])
def test_params_match_built_model(cfg: ModelConfig, size: int) -> None:
    model = build_model(cfg, 3, size)
    assert model_cost(cfg, 3, size).params == sum(p.numel() for p in model.parameters())


def test_flops_hand_count() -> None:
    # 16 px; block 1: 3->4 channels 3x3, 16x16 out; pool -> 8; block 2: 4->8 channels 1x1 (x2 convs), 8x8 out;
    # pool -> 4; fc head: 8*4*4=128 -> 10 -> 2.
    cfg = ModelConfig(blocks=(BlockConfig(4, 3, 1), BlockConfig(8, 1, 2)), head="fc", fc_hidden=10)
    macs = (16 * 16 * 4 * 3 * 3 * 3) + (8 * 8 * 8 * 4 * 1 * 1) + (8 * 8 * 8 * 8 * 1 * 1) + 128 * 10 + 10 * 2
    assert model_cost(cfg, 2, 16).flops == 2 * macs


def test_resnet18_flops_match_published() -> None:
    # torchvision lists ResNet-18 at 1.81 GFLOPS in its (multiply-add) convention at 224 px.
    gmacs = model_cost(ModelConfig(family="resnet18", fc_hidden=0), 2, 224).flops / 2e9
    assert 1.80 < gmacs < 1.83


@pytest.mark.parametrize("size,hidden", [(32, 0), (40, 64)])
def test_resnet18_from_scratch(size: int, hidden: int) -> None:
    model = build_model(ModelConfig(family="resnet18", fc_hidden=hidden, dropout=0.1), 5, size)
    assert _forward(model, 2, size).shape == (2, 5)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()  # 1000-class head: dropped on load
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_resnet18_weights_file(resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = resnet_weights
    model = build_model(ModelConfig(family="resnet18", weights_file=str(path), fc_hidden=0), 2, 32)
    loaded = model.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(loaded[key], state[key])
    assert loaded["fc.1.weight"].shape == (2, 512)


def test_freeze_backbone(resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = resnet_weights
    cfg = ModelConfig(family="resnet18", weights_file=str(path), freeze_backbone=True, fc_hidden=32)
    model = build_model(cfg, 2, 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.0.weight", "fc.0.bias", "fc.3.weight", "fc.3.bias"}


def test_weights_file_errors(tmp_path: Path, resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth.*no such file"):
        build_model(ModelConfig(family="resnet18", weights_file=str(missing)), 2, 32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "junk": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match=r"wrong.pth.*not a ResNet-18 state dict \(missing key"):
        build_model(ModelConfig(family="resnet18", weights_file=str(wrong)), 2, 32)
    _, state = resnet_weights
    bad_shape = dict(state, **{"conv1.weight": torch.zeros(64, 3, 5, 5)})
    shaped = tmp_path / "shaped.pth"
    torch.save(bad_shape, shaped)
    with pytest.raises(UserError, match=r"shaped.pth.*does not fit ResNet-18"):
        build_model(ModelConfig(family="resnet18", weights_file=str(shaped)), 2, 32)
    text = tmp_path / "text.pth"
    text.write_text("not a tensor file")
    with pytest.raises(UserError, match="text.pth.*not a PyTorch state dict"):
        build_model(ModelConfig(family="resnet18", weights_file=str(text)), 2, 32)


def test_pretrained_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(family="resnet18", pretrained=True), 2, 32)
    message = str(info.value)
    assert "\n" not in message and "weights_file" in message and "name resolution" in message


# --------------------------------------------------------------------------- stride and padding


def _block(stride: int = 1, padding: str = "same", kernel: int = 3, convs: int = 1, channels: int = 4) -> BlockConfig:
    return BlockConfig(channels=channels, kernel_size=kernel, convs=convs, stride=stride, padding=padding)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_stride_and_padding_shapes(stride: int, padding: str, head: str) -> None:
    cfg = ModelConfig(blocks=(_block(stride, padding, 3, 2), _block(1, padding, 3, 1, 8)), head=head, fc_hidden=8)
    model = build_model(cfg, 3, 24)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(stride, stride), (1, 1), (1, 1)]  # the block's first conv only
    assert {c.padding for c in convs} == {(1, 1) if padding == "same" else (0, 0)}
    # A strided block downsamples in place of its pooling.
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == (1 if stride > 1 else 2)
    assert _forward(model, 2, 24).shape == (2, 3)


def test_stride_and_padding_flops_hand_count() -> None:
    # 16 px; block 1: 3->4 channels 3x3 stride 2 'same': (16 + 2 - 3) // 2 + 1 = 8 px, no pool;
    # block 2: 4->8 channels 3x3 'valid': 6 px, pool -> 3; fc head: 8*3*3=72 -> 10 -> 2.
    cfg = ModelConfig(blocks=(_block(2), _block(1, "valid", channels=8)), head="fc", fc_hidden=10)
    macs = 8 * 8 * 4 * 3 * 3 * 3 + 6 * 6 * 8 * 4 * 3 * 3 + 72 * 10 + 10 * 2
    assert model_cost(cfg, 2, 16).flops == 2 * macs


@pytest.mark.parametrize("stride,padding,side", [(1, "same", 16), (2, "same", 8), (1, "valid", 14), (2, "valid", 7)])
def test_cost_model_sees_stride_and_padding(stride: int, padding: str, side: int) -> None:
    """engine/cost.py's activation count follows the conv's output: conv, BN, act, [pool], then
    the gap head's pool, flatten, dropout, linear."""
    cfg = ModelConfig(blocks=(_block(stride, padding),), head="gap", dropout=0.0)
    layers, acts = layer_stats(cfg, 2, 16)
    pooled = [] if stride > 1 else [4 * (side // 2) ** 2]
    assert acts == sum([3 * 4 * side * side, *pooled, 4, 4, 4, 2])
    assert layers == 8 - (stride > 1)
    assert model_cost(cfg, 2, 16).flops == 2 * (side * side * 4 * 27 + 4 * 2)


def test_valid_padding_that_empties_the_map_is_one_line() -> None:
    # 16 px, 5x5 'valid' convs: 16 -> 12 -> 8, pool 4; block 2: 4 < 5.
    cfg = ModelConfig(blocks=(_block(1, "valid", 5, 2), _block(1, "valid", 5, 1, 8)))
    message = ("model.blocks[1].padding: 'valid' shrinks the feature map to nothing at 16 px "
               "(conv 1 of block 2 gets 4x4, smaller than its 5x5 kernel)")
    for call in (lambda: check_model(cfg, 16), lambda: build_model(cfg, 2, 16), lambda: model_cost(cfg, 2, 16)):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    # 18 px: 18 -> 14 -> 10, pool 5; block 2: 5 -> 1, and a 1x1 map cannot pool 2x2.
    with pytest.raises(ConfigError, match=r"2 blocks need a larger image than 18 px .* use fewer blocks, 'same' padding"):
        check_model(cfg, 18)
    check_model(cfg, 20)  # 20 -> 16 -> 12, pool 6; 6 -> 2, pool 1
    check_model(ModelConfig(blocks=(_block(2, "same", 5),) * 6), 16)  # strided: no pooling to fail


@pytest.mark.parametrize("section,data,message", [
    ("blocks", {"stride": -1}, "config.model.blocks[0].stride: -1 must be >= 1"),
    ("blocks", {"stride": 0}, "config.model.blocks[0].stride: 0 must be >= 1"),
    ("blocks", {"padding": "full"}, "config.model.blocks[0].padding: 'full' is not one of same, valid"),
    ("stages", {"blocks": 0}, "config.model.stages[0].blocks: 0 must be >= 1"),
    ("stages", {"stride": -2}, "config.model.stages[0].stride: -2 must be >= 1"),
    ("stages", {"channels": 0}, "config.model.stages[0].channels: 0 must be >= 1"),
])
def test_bad_block_and_stage_values_are_one_line(section: str, data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(TrialConfig, {"model": {section: [data]}})
    assert str(info.value) == message


@pytest.mark.parametrize("data,message", [
    ({"model": {"init": "he"}}, "config.model.init: 'he' is not one of kaiming_normal, kaiming_uniform, "
                                "xavier_normal, xavier_uniform, pytorch"),
    ({"model": {"activation": "swish"}}, "config.model.activation: 'swish' is not one of"),
    ({"model": {"family": "resnet", "stages": []}}, "config.model.stages: 0 stages; the resnet family has 1 to 6"),
    ({"optim": {"l1": -1e-5}}, "config.optim.l1: -1e-05 must be >= 0.0"),
])
def test_bad_model_values_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(TrialConfig, data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- init


def _conv_weight(init: str, activation: str = "relu") -> torch.Tensor:
    torch.manual_seed(0)
    cfg = ModelConfig(blocks=(BlockConfig(64), BlockConfig(128)), head="gap", init=init, activation=activation)
    return [m for m in build_model(cfg, 2, 8).modules() if isinstance(m, nn.Conv2d)][1].weight.detach()


@pytest.mark.parametrize("init,activation,std", [
    # conv 2: 64 -> 128 channels, 3x3: fan_in 576, fan_out 1152
    ("kaiming_normal", "relu", (2 / 576) ** 0.5),
    ("kaiming_uniform", "relu", (2 / 576) ** 0.5),
    ("kaiming_normal", "prelu", (2 / (1 + 0.25 ** 2) / 576) ** 0.5),
    ("kaiming_normal", "tanh", 5 / 3 / 576 ** 0.5),
    ("xavier_normal", "relu", 2 ** 0.5 * (2 / (576 + 1152)) ** 0.5),
    ("xavier_uniform", "tanh", 5 / 3 * (2 / (576 + 1152)) ** 0.5),
    ("pytorch", "relu", 1 / (3 * 576) ** 0.5),  # uniform in +-1/sqrt(fan_in)
])
def test_init_scales_weights_for_the_activation(init: str, activation: str, std: float) -> None:
    w = _conv_weight(init, activation)
    assert abs(float(w.std()) / std - 1) < 0.03  # 73,728 draws: the estimate is within ~1%
    uniform = init.endswith("uniform") or init == "pytorch"
    assert (float(w.abs().max()) <= std * 3 ** 0.5 * 1.0001) == uniform


def test_default_init_is_unchanged_and_applies_to_the_scratch_families_only() -> None:
    assert ModelConfig().init == "kaiming_normal"
    assert torch.equal(_conv_weight("kaiming_normal"), _conv_weight(ModelConfig().init))
    torch.manual_seed(0)
    cfg = ModelConfig(family="resnet", head="gap", init="xavier_uniform")
    assert _forward(build_model(cfg, 2, 16), 2, 16).shape == (2, 2)
    with pytest.raises(ConfigError, match="model.init 'xavier_uniform': applies to families cnn, resnet only, not resnet18"):
        check_model(ModelConfig(family="resnet18", init="xavier_uniform"), 64)


def test_pytorch_init_keeps_conv_biases() -> None:
    cfg = _cnn(2, batch_norm=False, init="pytorch")
    biases = [m.bias for m in build_model(cfg, 2, 16).modules() if isinstance(m, nn.Conv2d)]
    assert all(b is not None and bool((b != 0).any()) for b in biases)
    cfg = _cnn(2, batch_norm=False)
    biases = [m.bias for m in build_model(cfg, 2, 16).modules() if isinstance(m, nn.Conv2d)]
    assert all(bool((b == 0).all()) for b in biases)


# --------------------------------------------------------------------------- L1


def test_l1_penalty_adds_the_weights_absolute_sum() -> None:
    model = build_model(_cnn(1, activation="prelu", head="fc", fc_hidden=4), 2, 4)
    params = list(model.parameters())
    ce = nn.CrossEntropyLoss()
    assert with_l1(ce, params, 0.0) is ce  # off: the very criterion that ran before
    criterion = with_l1(ce, params, 1e-3)
    assert isinstance(criterion, L1Penalised)
    logits, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert len(criterion.weights) == len(weights) == 3  # conv, hidden and classifier linears; not PReLU's slope
    want = ce(logits, y) + 1e-3 * sum(float(w.detach().abs().sum()) for w in weights)
    assert float(criterion(logits, y).detach()) == pytest.approx(float(want), rel=1e-6)
    assert OptimConfig().l1 == 0.0


# --------------------------------------------------------------------------- the small ResNet


def _resnet(*stages: tuple[int, int, int], **kw) -> ModelConfig:
    kw.setdefault("head", "gap")
    return ModelConfig(family="resnet", stages=tuple(StageConfig(*s) for s in stages), **kw)


RESNET_CASES = [
    ((16, 1, 2), (32, 1, 2), (64, 1, 2)),  # the default
    ((8, 2, 1), (16, 2, 2)),
    ((8, 1, 2), (8, 1, 1), (12, 2, 2), (16, 1, 2)),
    ((4, 1, 1),),
]


@pytest.mark.parametrize("stages", RESNET_CASES)
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("size", [16, 33])
def test_resnet_output_shape(stages: tuple, head: str, size: int) -> None:
    model = build_model(_resnet(*stages, head=head, fc_hidden=8), 3, size)
    out = _forward(model, 2, size)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_resnet_structure() -> None:
    cfg = _resnet((8, 2, 1), (16, 2, 2), (16, 1, 2))
    model = build_model(cfg, 2, 32)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 5
    # 1x1 projection shortcuts exactly where the shape changes: stride 2 or a new width.
    assert [b.shortcut is not None for b in blocks] == [False, False, True, False, True]
    first_convs = [b.branch[0][0] for b in blocks]
    assert [c.stride for c in first_convs] == [(1, 1), (1, 1), (2, 2), (1, 1), (2, 2)]
    assert [c.out_channels for c in first_convs] == [8, 8, 16, 16, 16]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 5 + 2  # stem, two per block, two projections
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert all(c.bias is None for c in convs)  # BN's shift replaces the bias
    assert isinstance(model.head[0], nn.AdaptiveAvgPool2d) and model.head[-1].in_features == 16
    no_bn = build_model(_resnet((8, 1, 2), batch_norm=False), 2, 16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert _forward(no_bn, 2, 16).shape == (2, 2)


def test_resnet_flops_hand_count() -> None:
    # 8 px; stem 3->4 3x3 at 8 px; stage (4, 1, stride 2): conv 4->4 3x3 at 4 px, conv 4->4 3x3 at
    # 4 px, projection 4->4 1x1 at 4 px; gap head 4 -> 2.
    macs = 8 * 8 * 4 * 27 + 4 * 4 * 4 * 36 + 4 * 4 * 4 * 36 + 4 * 4 * 4 * 4 + 4 * 2
    assert model_cost(_resnet((4, 1, 2)), 2, 8).flops == 2 * macs
    # The cost model's activation count follows the stride: stem conv, BN, act at 8x8; the block's
    # conv, BN, act, conv, BN, projection conv and BN, act at 4x4 (no projection at stride 1, 8x8);
    # the gap head's pool, flatten, dropout, linear.
    head = 4 + 4 + 4 + 2
    assert layer_stats(_resnet((4, 1, 2)), 2, 8) == (3 + 8 + 4, 3 * 4 * 64 + 8 * 4 * 16 + head)
    assert layer_stats(_resnet((4, 1, 1)), 2, 8) == (3 + 6 + 4, 3 * 4 * 64 + 6 * 4 * 64 + head)


def test_resnet_default_is_the_spaces_baseline_shape() -> None:
    cfg = ModelConfig(family="resnet", head="gap")
    assert [(s.channels, s.blocks, s.stride) for s in cfg.stages] == [(16, 1, 2), (32, 1, 2), (64, 1, 2)]
    cost = model_cost(cfg, 2, 64)
    assert cost.params == sum(p.numel() for p in build_model(cfg, 2, 64).parameters())
    assert cost.flops < model_cost(ModelConfig(), 2, 64).flops  # cheaper than the tutorial CNN


def test_resnet_infeasible_configs_rejected() -> None:
    with pytest.raises(ConfigError, match="model.pretrained: applies to families resnet18, efficientnet_lite0 only, not resnet"):
        check_model(ModelConfig(family="resnet", pretrained=True), 64)
    with pytest.raises(ConfigError, match="model.weights_file 'w.pth': applies to .* not resnet"):
        check_model(ModelConfig(family="resnet", weights_file="w.pth"), 64)
    with pytest.raises(ConfigError, match="model.stages: 7 stages; the resnet family has 1 to 6"):
        model_cost(_resnet(*[(4, 1, 2)] * 7), 2, 64)
    check_model(_resnet(*[(4, 1, 2)] * 6), 8)  # 'same'-padded convs never empty the map
