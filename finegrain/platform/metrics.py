"""Evaluation metrics: views of one video averaged, then torchmetrics.

The validation pipeline emits several views per video (clips × crops) tagged with the video id;
each rank evaluates its share of the views, rank 0 gathers them, :func:`average_views` averages
the softmax of the views of each video, and :func:`classification_metrics` computes top-1, top-5,
mean class accuracy, the confusion matrix, per-class accuracy and — for the synthetic benchmark —
accuracy on its spatial-subtle and temporal-subtle classes and the share of errors that stay
inside the true class's confusable group.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import torch
from torch import Tensor


def average_views(
    logits: Tensor, labels: Tensor, video_ids: Sequence[str]
) -> tuple[Tensor, Tensor, list[str]]:
    """Mean softmax over the views of each video → (probs (V, K), labels (V,), ids)."""
    order: dict[str, int] = {}
    index = torch.tensor([order.setdefault(v, len(order)) for v in video_ids], dtype=torch.long)
    probs = torch.softmax(logits.float(), dim=1)
    sums = torch.zeros(len(order), probs.shape[1]).index_add_(0, index, probs)
    counts = torch.zeros(len(order)).index_add_(0, index, torch.ones(len(index)))
    video_labels = torch.empty(len(order), dtype=torch.long)
    video_labels[index] = labels.long()
    return sums / counts[:, None], video_labels, list(order)


def classification_metrics(
    probs: Tensor,
    labels: Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    class_groups: dict[str, dict] | None = None,
) -> dict:
    """Scalars under their MLflow names (``loss``: cross-entropy of the view-averaged
    probabilities), plus ``confusion`` (K, K) and ``per_class`` (K,)."""
    # imported here, not with the module: torchmetrics imports scipy.signal and matplotlib
    # (~2 s on a 2-core machine), which the processes that only import this module for its
    # names — every Tune trial's actor, every command's driver — never use
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
    )

    k = num_classes
    out: dict = {
        "top1": multiclass_accuracy(probs, labels, k, average="micro").item(),
        "top5": multiclass_accuracy(probs, labels, k, average="micro", top_k=min(5, k)).item(),
        "mean_class_acc": multiclass_accuracy(probs, labels, k, average="macro").item(),
        # the validation loss: cross-entropy of the view-averaged prediction of each video
        "loss": torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
    }
    out["per_class"] = multiclass_accuracy(probs, labels, k, average="none")
    out["confusion"] = multiclass_confusion_matrix(probs, labels, k)
    if class_groups and class_names:
        out.update(group_metrics(probs.argmax(1), labels, class_names, class_groups))
    return out


def group_metrics(
    pred: Tensor, labels: Tensor, class_names: Sequence[str], class_groups: dict[str, dict]
) -> dict[str, float]:
    """Accuracy on spatial-subtle / temporal-subtle classes; share of in-group errors."""
    subtlety = [class_groups.get(n, {}).get("subtlety") for n in class_names]
    group = [class_groups.get(n, {}).get("group") for n in class_names]
    out = {}
    for kind in ("spatial", "temporal"):
        mask = torch.tensor([subtlety[y] == kind for y in labels.tolist()], dtype=torch.bool)
        if mask.any():
            out[f"{kind}_top1"] = (pred[mask] == labels[mask]).float().mean().item()
    wrong = (pred != labels).nonzero().flatten().tolist()
    if wrong:
        same = sum(group[pred[i]] == group[labels[i]] for i in wrong)
        out["in_group_error_share"] = same / len(wrong)
    return out


PER_VIDEO_FILE = "per_video.csv"  # logged as eval/per_video.csv: video_id, label, pred, correct


def per_video_rows(video_ids: Sequence[str], labels: Tensor, preds: Tensor) -> list[dict]:
    """Each validation video's label and view-averaged prediction."""
    return [
        {"video_id": v, "label": int(y), "pred": int(p), "correct": int(y == p)}
        for v, y, p in zip(video_ids, labels.tolist(), preds.tolist(), strict=True)
    ]


def per_video_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["video_id", "label", "pred", "correct"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["video_id"]))
    return out.getvalue()


def read_per_video(text: str) -> dict[str, int]:
    """``per_video.csv`` → ``{video_id: 1 if correct else 0}``."""
    return {row["video_id"]: int(row["correct"]) for row in csv.DictReader(io.StringIO(text))}
