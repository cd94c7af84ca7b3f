"""DSTS's mechanism, checked against the synthetic benchmark's ground truth.

The paper argues that the synapse routes each clip to a *specialized* neuron, and that the
neurons' spatio-temporal gates specialise to spatial or temporal cues. From the diagnostics the
model emits (``dsts/layer{j}/selection`` (B,), ``dsts/layer{j}/selected`` (N,) counts and, for
``sts="gates"`` or ``"fixed_halves"``, ``dsts/layer{j}/temporal_share`` (N,)), per layer ``j``:

- ``selection_entropy_l{j}``: entropy in bits of the selected neuron over the evaluated clips
  (0: one neuron takes every clip; log2 N: each neuron takes as many).
- ``selection_entropy_norm_l{j}``: the same divided by log2 N (N = the layer's neurons).
- ``group_mi_l{j}``: mutual information in bits between the selected neuron and the group of the
  clip's true class (``class_groups``); clips whose class has no group are left out. At most
  min(H(neuron), H(group)); H(group) when the neuron tells the group.
- ``temporal_share_gap_l{j}``: the mean temporal share of the neuron each clip went through, on
  clips whose true class is temporal-subtle minus on spatial-subtle ones (> 0: temporal classes
  are routed to more temporal neurons). Skipped without a temporal share or without clips of
  both kinds.

A layer without per-clip selection (``synapse="average_all"``) gives nothing; group-based keys
need ``class_groups`` and one label per selected clip.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

LAYER_KEY = re.compile(r"dsts/layer(\d+)/selection")


def score(
    diagnostics: list[dict],
    labels: Tensor,
    preds: Tensor,
    class_names: list[str],
    class_groups: dict,
    evidence: list[dict | None] | None = None,
) -> dict[str, float]:
    """The mechanism scores above (see :mod:`finegrain.models.spec` for the signature)."""
    layers = sorted(
        {int(m[1]) for d in diagnostics for k in d if (m := LAYER_KEY.fullmatch(str(k)))}
    )
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    out: dict[str, float] = {}
    for j in layers:
        out.update(_layer(j, diagnostics, labels, class_names, class_groups or {}))
    return out


def _layer(j, diagnostics, labels, class_names, class_groups) -> dict[str, float]:
    key = f"dsts/layer{j}"
    if not all(f"{key}/selection" in d for d in diagnostics):
        return {}  # a batch without per-clip selection: the clips no longer line up
    selection = torch.cat([_long(d[f"{key}/selection"]) for d in diagnostics])
    if selection.numel() == 0:
        return {}
    counts = [d[f"{key}/selected"] for d in diagnostics if f"{key}/selected" in d]
    n = int(torch.as_tensor(counts[0]).numel()) if counts else int(selection.max()) + 1
    n = max(n, int(selection.max()) + 1)
    out = {f"selection_entropy_l{j}": _entropy(selection)}
    if n > 1:
        out[f"selection_entropy_norm_l{j}"] = out[f"selection_entropy_l{j}"] / math.log2(n)
    if selection.numel() != labels.numel() or not class_groups:
        return out  # the group-based scores need one label per clip, and groups
    spec = [_spec(class_names, class_groups, i) for i in labels.tolist()]
    group = [s.get("group") for s in spec]
    known = torch.tensor([g is not None for g in group], dtype=torch.bool)
    if known.any():
        ids = {g: i for i, g in enumerate(sorted({str(g) for g in group if g is not None}))}
        g = torch.tensor([ids[str(x)] if x is not None else -1 for x in group])
        out[f"group_mi_l{j}"] = _mutual_information(selection[known], g[known])
    if all(f"{key}/temporal_share" in d for d in diagnostics):
        share = torch.cat(  # each clip: the temporal share of the neuron it went through
            [
                torch.as_tensor(d[f"{key}/temporal_share"])
                .float()
                .reshape(-1)[_long(d[f"{key}/selection"])]
                for d in diagnostics
            ]
        )
        subtlety = [s.get("subtlety") for s in spec]
        temporal = torch.tensor([s == "temporal" for s in subtlety], dtype=torch.bool)
        spatial = torch.tensor([s == "spatial" for s in subtlety], dtype=torch.bool)
        if temporal.any() and spatial.any():
            gap = share[temporal].mean() - share[spatial].mean()
            out[f"temporal_share_gap_l{j}"] = float(gap)
    return out


def _long(x) -> Tensor:
    return torch.as_tensor(x).reshape(-1).long().cpu()


def _spec(class_names, class_groups, i: int) -> dict:
    spec = class_groups.get(class_names[i]) if 0 <= i < len(class_names) else None
    return spec if isinstance(spec, dict) else {}


def _entropy(x: Tensor) -> float:
    p = torch.bincount(x).double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log2()).sum()))


def _mutual_information(a: Tensor, b: Tensor) -> float:
    """I(A; B) in bits from paired samples of two non-negative integer variables."""
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float(
        (joint[nz] * (joint[nz] / (pa * pb).expand_as(joint)[nz]).log2()).sum().clamp(min=0.0)
    )


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """The paper's claims on the last layer: neurons specialise (the selected neuron tells the
    class group: MI's 95 % interval above 0, selection not uniform) and temporal classes go to
    more temporal neurons (the temporal-share gap's interval above 0)."""
    layers = sorted(int(k.rsplit("_l", 1)[1]) for k in scores if k.startswith("group_mi_l"))
    if not layers:
        return "not scored (no per-clip neuron selection)"
    j = layers[-1]
    mi, mi_lo, _ = scores[f"group_mi_l{j}"]
    ent = scores.get(f"selection_entropy_norm_l{j}", (float("nan"),) * 3)[0]
    special = mi_lo > 0 and ent < 0.95
    parts = [
        f"specialisation {'holds' if special else 'not shown'} (layer {j}: neuron-group MI "
        f"{mi:.2f} bit, 95 % CI from {mi_lo:.2f}; selection entropy {ent:.2f} of uniform)"
    ]
    if f"temporal_share_gap_l{j}" in scores:
        gap, lo, hi = scores[f"temporal_share_gap_l{j}"]
        parts.append(
            f"temporal routing {'holds' if lo > 0 else 'not shown'} (temporal-share gap "
            f"{gap:+.2f}, 95 % CI [{lo:+.2f}, {hi:+.2f}])"
        )
    return "; ".join(parts)
