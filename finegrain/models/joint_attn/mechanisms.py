"""JointAttn's mechanism, checked against the synthetic benchmark's ground truth.

The paper argues that the LSTM's soft attention finds the action's region in each frame (its
Fig. 4: attention on the moving limb or object). The benchmark knows where the action is: each
validation clip's ``evidence["object"]`` box per frame (the moving object's box).

The model's diagnostic ``attention`` (B, T', K, K) holds, per LSTM step t, the attention weights
over the K×K feature grid (summing to 1); the step's grid is the tapped feature maps resized to
(T', K, K), so it tiles the input clip uniformly, and step t reads the features of time cell t.
With ``input_size`` (the input clip's (T, H, W)), each input frame with an object box is scored
against the attention of its time cell, as :mod:`finegrain.models.evidence` describes:

- ``object_mass``: the mean, over clips and their frames with a box, of the attention mass
  inside the object box (the map read as constant over each cell).
- ``object_chance``: the mean share of the frame the object box covers over the same frames:
  what uniform attention scores.
- ``object_lift``: ``object_mass − object_chance`` (> 0: attention on the moving object more
  than uniform attention).

``{}`` without evidence (real datasets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from finegrain.models.evidence import evidence_scores, input_size_of, lift_words, summary


def score(
    diagnostics: list[dict],
    labels: Tensor,
    preds: Tensor,
    class_names: list[str],
    class_groups: dict,
    evidence: list[dict | None] | None = None,
) -> dict[str, float]:
    """The mechanism scores above (see :mod:`finegrain.models.spec` for the signature)."""
    per_clip = evidence_scores(diagnostics, evidence, None, "object", _attention_maps)
    return summary(per_clip, "object", ("mass",))


def _attention_maps(d: dict, labels: Tensor):
    att, size = d.get("attention"), input_size_of(d)
    if att is None or size is None:
        return None
    att = torch.as_tensor(att).detach().cpu()
    return (att, size) if att.dim() == 4 else None


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """The paper's claim — the attention finds the action — against the moving object's box:
    the lift of the attention mass over the box's area share, its 95 % interval above 0."""
    return lift_words(scores, "object", "mass", "object", "attention mass")
