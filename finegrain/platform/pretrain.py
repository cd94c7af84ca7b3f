"""The project's pretrained backbone: a one-pass run on the pretraining set, its backbone saved.

:func:`pretrain` trains ``cfg`` (the ``pretrain_synthetic`` config: the synthetic generator's
coarse classes, disjoint from the fine-grained benchmark's) through the normal trainer, then
:func:`save_backbone` writes the backbone of the run's best checkpoint as an ordinary state dict
(the :class:`~finegrain.models.backbones.Backbone` wrapper's key names, loadable with
``torch.load(weights_only=True)`` and ``model.weights``), with a JSON sidecar of its provenance.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from finegrain.platform.config import ExperimentConfig


def save_backbone(checkpoint: str | Path, out: str | Path) -> str:
    """The ``backbone.*`` tensors of a training checkpoint, prefix stripped, saved to ``out``;
    returns the file's sha256 (which depends on the file's name too: torch.save names the zip
    archive inside after it)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = state["model"] if "model" in state else state
    backbone = {
        k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")
    }
    if not backbone:
        raise ValueError(f"{checkpoint}: no backbone.* weights in it")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous().clone() for k, v in sorted(backbone.items())}, out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def pretrain(
    cfg: ExperimentConfig, out: str | Path, *, address: str | None = None
) -> dict[str, Any]:
    """Train ``cfg`` (one-pass) and save its best epoch's backbone to ``out``. Returns what the
    sidecar JSON records."""
    from finegrain.platform import tracking
    from finegrain.platform.train import run_experiment

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = cfg.run.name or f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_experiment(cfg, address=address)
    best = result.run_dir / "best.pt"
    state = torch.load(best, map_location="cpu", weights_only=False)
    out = Path(out).absolute()
    sha = save_backbone(best, out)
    root = Path(__file__).resolve().parents[2]
    made = {
        "path": str(out.relative_to(root)) if out.is_relative_to(root) else str(out),
        "sha256": sha,
        "epoch": int(state["epoch"]) + 1,
        "val/top1": 100 * float(state["best_top1"]),  # the best epoch's, in % (a fraction there)
        "classes": cfg.data.synthetic.classes,
        "mlflow_run": result.run_id,
        "config": cfg.model_dump(mode="json"),
        "command": "python experiments/pretrain.py",
        # deterministic for a seed *and* the code: the shipped file (added in c5d6edd, epoch 32,
        # 69.3 %) is not what later code makes (2026-12-02: epoch 26, 66.1 %), so record the code
        "commit": tracking.git_commit(),
    }
    out.with_suffix(".json").write_text(json.dumps(made, indent=1) + "\n")
    return made
