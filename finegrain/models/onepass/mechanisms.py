"""The one-pass baseline's "mechanism": where its decision's evidence lies, against ground truth.

The baseline argues nothing; its class activation map (Zhou et al. 2016) is the reference the
methods' localisation claims are read against: does a plain GAP → linear classifier already look
at the part that tells a class apart? The benchmark knows that part: each validation clip's
``evidence["part"]`` box per frame (the notch, the dots, the liquid rim; for temporal-direction
classes the moving object itself).

The model's diagnostic ``cam`` (B, T', H', W') is the CAM of each clip's **predicted** class
(``cam_class``; the model does not see the labels, and the CAMs of every class would be K times
larger) on the last stage. Its positive part is scored against the part box on each input frame
that has one, as :mod:`finegrain.models.evidence` describes (frames whose CAM is nowhere positive
are skipped):

- ``evidence_hit``: the mean share of the CAM's peak cell inside the part box.
- ``evidence_mass``: the mean share of the CAM's positive mass inside the part box.
- ``evidence_chance``: the mean share of the frame the part box covers over the same frames:
  what a CAM blind to the box scores (for the hit and the mass alike).
- ``evidence_lift``: ``evidence_hit − evidence_chance``.

``{}`` without evidence (real datasets) or without the CAM (a model evaluated in training mode).
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
    per_clip = evidence_scores(diagnostics, evidence, None, "part", _cam_maps)
    return summary(per_clip, "evidence", ("hit", "mass"))


def _cam_maps(d: dict, labels: Tensor):
    cam, size = d.get("cam"), input_size_of(d)
    if cam is None or size is None:
        return None
    cam = torch.as_tensor(cam).detach().cpu().float()
    return (cam.clamp(min=0), size) if cam.dim() == 4 else None


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """Whether the baseline's decision already rests on the part (the reference for the
    methods' claims): the CAM peak's lift over the box's area share, 95 % interval above 0;
    the CAM mass in the box beside it."""
    words = lift_words(scores, "evidence", "hit", "part", "the predicted class's CAM peak")
    if "evidence_mass" in scores:
        mass, lo, hi = scores["evidence_mass"]
        words += (
            f"; CAM mass {100 * mass:.0f} % in the box (95 % CI [{100 * lo:.0f}, {100 * hi:.0f}])"
        )
    return words
