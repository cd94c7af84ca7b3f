"""DFB's mechanism, checked against the synthetic benchmark's ground truth.

The paper argues that each class's discriminative filters fire on the small, local region that
tells the class from its neighbours (its Fig. 5: max-response boxes on the discriminative part).
The benchmark knows that region: each validation clip's ``evidence["part"]`` box per frame (the
notch, the dots, the liquid rim; for temporal-direction classes the moving object itself).

From the model's diagnostics ``max_response_thw`` (B, K, 3) (per clip and class, the feature cell
(t, h, w) of the strongest response of the class's N filters), ``feature_stride`` and
``input_size``, each clip's **true class's** strongest response is a cell of the feature grid;
it is scored on the input frames of its time cell that have a part box, as
:mod:`finegrain.models.evidence` describes (the cell tiles the input uniformly; a frame's value
is the share of the cell's area inside the box):

- ``evidence_hit``: the mean, over clips, of the share of the top-response cell inside the part
  box (1: every clip's true class fires inside the box).
- ``evidence_chance``: the mean share of the frame the part box covers, over the same frames:
  what a response at a uniformly random cell would score.
- ``evidence_lift``: ``evidence_hit − evidence_chance`` (> 0: the filters fire on the evidence
  more than chance).

Only clips whose top response's frames have a box are scored; ``{}`` without evidence (real
datasets, or ``branches="gb"``, which has no filter bank).
"""

from __future__ import annotations

import torch
from torch import Tensor

from finegrain.models.evidence import (
    evidence_scores,
    input_size_of,
    lift_words,
    one_hot_maps,
    summary,
)


def score(
    diagnostics: list[dict],
    labels: Tensor,
    preds: Tensor,
    class_names: list[str],
    class_groups: dict,
    evidence: list[dict | None] | None = None,
) -> dict[str, float]:
    """The mechanism scores above (see :mod:`finegrain.models.spec` for the signature)."""
    per_clip = evidence_scores(diagnostics, evidence, labels, "part", _top_response_maps)
    return summary(per_clip, "evidence", ("hit",))


def _top_response_maps(d: dict, labels: Tensor):
    """One-hot maps at each clip's true class's strongest filter response."""
    thw, stride, size = d.get("max_response_thw"), d.get("feature_stride"), input_size_of(d)
    if thw is None or stride is None or size is None:
        return None
    thw = torch.as_tensor(thw).detach().cpu().long()
    stride = torch.as_tensor(stride).detach().cpu().double().reshape(-1)
    if thw.dim() != 3 or thw.shape[2] != 3 or stride.numel() != 3 or labels.numel() < len(thw):
        return None
    grid = [max(1, round(s / st)) for s, st in zip(size, stride.tolist())]
    y = labels[: len(thw)]
    k = thw.shape[1]
    cells = torch.full((len(thw), 3), -1, dtype=torch.long)  # unknown class: not scored
    known = (y >= 0) & (y < k)
    cells[known] = thw[known.nonzero().reshape(-1), y[known]]
    return one_hot_maps(cells, grid), size


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """The paper's claim — a class's filters fire on the part that tells it apart — against
    the part boxes: the lift of the hit over the box's area share, its 95 % interval above 0."""
    return lift_words(scores, "evidence", "hit", "part", "the true class's top filter cell")
