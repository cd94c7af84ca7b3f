"""DFB: spatial-temporal discriminative filter banks (Martinez et al., ICCV 2019; METHODS.md § DFB).

Three classifiers on top of the backbone (paper Fig. 2):

- global branch (§3.1): last stage → GAP → dropout → linear → z_avg (the one-pass head);
- discriminative filter bank (§3.2): N·K 1×1×1 filters, global max pool over T·H·W → r (N·K);
  z_xchannel = mean of each class's N responses (cross-channel pooling), z_max = linear(r);
- local detail branch (§3.3): a randomly initialised copy of the last stage, fed with the
  second-to-last stage's output upsampled ×2 in space, plus a 1×1×1 projection of that input as
  a skip connection; the filter bank reads its output.

    z_comb = z_avg + z_xchannel + z_max
    L = CE(z_comb) + CE(z_avg) + CE(z_max) + CE(z_xchannel)                        (Eq. 1)

Prediction: z_comb. Filter ``k·N + n`` belongs to class ``k`` (class-major blocks).
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import Tensor, nn

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options

Branches = Literal["gb", "gb_df", "gb_df_lb"]
BRANCHES = get_args(Branches)


class DFBOptions(Options):
    """DFB's options.

    filters_per_class: N discriminative filters per class (paper N = 5).
    branches: "gb" (global branch only = the one-pass baseline), "gb_df" (+ filter bank on the
        last stage's features), "gb_df_lb" (+ local detail branch feeding the filters; paper).
    dropout: before the global branch's classifier, as the one-pass head.
    """

    filters_per_class: StrictInt = Field(5, ge=1)
    branches: Branches = "gb_df_lb"
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter re-initialised (paper §4.2: random init is better).

    Submodules with ``reset_parameters`` use it (PyTorch's default init); parameters held
    directly by a submodule without one (Swin's relative position bias table) get timm's
    truncated normal, std 0.02.
    """
    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        else:
            for p in m.parameters(recurse=False):
                nn.init.trunc_normal_(p, std=0.02)
    return new


def cross_channel_pool(responses: Tensor, filters_per_class: int) -> Tensor:
    """z_xchannel: ``(B, N·K) → (B, K)``, the mean of each class's block of N responses."""
    b, nk = responses.shape
    return responses.view(b, nk // filters_per_class, filters_per_class).mean(dim=2)


class DFB(FineGrainModel):
    """``head`` is the global branch (named as in :class:`OnePass`, so its weights load)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        filters_per_class: int,
        branches: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_classes, self.filters_per_class, self.branches = (
            num_classes,
            filters_per_class,
            branches,
        )
        channels = backbone.out_channels
        self.backbone = backbone
        self.head = ClassifierHead(channels, num_classes, dropout)  # z_avg
        if branches != "gb":
            self.filter_bank = nn.Conv3d(channels, filters_per_class * num_classes, kernel_size=1)
            self.max_classifier = nn.Linear(filters_per_class * num_classes, num_classes)  # z_max
        if branches == "gb_df_lb":
            self.local_stage = fresh_copy(backbone.stages[-1])
            self.skip = nn.Conv3d(backbone.stage_channels[-2], channels, kernel_size=1)

    def local_features(self, penultimate: Tensor) -> Tensor:
        """Local branch: ×2 spatial upsampling (time ×1) → fresh last stage, + projected skip."""
        t, h, w = penultimate.shape[2:]
        up = F.interpolate(
            penultimate, size=(t, 2 * h, 2 * w), mode="trilinear", align_corners=False
        )
        local = self.local_stage(up)
        # The skip is resized to the stage's output (the stage strides): trilinear, which for a
        # factor-2 reduction averages each 2×2 (×2) cell.
        skip = F.interpolate(
            self.skip(up), size=local.shape[2:], mode="trilinear", align_corners=False
        )
        return local + skip

    def forward(self, clips: Tensor) -> ModelOutput:
        feats = self.backbone(clips)
        z_avg = self.head(feats[-1])
        if self.branches == "gb":
            return ModelOutput(logits=z_avg, extras={"z_avg": z_avg})
        # gb_df: the filters read the global branch's own last-stage features (paper §3.3).
        x = self.local_features(feats[-2]) if self.branches == "gb_df_lb" else feats[-1]
        responses = self.filter_bank(x)  # (B, N·K, T, H, W)
        r = responses.amax(dim=(2, 3, 4))  # global max pool
        z_xchannel = cross_channel_pool(r, self.filters_per_class)
        z_max = self.max_classifier(r)
        z_comb = z_avg + z_xchannel + z_max
        extras = {"z_avg": z_avg, "z_xchannel": z_xchannel, "z_max": z_max}
        diagnostics = self.max_responses(responses.detach(), clips.shape[2:])
        return ModelOutput(logits=z_comb, diagnostics=diagnostics, extras=extras)

    def max_responses(self, responses: Tensor, input_size: torch.Size) -> dict[str, Tensor]:
        """Per sample and class, where the class's filters fire most (paper §5.3).

        Returns ``max_response_thw`` ``(B, K, 3)`` feature-map coordinates, ``max_response_filter``
        ``(B, K)`` (which of the class's N filters), ``max_response_value`` ``(B, K)`` and
        ``feature_stride`` ``(3,)``: input frames/pixels per feature cell along (T, H, W), so
        pixel box = [coord·stride, (coord + 1)·stride); ``input_size`` ``(3,)``: the input
        clip's (T, H, W) (the mechanism score maps the cells onto the evidence boxes with it).
        """
        b, _, t, h, w = responses.shape
        k, n = self.num_classes, self.filters_per_class
        value, index = responses.reshape(b, k, n * t * h * w).max(dim=2)
        filt, rest = index // (t * h * w), index % (t * h * w)
        thw = torch.stack([rest // (h * w), (rest // w) % h, rest % w], dim=2)
        stride = torch.tensor([s / f for s, f in zip(input_size, (t, h, w))])
        return {
            "max_response_thw": thw,
            "max_response_filter": filt,
            "max_response_value": value,
            "feature_stride": stride,
            "input_size": torch.tensor([float(s) for s in input_size]),
        }

    def branch_logits(self, output: ModelOutput) -> dict[str, Tensor]:
        """z_avg, z_max and z_xchannel on their own: where z_comb's accuracy comes from."""
        if self.branches == "gb":
            return {}
        return {k: output.extras[k] for k in ("z_avg", "z_max", "z_xchannel")}

    def loss(self, output: ModelOutput, labels: Tensor) -> Tensor:
        """Eq. 1: CE(z_comb) + CE(z_avg) + CE(z_max) + CE(z_xchannel); ``gb``: CE(z_avg)."""
        ce = F.cross_entropy
        if "z_xchannel" not in output.extras:
            return ce(output.logits, labels)
        ex = output.extras
        return (
            ce(output.logits, labels)
            + ce(ex["z_avg"], labels)
            + ce(ex["z_max"], labels)
            + ce(ex["z_xchannel"], labels)
        )


def build(num_classes: int, backbone: Backbone, options: DFBOptions | None = None, **kwargs) -> DFB:
    """DFB on ``backbone``; options as a :class:`DFBOptions` or keyword arguments.

    The local branch (``branches="gb_df_lb"``) copies the last stage and reads the one before it:
    the backbone needs two stages or more.
    """
    opts = options if options is not None else parse_options("dfb", DFBOptions, kwargs)
    if opts.branches == "gb_df_lb" and len(backbone.stages) < 2:
        raise ValueError(
            f"branches='gb_df_lb' needs a backbone with >= 2 stages; {backbone.name!r} has "
            f"{len(backbone.stages)}"
        )
    return DFB(backbone, num_classes, opts.filters_per_class, opts.branches, opts.dropout)
