"""The names of what a run reports, grouped by prefix; every accuracy in percent (0–100).

Each epoch a training run reports (to Ray Tune, and from rank 0 to MLflow, step = the epoch):

- ``val/…`` the evaluation on every validation view: ``val/top1``, ``val/top5``,
  ``val/mean_class_acc``, ``val/spatial_top1``, ``val/temporal_top1`` (synthetic benchmark),
  ``val/best_top1`` (the best ``val/top1`` so far), ``val/top1_without_precise_bn`` (last epoch)
  and ``val/branch_top1/<branch>`` (DFB's z_avg / z_max / z_xchannel) — all in %;
  ``val/loss`` (cross-entropy of the view-averaged prediction) and ``val/in_group_error_share``
  (a fraction: of the errors, those inside the true class's confusable group);
- ``train/…`` the epoch's training: ``train/loss``, ``train/clips_per_s``, ``train/lr`` (the
  rate it trained with), ``train/stage`` (the index of its stage);
- ``<method>/…`` a method's own training statistics (DSTS's UDL: ``dsts/udl_train_loss``,
  ``dsts/udl_val_loss``, ``dsts/udl_grad_norm``, ``dsts/udl_alpha``);
- ``mech/…`` the method's mechanism scores (``finegrain/models/<method>/mechanisms.py``);
- ``sys/…`` ``sys/rank_param_drift`` (0 when DDP kept the ranks identical), ``sys/bad_videos``,
  and where the epoch's time went, in seconds: ``sys/train_s``, ``sys/precise_bn_s`` and
  ``sys/eval_s`` (the last epoch's ``sys/precise_bn_s`` also holds the evaluation without it);
- ``epoch`` (Tune's time axis, MLflow's step), and for Tune only ``val/videos`` and
  ``total_epochs`` (constant over a run: MLflow has them as the tags ``val/videos`` and
  ``total_epochs``).

Runs logged before these names (``val_top1`` as a fraction, ``train_loss``, ``lr``, ...) are
still read: :func:`metric_key` maps an old name to its key and :func:`legacy_name` a key to its
old name (:func:`finegrain.platform.compare.compare` converts their fractions to %).
"""

from __future__ import annotations

from collections.abc import Mapping

TOP1 = "val/top1"  # what ASHA, Optuna and the tables rank by
BEST_TOP1 = "val/best_top1"
VIDEOS = "val/videos"
EPOCH = "epoch"
TOTAL_EPOCHS = "total_epochs"
CONSTANT = (EPOCH, TOTAL_EPOCHS, VIDEOS)  # reported to Tune; never MLflow metrics

# keys whose old name is not "<group>_<name>"
_OLD = {
    "train/lr": "lr",
    "train/stage": "stage",
    "sys/rank_param_drift": "rank_param_drift",
    "sys/bad_videos": "bad_videos",
}


def is_accuracy(key: str) -> bool:
    """A key whose value is an accuracy in % (``val/top1``, ``val/mean_class_acc``,
    ``val/branch_top1/z_avg``, ...); ``mech/`` scores and losses are not."""
    group, _, name = key.partition("/")
    return group == "val" and ("top" in name or "acc" in name)


def percent(fraction: float) -> float:
    """An accuracy in %, to 1e-4 % (one video in a million): torchmetrics' float32 fraction
    (0.44999998807907104) would show as 44.999998807907104 in Tune's table and MLflow."""
    return round(100 * float(fraction), 4)


def val_metrics(val: Mapping) -> dict[str, float]:
    """The scalars of an evaluation (:func:`finegrain.platform.metrics.classification_metrics`
    plus the evaluator's ``videos`` and ``branch_top1_<name>``, accuracies as fractions) under
    their ``val/`` keys, accuracies in %."""
    out = {}
    for name, value in val.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        key = f"val/{_branch(name)}"
        out[key] = percent(value) if is_accuracy(key) else value
    return out


def _branch(name: str) -> str:
    """``branch_top1_z_avg`` → ``branch_top1/z_avg``."""
    head = "branch_top1_"
    return f"branch_top1/{name.removeprefix(head)}" if name.startswith(head) else name


def metric_key(name: str) -> str:
    """A metric as a user or an old run names it → its key: ``top1`` / ``val_top1`` /
    ``metrics.val_top1`` → ``val/top1``; ``best_top1`` → ``val/best_top1``; ``train_loss`` →
    ``train/loss``; ``lr`` → ``train/lr``. Names with a ``/`` (``val/top5``, ``mech/…``,
    ``dsts/…``) are kept."""
    name = name.strip().removeprefix("metrics.")
    if not name or "/" in name:
        return name
    new = {old: key for key, old in _OLD.items()}
    if name in new:
        return new[name]
    for group in ("val", "train"):
        if name.startswith(f"{group}_"):
            rest = name.removeprefix(f"{group}_")
            return f"{group}/{_branch(rest) if group == 'val' else rest}"
    return f"val/{_branch(name)}"


def legacy_name(key: str) -> str | None:
    """The name runs logged ``key`` under before the grouped keys (``val/top1`` →
    ``val_top1``, then a fraction for accuracies), None when it had none."""
    if key in _OLD:
        return _OLD[key]
    group, _, name = key.partition("/")
    if group in ("val", "train") and name:
        return f"{group}_{name.replace('/', '_')}"
    return None
