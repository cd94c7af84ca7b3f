"""Hyperparameter sweeps: Ray Tune + Optuna (TPE) + ASHA around :func:`run_experiment`.

Each trial is a function trainable that runs a ``TorchTrainer`` (the Ray 2.60 pattern: Train V2
trainers cannot be handed to ``Tuner`` directly) and reports every epoch to Tune through
``ray.tune.integration.ray_train.TuneReportCallback``; ASHA stops weak trials early on val top-1.

MLflow: one parent run per sweep (search space, best config, results table, parallel-coordinates
and importance pictures) with one child run per trial. With the embedded SQLite store the sweep
starts a local ``mlflow server`` (one worker) and every trial logs over HTTP: one process owns
the SQLite file, so concurrent trials never hit "database is locked". Child runs are keyed by
trial name, so ``--resume`` (``Tuner.restore``) neither reruns finished trials nor duplicates
their runs; trials that ASHA stopped end as KILLED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finegrain.platform import tracking
from finegrain.platform.config import ConfigError, ExperimentConfig, validate

# The shared learning-rate and weight-decay ranges, per optimizer: SGD with momentum wants rates
# some 20x larger than AdamW, and AdamW's decoupled decay is used 10-100x stronger.
LR_WD = {
    "optim.lr": {"type": "loguniform", "low": 3e-3, "high": 0.2},
    "optim.weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
}
LR_WD_ADAMW = {
    "optim.lr": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
    "optim.weight_decay": {"type": "loguniform", "low": 1e-3, "high": 0.1},
}

DEFAULT_SPACES: dict[str, dict[str, dict]] = {
    "dsts": {
        "model.neurons": {"type": "int", "low": 2, "high": 16},
        "model.layers": {"type": "int", "low": 1, "high": 5},
        "model.impulse": {"type": "choice", "values": ["sum", "mean"]},
        "model.tau": {"type": "loguniform", "low": 0.25, "high": 4.0},
        "model.udl": {"type": "choice", "values": [True, False]},
        "model.udl_inner_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1},
        **LR_WD,
    },
    "onepass": {"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.7}, **LR_WD},
    "u2s": {
        "model.confusers": {"type": "int", "low": 1, "high": 5},
        "model.lam": {"type": "loguniform", "low": 0.05, "high": 2.0},
        **LR_WD,
    },
    "dfb": {"model.filters_per_class": {"type": "int", "low": 1, "high": 10}, **LR_WD},
    "classreg": {
        **{f"model.gamma.{i}": {"type": "uniform", "low": 0.0, "high": 0.6} for i in range(4)},
        **LR_WD,
    },
    "joint_attn": {
        "model.lam": {"type": "loguniform", "low": 10.0, "high": 3000.0},
        "model.hidden": {"type": "choice", "values": [128, 256, 512]},
        "model.fusion": {"type": "choice", "values": ["early", "late"]},
        **LR_WD,
    },
}


def to_tune_space(space: dict[str, dict]) -> dict[str, Any]:
    """``{"model.neurons": {"type": "int", "low": 2, "high": 16}}`` → Ray Tune domains."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        try:
            if kind == "int":
                out[key] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)  # inclusive
            elif kind == "uniform":
                out[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
            elif kind == "loguniform":
                out[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
            elif kind == "choice":
                out[key] = tune.choice(list(spec["values"]))
            else:
                raise ConfigError(
                    f"search space {key!r}: type must be int, uniform, loguniform or choice; "
                    f"got {spec!r}"
                )
        except KeyError as e:
            raise ConfigError(f"search space {key!r}: missing {e.args[0]!r} in {spec!r}") from None
    return out


def load_space(path: str | None, method: str, optimizer: str = "sgd") -> dict[str, dict]:
    """The YAML file's space, else the method's default with ``optimizer``'s LR/WD ranges."""
    if path is None:
        space = DEFAULT_SPACES[method]
        return {**space, **LR_WD_ADAMW} if optimizer == "adamw" else space
    raw = yaml.safe_load(Path(path).read_text()) or {}
    space = raw.get("space", raw)
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: expected a mapping 'space: {{field: {{type: ...}}}}'")
    return space


def apply_params(base: dict, params: dict[str, Any]) -> ExperimentConfig:
    """Set dotted keys (``model.neurons``; ``model.gamma.0`` builds a list) on a config dict."""
    raw = json.loads(json.dumps(base))
    lists: dict[tuple[str, ...], dict[int, Any]] = {}
    for key, value in params.items():
        parts = key.split(".")
        if parts[-1].isdigit():
            lists.setdefault(tuple(parts[:-1]), {})[int(parts[-1])] = value
            continue
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _plain(value)
    for parts, items in lists.items():
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = [_plain(items[i]) for i in sorted(items)]
    return validate(raw)


def _plain(value):
    """numpy scalars (from the searchers) → Python values, so the config validates."""
    return value.item() if hasattr(value, "item") else value


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    best_params: dict[str, Any]
    best_top1: float
    baseline_top1: float | None
    tracking_uri: str
    table: Any  # pandas.DataFrame


def trial_function(params: dict, *, base: dict, sweep: str, parent: str, uri: str) -> None:
    """One trial: the sampled params on the base config → ``run_experiment`` in this actor."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from finegrain.platform.train import run_experiment

    cfg = apply_params(base, params)
    trial = tune.get_context().get_trial_name()
    cfg.run.name = f"{sweep}-{trial}"
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.parent_run_id = parent
    run_experiment(cfg, callbacks=[TuneReportCallback()], quiet=True)


def run_sweep(
    base: ExperimentConfig,
    *,
    space: dict[str, dict],
    num_samples: int,
    max_concurrent: int,
    time_budget: float | None = None,
    resume: str | None = None,
    name: str | None = None,
    baseline: bool = True,
    seed: int = 0,
) -> SweepResult:
    """Run (or resume) a sweep of ``base.model.method`` over ``space``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from finegrain.platform.data import bad_video_note, own_bad_video_log, prepare_data
    from finegrain.platform.train import check_model, ensure_ray

    method = base.model.method
    root = tracking.run_root(base.run.dir)
    sweeps = root / "tune"
    if resume:
        name = _resolve_resume(sweeps, resume)
    name = name or f"tune-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweeps / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweeps / "LATEST").write_text(name)
    tune_space = to_tune_space(space)
    # every sampled value must validate before any trial starts
    for key in space:
        if key.split(".")[0] not in ExperimentConfig.model_fields:
            raise ConfigError(f"search space {key!r}: not a config field (section.field)")
    check_model(base)
    prepare_data(base)  # once, in the driver: the trials find the shards cached
    ensure_ray(base, concurrent_runs=max_concurrent)
    own_bad_video_log()

    with tracking_server(base) as uri:
        parent = _parent_run(uri, base, name, space, num_samples)
        print(f"sweep {name}: MLflow parent run {parent} in {uri}", flush=True)
        trainable = tune.with_parameters(
            trial_function, base=base.model_dump(mode="json"), sweep=name, parent=parent, uri=uri
        )
        # the trial itself only waits for its TorchTrainer: a token CPU share
        trainable = tune.with_resources(trainable, {"CPU": 0.25})
        storage = str(sweeps)
        if resume and tune.Tuner.can_restore(str(sweep_dir)):
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True)
            print(f"resuming sweep {name} from {sweep_dir}", flush=True)
        else:
            searcher = ConcurrencyLimiter(
                OptunaSearch(metric="val_top1", mode="max", seed=seed), max_concurrent
            )
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=base.optim.epochs,
                grace_period=1,
                reduction_factor=2,
            )
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space,
                tune_config=tune.TuneConfig(
                    metric="val_top1",
                    mode="max",
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    time_budget_s=time_budget,
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
            )
        try:
            with graceful_interrupt() as interrupted:
                results = tuner.fit()
            if interrupted.is_set():  # Tune stopped the trials and saved its state
                raise SweepInterrupted(name)
        except BaseException as e:
            close_stopped_children(uri, parent)
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.close_run(uri, parent, status)
            raise
        close_stopped_children(uri, parent)
        table = _results_table(results)
        if table["val_best_top1"].isna().all():
            raise RuntimeError(
                "no trial finished an epoch: raise --time-budget or make trials cheaper "
                f"(the sweep is in {sweep_dir}; --resume {name} continues it)"
            )
        best = results.get_best_result(metric="val_best_top1", mode="max")
        best_params = {k: _plain(v) for k, v in best.config.items()}
        best_top1 = float(best.metrics.get("val_best_top1", float("nan")))
        baseline_top1 = _baseline(base, uri, parent, name) if baseline else None
        _log_sweep(uri, parent, space, table, best_params, best_top1, baseline_top1)
        tracking.close_run(uri, parent, "FINISHED")
    count, note = bad_video_note()
    if count:
        print(f"note: {note}", flush=True)
    return SweepResult(
        name, parent, best_params, best_top1, baseline_top1, _display_uri(base), table
    )


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl+C during a sweep: Tune saved its state; ``--resume NAME`` continues it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"sweep {name} interrupted; --resume {name} continues it")
        self.name = name


@contextlib.contextmanager
def graceful_interrupt():
    """Ctrl+C → Tune's graceful stop (SIGUSR1), and an event saying that it happened.

    On SIGINT ``Tuner.fit`` stops the trials, saves the experiment state and *returns*, like a
    finished sweep; the sweep must then end as KILLED, not pick a "best" trial and log it. Tune's
    own SIGINT handler is turned off and ours forwards to its SIGUSR1 handler, noting the
    interrupt. A second Ctrl+C falls to the previous handler (KeyboardInterrupt).
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signals only reach the main thread; nothing to catch
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(sig, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
        os.kill(os.getpid(), signal.SIGUSR1)

    saved = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved


def _display_uri(base: ExperimentConfig) -> str:
    return tracking.resolve_tracking_uri(base.tracking.mlflow_uri, base.run.dir)


@contextlib.contextmanager
def tracking_server(base: ExperimentConfig):
    """The HTTP URI trials log to: the configured server, or a local one over the SQLite store.

    Ray must be up: a server on this machine's loopback gets its relay (``tracking.start_relay``)
    so that trials and rank-0 workers on other nodes reach it.
    """
    uri = _display_uri(base)
    if not uri.startswith("sqlite:"):
        tracking.start_relay(uri)  # a server on this machine's loopback: other nodes need it
        yield uri
        return
    root = tracking.run_root(base.run.dir)
    server = tracking.LocalServer(uri, tracking.artifact_root(base.run.dir), root / "mlflow.log")
    with server as http_uri:
        tracking.start_relay(http_uri)
        yield http_uri


def _resolve_resume(sweeps: Path, resume: str) -> str:
    if resume == "latest":
        latest = sweeps / "LATEST"
        if not latest.is_file():
            raise ConfigError(f"--resume: no sweep to resume under {sweeps}")
        return latest.read_text().strip()
    if not (sweeps / resume).is_dir():
        known = sorted(p.name for p in sweeps.glob("*") if p.is_dir()) if sweeps.is_dir() else []
        raise ConfigError(f"--resume {resume!r}: no such sweep; known: {', '.join(known) or '-'}")
    return resume


def _parent_run(uri, base: ExperimentConfig, name: str, space: dict, num_samples: int) -> str:
    run_id = tracking.open_run(
        uri,
        base.tracking.experiment,
        name,
        base.run.dir,
        tags={"method": base.model.method, "backbone": base.model.backbone, "sweep": "parent"},
        params={"num_samples": num_samples, **{f"base.{k}": v for k, v in base.flat().items()}},
    )
    tracking.RunLogger(uri, run_id).text(
        yaml.safe_dump(space, sort_keys=False), "search_space.yaml"
    )
    return run_id


def close_stopped_children(uri: str, parent: str) -> None:
    """End the child runs that Tune's stopped trials left RUNNING.

    A stopped trial dies with its actor, before its ``run_experiment`` closes the run. A trial
    that reported its last epoch (ASHA says STOP at ``max_t`` = the last epoch, too) is complete:
    FINISHED. One stopped earlier — by ASHA, the time budget or Ctrl+C — is KILLED and tagged
    ``early_stopped``. The loop tags each run with its ``total_epochs``.
    """
    client = tracking.tracking_client(uri)
    parent_run = client.get_run(parent)
    children = client.search_runs(
        [parent_run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
    )
    for run in children:
        run_id, total = run.info.run_id, run.data.tags.get("total_epochs")
        done = max((m.step for m in client.get_metric_history(run_id, "val_top1")), default=0)
        if total is not None and done >= int(total):
            client.set_terminated(run_id, status="FINISHED")
            continue
        client.set_tag(run_id, "early_stopped", "true")
        client.set_terminated(run_id, status="KILLED")


def _results_table(results):
    import pandas as pd

    df = results.get_dataframe(filter_metric="val_best_top1", filter_mode="max")
    if "val_best_top1" not in df.columns:  # no trial finished an epoch (time budget too small)
        df["val_best_top1"] = pd.NA
    keep = [c for c in df.columns if c.startswith("config/")]
    keep += [c for c in ("val_best_top1", "val_top1", "epoch", "trial_id") if c in df.columns]
    df = df[keep].rename(columns=lambda c: c.removeprefix("config/"))
    return df.sort_values("val_best_top1", ascending=False).reset_index(drop=True)


def _baseline(base: ExperimentConfig, uri: str, parent: str, name: str) -> float:
    """The one-pass baseline on the same data and schedule (a child run of the sweep)."""
    from finegrain.platform.train import run_experiment

    raw = base.model_dump(mode="json")
    raw["model"] = {"method": "onepass", "backbone": base.model.backbone}
    cfg = validate(raw)
    cfg.run.name = f"{name}-baseline-onepass"
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.parent_run_id = parent
    print("training the one-pass baseline on the same data ...", flush=True)
    result = run_experiment(cfg, quiet=True)
    return float(result.metrics.get("val_best_top1", float("nan")))


def _log_sweep(uri, parent, space, table, best_params, best_top1, baseline_top1) -> None:
    logger = tracking.RunLogger(uri, parent)
    logger.text(yaml.safe_dump(best_params, sort_keys=False), "best_config.yaml")
    logger.text(table.to_csv(index=False), "results.csv")
    logger.text(table.to_string(index=False), "results.txt")
    metrics = {"best_val_top1": best_top1}
    if baseline_top1 is not None:
        metrics["baseline_val_top1"] = baseline_top1
    logger.metrics(metrics, step=0)
    for fig_name, fig in sweep_figures(table, space).items():
        logger.figure(fig, f"{fig_name}.png")
    import matplotlib.pyplot as plt

    plt.close("all")


def sweep_figures(table, space: dict[str, dict]) -> dict:
    """Optuna's parallel-coordinates and hyperparameter-importance plots of the finished trials.

    The results are replayed into an in-memory Optuna study so Optuna's own plotting and
    importance code (fANOVA) can be used as is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    from optuna.visualization import matplotlib as ovm

    dists = {}
    for key, spec in space.items():
        if key not in table.columns:
            continue
        if spec["type"] == "int":
            dists[key] = IntDistribution(int(spec["low"]), int(spec["high"]))
        elif spec["type"] == "choice":
            dists[key] = CategoricalDistribution(list(spec["values"]))
        else:
            log = spec["type"] == "loguniform"
            dists[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=log)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in table.dropna(subset=["val_best_top1"]).iterrows():
        params = {k: _plain(row[k]) for k in dists}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, value=float(row["val_best_top1"])
            )
        )
    out = {}
    if len(study.trials) >= 2 and dists:
        with contextlib.suppress(Exception):  # a picture never fails a sweep
            out["parallel_coordinates"] = ovm.plot_parallel_coordinate(study).figure
        with contextlib.suppress(Exception):
            out["param_importances"] = ovm.plot_param_importances(study).figure
    return out
