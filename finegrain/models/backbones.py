"""Video backbones with stage access.

Every backbone is a :class:`Backbone`: a ``stem`` followed by ``stages`` (an ``nn.ModuleList``),
all in channels-first layout ``(B, C, T, H, W)``; ``backbone(x)`` returns the output of every
stage, ``backbone.stage_channels[k]`` is stage k's width. Methods tap stages, run them one by one
(ClassReg), or copy the later ones (U2S, DFB's local branch).

Last-stage size for an input ``(B, 3, T, H, W)`` (T, H, W divisible by the strides):

| backbone     | stages (channels)         | last stage T, H×W            | methods       |
|--------------|---------------------------|------------------------------|---------------|
| tiny         | 16, 32, 64, 128 (`width`) | T/2, H/16                    | all           |
| r3d_18       | 64, 128, 256, 512         | T/8 (T/2 `keep_time`), H/16  | all           |
| mc3_18       | 64, 128, 256, 512         | T, H/16                      | all           |
| r2plus1d_18  | 64, 128, 256, 512         | T/8 (T/2 `keep_time`), H/16  | all           |
| s3d          | 480, 832, 1024            | T/8, H/32                    | all           |
| swin3d_t, _s | 96, 192, 384, 768         | T/2, H/32                    | all           |
| swin3d_b     | 128, 256, 512, 1024       | T/2, H/32                    | all           |
| mvit_v2_s    | one token stage: 768      | T/2, H/32                    | onepass, dsts |

"all" = onepass, dsts, u2s, dfb, classreg, joint_attn. MViT's blocks pool the query/key/value
tokens inside attention and carry a class token between blocks, so it exposes no intermediate
feature maps: it is one stage (its final tokens without the class token, reshaped to
``(B, 768, T, H, W)``), and methods that need several stages fail with a clear message
(``Backbone.has_stages`` is False; the registry checks each method's ``needs_stages``).

DSTS's temporal operator needs ``T >= 4`` in the last stage (METHODS.md): with 8-frame clips use
``keep_time=True`` (ResNet family: removes the temporal stride of the last two stages; weights
unchanged, so pretrained state dicts still load), or feed more frames (s3d: 32).

MViT-v2's relative position tables are sized for the 16×224×224 clips torchvision builds it for;
the wrapper reads ``(T, H, W)`` from the patch embedding and torchvision interpolates the tables,
so any input size runs (exact at 16×224×224, which is what pretrained weights assume).

Pretrained weights are never downloaded: ``weights=PATH`` loads a local state dict, keyed either
like this wrapper or like the torchvision model (its classifier head is ignored), with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models.video import MViT


def _video_models():
    """torchvision's video models, imported when a backbone is built, not with the registry:
    ``torchvision.models`` loads ``torch._dynamo`` (~2 s on this machine), which the processes
    that only read the registry (every driver, each Tune trial's actor, Ray Train's
    controller) never use."""
    from torchvision.models import video

    return video


class Backbone(nn.Module):
    """stem → stages; forward returns the list of stage outputs (channels-first).

    ``torchvision_keys`` maps this module's state-dict keys to those of the torchvision model it
    wraps (empty for ``tiny``); ``torchvision_ignored`` are the torchvision keys it does not use
    (the classifier head).
    """

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        stages: list[nn.Module],
        stage_channels: list[int],
        has_stages: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(stage_channels)
        # False: one token stage with no intermediate feature maps (MViT); methods whose spec
        # says ``needs_stages`` refuse it
        self.has_stages = has_stages
        self.torchvision_keys: dict[str, str] = {}
        self.torchvision_ignored: tuple[str, ...] = ()

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


def _wrap(backbone: Backbone, net: nn.Module) -> Backbone:
    """Record how ``backbone``'s state-dict keys map onto torchvision ``net``'s.

    The wrapper holds ``net``'s own submodules, so every tensor of ``backbone.state_dict()`` is
    one of ``net.state_dict()``: match them by identity.
    """
    theirs = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    backbone.torchvision_keys = {
        k: theirs[id(t)] for k, t in backbone.state_dict(keep_vars=True).items()
    }
    used = set(backbone.torchvision_keys.values())
    backbone.torchvision_ignored = tuple(k for k in net.state_dict() if k not in used)
    return backbone


# --- tiny: a 3D ResNet with r3d's stage structure and few channels --------------------------


def _res_stage(inplanes: int, planes: int, stride: tuple[int, int, int], blocks: int = 1):
    downsample = None
    if stride != (1, 1, 1) or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm3d(planes),
        )
    from torchvision.models.video.resnet import BasicBlock, Conv3DSimple

    layers = [BasicBlock(inplanes, planes, Conv3DSimple, stride, downsample)]
    layers += [BasicBlock(planes, planes, Conv3DSimple) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def tiny(width: int = 16) -> Backbone:
    """Four one-block stages of width w, 2w, 4w, 8w; time halved once (stage 3)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
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


def video_resnet(name: str, keep_time: bool = False) -> Backbone:
    """``r3d_18``, ``mc3_18`` or ``r2plus1d_18``: stem + layer1..4."""
    if not isinstance(keep_time, bool):
        raise ValueError(f"keep_time must be a bool, got {keep_time!r}")
    net = getattr(_video_models(), name)(weights=None)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    if keep_time:
        for stage in stages[2:]:
            _drop_temporal_stride(stage)
    return _wrap(Backbone(name, net.stem, stages, [64, 128, 256, 512]), net)


# --- S3D -------------------------------------------------------------------------------------


def s3d() -> Backbone:
    """S3D's ``features`` split after the three resolution levels of its inception blocks."""
    net = _video_models().s3d(weights=None)
    f = net.features
    return _wrap(Backbone("s3d", f[:5], [f[5:7], f[7:13], f[13:16]], [480, 832, 1024]), net)


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


def swin3d(name: str) -> Backbone:
    """``swin3d_t/s/b``: patch embedding; four stages (patch merging + blocks; the last + norm)."""
    net = getattr(_video_models(), name)(weights=None)
    feats = list(net.features)  # stage, merge, stage, merge, stage, merge, stage
    stages, chans = [], []
    for k in range(0, len(feats), 2):
        mods = ([feats[k - 1]] if k else []) + [feats[k]]
        mods += [net.norm] if k == len(feats) - 1 else []
        stages.append(_ChannelsLast(*mods))
        chans.append(net.num_features // 2 ** ((len(feats) - 1 - k) // 2))
    stem = _SwinStem(net.patch_embed, net.pos_drop)
    return _wrap(Backbone(name, stem, stages, chans), net)


# --- MViT-v2 ---------------------------------------------------------------------------------


class _MViTTokens(nn.Module):
    """MViT's transformer on a channels-first patch embedding ``(B, C, T, H, W)``.

    Adds the class token, runs the blocks with the ``(T, H, W)`` read from the input (torchvision
    uses the fixed size it was built for), applies the final norm and returns the tokens without
    the class token as ``(B, C_out, T', H', W')``.
    """

    def __init__(self, pos_encoding: nn.Module, blocks: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.pos_encoding, self.blocks, self.norm = pos_encoding, blocks, norm

    def forward(self, x: Tensor) -> Tensor:
        thw = tuple(x.shape[2:])
        x = self.pos_encoding(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x, thw = block(x, thw)
        x = self.norm(x)[:, 1:]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *thw)


def mvit(net: MViT, name: str) -> Backbone:
    """Wrap a torchvision MViT with relative position embeddings as a one-stage backbone."""
    if net.pos_encoding.spatial_pos is not None:
        raise ValueError(f"{name}: only MViT with relative position embeddings (v2) is supported")
    stage = _MViTTokens(net.pos_encoding, net.blocks, net.norm)
    backbone = Backbone(
        name, net.conv_proj, [stage], [net.norm.normalized_shape[0]], has_stages=False
    )
    return _wrap(backbone, net)


def mvit_v2_s() -> Backbone:
    return mvit(_video_models().mvit_v2_s(weights=None), "mvit_v2_s")


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny": tiny,
    "r3d_18": partial(video_resnet, "r3d_18"),
    "mc3_18": partial(video_resnet, "mc3_18"),
    "r2plus1d_18": partial(video_resnet, "r2plus1d_18"),
    "s3d": s3d,
    "swin3d_t": partial(swin3d, "swin3d_t"),
    "swin3d_s": partial(swin3d, "swin3d_s"),
    "swin3d_b": partial(swin3d, "swin3d_b"),
    "mvit_v2_s": mvit_v2_s,
}


def backbone_options(name: str) -> dict[str, object]:
    """The options backbone ``name`` accepts, with their defaults."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    params = inspect.signature(BACKBONES[name]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def build_backbone(name: str, weights: str | Path | None = None, **options) -> Backbone:
    """Build backbone ``name``; ``weights`` is an optional local state-dict file."""
    valid = backbone_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"backbone {name!r} has no option(s) {unknown}; valid: {', '.join(valid) or '(none)'}"
        )
    backbone = BACKBONES[name](**options)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a local state dict into ``backbone``: keyed like the wrapper or like torchvision.

    The naming is the one most of the file's keys follow. Everything the backbone has must be in
    the file with the same shape; nothing else may be, except torchvision's classifier head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights for {backbone.name!r} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file or a pickle weights_only refuses
        raise ValueError(f"cannot read weights {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights {path} are not a state dict (a dict of name → tensor)")

    own = backbone.state_dict()
    to_tv = backbone.torchvision_keys
    if to_tv and len(state.keys() & set(to_tv.values())) > len(state.keys() & own.keys()):
        naming, name_of = "torchvision", to_tv
        allowed = set(to_tv.values()) | set(backbone.torchvision_ignored)
    else:
        naming, name_of = "wrapper", {k: k for k in own}
        allowed = set(own)
    missing = [name_of[k] for k in own if name_of[k] not in state]
    unexpected = sorted(set(state) - allowed)
    shape = [
        f"{name_of[k]} {tuple(state[name_of[k]].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if name_of[k] in state and state[name_of[k]].shape != v.shape
    ]
    if missing or unexpected or shape:
        raise ValueError(
            f"weights {path} do not fit backbone {backbone.name!r} ({naming} key names): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), "
            f"{len(shape)} with wrong shapes (file vs model, e.g. {shape[:3]})"
        )
    backbone.load_state_dict({k: state[name_of[k]] for k in own})
