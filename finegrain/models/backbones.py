"""Video backbones with stage access.

Every backbone is a :class:`Backbone`: a ``stem`` followed by ``stages`` (an ``nn.ModuleList``),
all in channels-first layout ``(B, C, T, H, W)``; ``backbone(x)`` returns the output of every
stage, ``backbone.stage_channels[k]`` is stage k's width. Methods tap stages, run them one by one
(ClassReg), or copy the later ones (U2S, DFB's local branch).

| backbone      | stages (channels)          | T out (of T in)       | methods                        |
|---------------|----------------------------|-----------------------|--------------------------------|
| tiny          | 16, 32, 64, 128            | T/2                   | all                            |
| r3d_18        | 64, 128, 256, 512          | T/8, T/2 `keep_time`  | all                            |
| mc3_18        | 64, 128, 256, 512          | T                     | all                            |
| r2plus1d_18   | 64, 128, 256, 512          | T/8, T/2 `keep_time`  | all                            |
| s3d           | 480, 832, 1024             | T/8                   | all                            |
| swin3d_t/s/b  | 96·2^k (128·2^k for b)     | T/2                   | all                            |
| mvit_v2_s     | one token stage (768)      | T/2                   | onepass, dsts (no CNN stages)  |

``keep_time=True`` (ResNet family) removes the temporal stride of the last two stages, so that
DSTS's temporal operator sees T ≥ 4 time steps with 8-frame inputs (METHODS.md); the weights are
unchanged, so pretrained state dicts still load.

Pretrained weights are never downloaded: ``weights=PATH`` loads a local state dict (of the
torchvision model, or of this wrapper) with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import video as tvv
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple

ALL_METHODS = ("onepass", "dsts", "u2s", "dfb", "classreg", "joint_attn")


class Backbone(nn.Module):
    """stem → stages; forward returns the list of stage outputs (channels-first)."""

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        stages: list[nn.Module],
        stage_channels: list[int],
        methods: tuple[str, ...] = ALL_METHODS,
    ) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(stage_channels)
        self.methods = methods

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise ValueError(
                f"method {method!r} needs CNN stages that backbone {self.name!r} does not have; "
                f"{self.name!r} supports: {', '.join(self.methods)}"
            )


# --- tiny: a 3D ResNet with r3d's stage structure and few channels --------------------------


def _res_stage(inplanes: int, planes: int, stride: tuple[int, int, int], blocks: int = 1):
    downsample = None
    if stride != (1, 1, 1) or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm3d(planes),
        )
    layers = [BasicBlock(inplanes, planes, Conv3DSimple, stride, downsample)]
    layers += [BasicBlock(planes, planes, Conv3DSimple) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def tiny(width: int = 16) -> Backbone:
    """Four one-block stages of width w, 2w, 4w, 8w; time halved once (stage 3)."""
    stem = nn.Sequential(
        nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )
    chans = [width, 2 * width, 4 * width, 8 * width]
    strides = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)]
    stages, inplanes = [], width
    for c, s in zip(chans, strides):
        stages.append(_res_stage(inplanes, c, s))
        inplanes = c
    backbone = Backbone("tiny", stem, stages, chans)
    for m in backbone.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return backbone


# --- torchvision ResNet family ---------------------------------------------------------------


def _drop_temporal_stride(stage: nn.Module) -> None:
    for m in stage.modules():
        if isinstance(m, nn.Conv3d) and m.stride[0] > 1:
            m.stride = (1, *m.stride[1:])


def _video_resnet(builder: Callable[..., tvv.VideoResNet], name: str, keep_time: bool) -> Backbone:
    net = builder(weights=None)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    if keep_time:
        for stage in stages[2:]:
            _drop_temporal_stride(stage)
    return Backbone(name, net.stem, stages, [64, 128, 256, 512])


# --- S3D -------------------------------------------------------------------------------------


def _s3d() -> Backbone:
    f = tvv.s3d(weights=None).features
    return Backbone("s3d", f[:5], [f[5:7], f[7:13], f[13:16]], [480, 832, 1024])


# --- Swin3D ----------------------------------------------------------------------------------


class _ChannelsLast(nn.Module):
    """Runs a channels-last module on a channels-first tensor."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class _SwinStem(nn.Module):
    def __init__(self, patch_embed: nn.Module, pos_drop: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.pos_drop = patch_embed, pos_drop

    def forward(self, x: Tensor) -> Tensor:
        return self.pos_drop(self.patch_embed(x)).permute(0, 4, 1, 2, 3)


def _swin(builder: Callable[..., tvv.SwinTransformer3d], name: str) -> Backbone:
    net = builder(weights=None)
    feats = list(net.features)  # stage, merge, stage, merge, stage, merge, stage
    stages, chans = [], []
    for k in range(0, len(feats), 2):
        mods = ([feats[k - 1]] if k else []) + [feats[k]] + ([net.norm] if k == len(feats) - 1 else [])
        stages.append(_ChannelsLast(*mods))
        chans.append(net.num_features // 2 ** ((len(feats) - 1 - k) // 2))
    return Backbone(name, _SwinStem(net.patch_embed, net.pos_drop), stages, chans)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny": lambda **kw: tiny(**kw),
    "r3d_18": lambda keep_time=False: _video_resnet(tvv.r3d_18, "r3d_18", keep_time),
    "mc3_18": lambda keep_time=False: _video_resnet(tvv.mc3_18, "mc3_18", keep_time),
    "r2plus1d_18": lambda keep_time=False: _video_resnet(tvv.r2plus1d_18, "r2plus1d_18", keep_time),
    "s3d": lambda: _s3d(),
    "swin3d_t": lambda: _swin(tvv.swin3d_t, "swin3d_t"),
    "swin3d_s": lambda: _swin(tvv.swin3d_s, "swin3d_s"),
    "swin3d_b": lambda: _swin(tvv.swin3d_b, "swin3d_b"),
}


def build_backbone(name: str, weights: str | Path | None = None, **options) -> Backbone:
    """Build backbone ``name``; ``weights`` is an optional local state-dict file."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    try:
        backbone = BACKBONES[name](**options)
    except TypeError as e:
        raise ValueError(f"backbone {name!r}: bad option(s) {sorted(options)}: {e}") from None
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a local state dict into ``backbone`` (its own keys, or the torchvision model's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights for {backbone.name!r} not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = backbone.state_dict()
    if not set(state) & set(own):
        state = _from_torchvision_keys(backbone, state)
    missing = sorted(set(own) - set(state))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or shape:
        raise ValueError(
            f"weights {path} do not fit backbone {backbone.name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(shape)} with wrong shapes (e.g. {shape[:3]})"
        )
    backbone.load_state_dict({k: state[k] for k in own})


def _from_torchvision_keys(backbone: Backbone, state: dict) -> dict:
    """Map a torchvision model's state-dict keys onto the wrapper's, by module identity."""
    net_names = {}
    for prefix, module in backbone.named_modules():
        net_names[id(module)] = prefix
    # The wrapper holds the torchvision submodules themselves; rebuild their original names by
    # re-creating the torchvision model and matching parameter order within each tensor shape.
    ours = list(backbone.state_dict().items())
    theirs = [(k, v) for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))]
    if len(ours) != len(theirs):
        return state
    return {ko: vt for (ko, _), (_, vt) in zip(ours, theirs)}
