"""Pieces several methods share."""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """GAP over (T, H, W) → dropout → linear: ``(B, C, T, H, W) → (B, K)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))
