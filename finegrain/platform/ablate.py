"""Ablation suites: the runs behind the papers' ablation tables, on Ray Tune, tracked in MLflow.

A suite is an ordered list of variants (a row name → dotted config overrides, e.g.
``{"model.sts": "fixed_halves"}``) laid out like the paper's table; one reference row ("full",
the method's defaults) is shared by the paper's several tables instead of being repeated.
Every variant × seed is one :func:`run_experiment`; Ray Tune runs them in parallel across the
cluster (a ``tune.grid_search`` over the (variant, seed) pairs, a function trainable, no searcher,
no scheduler). Runs log to one MLflow experiment per suite (``ablate-<suite>``) through
:func:`finegrain.platform.tune.tracking_server` (one ``mlflow server`` owns the SQLite file), are
tagged ``variant`` and ``suite`` and named ``ablate-<suite>-<variant>-s<seed>``, so a rerun finds
its finished runs and skips them (and refuses to mix in runs trained with another config).

Evaluation-only rows (U2S Table I's prediction subsets and Table III's oracle) need no training:
they evaluate the final checkpoint of the ``full`` run of the same seed with other options
(``fuse``, ``oracle=True``) on the val split — the paper fuses the predictions of one trained
model, and the oracle only changes which masks are selected at test time.

The table (rows = variants in suite order; top-1, top-5, mean class accuracy and, on the
synthetic benchmark, spatial-subtle and temporal-subtle accuracy as mean ± std over seeds) is
computed from MLflow with :func:`finegrain.platform.compare.compare`, so it shows what MLflow
stores. It is written to ``<run dir>/ablate/<suite>/table.md`` with a bar chart ``table.png``
and logged as artifacts of the suite's summary run (tag ``ablation=summary``; the variant runs
are its children, so ``compare`` never counts it as a seed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finegrain.models import BASELINE, METHODS, method_options, method_spec
from finegrain.models.spec import Suite, Variant
from finegrain.models.spec import variant as _variant
from finegrain.platform import keys, tracking
from finegrain.platform.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    apply_params,
    load_config,
)
from finegrain.platform.metrics import PER_VIDEO_FILE

DEFAULT_CONFIG = "tune_synthetic"  # pretrained tiny backbone (width 16), 48 px, 8 frames, 4 epochs

# ---------------------------------------------------------------------------------- suites


def suites() -> dict[str, Suite]:
    """Every registered method's suite (its paper's tables, defined in the method's package),
    then ``methods``: every method with its defaults against the baseline, on the same data."""
    found = {}
    for method in METHODS:
        suite = method_spec(method).suite
        if suite is not None:
            found[suite.name] = suite
    every = tuple(_variant(m, {"model.method": m}, method_spec(m).title, "—") for m in METHODS)
    found["methods"] = Suite(
        "methods", BASELINE, "Every method with its defaults vs the one-pass baseline", every
    )
    found["mechanisms"] = Suite(
        "mechanisms",
        BASELINE,
        "Every method on its defaults: accuracy, and its paper's mechanism scored against the "
        "synthetic benchmark's ground truth, with a verdict per method",
        every,
    )
    return found


def suite_choices() -> tuple[str, ...]:
    return (*suites(), "all")


def get_suite(name: str) -> Suite:
    found = suites()
    if name not in found:
        raise ConfigError(f"--suite {name!r}: unknown suite; valid: {', '.join(suite_choices())}")
    return found[name]


def suite_names(name: str) -> list[str]:
    """``all`` → every suite; else the one suite (checked)."""
    return list(suites()) if name == "all" else [get_suite(name).name]


def _row(suite: Suite, name: str) -> Variant:
    try:
        return suite.variant(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def select(suite: Suite, names: Sequence[str] | None = None) -> list[Variant]:
    """The chosen variants in suite order; an evaluation-only row brings its trained variant."""
    if not names:
        return list(suite.variants)
    wanted = {_row(suite, n).name for n in names}
    wanted |= {_row(suite, n).evaluates for n in names if _row(suite, n).evaluates}
    return [v for v in suite.variants if v.name in wanted]


def experiment_name(suite: str) -> str:
    return f"ablate-{suite}"


def run_name(suite: str, variant: str, seed: int) -> str:
    return f"ablate-{suite}-{variant}-s{seed}"


# ---------------------------------------------------------------------------------- configs


def load_base(
    suite: Suite | str,
    config: str | None = None,
    overrides: Sequence[str] | None = None,
    *,
    epochs: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    mlflow_uri: str | None = None,
) -> ExperimentConfig:
    """The suite's base config: ``config`` (default ``tune_synthetic``) with the suite's method,
    the CLI flags, then the ``--set`` overrides."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    return load_config(
        config or DEFAULT_CONFIG,
        list(overrides or []),
        model={"method": suite.method},
        optim={"epochs": epochs},
        scaling={"workers": workers, "gpus_per_worker": gpus_per_worker},
        tracking={"mlflow_uri": mlflow_uri, "experiment": experiment_name(suite.name)},
    )


def variant_config(
    base: ExperimentConfig, suite: Suite, variant: Variant, seed: int
) -> ExperimentConfig:
    """``base`` + the variant's overrides (+ its trained variant's, if evaluation-only) + seed.

    A row that switches ``model.method`` (the one-pass baseline) keeps the backbone fields of
    the model section and drops the suite method's options.
    """
    overrides = dict(variant.overrides)
    if variant.evaluates:
        overrides = {**_row(suite, variant.evaluates).overrides, **overrides}
    raw = base.model_dump(mode="json")
    method = overrides.get("model.method", raw["model"]["method"])
    if method != raw["model"]["method"]:
        raw["model"] = {k: raw["model"][k] for k in ModelConfig.model_fields}
    try:
        cfg = apply_params(raw, {**overrides, "run.seed": seed})
    except ConfigError as e:
        raise ConfigError(f"suite {suite.name!r} variant {variant.name!r}: {e}") from None
    cfg.run.name = run_name(suite.name, variant.name, seed)
    cfg.tracking.experiment = experiment_name(suite.name)
    return cfg


def check_suite(base: ExperimentConfig, suite: Suite, variants: Sequence[Variant]) -> None:
    """Every variant's config validates, its model builds and runs a dummy clip of the
    configured shape, and the epochs cover its training stages — before data, Ray or MLflow."""
    from finegrain.models import build_model
    from finegrain.platform.train import check_model, stage_plan

    for variant in variants:
        cfg = variant_config(base, suite, variant, seed=0)
        try:
            check_model(cfg)
            if not variant.evaluates:
                classes = cfg.data.synthetic.classes if cfg.data.dataset == "synthetic" else 10
                model = build_model(
                    cfg.model.method, classes, cfg.model.backbone, **cfg.model.options()
                )
                stage_plan(model.training_stages(), cfg.optim.epochs, cfg.optim.stage_epochs)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"suite {suite.name!r} variant {variant.name!r}: {e}") from None


# Config fields that do not change what a run computes (where and how it runs): a finished run
# whose other params differ was trained with another configuration.
VOLATILE = ("tracking.", "scaling.", "run.name", "run.dir", "run.log_every", "run.max_failures")
VOLATILE += ("run.fail_at_step", "run.startup_retries", "eval.batch_size", "eval.cache_mb")
VOLATILE += ("data.decode_actors", "data.decode_cpus", "data.decode_batch", "data.read_cpus")


def config_diff(cfg: ExperimentConfig, params: dict[str, str]) -> list[str]:
    """``key: logged → now`` for every config field that differs from a run's MLflow params."""
    out = []
    defaults = method_options(cfg.model.method)
    for key, value in cfg.params().items():
        now = str(value)[:6000]  # as tracking.log_params stores it
        if key not in params and key.startswith("model.") and defaults.get(key[6:]) == value:
            continue  # a run logged before defaults were logged: it used this default too
        if not key.startswith(VOLATILE) and params.get(key) != now:
            out.append(f"{key}: {params.get(key, '(missing)')} → {now}")
    return out


# ---------------------------------------------------------------------------------- running


@dataclass
class SuiteResult:
    suite: str
    table: Any  # pandas.DataFrame, one row per variant
    markdown: str
    markdown_path: Path
    png_path: Path
    summary_run_id: str
    tracking_uri: str
    failed: list[str]


def ablation_trial(
    params: dict, *, configs: dict[str, dict], suite: str, parent: str, uri: str
) -> None:
    """One (variant, seed): its config → ``run_experiment`` in this Tune actor."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from finegrain.platform.config import validate
    from finegrain.platform.logs import quiet_ray_logs
    from finegrain.platform.train import run_experiment

    quiet_ray_logs()
    variant, seed = params["run"]["variant"], params["run"]["seed"]
    cfg = validate(configs[run_name(suite, variant, seed)])
    cfg.tracking.mlflow_uri = uri
    cfg.tracking.parent_run_id = parent
    # created here with the ablation's tags; run_experiment finds it by name and trains into it
    _open(cfg, uri, suite, variant)
    run_experiment(cfg, callbacks=[TuneReportCallback()], quiet=True, in_trial=True)


def _open(cfg: ExperimentConfig, uri: str, suite: str, variant: str, **tags: str) -> str:
    return tracking.open_run(
        uri,
        cfg.tracking.experiment,
        cfg.run.name,
        cfg.run.dir,
        tags={
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "dataset": cfg.data.dataset,
            "suite": suite,
            "variant": variant,
            **cfg.bookkeeping(),
            **tags,
        },
        params=cfg.params(),
        parent_run_id=cfg.tracking.parent_run_id,
        # variant first: MLflow's runs table cuts long names at the end
        display_name=f"{variant} · seed {cfg.run.seed} · {experiment_name(suite)}",
    )


def run_suite(
    suite: Suite | str,
    base: ExperimentConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    max_concurrent: int | None = None,
    address: str | None = None,
) -> SuiteResult:
    """Train (and evaluate) ``variants`` × ``seeds`` of ``suite``; write and log its table.

    At most ``max_concurrent`` runs at once (default: as many as the cluster holds).
    """
    from finegrain.platform import cluster
    from finegrain.platform.data import prepare_data
    from finegrain.platform.sweeps import close_stopped_children, tracking_server

    suite = get_suite(suite) if isinstance(suite, str) else suite
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"seeds: need at least one seed >= 0, got {seeds}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be >= 1, got {max_concurrent}")
    chosen = select(suite, variants)
    check_suite(base, suite, chosen)
    runs = {
        (v.name, s): variant_config(base, suite, v, s) for v in chosen for s in seeds
    }  # suite order, then seed
    for cfg in {c.data.model_dump_json(): c for c in runs.values()}.values():
        prepare_data(cfg)  # once, in the driver: the runs find the shards cached
    root = tracking.run_root(base.run.dir)
    out_dir = root / "ablate" / suite.name
    experiment = experiment_name(suite.name)
    display_uri = tracking.resolve_tracking_uri(base.tracking.mlflow_uri, base.run.dir)
    with tracking_server(base, address) as uri:  # Ray starts while the local server does
        need = max(
            (cluster.run_resources(c, in_trial=True) for c in runs.values()), key=lambda r: r.cpus
        )
        concurrent = cluster.plan_concurrency(need, max_concurrent or len(runs), what="run")
        summary = tracking.open_run(
            uri,
            experiment,
            f"ablate-{suite.name}-summary",
            base.run.dir,
            tags={"suite": suite.name, "ablation": "summary", "method": suite.method},
        )
        tracking.set_runs_view(  # the variant and what it changes as columns
            uri, summary, list(dict.fromkeys(k for v in chosen for k in v.overrides)), ["variant"]
        )
        failed: list[str] = []
        try:
            close_stopped_children(uri, summary)  # runs that ended while no driver watched
            done = _finished_runs(uri, experiment, runs)
            train = [k for k in runs if not _evaluates(suite, k) and k not in done]
            evaluate = [k for k in runs if _evaluates(suite, k) and k not in done]
            print(
                f"ablation {suite.name}: {len(chosen)} variants × {len(seeds)} seed(s) = "
                f"{len(runs)} runs ({len(done)} already finished, {len(train)} to train, "
                f"{len(evaluate)} to evaluate); MLflow experiment {experiment!r} in "
                f"{display_uri}",
                flush=True,
            )
            if train:
                failed += _train(suite, runs, train, summary, uri, root, concurrent)
            close_stopped_children(uri, summary)
            failed += _evaluate_all(suite, runs, evaluate, summary, uri, concurrent)
            cluster.wait_released()
            result = _report(suite, chosen, seeds, base, uri, display_uri, out_dir, summary)
        except BaseException as e:
            close_stopped_children(uri, summary)
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.close_run(uri, summary, status, error=None if status == "KILLED" else e)
            cluster.wait_released()  # let the stopped runs wind down before Ray does
            raise
        tracking.close_run(uri, summary, "FINISHED")
    result.failed = failed
    return result


def check_existing(
    base: ExperimentConfig,
    suite: Suite | str,
    *,
    seeds: Sequence[int],
    variants: Sequence[str] | None = None,
) -> int:
    """Before anything runs: the number of runs MLflow already holds as FINISHED; a same-named
    run made with another configuration raises :class:`ConfigError` (``--suite all`` checks
    every suite up front instead of failing at the fifth)."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    uri = tracking.resolve_tracking_uri(base.tracking.mlflow_uri, base.run.dir)
    chosen = select(suite, variants)
    runs = {(v.name, s): variant_config(base, suite, v, s) for v in chosen for s in seeds}
    return len(_finished_runs(uri, experiment_name(suite.name), runs))


def _evaluates(suite: Suite, key: tuple[str, int]) -> bool:
    return _row(suite, key[0]).evaluates is not None


def _finished_runs(
    uri: str, experiment: str, runs: dict[tuple[str, int], ExperimentConfig]
) -> set[tuple[str, int]]:
    """The (variant, seed) runs MLflow already holds as FINISHED; a same-named run trained with
    another configuration is an error (its name, and its checkpoints, would be reused)."""
    client = tracking.tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    by_name = {
        r.data.tags.get(tracking.RUN_NAME_TAG): r
        for r in client.search_runs([exp.experiment_id], max_results=5000)
    }
    done = set()
    for key, cfg in runs.items():
        run = by_name.get(cfg.run.name)
        if run is None:
            continue
        diff = config_diff(cfg, run.data.params)
        if diff:
            raise ConfigError(
                f"MLflow run {cfg.run.name!r} (experiment {experiment!r}) was made with another "
                f"configuration ({'; '.join(diff[:5])}); ablation run names are fixed, so run "
                "this ablation in another run directory (--set run.dir=...) or MLflow store "
                "(--mlflow-uri), or delete that run"
            )
        if run.info.status == "FINISHED":
            done.add(key)
    return done


def _train(suite, runs, todo, summary, uri, root, max_concurrent) -> list[str]:
    """The runs to train, as one Tune grid over their (variant, seed) pairs."""
    from ray import tune

    from finegrain.platform.cluster import TRIAL_CPUS
    from finegrain.platform.sweeps import (
        TrialRuns,
        graceful_interrupt,
        mark_stopping,
        no_default_loggers,
        result_loggers,
    )

    trainable = tune.with_parameters(
        ablation_trial,
        configs={runs[k].run.name: runs[k].model_dump(mode="json") for k in todo},
        suite=suite.name,
        parent=summary,
        uri=uri,
    )
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPUS})
    grid = [{"variant": v, "seed": s} for v, s in todo]

    def trial_run(trial) -> str:
        return run_name(suite.name, trial.config["run"]["variant"], trial.config["run"]["seed"])

    closer = TrialRuns(uri, experiment_name(suite.name), trial_run)
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=f"ablate-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(root / "ablate" / suite.name / "tune"),
            verbose=1,
            callbacks=[closer, *result_loggers()],
        ),
    )
    with (
        graceful_interrupt(lambda: mark_stopping(uri, summary)) as interrupted,
        no_default_loggers(),
    ):
        results = tuner.fit()
    if interrupted.is_set():  # Tune stopped the runs; a rerun trains the unfinished ones
        raise KeyboardInterrupt(f"suite {suite.name} interrupted; rerun it to finish")
    failed = []
    for result in results:
        if result.error is not None:
            run = result.config["run"]
            name = run_name(suite.name, run["variant"], run["seed"])
            failed.append(name)
            print(f"run {name} failed: {tracking.error_line(result.error)}", flush=True)
    return failed


# ---------------------------------------------------------------------------------- evaluation


def final_checkpoint(cfg: ExperimentConfig) -> Path:
    """The last Ray Train checkpoint of run ``cfg.run.name`` (its final epoch: the weights its
    reported last-epoch metrics come from); ``best.pt`` if Ray's copy is gone."""
    from finegrain.platform.train import CHECKPOINT_FILE

    root = tracking.run_root(cfg.run.dir)
    found = sorted((root / "ray" / cfg.run.name).glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if found:
        return found[-1]  # named checkpoint_<timestamp>: the last one sorts last
    best = root / cfg.run.name / "best.pt"
    if best.is_file():
        return best
    raise FileNotFoundError(
        f"run {cfg.run.name!r}: no checkpoint under {root / 'ray' / cfg.run.name} and no {best}"
    )


def evaluate_checkpoint(cfg: ExperimentConfig | dict, checkpoint: str | Path) -> dict[str, Any]:
    """The model of ``cfg`` with ``checkpoint``'s weights, evaluated on every validation view
    by the training loop's own evaluation (:func:`finegrain.platform.train.evaluate_checkpoint`).

    Returns ``{"metrics": {"val/top1": ... (%), ...}, "epoch": the checkpoint's epoch
    (1-based), "per_video": the CSV of each video's prediction}``.
    """
    from finegrain.platform.config import validate
    from finegrain.platform.train import evaluate_checkpoint as evaluate

    cfg = validate(cfg) if isinstance(cfg, dict) else cfg
    out = evaluate(cfg, checkpoint)
    epoch = int(out.pop("epoch", 0))
    per_video = out.pop("per_video", None)
    metrics = {k: float(v) for k, v in out.items()}
    return {"metrics": metrics, "epoch": epoch, "per_video": per_video}


def _evaluate_all(suite, runs, todo, summary, uri, max_concurrent) -> list[str]:
    """Evaluation-only rows as Ray tasks (at most ``max_concurrent`` at once), each logged as
    a run of its own in the suite's experiment, next to the run it evaluates."""
    import ray

    from finegrain.platform.cluster import TRIAL_CPUS

    failed, pending = [], {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < max_concurrent:
            key = queue.pop(0)
            cfg, variant = runs[key], _row(suite, key[0])
            trained = runs[(variant.evaluates, key[1])]
            trained_id, status = _run_status(uri, trained)
            try:
                if status != "FINISHED":
                    raise FileNotFoundError(f"run {trained.run.name!r} is {status}, not FINISHED")
                checkpoint = final_checkpoint(trained)
            except FileNotFoundError as e:
                print(f"run {cfg.run.name} skipped: {e}", flush=True)
                failed.append(cfg.run.name)
                continue
            # the task only waits for the TorchTrainer that evaluates, like a Tune trial
            task = ray.remote(num_cpus=TRIAL_CPUS)(evaluate_checkpoint)
            print(f"evaluating {cfg.run.name} (checkpoint of {trained.run.name})", flush=True)
            ref = task.remote(cfg.model_dump(mode="json"), str(checkpoint))
            pending[ref] = (cfg, variant, checkpoint, trained_id)
        if not pending:
            continue
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        cfg, variant, checkpoint, trained_id = pending.pop(ready)
        cfg.tracking.parent_run_id = summary
        tags = {"eval_only": "true", "evaluated_from": trained_id, "checkpoint": str(checkpoint)}
        run_id = _open(cfg, uri, suite.name, variant.name, **tags)
        try:
            out = ray.get(ready)
        except Exception as e:  # one failed evaluation never stops the suite
            tracking.close_run(uri, run_id, "FAILED", error=e)
            print(f"run {cfg.run.name} failed: {tracking.error_line(e)}", flush=True)
            failed.append(cfg.run.name)
            continue
        logger = tracking.RunLogger(uri, run_id)
        logger.text(cfg.to_yaml(), "config.yaml")
        scores = dict(out["metrics"])
        videos = scores.pop(keys.VIDEOS, None)  # constant: a tag, as a training run has it
        logger.metrics(scores, step=out["epoch"])
        if videos is not None:
            logger.tags({keys.VIDEOS: int(videos)})
        if out.get("per_video"):
            logger.text(out["per_video"], f"eval/{PER_VIDEO_FILE}")
        tracking.close_run(uri, run_id, "FINISHED")
        top1 = scores[keys.TOP1]
        print(f"[{cfg.run.name}] val top1 {top1:.1f}% (epoch {out['epoch']})", flush=True)
    return failed


def _run_status(uri: str, cfg: ExperimentConfig) -> tuple[str, str]:
    """(run id, status) of the MLflow run named ``cfg.run.name``; ("", "MISSING") if none."""
    client = tracking.tracking_client(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = exp and client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{cfg.run.name}'",
        max_results=1,
    )
    return (found[0].info.run_id, found[0].info.status) if found else ("", "MISSING")


# ---------------------------------------------------------------------------------- the table

# metric (compare's name: top1 → val/top1, in %) → column
COLUMNS = {
    "top1": "top-1",
    "top5": "top-5",
    "mean_class_acc": "mean class acc",
    "spatial_top1": "spatial-subtle",
    "temporal_top1": "temporal-subtle",
}


def suite_table(
    suite: Suite | str,
    uri: str,
    variants: Sequence[Variant] | None = None,
    *,
    synthetic: bool = True,
    run_dir: str = "runs",
):
    """One row per variant (suite order): ``<metric>_mean``/``_std`` for each column, ``n``,
    ``seeds`` and ``runs`` — each metric aggregated by :func:`compare` over the FINISHED runs of
    the suite's MLflow experiment (its final-epoch value per run)."""
    import pandas as pd

    from finegrain.platform.compare import (
        CompareError,
        compare,
        intervals_caption,
        with_intervals,
    )

    suite = get_suite(suite) if isinstance(suite, str) else suite
    variants = list(variants or suite.variants)
    experiment = experiment_name(suite.name)
    frames = {}
    for metric in list(COLUMNS) if synthetic else list(COLUMNS)[:3]:
        try:
            df = compare([experiment], metric, uri, ["variant"], run_dir=run_dir)
        except CompareError:
            if metric == "top1":
                raise
            continue  # no run has it (e.g. no spatial-subtle class in a tiny val split)
        if metric == "top1":  # intervals, and each row tested against the suite's first row
            present = [v.name for v in variants if v.name in set(df["variant"])]
            first = df.index[df["variant"] == present[0]][0] if present else None
            df = with_intervals(df.reset_index(drop=True), baseline=first)
        frames[metric] = df.set_index("variant")
    top1 = frames["top1"]
    unfinished = _unfinished(uri, experiment)
    rows = []
    for v in variants:
        row: dict[str, Any] = {
            "table": v.table,
            "variant": v.name,
            "setting": v.paper + (f" [eval of {v.evaluates}]" if v.evaluates else ""),
        }
        for metric in COLUMNS:
            frame = frames.get(metric)
            hit = frame is not None and v.name in frame.index
            row[f"{metric}_mean"] = float(frame.at[v.name, "mean"]) if hit else math.nan
            row[f"{metric}_std"] = float(frame.at[v.name, "std"]) if hit else math.nan
        hit = v.name in top1.index
        for key in ("ci_lo", "ci_hi", "delta", "p"):
            row[f"top1_{key}"] = float(top1.at[v.name, key]) if hit else math.nan
        row["top1_significant"] = bool(top1.at[v.name, "significant"]) if hit else False
        row["videos"] = int(top1.at[v.name, "videos"]) if hit else 0
        row["n"] = int(top1.at[v.name, "n"]) if hit else 0
        row["seeds"] = top1.at[v.name, "seeds"] if hit else ""
        row["runs"] = top1.at[v.name, "runs"] if hit else ""
        row["failed"] = "; ".join(unfinished.get(v.name, []))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(
        baseline=top1.attrs.get("baseline"),
        intervals=intervals_caption(top1),
        suite=suite.name,
        title=suite.title,
        experiment=experiment,
        uri=uri,
        columns=[m for m in COLUMNS if m in frames],
    )
    top1 = top1.loc[[v.name for v in variants if v.name in top1.index]].reset_index()
    top1.attrs.update(frames["top1"].attrs)
    return table, top1


def _unfinished(uri: str, experiment: str) -> dict[str, list[str]]:
    """Variant → what its runs that did not finish say: "failed: <error>" for a FAILED run,
    "stopped early" for a KILLED one (a table never drops a run silently)."""
    client = tracking.tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out: dict[str, list[str]] = {}
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status != 'FINISHED'", max_results=5000
    )
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        tags, status = run.data.tags, run.info.status
        if status == "RUNNING" or "variant" not in tags or "suite" not in tags:
            continue
        seed = run.data.params.get("run.seed", "?")
        what = (
            f"failed: {tags.get('error', 'no error recorded')}"
            if status == "FAILED"
            else ("stopped early")
        )
        out.setdefault(tags["variant"], []).append(f"seed {seed} {what}")
    return out


def _pct(mean: float, std: float) -> str:
    """An accuracy (logged in %) and its std, to one decimal."""
    if math.isnan(mean):
        return "—"
    return f"{mean:.1f}" + ("" if math.isnan(std) else f" ± {std:.1f}")


def to_markdown(table, setup: str = "") -> str:
    """The suite's table in the paper's layout (accuracies in %, mean ± std over seeds; with
    per-video results, the top-1 interval and the paired test against the first row)."""
    from finegrain.platform.compare import delta_cell, interval_cell

    columns = table.attrs.get("columns", ["top1"])
    header = ["paper table", "variant", "setting"] + [f"{COLUMNS[m]} (%)" for m in columns]
    stats = "top1_ci_lo" in table
    baseline = table.attrs.get("baseline") or "the first row"
    header += ["top-1 95 % CI", f"Δ top-1 vs `{baseline}` (p)"] if stats else []
    header += ["n", "seeds", "MLflow runs"]
    failures = bool("failed" in table and table["failed"].astype(bool).any())
    header += ["not finished"] if failures else []
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join(
            [":--"] * 3
            + ["--:"] * (len(columns) + 2 * stats + 1)
            + [":--", ":--"]
            + [":--"] * failures
        )
        + "|",
    ]
    for _, row in table.iterrows():
        cells = [row["table"], f"`{row['variant']}`", row["setting"]]
        cells += [_pct(row[f"{m}_mean"], row[f"{m}_std"]) for m in columns]
        if stats:
            top1 = {k.removeprefix("top1_"): v for k, v in row.items() if k.startswith("top1_")}
            cells += [interval_cell(top1), delta_cell(top1)]
        cells += [row["n"], row["seeds"] or "—", row["runs"] or "—"]
        cells += [row["failed"] or "—"] if failures else []
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    evals = table["setting"].str.contains(r"\[eval of ", regex=True).any()
    caption = (
        f"**Ablation `{table.attrs.get('suite')}`**: {table.attrs.get('title', '')}. {setup}\n"
        "Validation accuracy (%) at each run's last epoch, mean ± sample std (n−1) over seeds"
        + (
            "; `[eval of full]` rows evaluate the final checkpoint of the same seed's `full` run"
            if evals
            else ""
        )
        + f". MLflow experiment `{table.attrs.get('experiment')}` in `{table.attrs.get('uri')}`."
        + (f" {table.attrs['intervals']}" if table.attrs.get("intervals") else "")
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


def mechanism_table(uri: str, experiment: str, suite: Suite, variants: Sequence[Variant]):
    """One row per variant and mechanism score (the runs' final ``mech/`` metrics): ``mean``
    over seeds, ``ci_lo``/``ci_hi`` (bootstrap over seeds, 95 %; NaN from one seed, which gives
    no interval: the scores are per run, there are no videos to resample), ``n``."""
    import pandas as pd

    from finegrain.platform.stats import Correctness, bootstrap_ci

    client = tracking.tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
        if exp
        else []
    )
    values: dict[tuple[str, str], list[float]] = {}
    names = {v.name for v in variants}
    for run in runs:
        variant = run.data.tags.get("variant")
        if variant not in names or run.data.tags.get("ablation") == "summary":
            continue
        for key, value in run.data.metrics.items():
            if key.startswith("mech/"):
                values.setdefault((variant, key.removeprefix("mech/")), []).append(value)
    rows = []
    for v in variants:
        for (variant, key), xs in values.items():
            if variant != v.name:
                continue
            lo, hi = (
                bootstrap_ci(Correctness.from_accuracies(dict(enumerate(xs))))
                if len(xs) > 1
                else (math.nan, math.nan)
            )
            rows.append(
                {"variant": variant, "method": _method_of(suite, v), "score": key,
                 "mean": sum(xs) / len(xs), "ci_lo": lo, "ci_hi": hi, "n": len(xs)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def _method_of(suite: Suite, variant: Variant) -> str:
    return variant.overrides.get("model.method", suite.method)


def mechanisms_markdown(df, suite: Suite, variants: Sequence[Variant]) -> str:
    """The mechanism scores (mean and 95 % CI over seeds) and, per method, the verdict its
    folder's ``verdict`` gives on them."""
    lines = [
        "**Mechanism scores** (the `mech/` metrics of each run's last evaluation, on every "
        "validation view; mean over seeds, 95 % CI: bootstrap over seeds).",
        "",
        "| variant | method | score | mean | 95 % CI | n |",
        "|:--|:--|:--|--:|--:|--:|",
    ]
    for row in df.itertuples():
        ci = "—" if math.isnan(row.ci_lo) else f"[{row.ci_lo:.3f}, {row.ci_hi:.3f}]"
        lines.append(
            f"| `{row.variant}` | {row.method} | {row.score} | {row.mean:.3f} | {ci} | {row.n} |"
        )
    lines += ["", "**Does the paper's mechanism hold here?**", ""]
    for v in variants:
        spec = method_spec(_method_of(suite, v))
        mine = df[df["variant"] == v.name]
        scores = {r.score: (r.mean, r.ci_lo, r.ci_hi) for r in mine.itertuples()}
        if len(mine) and (mine["n"] < 2).all():  # a verdict needs an interval
            words = "not tested: one seed gives no interval (run the suite with --seeds 2 or more)"
        else:
            words = spec.verdict(scores)
        lines.append(f"- `{v.name}` ({spec.title}): {words}")
    return "\n".join(lines) + "\n"


def _setup_line(base: ExperimentConfig) -> str:
    d, m = base.data, base.model
    data = d.dataset
    if d.dataset == "synthetic":
        s = d.synthetic
        data += f" ({s.classes} classes × {s.videos_per_class} videos)"
    width = f", width {m.width}" if m.width else ""
    return (
        f"Data: {data}, {d.num_frames} frames at {d.crop} px; backbone {m.backbone}{width}; "
        f"{base.optim.epochs} epoch(s), batch {base.optim.batch_size}, lr {base.optim.lr}."
    )


def _num_classes(base: ExperimentConfig) -> int | None:
    """The classes of the suite's dataset (for the chance line), None when unknown here."""
    if base.data.dataset == "synthetic":
        return base.data.synthetic.classes
    from finegrain.platform.data import load_spec

    try:
        return len(load_spec(Path(base.data.shards)).classes) if base.data.shards else None
    except FileNotFoundError:
        return None


def _report(suite, chosen, seeds, base, uri, display_uri, out_dir, summary) -> SuiteResult:
    from finegrain.platform.compare import bar_chart

    table, top1 = suite_table(
        suite,
        uri,
        chosen,
        synthetic=base.data.dataset == "synthetic",
        run_dir=base.run.dir,
    )
    table.attrs["uri"] = display_uri
    top1.attrs["uri"] = display_uri
    markdown = to_markdown(table, _setup_line(base))
    mechanisms = mechanism_table(uri, experiment_name(suite.name), suite, chosen)
    if not mechanisms.empty:
        markdown += "\n" + mechanisms_markdown(mechanisms, suite, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "table.md", out_dir / "table.png"
    top1.attrs.update(title=f"ablation {suite.name}: {suite.title}", suite=suite.name)
    classes = _num_classes(base)
    bar_chart(top1, png, chance=1 / classes if classes else None)
    md.write_text(markdown + f"\n![top-1 per variant]({png.name})\n")
    table.to_csv(out_dir / "table.csv", index=False)
    plan = {
        "suite": suite.name,
        "seeds": list(seeds),
        "variants": {
            v.name: {"overrides": v.overrides, "paper": v.paper, "table": v.table}
            | ({"evaluates": v.evaluates} if v.evaluates else {})
            for v in chosen
        },
        "base": base.model_dump(mode="json"),
    }
    logger = tracking.RunLogger(uri, summary)
    logger.tags({"mlflow.note.content": markdown})  # the run page's description
    logger.text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True), "suite.yaml")
    for path in (md, png, out_dir / "table.csv"):
        logger.artifact(path)
    return SuiteResult(suite.name, table, markdown, md, png, summary, display_uri, [])
