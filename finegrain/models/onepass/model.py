"""One-pass baseline: backbone → global average pool → dropout → linear (METHODS.md)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options


class OnePassOptions(Options):
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class OnePass(FineGrainModel):
    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, dropout)

    def forward(self, clips: Tensor) -> ModelOutput:
        return ModelOutput(logits=self.head(self.backbone(clips)[-1]))


def build(num_classes: int, backbone: Backbone, options: OnePassOptions | None = None, **kwargs):
    """The baseline on ``backbone``; options as an ``OnePassOptions`` or keyword arguments."""
    opts = options or parse_options("onepass", OnePassOptions, kwargs)
    return OnePass(backbone, num_classes, opts.dropout)
