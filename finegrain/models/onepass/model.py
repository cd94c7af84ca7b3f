"""One-pass baseline: backbone → global average pool → dropout → linear (METHODS.md)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options


class OnePassOptions(Options):
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class OnePass(FineGrainModel):
    """In evaluation (``model.eval()``) the output's diagnostics hold the class activation map
    of each clip's **predicted** class on the last stage (the CAMs of every class would be K
    times larger; the mechanism score reads the predicted class's): ``cam`` ``(B, T', H', W')``
    float16, divided by its largest absolute value per clip (so in [-1, 1]; the sign and the
    ratios are kept, the scale dropped), ``cam_class`` ``(B,)`` the class it belongs to, and
    ``input_size`` ``(3,)`` the input clip's (T, H, W). Training computes none of it."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, dropout)

    def forward(self, clips: Tensor) -> ModelOutput:
        features = self.backbone(clips)[-1]
        logits = self.head(features)
        if self.training:
            return ModelOutput(logits=logits)
        return ModelOutput(
            logits=logits, diagnostics=cam_diagnostics(self.head, features, logits, clips)
        )


def cam_diagnostics(head: ClassifierHead, features: Tensor, logits: Tensor, clips: Tensor) -> dict:
    """The predicted class's CAM of ``head`` on ``features`` (see :class:`OnePass`)."""
    classes = logits.detach().argmax(dim=1)
    cam = head.class_activation_map(features, classes)
    scale = cam.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(cam.dtype).tiny)
    return {
        "cam": (cam / scale).half(),
        "cam_class": classes,
        "input_size": torch.tensor([float(s) for s in clips.shape[2:]]),
    }


def build(num_classes: int, backbone: Backbone, options: OnePassOptions | None = None, **kwargs):
    """The baseline on ``backbone``; options as an ``OnePassOptions`` or keyword arguments."""
    opts = options or parse_options("onepass", OnePassOptions, kwargs)
    return OnePass(backbone, num_classes, opts.dropout)
