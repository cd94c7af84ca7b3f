"""One-pass baseline: backbone → global average pool → dropout → linear (METHODS.md)."""

from __future__ import annotations

from torch import Tensor, nn

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput


class ClassifierHead(nn.Module):
    """GAP over (T, H, W) → dropout → linear: ``(B, C, T, H, W) → (B, K)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))


class OnePass(FineGrainModel):
    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, dropout)

    def forward(self, clips: Tensor) -> ModelOutput:
        return ModelOutput(logits=self.head(self.backbone(clips)[-1]))


def build(num_classes: int, backbone: Backbone, *, dropout: float = 0.5) -> OnePass:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return OnePass(backbone, num_classes, dropout)
