"""Hyperparameter sweeps: Ray Tune + Optuna (TPE) + ASHA around :func:`run_experiment`.

Each trial is a function trainable that runs a ``TorchTrainer`` (the Ray 2.60 pattern: Train V2
trainers cannot be handed to ``Tuner`` directly) and reports every epoch to Tune through
``ray.tune.integration.ray_train.TuneReportCallback``; ASHA stops weak trials early on val top-1.
At most as many trials run at once as the cluster holds (``cluster.plan_concurrency``).

Optuna sees the truth: the space is define-by-run (a parameter with ``when`` is sampled only
when its condition holds: ``model.udl_inner_lr`` only with ``model.udl: true``), every epoch's
val top-1 is reported to the trial as an intermediate value, and a trial that ASHA (or the time
budget) stopped before its last epoch is told to Optuna as PRUNED, not as COMPLETE with an
early score: TPE ranks pruned trials by how far they got. A sampled configuration that the time
budget left could not take to a first epoch (:class:`FirstEpochBudget`) is told to Optuna as
FAIL with the reason, never started, and TPE is asked again. The study lives in
``<run dir>/tune/NAME/optuna.db`` (Optuna's RDB storage), so ``--resume`` continues the same
study and the parent run's pictures are drawn from it.

MLflow: one parent run per sweep (search space, best config, results table, parallel-coordinates
and importance pictures) with one child run per trial, closed the moment its trial ends
(:class:`finegrain.platform.sweeps.TrialRuns`). Child runs are keyed by trial id, so
``--resume`` (``Tuner.restore``) neither reruns finished trials nor duplicates their runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from finegrain.models import BASELINE, method_spec
from finegrain.platform import cluster, tracking
from finegrain.platform.config import ConfigError, ExperimentConfig, apply_params, plain, validate
from finegrain.platform.keys import BEST_TOP1, TOP1, TOTAL_EPOCHS, legacy_name
from finegrain.platform.sweeps import (
    SweepInterrupted,
    TrialRuns,
    close_stopped_children,
    graceful_interrupt,
    mark_stopping,
    no_default_loggers,
    result_loggers,
    tracking_server,
)

__all__ = [
    "default_space",
    "SweepInterrupted",
    "apply_params",
    "check_space",
    "load_space",
    "run_sweep",
]

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


def default_space(method: str, optimizer: str = "sgd") -> dict[str, dict]:
    """The method's own search space (its spec) and ``optimizer``'s LR/WD ranges."""
    return {**method_spec(method).space, **(LR_WD_ADAMW if optimizer == "adamw" else LR_WD)}


TYPES = ("int", "uniform", "loguniform", "choice")


def check_space(space: dict[str, dict]) -> dict[str, dict]:
    """Validate a search space; a problem raises :class:`ConfigError` naming the key.

    Each entry: ``{type: int|uniform|loguniform, low, high}`` or ``{type: choice, values}``,
    optionally ``when: {earlier key: value, ...}`` (sampled only when every condition holds).
    """
    if not isinstance(space, dict) or not space:
        raise ConfigError("search space: expected a mapping {section.field: {type: ...}}")
    seen: dict[str, dict] = {}
    for key, spec in space.items():
        if key.split(".")[0] not in ExperimentConfig.model_fields:
            raise ConfigError(f"search space {key!r}: not a config field (section.field)")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in TYPES:
            raise ConfigError(
                f"search space {key!r}: type must be int, uniform, loguniform or choice; "
                f"got {spec!r}"
            )
        needs = ("values",) if kind == "choice" else ("low", "high")
        for field in needs:
            if field not in spec:
                raise ConfigError(f"search space {key!r}: missing {field!r} in {spec!r}")
        if kind != "choice" and not float(spec["low"]) <= float(spec["high"]):
            raise ConfigError(f"search space {key!r}: low must be <= high in {spec!r}")
        if kind == "choice" and not list(spec["values"]):
            raise ConfigError(f"search space {key!r}: 'values' is empty")
        for other, value in (spec.get("when") or {}).items():
            if other not in seen:
                raise ConfigError(
                    f"search space {key!r}: its condition names {other!r}, which must be an "
                    "earlier key of the space"
                )
            if seen[other]["type"] == "choice" and value not in seen[other]["values"]:
                raise ConfigError(
                    f"search space {key!r}: condition {other}={value!r} is not one of "
                    f"{seen[other]['values']}"
                )
        seen[key] = spec
    return space


class DefineByRun:
    """The Optuna define-by-run function of a space (conditional keys sampled only when their
    conditions hold); a class, so Tune can pickle the searcher with it."""

    def __init__(self, space: dict[str, dict]) -> None:
        self.space = space

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for key, spec in self.space.items():
            if not applies(spec, values):
                continue
            kind = spec["type"]
            if kind == "int":
                values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]))
            elif kind == "choice":
                values[key] = trial.suggest_categorical(key, list(spec["values"]))
            else:
                values[key] = trial.suggest_float(
                    key, float(spec["low"]), float(spec["high"]), log=kind == "loguniform"
                )


def applies(spec: dict, values: dict[str, Any]) -> bool:
    """Whether a key of the space is sampled, given the values sampled before it (its
    ``when`` conditions hold)."""
    when = spec.get("when") or {}
    return all(k in values and values[k] == v for k, v in when.items())


def sampled_only(space: dict[str, dict], config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` (a whole configuration, e.g. a run's logged params) that
    ``space`` would have sampled: a conditional key whose condition failed is left out."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        if key in config and applies(spec, values):
            values[key] = config[key]
    return values


def load_space(path: str | None, method: str, optimizer: str = "sgd") -> dict[str, dict]:
    """The YAML file's space, else the method's default with ``optimizer``'s LR/WD ranges."""
    if path is None:
        return default_space(method, optimizer)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    space = raw.get("space", raw)
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: expected a mapping 'space: {{field: {{type: ...}}}}'")
    return space


# the results table's column of each trial's val/top1 at its last epoch, and the sweep parent's
# metric of the one-pass baseline's best val/top1 (both in %)
LAST_TOP1 = "val/top1_last"
BASELINE_BEST_TOP1 = "val/baseline_best_top1"
# the ``run.name`` suffix of the sweep's one-pass baseline run
BASELINE_SUFFIX = f"-baseline-{BASELINE}"


ASHA_REDUCTION = 3


class ComparedASHA(ASHAScheduler):
    """Ray's ASHA, except that no trial goes past the first rung before ``quorum`` trials
    (η, or all of a smaller sweep) have reached it.

    ASHA promotes the top 1/η of the trials at a rung — ⌊n/η⌋ of n (Li et al., 2020, Alg. 2:
    none while n < η). Ray's ASHA compares a trial with the trials recorded before it, so the
    first trial to reach a rung always goes on: when trials run one at a time (a 2-core machine),
    the first sampled configuration trains every epoch whatever its score, and in the demo that
    one (DSTS N=10, L=4 with UDL, ~50 s an epoch) took half of the 8-minute budget. Here the
    first rung needs a quorum; from then on, and at the later rungs, Ray's rule applies.
    Defined at module level: Tune pickles the scheduler into the sweep's saved state.
    """

    def __init__(self, *, quorum: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._quorum, self._first_rung = quorum, kwargs.get("grace_period", 1)
        self._reached: set[str] = set()  # trials that reported the first rung

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        at = result.get(self._time_attr)
        if at is None or self._metric not in result or at < self._first_rung:
            return action
        first = trial.trial_id not in self._reached
        self._reached.add(trial.trial_id)
        if first and action == TrialScheduler.CONTINUE and at < self._max_t:
            if len(self._reached) < self._quorum:
                self._num_stopped += 1
                return TrialScheduler.STOP
        return action


TUNE_TRIAL_ID = "tune_trial_id"  # the Optuna trial's user attribute naming its Tune trial
NOT_STARTED = "not_started"  # ... saying why a sampled configuration never became a trial


class FirstEpochBudget:
    """What is left of a sweep's time budget, and whether a new trial could still report its
    first epoch within it.

    Tune's time budget stops whatever runs when it ends, so a trial started in its last minute
    is stopped before it reports anything: its ~30 s of start-up (trial actor, Train V2
    controller and worker group, decode actors) and its partial epoch are lost, and the sweep
    ends no sooner. Here no trial starts once the budget left is shorter than the time a trial
    of its kind took from its start to its first result — the quickest such trial so far, a
    lower bound for the next one. A trial's kind is its categorical choices (DSTS's
    ``model.udl``: in the demo a UDL trial took 95–122 s to its first epoch, a plain one
    47–68 s), or any kind while its configuration is unknown or no trial of its kind has
    reported. Tune has no such rule, and Optuna's pruners act on running trials, not on
    starting them.

    The clock runs like Tune's ``TimeoutStopper``: from the first check, across ``--resume``
    with what was left (a restored copy restarts its clock and forgets trials in flight).
    """

    def __init__(self, seconds: float) -> None:
        self.left = float(seconds)
        self.quickest: float | None = None  # seconds from a trial's start to its first result
        self.quickest_of: dict[tuple, float] = {}  # the same, per kind of trial
        self._tick: float | None = None
        self._started: dict[str, tuple[float, tuple]] = {}

    def _elapse(self) -> float:
        now = time.time()
        if self._tick is not None:
            self.left -= now - self._tick
        self._tick = now
        return now

    def needed(self, kind: tuple | None = None) -> float | None:
        """The least a trial of ``kind`` (None: of any) has taken to its first result."""
        return self.quickest_of.get(kind, self.quickest) if kind is not None else self.quickest

    def fits(self, kind: tuple | None = None) -> bool:
        """Whether a trial of ``kind`` (None: of any) could report its first epoch in time."""
        self._elapse()
        return (needed := self.needed(kind)) is None or self.left >= needed

    def admits(self, trial_id: str, kind: tuple = ()) -> bool:
        """Whether trial ``trial_id`` of ``kind`` may start now (it is timed from here if so)."""
        if not self.fits(kind):
            return False
        self._started[trial_id] = (self._tick, kind)
        return True

    def first_result(self, trial_id: str) -> None:
        """Trial ``trial_id`` reported (its first result times it; later ones do nothing)."""
        began, kind = self._started.pop(trial_id, (None, ()))
        if began is not None:
            taken = self._elapse() - began
            self.quickest = taken if self.quickest is None else min(self.quickest, taken)
            self.quickest_of[kind] = min(self.quickest_of.get(kind, taken), taken)

    def __setstate__(self, state: dict) -> None:
        state["_tick"], state["_started"] = None, {}
        state.setdefault("quickest_of", {})  # (a sweep saved before kinds were timed)
        self.__dict__.update(state)


def trial_kind(ot_trial) -> tuple:
    """An Optuna trial's categorical choices, ``(("model.udl", True),)``: what sets a
    configuration's cost apart most (numbers in a range change it by degrees)."""
    from optuna.distributions import CategoricalDistribution

    return tuple(
        sorted(
            (name, ot_trial.params[name])
            for name, dist in ot_trial.distributions.items()
            if isinstance(dist, CategoricalDistribution)
        )
    )


def _kind_text(kind: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in kind) or "its kind"


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    best_params: dict[str, Any]
    best_top1: float  # val/best_top1 of the best trial, in %
    baseline_top1: float | None  # the one-pass baseline's, in %
    tracking_uri: str
    table: Any  # pandas.DataFrame
    # how the trials ended, counted: finished, stopped, unstarted, failed
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)

    def accounting(self) -> str:
        """One line that accounts for every trial of the sweep, e.g. "6 trials: 3 ran all
        their epochs, 2 stopped early (ASHA or the time budget), 1 stopped before its first
        epoch (the time budget), 0 failed"."""
        o = self.outcomes
        n, unstarted = sum(o.values()), o.get("unstarted", 0)
        return (
            f"{n} trial{'s' * (n != 1)}: {o.get('finished', 0)} ran all their epochs, "
            f"{o.get('stopped', 0)} stopped early (ASHA or the time budget), "
            f"{unstarted} stopped before {'its' if unstarted == 1 else 'their'} first epoch "
            f"(the time budget), {o.get('failed', 0)} failed"
        )


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def display_name(sweep: str, what: str) -> str:
    """A sweep child's name in MLflow's UI: what tells it apart first (the runs table cuts
    long names at the end, where ``{sweep}-{trial id}`` had it), e.g. ``ac9c5f11 · tune-dsts-…``.
    The run's ``run.name`` (its tag) stays ``{sweep}-{trial id}``."""
    return f"{what} · {sweep}"


def child_name(run) -> str:
    """The ``run.name`` of a sweep's child run (its tag; the UI shows :func:`display_name`)."""
    return run.data.tags.get(tracking.RUN_NAME_TAG) or run.info.run_name or ""


def trial_function(params: dict, *, base: dict, sweep: str, parent: str, uri: str) -> None:
    """One trial: the sampled params on the base config → ``run_experiment`` in this actor."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from finegrain.platform.logs import quiet_ray_logs
    from finegrain.platform.train import run_experiment

    quiet_ray_logs()
    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    cfg.run.name = trial_run_name(sweep, trial_id)
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.parent_run_id = parent
    run_experiment(
        cfg,
        callbacks=[TuneReportCallback()],
        quiet=True,
        in_trial=True,
        display_name=display_name(sweep, trial_id),
    )


def _optuna_search_class():
    from optuna.trial import TrialState
    from ray.tune.result import TRAINING_ITERATION
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class TruthfulOptunaSearch(OptunaSearch):
        """``OptunaSearch`` that tells Optuna a trial stopped before its last epoch (by ASHA or
        the time budget) is PRUNED; its per-epoch val top-1 are its intermediate values. With a
        :class:`FirstEpochBudget` it starts no trial that could not report an epoch in time."""

        budget: FirstEpochBudget | None = None  # (also in a sweep saved before budgets)
        # configurations sampled per trial before the sweep ends for lack of time: each
        # refused one is a new draw from TPE, so a cheaper kind may still fit
        ASKS = 3

        def __init__(self, *args, budget: FirstEpochBudget | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.budget = budget

        def suggest(self, trial_id):
            if (b := self.budget) is not None and not b.fits():
                print(
                    f"no new trials: {max(b.left, 0):.0f} s of the time budget left, less than "
                    f"the quickest trial took to its first epoch ({b.quickest:.0f} s)",
                    flush=True,
                )
                return Searcher.FINISHED
            for _ in range(self.ASKS):
                config = super().suggest(trial_id)
                if trial_id not in self._ot_trials:
                    return config
                ot_trial = self._ot_trials[trial_id]
                if b is None or b.admits(trial_id, kind := trial_kind(ot_trial)):
                    ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)  # what `settle_study` finds
                    return config
                # a configuration of a kind that has taken longer to a first epoch than is
                # left: Optuna is told it FAILED (TPE learns nothing from it), never started
                why = (
                    f"not started: {max(b.left, 0):.0f} s of the time budget left, less than "
                    f"trials with {_kind_text(kind)} took to their first epoch "
                    f"({b.needed(kind):.0f} s)"
                )
                ot_trial.set_user_attr(NOT_STARTED, why)
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
                del self._ot_trials[trial_id]
                print(f"a sampled configuration {why}", flush=True)
            print(
                f"no new trials: {self.ASKS} configurations sampled in a row could not report "
                f"a first epoch in the {max(b.left, 0):.0f} s left",
                flush=True,
            )
            return Searcher.FINISHED

        def on_trial_complete(self, trial_id, result=None, error=False):
            reported = (
                bool(result)
                and not error
                and trial_id not in self._completed_trials
                and self.metric in result
            )
            if reported:
                # Tune gives the searcher a result only if the scheduler lets the trial go on:
                # the result on which ASHA stopped a trial (at a rung, or at max_t) arrives
                # here alone, and without it a trial stopped at epoch 1 reached Optuna PRUNED
                # with no intermediate value (TPE ranked it last, whatever its score) and never
                # timed the budget's first epoch
                self.on_trial_result(trial_id, result)
            stopped = reported and result.get("epoch", 0) < result.get(TOTAL_EPOCHS, 0)
            if not stopped:
                return super().on_trial_complete(trial_id, result, error)
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)

        def on_trial_result(self, trial_id, result):
            if self.budget is not None:
                self.budget.first_result(trial_id)
            # each epoch once: a result may come here and then again with the trial's end
            steps = self.__dict__.setdefault("_reported_steps", {})  # (older pickles lack it)
            step = result.get(TRAINING_ITERATION, 0)
            if step <= steps.get(trial_id, 0):
                return None
            steps[trial_id] = step
            return super().on_trial_result(trial_id, result)

    return TruthfulOptunaSearch


def settle_study(
    storage_path: Path, name: str, results, logged: dict[str, tuple[int, float]] | None = None
) -> dict[str, int]:
    """Tell Optuna how the trials that the sweep's end stopped ended, once the sweep is over.

    Tune's time budget ends the experiment through ``TuneController._cleanup_trials``, which
    marks the running trials TERMINATED without calling the searcher's ``on_trial_complete``
    (``stop_trial`` does; the clean-up does not: Ray 2.60). Their Optuna trials stayed RUNNING,
    so the study counted fewer trials than ran and its pictures left them out. A trial that ran
    every epoch is COMPLETE with its last val top-1, one stopped earlier PRUNED (Optuna takes
    its last epoch's value), one that errored FAIL. Only for a sweep that ended (an interrupted
    one keeps them RUNNING: ``--resume`` continues them). ``logged``: per Tune trial id, the
    epochs and last val top-1 its MLflow run holds, which may be one epoch more than Tune
    received (the budget stopped it as it reported: :func:`_with_unreported`). Returns the count
    per new state."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage_path}")
    by_id = _by_trial_id(results)
    settled: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        result = by_id.get(trial.user_attrs.get(TUNE_TRIAL_ID))
        m = dict(result.metrics) if result is not None else {}
        epochs, top1 = (logged or {}).get(trial.user_attrs.get(TUNE_TRIAL_ID), (0, None))
        if epochs > m.get("epoch", 0):  # its last epoch(s) never reached Tune
            m.update({"epoch": epochs, TOP1: top1})
        value = None
        if result is not None and result.error is not None:
            state = TrialState.FAIL
        elif m.get("epoch", 0) >= m.get(TOTAL_EPOCHS, float("inf")) and TOP1 in m:
            state, value = TrialState.COMPLETE, float(m[TOP1])
        else:  # stopped before its last epoch, or before its first
            state = TrialState.PRUNED
        study.tell(trial.number, value, state=state)
        settled[state.name] = settled.get(state.name, 0) + 1
    return settled


def _by_trial_id(results) -> dict[str, Any]:
    """Tune's ResultGrid (one result per trial) keyed by trial id (trials that reported)."""
    ended = (results[i] for i in range(len(results)))
    return {r.metrics.get("trial_id"): r for r in ended if r.metrics}


def optuna_searcher(
    space: dict[str, dict],
    name: str,
    storage_path: Path,
    seed: int,
    time_budget: float | None = None,
):
    """Ray Tune's ``OptunaSearch`` on the define-by-run ``space``, TPE seeded, its study stored
    in SQLite at ``storage_path``, early-stopped trials told to Optuna as PRUNED; with a
    ``time_budget`` (seconds), no trial starts that could not report its first epoch in it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return _optuna_search_class()(
        space=DefineByRun(space),
        metric=TOP1,
        mode="max",
        study_name=name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{storage_path}"),
        sampler=optuna.samplers.TPESampler(seed=seed),
        budget=None if time_budget is None else FirstEpochBudget(time_budget),
    )


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
    address: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep of ``base.model.method`` over ``space``."""
    from ray import tune

    from finegrain.platform.data import prepare_data
    from finegrain.platform.train import check_model

    method = base.model.method
    root = tracking.run_root(base.run.dir)
    sweeps = root / "tune"
    if resume:
        name = _resolve_resume(sweeps, resume)
    name = name or f"tune-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweeps / name
    check_space(space)
    # every sampled value must validate before any trial starts: both ends of every range
    for end in (0, -1):
        apply_params(base.model_dump(mode="json"), _corner(space, end))
    check_model(base)
    prepare_data(base)  # once, in the driver: the trials find the shards cached
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweeps / "LATEST").write_text(name)

    with tracking_server(base, address) as uri:  # Ray starts while the local server does
        need = cluster.run_resources(base, in_trial=True)
        concurrent = cluster.plan_concurrency(need, max_concurrent, what="trial")
        parent = _parent_run(uri, base, name, space, num_samples)
        print(f"sweep {name}: MLflow parent run {parent} in {uri}", flush=True)
        trainable = tune.with_parameters(
            trial_function,
            base=base.model_dump(mode="json"),
            sweep=name,
            parent=parent,
            uri=uri,
        )
        trainable = tune.with_resources(trainable, {"CPU": cluster.TRIAL_CPUS})
        closer = TrialRuns(
            uri, base.tracking.experiment, lambda trial: trial_run_name(name, trial.trial_id)
        )
        if resume and tune.Tuner.can_restore(str(sweep_dir)):
            close_stopped_children(uri, parent)  # trials that ended while no driver watched
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True)
            # a resumed sweep keeps the callbacks it was made with; one whose trials wrote
            # TensorBoard files was made before result_loggers(), with Tune's default loggers
            loggers = next(sweep_dir.glob("*/events.out.tfevents.*"), None) is None
            print(f"resuming sweep {name} from {sweep_dir}", flush=True)
        else:
            loggers = True
            searcher = optuna_searcher(space, name, sweep_dir / "optuna.db", seed, time_budget)
            scheduler = ComparedASHA(
                time_attr="training_iteration",
                max_t=base.optim.epochs,
                grace_period=1,
                # a third of the trials go on at each rung (rungs at epochs 1, 3, 9, …): with
                # 2 (half), the demo's two 4-epoch trials above the median took the time of
                # three 1-epoch trials, and only 5 of its trials finished an epoch in 8 min
                reduction_factor=ASHA_REDUCTION,
                quorum=min(ASHA_REDUCTION, num_samples),
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=TOP1,
                    mode="max",
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    time_budget_s=time_budget,
                    max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(sweeps),
                    verbose=1,
                    callbacks=[closer, *result_loggers()],
                ),
            )
        try:
            with (
                graceful_interrupt(lambda: mark_stopping(uri, parent)) as interrupted,
                no_default_loggers() if loggers else contextlib.nullcontext(),
            ):
                results = tuner.fit()
            if interrupted.is_set():  # Tune stopped the trials and saved its state
                raise SweepInterrupted(name)
        except BaseException as e:
            close_stopped_children(uri, parent)
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.close_run(uri, parent, status, error=None if status == "KILLED" else e)
            cluster.wait_released()  # let the stopped trials wind down before Ray does
            raise
        close_stopped_children(uri, parent)
        cluster.wait_released()  # (a stopped trial may still log its last epoch meanwhile)
        table = _with_unreported(_results_table(results), uri, parent, name, space)
        logged = {}  # what each trial's MLflow run holds: Optuna is told that
        if {"trial_id", "epochs", LAST_TOP1} <= set(table.columns):
            done = table[table["epochs"].notna() & table[LAST_TOP1].notna()]
            logged = {
                t: (int(e), float(v))
                for t, e, v in zip(done["trial_id"], done["epochs"], done[LAST_TOP1])
            }
        settle_study(sweep_dir / "optuna.db", name, results, logged)
        outcomes = _outcomes(uri, parent, trials=len(results))
        if table[BEST_TOP1].isna().all():
            error = RuntimeError(
                "no trial finished an epoch: raise --time-budget or make trials cheaper "
                f"(the sweep is in {sweep_dir}; --resume {name} continues it)"
            )
            tracking.close_run(uri, parent, "FAILED", error=error)  # not left RUNNING
            raise error
        best_params, best_top1 = _best(table, results)  # top-1 in %
        baseline_top1 = _baseline(base, uri, parent, name) if baseline else None
        _log_sweep(uri, parent, space, table, best_params, best_top1, baseline_top1, sweep_dir)
        tracking.close_run(uri, parent, "FINISHED")
    return SweepResult(
        name, parent, best_params, best_top1, baseline_top1, _display_uri(base), table, outcomes
    )


def _children(client, parent: str) -> list:
    """The child runs of the sweep's parent run (its trials' and the baseline's)."""
    return client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
        max_results=10_000,
    )


def _outcomes(uri: str, parent: str, trials: int = 0) -> dict[str, int]:
    """How the ``trials`` Tune started ended, from their MLflow runs (all closed by now; the
    baseline is not a trial): ``finished`` (FINISHED: every epoch), ``stopped`` (KILLED after at
    least one epoch), ``unstarted`` (KILLED before its first: only the time budget or an
    interrupt stops a trial that has not reported) and ``failed``. A trial the time budget
    stopped before it even opened its MLflow run (it started in the budget's last seconds) has
    no run: it is counted ``unstarted`` too, so the counts add up to what Tune and Optuna ran."""
    client = tracking.tracking_client(uri)
    children = _children(client, parent)
    counts = dict.fromkeys(("finished", "stopped", "unstarted", "failed"), 0)
    for run in children:
        if child_name(run).endswith(BASELINE_SUFFIX):
            continue
        status = run.info.status
        if status == "FINISHED":
            counts["finished"] += 1
        elif status == "FAILED":
            counts["failed"] += 1
        elif client.get_metric_history(run.info.run_id, TOP1):
            counts["stopped"] += 1
        else:
            counts["unstarted"] += 1
    counts["unstarted"] += max(0, trials - sum(counts.values()))
    return counts


def _corner(space: dict[str, dict], end: int) -> dict[str, Any]:
    """One end of every range of ``space`` (conditions ignored: every key set)."""
    return {
        k: s["values"][end] if s["type"] == "choice" else s["high" if end else "low"]
        for k, s in space.items()
    }


def _display_uri(base: ExperimentConfig) -> str:
    return tracking.resolve_tracking_uri(base.tracking.mlflow_uri, base.run.dir)


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
        params={"num_samples": num_samples, **{f"base.{k}": v for k, v in base.params().items()}},
    )
    tracking.RunLogger(uri, run_id).text(
        yaml.safe_dump(space, sort_keys=False), "search_space.yaml"
    )
    tracking.set_runs_view(uri, run_id, params=list(space))  # the searched settings as columns
    return run_id


def _results_table(results):
    import pandas as pd

    df = results.get_dataframe()  # each trial's last report: its best so far, epochs done
    if BEST_TOP1 not in df.columns:  # no trial finished an epoch (time budget too small)
        df[BEST_TOP1] = pd.NA
    keep = [c for c in df.columns if c.startswith("config/")]
    keep += [c for c in (BEST_TOP1, TOP1, "epoch", "trial_id") if c in df.columns]
    df = (
        df[keep]
        .rename(columns=lambda c: c.removeprefix("config/"))
        .rename(columns={TOP1: LAST_TOP1, "epoch": "epochs"})
    )
    return df.sort_values(BEST_TOP1, ascending=False).reset_index(drop=True)


def _with_unreported(df, uri: str, parent: str, sweep: str, space: dict[str, dict]):
    """``df`` reconciled with the trials' MLflow runs. A trial that the time budget stopped just
    as an epoch ended logged that epoch to its MLflow run (the trainer logs directly) before its
    report reached Tune: Tune holds no result for it (its row comes from MLflow, so the table
    accounts for every trial that finished an epoch), or one epoch less than it ran (its row's
    epochs and top-1 are updated from MLflow: in the demo a trial that had run all 4 epochs, and
    was counted so, was listed with 3). A row from MLflow holds what ``space`` sampled (a run
    logs its whole config: a conditional key that was not sampled is left empty, as in Tune's
    rows, not filled with the config's default)."""
    import pandas as pd

    client = tracking.tracking_client(uri)
    children = _children(client, parent)
    known = set(df["trial_id"]) if "trial_id" in df else set()
    rows, refreshed = [], 0
    for run in children:
        name = child_name(run)
        if name.endswith(BASELINE_SUFFIX):
            continue
        trial_id = name.removeprefix(f"{sweep}-")
        history = [  # (a run of a sweep resumed across the rename logged val_top1)
            m
            for key in (TOP1, legacy_name(TOP1))
            for m in client.get_metric_history(run.info.run_id, key)
        ]
        if not history:
            continue  # no epoch finished: nothing to compare
        history = sorted(history, key=lambda m: m.step)
        logged = {
            BEST_TOP1: max(m.value for m in history),
            LAST_TOP1: history[-1].value,
            "epochs": history[-1].step,
        }
        if trial_id in known:
            i = df.index[df["trial_id"] == trial_id][0]
            told = df.at[i, "epochs"] if "epochs" in df else None
            if told is None or pd.isna(told) or history[-1].step > told:
                for key, value in logged.items():
                    df.at[i, key] = value
                refreshed += 1
            continue
        logged_params = run.data.params
        params = {k: _param(logged_params[k]) for k in space if k in logged_params}
        config = sampled_only(space, params)
        rows.append(config | logged | {"trial_id": trial_id})
    if rows or refreshed:
        print(
            f"note: the time budget stopped {len(rows) + refreshed} trial(s) as an epoch was "
            "reported, before Tune received it: their rows below are read from their MLflow runs",
            flush=True,
        )
    if rows:
        df = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
    return df.sort_values(BEST_TOP1, ascending=False).reset_index(drop=True)


def _best(table, results) -> tuple[dict[str, Any], float]:
    """The best trial of the reconciled ``table`` (its first row): its sampled parameters (from
    Tune; from the table for a trial Tune holds no result for) and its best val top-1 (%)."""
    import pandas as pd

    top = table.iloc[0]
    result = _by_trial_id(results).get(top["trial_id"])
    if result is not None:
        return {k: plain(v) for k, v in result.config.items()}, float(top[BEST_TOP1])
    sampled = {k: plain(v) for k, v in top.items() if "." in k and pd.notna(v)}  # NaN: unsampled
    return sampled, float(top[BEST_TOP1])


def _param(text: str | None):
    """An MLflow param (a string) back to its value."""
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _baseline(base: ExperimentConfig, uri: str, parent: str, name: str) -> float:
    """The one-pass baseline on the same data and schedule (a child run of the sweep)."""
    from finegrain.platform.train import run_experiment

    raw = base.model_dump(mode="json")
    raw["model"] = {
        k: raw["model"][k]
        for k in ("backbone", "weights", "keep_time", "width")
        if k in raw["model"]
    } | {"method": BASELINE}
    cfg = validate(raw)
    cfg.run.name = f"{name}{BASELINE_SUFFIX}"
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.parent_run_id = parent
    print(f"training the {method_spec(BASELINE).title} on the same data ...", flush=True)
    result = run_experiment(
        cfg, quiet=True, display_name=display_name(name, f"{BASELINE} baseline")
    )
    return float(result.metrics.get(BEST_TOP1, float("nan")))


def _log_sweep(uri, parent, space, table, best_params, best_top1, baseline_top1, sweep_dir) -> None:
    logger = tracking.RunLogger(uri, parent)
    logger.text(yaml.safe_dump(best_params, sort_keys=False), "best_config.yaml")
    logger.text(table.to_csv(index=False), "results.csv")
    logger.text(table.to_string(index=False), "results.txt")
    # the run page's description (MLflow's note): the results, best first
    best_first = table.sort_values(BEST_TOP1, ascending=False, na_position="last")
    note = f"**Sweep `{sweep_dir.name}`**: best val top-1 {best_top1:.1f} %"
    if baseline_top1 is not None:
        note += f" (one-pass baseline {baseline_top1:.1f} %)"
    note += "; accuracies in %"
    logger.tags({"mlflow.note.content": note + "\n\n" + _markdown(best_first)})
    # the parent's row in the runs table: the best trial's val/best_top1 (and the baseline's)
    metrics = {BEST_TOP1: best_top1}
    if baseline_top1 is not None:
        metrics[BASELINE_BEST_TOP1] = baseline_top1
    logger.metrics(metrics, step=0)
    for fig_name, fig in sweep_figures(sweep_dir / "optuna.db", sweep_dir.name).items():
        logger.figure(fig, f"{fig_name}.png")
    import matplotlib.pyplot as plt

    plt.close("all")


def _markdown(table) -> str:
    """A DataFrame as a Markdown table (floats to 4 digits; pandas' own needs `tabulate`)."""

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def sweep_figures(storage_path: Path, study_name: str) -> dict:
    """Optuna's parallel-coordinates and hyperparameter-importance plots, drawn from the
    sweep's own study (its completed trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not storage_path.is_file():
        return {}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{storage_path}")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out = {}
    objective = f"{TOP1} (%)"  # Optuna's axis and colour-bar name of the objective
    if len(complete) >= 2:
        with warnings.catch_warnings():
            # Optuna marks its matplotlib plots experimental, and matplotlib warns when every
            # completed trial has the same value of a parameter (a flat axis): notices, no fault
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):  # a picture never fails a sweep
                out["parallel_coordinates"] = _readable(
                    ovm.plot_parallel_coordinate(study, target_name=objective).figure,
                    study,
                    "Searched settings of the trials that ran all their epochs, and their "
                    "validation top-1",
                    "One line per completed trial (trials ASHA or the time budget stopped are "
                    "pruned in Optuna's study and left out); the first axis and the colour: its "
                    f"{TOP1} in %. Axes of log-uniform settings are log-scaled.",
                )
            with contextlib.suppress(Exception):
                out["param_importances"] = _readable(
                    ovm.plot_param_importances(study, target_name=objective).figure,
                    study,
                    "Which searched settings mattered most for validation top-1",
                    f"Optuna's fANOVA importance of each setting for {TOP1} over the completed "
                    "trials (the importances sum to 1); with few trials, a rough guide.",
                )
    return out


def _full_name(label: str, names: set[str]) -> str:
    """A setting's name in full: Optuna's parallel-coordinates plot cuts long ones
    ("model.udl_alpha_s...")."""
    found = [n for n in names if label.endswith("...") and n.startswith(label[:-3])]
    return found[0] if len(found) == 1 else label


def _readable(fig, study, title: str, caption: str):
    """Optuna's matplotlib figure at the pictures' standard (:mod:`.figures`, whose title it
    gets): 150 dpi, 9 pt labels, settings named in full below their axes, a caption. (Laid out
    with tight_layout: constrained layout, which :func:`.figures._footer` needs, fails on the
    grid of Optuna's colour bar.)"""
    from finegrain.platform import figures

    width, height = 9.0, 5.0
    fig.set_size_inches(width, height)
    fig.set_dpi(figures.DPI)
    for ax in fig.axes:
        for loc in ("left", "center", "right"):
            ax.set_title("", loc=loc)  # the figure's title replaces Optuna's
        ax.tick_params(labelsize=figures.TEXT_PT)
        for text in (ax.xaxis.label, ax.yaxis.label, *ax.texts):
            text.set_fontsize(figures.TEXT_PT)
        if ax.get_legend() is not None:
            ax.get_legend().remove()  # one series, named in the caption
    main = fig.axes[0]
    if len(fig.axes) > 2:  # parallel coordinates: one axis per setting, named below it
        for lines in main.collections:  # its white-to-blue scale hid the worst trial's line
            lines.set_cmap("viridis")
        names = {n for t in study.trials for n in t.params}
        labels = [_full_name(t.get_text(), names) for t in main.get_xticklabels()]
        main.set_xticks(main.get_xticks(), labels)
        for label in main.get_xticklabels():
            label.set(rotation=25, ha="right", rotation_mode="anchor")
    figures._title(fig, title)
    text = figures._wrap(caption, figures._chars(width - 0.3))
    fig.text(0.15 / width, 0.08 / height, text, fontsize=figures.TEXT_PT, color="0.2")
    band = (text.count("\n") + 1) * figures.LINE_IN + 0.2
    fig.tight_layout(rect=(0, band / height, 1, 1))
    return fig
