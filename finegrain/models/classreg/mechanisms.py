"""Class Regularization's mechanism: do the blocks pick the class the network ends up predicting?

The paper argues that each block excites the channels of the class it believes in, and that this
belief sharpens with depth. The model's diagnostic ``chosen_class`` (B, blocks) holds, per clip,
the class each block selected (shallow to deep); the blocks' stages are read from the keys
``agreement_stage{s}`` the model emits beside it (one per block, in block order).

- ``agreement_stage{s}``: the share of the evaluated clips whose block at stage ``s`` selected
  the final prediction (``preds``, the argmax of every clip's logits).
- ``agreement_gap``: the deepest block's agreement minus the shallowest's (with 2+ blocks).

Without stage keys matching the blocks, the keys are ``agreement_block{j}`` (j: block index).
Needs no ground truth, so it is scored on real datasets too.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

STAGE_KEY = re.compile(r"agreement_stage(\d+)")


def score(
    diagnostics: list[dict],
    labels: Tensor,
    preds: Tensor,
    class_names: list[str],
    class_groups: dict,
    evidence: list[dict | None] | None = None,
) -> dict[str, float]:
    """The mechanism scores above (see :mod:`finegrain.models.spec` for the signature)."""
    if not diagnostics or not all("chosen_class" in d for d in diagnostics):
        return {}
    chosen = [torch.as_tensor(d["chosen_class"]).detach().cpu().long() for d in diagnostics]
    if any(c.dim() != 2 or c.shape[1] != chosen[0].shape[1] for c in chosen):
        return {}
    chosen = torch.cat(chosen)  # (clips, blocks)
    preds = torch.as_tensor(preds).detach().cpu().long().reshape(-1)
    if chosen.shape[0] != preds.numel() or chosen.shape[0] == 0 or chosen.shape[1] == 0:
        return {}
    agreement = (chosen == preds.unsqueeze(1)).double().mean(dim=0).tolist()
    stages = [int(m[1]) for k in diagnostics[0] if (m := STAGE_KEY.fullmatch(str(k)))]
    if len(stages) == len(agreement):
        names = [f"agreement_stage{s}" for s in stages]
    else:
        names = [f"agreement_block{j}" for j in range(len(agreement))]
    out = dict(zip(names, agreement))
    if len(agreement) > 1:
        out["agreement_gap"] = agreement[-1] - agreement[0]
    return out


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """The paper's claim: the per-stage class choices agree with the final decision, more so
    with depth (the agreement gap's 95 % interval above 0)."""
    stages = sorted(k for k in scores if k.startswith("agreement_stage"))
    if not stages:
        return "not scored (no ClassReg block)"
    deep = scores[stages[-1]][0]
    if "agreement_gap" not in scores:
        return f"one block only: its class agrees with the prediction on {100 * deep:.0f} %"
    gap, lo, hi = scores["agreement_gap"]
    return (
        f"{'holds' if lo > 0 else 'not shown'}: the deepest block agrees with the prediction on "
        f"{100 * deep:.0f} % of clips, {100 * gap:+.0f} points more than the shallowest "
        f"(95 % CI [{100 * lo:+.0f}, {100 * hi:+.0f}])"
    )
