"""U2S's mechanism, checked against the synthetic benchmark's ground truth.

The paper argues that the class similarity matrix (CSM), built from the universal network's
channel sparsity, finds the classes that are confusable with each other, so that the mask network
can attend to what separates them. The benchmark knows the confusable classes: those of the same
group (``class_groups``). The model's diagnostic ``csm`` (K, K) (emitted once the CSM exists,
from stage 2 on) is read as a set of **unordered** pairs {i, j}, i != j: a pair is predicted when
``C_ij >= 0.5`` or ``C_ji >= 0.5`` (a soft matrix is thresholded at 0.5; the diagonal, always 1,
is ignored). U2S's CSM is symmetric (cosine similarity), so unordered pairs count each confusion
once. The true pairs are the unordered pairs of different classes of the same group. Only classes
with a group in ``class_groups`` are scored (a pair with a class of unknown group is ignored).

- ``csm_pairs``: the number of predicted pairs (among the scored classes).
- ``csm_precision``: the share of predicted pairs that are true (skipped when none is predicted).
- ``csm_recall``: the share of true pairs that are predicted (skipped when there is none).

The CSM is a buffer, the same in every batch of an evaluation: the last batch's is read.
"""

from __future__ import annotations

import torch
from torch import Tensor


def score(
    diagnostics: list[dict],
    labels: Tensor,
    preds: Tensor,
    class_names: list[str],
    class_groups: dict,
    evidence: list[dict | None] | None = None,
) -> dict[str, float]:
    """The mechanism scores above (see :mod:`finegrain.models.spec` for the signature)."""
    csms = [d["csm"] for d in diagnostics if "csm" in d]
    if not csms or not class_groups:
        return {}
    csm = torch.as_tensor(csms[-1]).detach().cpu().float()
    k = len(class_names)
    if csm.dim() != 2 or csm.shape != (k, k):
        return {}
    group = [_group(class_groups.get(n)) for n in class_names]
    predicted = (csm >= 0.5) | (csm >= 0.5).T
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if group[i] and group[j]]
    hits = sum(bool(predicted[i, j]) and group[i] == group[j] for i, j in pairs)
    n_pred = sum(bool(predicted[i, j]) for i, j in pairs)
    n_true = sum(group[i] == group[j] for i, j in pairs)
    out = {"csm_pairs": float(n_pred)}
    if n_pred:
        out["csm_precision"] = hits / n_pred
    if n_true:
        out["csm_recall"] = hits / n_true
    if pairs:  # what a CSM of random pairs would score
        out["csm_chance_precision"] = n_true / len(pairs)
    return out


def verdict(scores: dict[str, tuple[float, float, float]]) -> str:
    """The paper's claim — the CSM finds the classes a class is confused with — against the
    benchmark's groups: precision above what random pairs would give (its 95 % interval)."""
    if "csm_precision" not in scores or "csm_chance_precision" not in scores:
        return "not scored (no CSM with predicted pairs)"
    p, lo, _ = scores["csm_precision"]
    chance = scores["csm_chance_precision"][0]
    recall = scores.get("csm_recall", (float("nan"),) * 3)[0]
    holds = lo > chance
    return (
        f"{'holds' if holds else 'not shown'}: CSM pairs are {100 * p:.0f} % true confusable "
        f"pairs (95 % CI from {100 * lo:.0f} %; random pairs: {100 * chance:.0f} %), "
        f"recall {100 * recall:.0f} %"
    )


def _group(spec) -> str | None:
    if isinstance(spec, dict) and spec.get("group") is not None:
        return str(spec["group"])
    return None
