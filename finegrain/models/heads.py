"""Pieces several methods share."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """GAP over (T, H, W) → dropout → linear: ``(B, C, T, H, W) → (B, K)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))

    def class_activation_map(self, x: Tensor, classes: Tensor) -> Tensor:
        """The class activation map (Zhou et al. 2016) of one class per clip: ``Σ_c w_kc ·
        x_c(t, y, x)`` for clip ``b``'s class ``k = classes[b]``, ``(B, C, T, H, W) → (B, T,
        H, W)`` in float32 (also under AMP), without the bias. For this head (GAP → linear)
        Grad-CAM is the same map (before its ReLU) up to a positive factor, with no backward
        pass: the map's mean over the cells plus the bias is the class's logit (in evaluation,
        where dropout is the identity). Called explicitly; ``forward`` never computes it."""
        w = self.fc.weight.detach()[classes.long()].float()  # (B, C)
        with torch.autocast(x.device.type, enabled=False):  # float32 under AMP too
            return torch.einsum("bc,bcthw->bthw", w, x.detach().float())
