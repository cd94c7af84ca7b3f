"""Sweeps (issue 6): the tuner's pure functions, `ray job submit` of the main job on a loopback
cluster, a two-node cluster run, and an interrupted sweep resumed with ``--resume``.

The Ray instances these tests start are isolated from any other on the machine: their own
``RAY_TMPDIR`` (so no ``ray.init()`` elsewhere finds them through ``ray_current_cluster``, and they
find no other), token auth with a throwaway token, free ports, and a marker variable in their
environment by which every process they started is ended afterwards (never ``ray stop``: it ends
every Ray process of the machine, not only ours).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import MlflowUI, subprocess_env
from mlflow.tracking import MlflowClient

from finegrain.models import METHODS
from finegrain.platform import tracking
from finegrain.platform.config import ConfigError, load_config
from finegrain.platform.sweeps import close_stopped_children, graceful_interrupt, mark_stopping
from finegrain.platform.tune import (
    ComparedASHA,
    DefineByRun,
    _resolve_resume,
    apply_params,
    check_space,
    child_name,
    default_space,
    load_space,
    optuna_searcher,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = [
    "data.synthetic.classes=4",
    "data.synthetic.videos_per_class=4",
    "data.synthetic.val_videos_per_class=null",
    "model.weights=null",
    "data.synthetic.size=32",
    "data.num_frames=8",
    "data.short_side=32",
    "data.crop=32",
    "optim.epochs=1",
    "optim.batch_size=4",
    "eval.batch_size=8",
    "model.width=4",
]
SPACE = {
    "model.neurons": {"type": "int", "low": 2, "high": 3},
    "model.layers": {"type": "int", "low": 1, "high": 1},
    "model.udl": {"type": "choice", "values": [False]},
    "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
}
PARENT_TAG = "mlflow.parentRunId"


# ------------------------------------------------------------------------ pure functions


def test_define_by_run_samples_each_type_and_conditional_keys_only_when_they_apply():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = check_space(
        {
            "model.neurons": {"type": "int", "low": 2, "high": 16},
            "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.7},
            "optim.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1},
            "model.udl": {"type": "choice", "values": [True, False]},
            "model.udl_inner_lr": {
                "type": "loguniform",
                "low": 1e-3,
                "high": 0.1,
                "when": {"model.udl": True},
            },
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(space)
    seen_udl = set()
    for _ in range(60):
        trial = study.ask()
        define(trial)
        p = trial.params
        assert 2 <= p["model.neurons"] <= 16 and isinstance(p["model.neurons"], int)
        assert 0.0 <= p["model.dropout"] <= 0.7 and 1e-3 <= p["optim.lr"] <= 0.1
        assert ("model.udl_inner_lr" in p) == p["model.udl"]  # sampled only when it applies
        seen_udl.add(p["model.udl"])
        study.tell(trial, 0.5)
    assert seen_udl == {True, False}
    dist = study.trials[0].distributions
    assert dist["optim.lr"].log and not dist["model.dropout"].log


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"type": "normal", "low": 0, "high": 1},
            "type must be int, uniform, loguniform or choice",
        ),
        ({"low": 0, "high": 1}, "type must be"),
        (0.5, "type must be"),
        ({"type": "int", "low": 2}, "missing 'high'"),
        ({"type": "choice"}, "missing 'values'"),
        ({"type": "int", "low": 3, "high": 2}, "low must be <= high"),
        ({"type": "int", "low": 2, "high": 3, "when": {"model.later": 1}}, "earlier key"),
        ({"type": "int", "low": 2, "high": 3, "when": {"model.udl": "yes"}}, "is not one of"),
    ],
)
def test_check_space_rejects_bad_specs_naming_the_key(spec, message):
    space = {"model.udl": {"type": "choice", "values": [True, False]}, "model.neurons": spec}
    with pytest.raises(ConfigError, match=message) as err:
        check_space(space)
    assert "'model.neurons'" in str(err.value)


def test_a_trial_stopped_before_its_last_epoch_reaches_optuna_as_pruned(tmp_path):
    """ASHA (or the time budget) stopped it: Optuna sees PRUNED with its per-epoch values,
    not a COMPLETE trial scored by its early epoch. The study lives in the sweep's SQLite."""
    import optuna
    from optuna.trial import TrialState

    space = {"model.neurons": {"type": "int", "low": 2, "high": 16}}
    search = optuna_searcher(space, "s", tmp_path / "optuna.db", seed=0)
    search.set_search_properties("val/top1", "max", {})

    def result(top1: float, epoch: int) -> dict:
        return {"val/top1": top1, "training_iteration": epoch, "epoch": epoch, "total_epochs": 3}

    for trial_id in ("stopped", "complete", "failed"):
        assert search.suggest(trial_id)["model.neurons"] in range(2, 17)
        search.on_trial_result(trial_id, result(20.0, 1))
    search.on_trial_result("stopped", result(25.0, 2))
    search.on_trial_result("complete", result(30.0, 2))
    # Tune hands the searcher a result only when the scheduler lets the trial go on: the one
    # on which ASHA stopped a trial (at a rung or at max_t) comes only with the trial's end
    search.on_trial_complete("stopped", result(25.0, 2))  # ended by the time budget
    search.on_trial_complete("complete", result(40.0, 3))  # its last epoch: ASHA's max_t
    search.on_trial_complete("failed", None, error=True)
    search.suggest("asha")
    search.on_trial_complete("asha", result(35.0, 1))  # ASHA stopped it at its first report
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert study.trials[0].intermediate_values == {1: 20.0, 2: 25.0}  # each epoch once
    assert study.trials[1].intermediate_values == {1: 20.0, 2: 30.0, 3: 40.0}
    assert study.trials[1].value == 40.0
    # TPE ranks a pruned trial by its last value: the stopping one must be there
    assert study.trials[3].intermediate_values == {1: 35.0}


def test_no_trial_starts_that_could_not_report_its_first_epoch_in_the_budget_left(
    tmp_path, monkeypatch, capsys
):
    """A trial started in the budget's last minute is stopped before it reports anything: once
    the budget left is shorter than the quickest trial took to its first result, the searcher
    starts none (Searcher.FINISHED). The clock survives the sweep's save and --resume."""
    import pickle

    from ray.tune.search import Searcher

    import finegrain.platform.tune as tune_module

    now = [1000.0]
    monkeypatch.setattr(tune_module.time, "time", lambda: now[0])
    search = optuna_searcher(SPACE, "s", tmp_path / "o.db", seed=0, time_budget=300)
    search.set_search_properties("val/top1", "max", {})

    def epoch(trial_id: str, seconds: float, iteration: int = 1) -> None:
        now[0] += seconds
        search.on_trial_result(trial_id, {"val/top1": 20.0, "training_iteration": iteration})

    assert search.suggest("a") not in (None, Searcher.FINISHED)  # nothing measured yet
    epoch("a", 120)  # its first result came 120 s after its start
    epoch("a", 30, iteration=2)  # later results do not time anything
    assert search.budget.quickest == 120
    assert search.suggest("b") not in (None, Searcher.FINISHED)  # 150 s left >= 120
    assert search.budget.left == 150
    epoch("b", 90)  # a cheaper configuration: the quickest is now 90 s
    assert search.budget.quickest == 90 and search.budget.left == 60
    assert search.suggest("c") == Searcher.FINISHED  # 60 s left < 90
    assert "no new trials: 60 s of the time budget left, less than the quickest trial took" in (
        capsys.readouterr().out
    )
    # a first result on which ASHA stopped the trial reaches the searcher only with its end
    # (Tune's order): it times the trial all the same
    late = optuna_searcher(SPACE, "l", tmp_path / "l.db", seed=0, time_budget=300)
    late.set_search_properties("val/top1", "max", {})
    late.suggest("a")
    now[0] += 200
    first = {"val/top1": 20.0, "training_iteration": 1, "epoch": 1, "total_epochs": 4}
    late.on_trial_complete("a", first)
    assert late.budget.quickest == 200 and late.budget.left == 100
    assert late.suggest("b") == Searcher.FINISHED  # 100 s left < 200

    # the saved searcher (Tune pickles its state) resumes with what was left, on a new clock
    budget = pickle.loads(pickle.dumps(search.budget))
    now[0] += 5000  # the sweep was interrupted for a while
    assert budget.left == 60 and not budget.admits("d")
    fresh = tune_module.FirstEpochBudget(300)
    assert fresh.admits("e") and fresh.left == 300  # no result yet: nothing to compare with
    # without a budget the searcher never stops early
    unlimited = optuna_searcher(SPACE, "u", tmp_path / "u.db", seed=0)
    unlimited.set_search_properties("val/top1", "max", {})
    assert unlimited.budget is None and unlimited.suggest("x") not in (None, Searcher.FINISHED)


def test_a_configuration_of_a_kind_too_slow_for_the_budget_left_is_never_started(
    tmp_path, monkeypatch, capsys
):
    """Once the configuration is sampled, its kind (categorical choices: DSTS's UDL on or off)
    is held to the quickest first epoch of its own kind: a refused one reaches Optuna as FAIL,
    saying why, and is never a Tune trial; TPE is asked again, and a cheaper kind may start."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import Searcher

    import finegrain.platform.tune as tune_module

    now = [1000.0]
    monkeypatch.setattr(tune_module.time, "time", lambda: now[0])
    space = {
        "model.udl": {"type": "choice", "values": [True, False]},
        "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
    }
    search = optuna_searcher(space, "k", tmp_path / "k.db", seed=0, time_budget=300)
    search.set_search_properties("val/top1", "max", {})
    for udl in (True, False, True, False, True, True, True):  # what TPE hands out, in order
        search._ot_study.enqueue_trial({"model.udl": udl})

    def epoch(trial_id: str, seconds: float) -> None:
        now[0] += seconds
        search.on_trial_result(trial_id, {"val/top1": 20.0, "training_iteration": 1})

    assert search.suggest("a")["model.udl"] is True
    epoch("a", 150)
    assert search.suggest("b")["model.udl"] is False  # any kind: 150 s left >= 150
    epoch("b", 60)
    assert search.budget.needed((("model.udl", True),)) == 150 and search.budget.left == 90
    assert search.suggest("c")["model.udl"] is False  # UDL refused (90 < 150), then plain
    out = capsys.readouterr().out
    assert (
        "a sampled configuration not started: 90 s of the time budget left, less than trials "
        "with model.udl=True took to their first epoch (150 s)"
    ) in out
    epoch("c", 30)  # the quickest now 30 s; 60 s left: only plain trials fit
    assert search.suggest("d") == Searcher.FINISHED  # three UDL draws in a row
    assert "no new trials: 3 configurations sampled in a row could not report" in (
        capsys.readouterr().out
    )
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{tmp_path / 'k.db'}")
    refused = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(refused) == 4 and all(t.params["model.udl"] for t in refused)
    assert all("not started" in t.user_attrs[tune_module.NOT_STARTED] for t in refused)
    assert all(tune_module.TUNE_TRIAL_ID not in t.user_attrs for t in refused)
    started = [t.user_attrs.get(tune_module.TUNE_TRIAL_ID) for t in study.trials]
    assert [t for t in started if t] == ["a", "b", "c"]


def test_asha_sends_no_trial_past_the_first_rung_before_a_quorum_has_reached_it():
    """One trial at a time: Ray's ASHA let the first trial train every epoch whatever its score;
    here the first rung needs η (= 3) trials before any goes on, then Ray's rule applies."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP

    def asha(quorum: int) -> ComparedASHA:
        return ComparedASHA(
            time_attr="training_iteration", metric="val/top1", mode="max", max_t=4,
            grace_period=1, reduction_factor=3, quorum=quorum,
        )  # fmt: skip

    def result(epoch: int, top1: float) -> dict:
        return {"training_iteration": epoch, "val/top1": top1}

    scheduler = asha(quorum=3)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trials[0], result(1, 50.0)) == stop  # the best, alone
    assert scheduler.on_trial_result(None, trials[1], result(1, 10.0)) == stop
    # the third makes the quorum and goes on by Ray's rule (above the 2/3 percentile of 50, 10)
    assert scheduler.on_trial_result(None, trials[2], result(1, 40.0)) == go
    assert scheduler.on_trial_result(None, trials[2], result(2, 45.0)) == go
    assert scheduler.on_trial_result(None, trials[2], result(3, 48.0)) == go  # first at rung 3
    assert scheduler.on_trial_result(None, trials[2], result(4, 49.0)) == stop  # max_t
    assert scheduler.on_trial_result(None, trials[3], result(1, 20.0)) == stop  # below the cut
    # Tune pickles the scheduler into the sweep's state: --resume keeps who reached the rung
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored._reached == {"t0", "t1", "t2", "t3"}

    # a one-trial sweep (quorum = num_samples = 1) is not stopped by a quorum it cannot reach
    single = asha(quorum=1)
    single.on_trial_add(None, trials[0])
    assert single.on_trial_result(None, trials[0], result(1, 5.0)) == go


def test_trials_the_time_budget_stopped_are_settled_in_optuna_when_the_sweep_ends(tmp_path):
    """Tune's time budget terminates the running trials without telling the searcher: once the
    sweep has ended they are COMPLETE (every epoch), PRUNED (fewer) or FAIL, never RUNNING."""
    from types import SimpleNamespace

    import optuna
    from optuna.trial import TrialState

    from finegrain.platform.tune import settle_study

    search = optuna_searcher({"optim.lr": SPACE["optim.lr"]}, "s", tmp_path / "o.db", seed=0)
    search.set_search_properties("val/top1", "max", {})
    ends = {
        "all": {"val/top1": 40.0, "epoch": 2, "total_epochs": 2},
        "early": {"val/top1": 20.0, "epoch": 1, "total_epochs": 2},
        "error": {"val/top1": 10.0, "epoch": 1, "total_epochs": 2},
        "told": {"val/top1": 30.0, "epoch": 2, "total_epochs": 2},  # its end reached Optuna
        "last": {"val/top1": 25.0, "epoch": 1, "total_epochs": 2},
        "unreported": {},  # stopped before its first epoch
    }
    for trial_id, last in ends.items():
        search.suggest(trial_id)
        if last:
            search.on_trial_result(trial_id, {**last, "training_iteration": last["epoch"]})
    search.on_trial_complete("told", ends["told"])
    results = [
        SimpleNamespace(metrics={**m, "trial_id": t} if m else {}, error=None)
        for t, m in ends.items()
    ]
    results[2].error = RuntimeError("worker died")
    # "last": the budget stopped it as its last epoch was reported; its MLflow run has epoch 2
    logged = {"all": (2, 40.0), "early": (1, 20.0), "last": (2, 35.0)}
    assert settle_study(tmp_path / "o.db", "s", results, logged) == {
        "COMPLETE": 2, "PRUNED": 2, "FAIL": 1
    }  # fmt: skip
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE,
        TrialState.COMPLETE, TrialState.PRUNED,
    ]  # fmt: skip
    assert study.trials[0].value == 40.0 and study.trials[1].value == 20.0  # its last epoch's
    assert study.trials[4].value == 35.0  # from its MLflow run, not Tune's epoch-1 report
    assert settle_study(tmp_path / "o.db", "s", results) == {}  # nothing left to settle


@pytest.mark.parametrize("method", sorted(METHODS))
def test_default_spaces_convert_and_their_bounds_validate_for_their_method(method):
    space = check_space(default_space(method))
    base = load_config("tune_synthetic", [f"model.method={method}"]).model_dump(mode="json")
    base["model"] = {"method": method, "backbone": "tiny"}  # only the method's own options
    for end in ("low", "high"):
        params = {
            k: s["values"][0 if end == "low" else -1] if s["type"] == "choice" else s[end]
            for k, s in space.items()
        }
        cfg = apply_params(base, params)
        assert cfg.model.method == method


def test_apply_params_sets_dotted_keys_builds_lists_and_converts_numpy_scalars():
    base = load_config("tune_synthetic").model_dump(mode="json")
    before = json.dumps(base, sort_keys=True)
    cfg = apply_params(
        base,
        {
            "model.neurons": np.int64(7),
            "model.udl": np.bool_(False),
            "model.tau": np.float64(0.5),
            "optim.lr": np.float32(0.02),
            "data.synthetic.seed": 3,
        },
    )
    assert cfg.model.neurons == 7 and type(cfg.model.neurons) is int
    assert cfg.model.udl is False
    assert cfg.model.tau == 0.5 and type(cfg.model.tau) is float
    assert cfg.optim.lr == pytest.approx(0.02)
    assert cfg.data.synthetic.seed == 3
    assert cfg.model.width == base["model"]["width"]  # untouched fields kept
    assert cfg.optim.epochs == base["optim"]["epochs"]
    assert json.dumps(base, sort_keys=True) == before  # the base dict is not modified

    raw = load_config("tune_synthetic", ["model.method=classreg"]).model_dump(mode="json")
    raw["model"] = {"method": "classreg", "backbone": "tiny"}
    gamma = {f"model.gamma.{i}": np.float64(v) for i, v in [(2, 0.3), (0, 0.1), (3, 0.4), (1, 0.2)]}
    cfg = apply_params(raw, gamma)
    assert cfg.model.gamma == [0.1, 0.2, 0.3, 0.4]
    assert all(type(g) is float for g in cfg.model.gamma)


def test_apply_params_rejects_invalid_values_naming_the_field():
    base = load_config("tune_synthetic").model_dump(mode="json")
    with pytest.raises(ConfigError, match="optim.lr"):
        apply_params(base, {"optim.lr": -1.0})
    with pytest.raises(ConfigError, match="model.neurons: Input should be a valid integer"):
        apply_params(base, {"model.neurons": 2.5})
    with pytest.raises(ConfigError, match="model.bogus: not an option of method 'dsts'"):
        apply_params(base, {"model.bogus": 1})


def test_load_space_reads_yaml_with_or_without_the_space_key(tmp_path):
    assert load_space(None, "u2s") == default_space("u2s")
    adamw = load_space(None, "u2s", "adamw")
    assert adamw["optim.lr"]["high"] <= 0.01 < default_space("u2s")["optim.lr"]["high"]
    assert adamw.keys() == default_space("u2s").keys()
    wrapped, bare, empty = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    wrapped.write_text(yaml.safe_dump({"space": SPACE}))
    bare.write_text(yaml.safe_dump(SPACE))
    empty.write_text("")
    assert load_space(str(wrapped), "dsts") == SPACE
    assert load_space(str(bare), "dsts") == SPACE
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_space(str(empty), "dsts")
    with pytest.raises(FileNotFoundError):
        load_space(str(tmp_path / "missing.yaml"), "dsts")


def test_resolve_resume_finds_the_latest_or_a_named_sweep(tmp_path):
    sweeps = tmp_path / "tune"
    with pytest.raises(ConfigError, match="no sweep to resume"):
        _resolve_resume(sweeps, "latest")
    (sweeps / "tune-dsts-1").mkdir(parents=True)
    (sweeps / "LATEST").write_text("tune-dsts-1\n")
    assert _resolve_resume(sweeps, "latest") == "tune-dsts-1"
    assert _resolve_resume(sweeps, "tune-dsts-1") == "tune-dsts-1"
    with pytest.raises(ConfigError, match="no such sweep; known: tune-dsts-1"):
        _resolve_resume(sweeps, "tune-dsts-2")


def test_close_stopped_children_kills_only_the_sweeps_running_children(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    other = client.create_run(exp, run_name="other-sweep").info.run_id

    def child(name, of, status=None):
        run_id = client.create_run(exp, run_name=name, tags={PARENT_TAG: of}).info.run_id
        if status:
            client.set_terminated(run_id, status=status)
        return run_id

    stopped, done = child("stopped", parent), child("done", parent, "FINISHED")
    failed, foreign = child("failed", parent, "FAILED"), child("foreign", other)
    # stopped by Tune right after reporting its last epoch (ASHA's max_t): complete
    at_max_t, halfway = child("at_max_t", parent), child("halfway", parent)
    for run_id, epochs in ((at_max_t, 2), (halfway, 1)):
        client.set_tag(run_id, "total_epochs", "2")
        for step in range(1, epochs + 1):
            client.log_metric(run_id, "val/top1", 50.0, step=step)
    close_stopped_children(uri, parent)
    runs = (stopped, done, failed, foreign, at_max_t, halfway)
    status = {r: client.get_run(r).info.status for r in runs}
    assert status == {
        stopped: "KILLED",
        done: "FINISHED",
        failed: "FAILED",
        foreign: "RUNNING",
        at_max_t: "FINISHED",
        halfway: "KILLED",
    }
    assert client.get_run(stopped).data.tags["early_stopped"] == "true"
    assert client.get_run(halfway).data.tags["early_stopped"] == "true"
    assert "early_stopped" not in client.get_run(done).data.tags
    assert "early_stopped" not in client.get_run(at_max_t).data.tags
    assert client.get_run(parent).info.status == "RUNNING"  # the parent is the caller's to close


# ------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The tiny synthetic benchmark, generated and sharded once for this module's runs."""
    from finegrain.platform.data import prepare_data

    run_dir = tmp_path_factory.mktemp("data")
    cfg = load_config("tune_synthetic", [*TINY, f"run.dir={run_dir}"])
    return prepare_data(cfg, quiet=True).shards


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"space": SPACE}))
    return path


def sweep_args(shards: Path, run_dir: Path, space: Path, *extra: str) -> list[str]:
    return [
        "--space", str(space), "--num-samples", "2", "--time-budget", "3600",
        "--set", *TINY, f"data.shards={shards}", f"run.dir={run_dir}",
        *extra,
    ]  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_env(tmp_path):
    """The environment for a Ray we start in a subprocess; its processes are ended afterwards."""
    marker = secrets.token_hex(8)
    # short: Ray's socket paths (under RAY_TMPDIR) must stay below 107 characters
    ray_tmp = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")
    env = subprocess_env()
    env.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        FINEGRAIN_TEST_RAY=marker,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    yield env
    end_marked_processes(marker)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def end_marked_processes(marker: str) -> None:
    """SIGKILL every process whose environment carries our marker (raylet, workers, drivers)."""
    needle = f"FINEGRAIN_TEST_RAY={marker}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def child_runs(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")


def parent_run(client: MlflowClient, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


# ------------------------------------------------------------------------ ray job submit


# Lines of Ray's (and MLflow's, Optuna's) internals that signal no fault: none may reach a
# sweep's console (issue 10). Each was traced; see finegrain/platform/logs.py.
INTERNAL_LINES = (
    "core_worker.cc",  # "has constructor arguments in the object store" (ray#53727)
    "RayDeprecationWarning",
    "exclude_resources",
    "encoding ratio",
    "Progress bars disabled",
    "Token authentication is enabled",
    "Requesting resources",
    "Started training worker group",
    "Setting up process group",
    "Detected that the Ray Train controller actor",
    "Failed to query Ray Train Controller actor state",
    "View run",
    "ExperimentalWarning",
    "Creating initial MLflow database tables",
    "Starting execution of Dataset",
    "Failed to fetch metrics for",  # a trial stopped before it reported: counted by the sweep
    "Tuner.restore(",  # Tune's resume hint for its Python API: ours is --resume NAME
    "TensorBoard",  # Tune's default TensorBoard logger's hint: sweeps run without that logger
)


def assert_clean_console(out: str) -> None:
    found = [line for line in out.splitlines() if any(k in line for k in INTERNAL_LINES)]
    assert not found, "Ray internals on the console:\n" + "\n".join(found[:20])


@pytest.mark.slow
def test_ray_job_submit_on_a_2_cpu_head_runs_the_main_job_to_succeeded(
    tmp_path, shards, space_file, ray_env
):
    """The README's `ray start --head --num-cpus 2` + `ray job submit`: one trial at a time
    (each needs both CPUs), every trial finishes, every MLflow run FINISHED, a clean console."""
    head, log, address = start_head(tmp_path, ray_env, num_cpus=2)
    run_dir = tmp_path / "runs"
    try:
        job_args = sweep_args(shards, run_dir, space_file, "--name", "job-sweep")
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
            "--submission-id", "fg-tune-test", "--no-wait", "--",
            "python", "experiments/tune_dsts.py", *job_args,
        ]  # fmt: skip
        token = ray_env["RAY_AUTH_TOKEN"]
        submit_job(submit, ray_env, address, token, "fg-tune-test")
        job = wait_for_job(address, token, "fg-tune-test", timeout=540)
        out = jobs_api(address, token, "fg-tune-test/logs")["logs"]
    finally:
        head.terminate()  # `ray start --block` ends its node's processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
    assert job["status"] == "SUCCEEDED", (job, out[-6000:])
    assert job["entrypoint"].startswith("python experiments/tune_dsts.py")
    assert "2 CPUs: 1 trial at a time (asked for 2), each 2 CPUs" in out, out[:3000]
    assert "best configuration (exact values" in out and "one-pass baseline:" in out, out[-4000:]
    assert_clean_console(out)

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = parent_run(client, "tune-dsts", "job-sweep")
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent.info.run_id)
    names = sorted(child_name(r) for r in children)
    assert len(names) == 3 and "job-sweep-baseline-onepass" in names, names
    # the UI's names: what tells the children apart first (the runs table cuts the end)
    shown = sorted(r.info.run_name for r in children)
    assert "onepass baseline · job-sweep" in shown, shown
    trial_ids = {n.removeprefix("job-sweep-") for n in names} - {"baseline-onepass"}
    assert {f"{t} · job-sweep" for t in trial_ids} < set(shown), shown
    # one epoch = ASHA's max_t: no trial is stopped early, every one ends FINISHED
    assert all(r.info.status == "FINISHED" for r in children), [
        (child_name(r), r.info.status, r.data.tags.get("early_stopped")) for r in children
    ]
    for run in children:  # every trial's epoch reached MLflow through the sweep's server
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")]
        assert steps == [1], (child_name(run), steps)
    assert 0.0 <= parent.data.metrics["val/best_top1"] <= 100.0  # in %
    assert 0.0 <= parent.data.metrics["val/baseline_best_top1"] <= 100.0
    # the artifacts, as the README's `mlflow ui` over this store serves them (from elsewhere)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    child = next(r for r in children if "baseline" not in child_name(r))
    with MlflowUI(run_dir / "mlflow.db", elsewhere) as ui:
        artifacts = ui.files(parent.info.run_id)
        trial = ui.files(child.info.run_id)
        config = ui.read(child.info.run_id, "config.yaml").decode()
    expected = {"search_space.yaml", "best_config.yaml", "results.csv", "parallel_coordinates.png"}
    assert expected <= artifacts, artifacts
    assert {"config.yaml", "eval"} <= trial, trial
    assert "method: dsts" in config and "neurons:" in config


def submit_job(command: list[str], env: dict, address: str, token: str, job: str) -> None:
    """``ray job submit --no-wait``, retried while the head is still coming up (the Jobs API
    answers before the node's job agent does; a loaded dashboard may drop the connection)."""
    deadline = time.time() + 180
    while True:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        if done.returncode == 0:
            return
        try:  # the request may have gone through before the connection dropped
            jobs_api(address, token, job)
            return
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            pytest.fail(f"ray job submit kept failing:\n{(done.stdout + done.stderr)[-4000:]}")
        time.sleep(5)


def wait_for_job(address: str, token: str, job: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = jobs_api(address, token, job)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
        except (OSError, ValueError):
            pass  # a busy dashboard; ask again
        time.sleep(3)
    pytest.fail(f"job {job} did not end within {timeout:.0f} s")


def jobs_api(address: str, token: str, job: str = "") -> dict | list:
    """GET the Ray Jobs REST API (``/api/jobs/[id]``) with the cluster's token."""
    request = urllib.request.Request(
        f"{address}/api/jobs/{job}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_head(tmp_path: Path, env: dict, attempts: int = 3, num_cpus: int = 6):
    """``ray start --head --block`` on free loopback ports, up to the node having started
    (``ray start`` prints "Ray runtime started.") and the Jobs API answering.

    The ports are picked free, released, then bound by Ray: another process starting at the
    same moment can take one, and the head then exits at start. Under load the node can also
    fail its own start-up after the dashboard already answers ("The current node timed out
    during startup": GCS node info past its deadline, seen in CI beside another pytest worker's
    runs), so the head counts as up only once ``ray start`` says so. Both are retried on fresh
    ports.
    """
    for attempt in range(1, attempts + 1):
        gcs, dash, client_port, agent, agent_grpc, metrics, runtime_env = free_ports(7)
        start = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
        ]  # fmt: skip
        path = tmp_path / f"ray_start_{attempt}.log"
        log = open(path, "wb")  # noqa: SIM115 (closed by the caller, or below)
        head = subprocess.Popen(
            start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 180
        while time.time() < deadline and head.poll() is None:
            try:
                jobs_api(address, env["RAY_AUTH_TOKEN"])
                if "Ray runtime started." in path.read_text(errors="replace"):
                    return head, log, address
            except (OSError, ValueError):
                pass
            time.sleep(1)
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        text = path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "rror" in line or "xception" in line]
        report = "\n".join(errors[-20:]) or text[-3000:]
    pytest.fail(f"ray start --head did not come up in {attempts} attempts; last:\n{report}")


# ------------------------------------------------------------------------ two nodes


@pytest.mark.slow
def test_two_node_cluster_places_trainer_workers_on_both_nodes(tmp_path, shards, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from finegrain.platform.train import run_experiment

    # the Cluster writes its address into $RAY_TMPDIR/ray/ray_current_cluster: keep it private
    ray_tmp = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    # 3 CPUs a node and 2 a worker: the two workers cannot share a node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        cluster.add_node(num_cpus=3, resources={"second_node": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        cfg = load_config(
            "tune_synthetic",
            [
                *TINY,
                "model.method=onepass",
                f"data.shards={shards}",
                "data.decode_cpus=0.5",
                "scaling.workers=2",
                "scaling.cpus_per_worker=2",
                f"run.dir={tmp_path}",
                "run.name=two-nodes",
            ],
        )
        result = run_experiment(cfg, quiet=True)
        # a process on the second node logs into the driver's SQLite store through the relay
        on_second = ray.remote(log_from_here()).options(resources={"second_node": 0.01})
        relayed = ray.get(on_second.remote(result.tracking_uri, result.run_id))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.metrics["epoch"] == 1
    assert result.metrics["sys/rank_param_drift"] == pytest.approx(0.0, abs=1e-6)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    second = next(node for node, res in nodes.items() if "second_node" in res)
    worker_nodes = run.data.tags["worker_nodes"].split(",")
    assert len(worker_nodes) == 2 and set(worker_nodes) == set(nodes), (worker_nodes, nodes)
    assert relayed == "RelayedClient"
    assert run.data.tags["from_second_node"] == second
    assert client.get_metric_history(result.run_id, "relayed")[0].value == 1.0
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "relayed")}
    assert artifacts == {"relayed/note.txt", "relayed/figure.png"}


def log_from_here():
    """A function the workers can unpickle (this test module is not importable there)."""

    def log(uri: str, run_id: str) -> str:
        """In a task on another node: tag, metric, local file and figure into the driver's store."""
        import tempfile
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import ray

        logger = tracking.RunLogger(uri, run_id)
        logger.tags({"from_second_node": ray.get_runtime_context().get_node_id()})
        logger.metrics({"relayed": 1.0}, step=1)
        with tempfile.TemporaryDirectory() as d:
            note = Path(d) / "note.txt"
            note.write_text("written on the second node")
            logger.artifact(note, "relayed")
        fig = plt.figure()
        logger.figure(fig, "relayed/figure.png")
        plt.close(fig)
        return type(logger.client).__name__

    return log


# ------------------------------------------------------------------------ --resume


class Driver:
    """``experiments/tune_dsts.py`` in a subprocess, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "experiments/tune_dsts.py", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def find(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.output)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the sweep did not end within {timeout:.0f} s:\n{self.output[-4000:]}")
        self.reader.join(timeout=10)
        return rc


def wait_for_children(driver: Driver, count: int, timeout: float = 420):
    """(client, parent id) once the sweep's parent run has ``count`` child runs."""
    deadline = time.time() + timeout
    client = parent = None
    while time.time() < deadline and driver.proc.poll() is None:
        time.sleep(1)
        found = driver.find(r"MLflow parent run (\w+) in (http://\S+)")
        if found is None:
            continue
        parent, client = found.group(1), client or MlflowClient(found.group(2))
        try:
            runs = child_runs(client, parent)
        except Exception:  # the server is busy; ask again
            continue
        if len(runs) >= count:
            return client, parent, runs
    driver.proc.kill()
    pytest.fail(f"the sweep never had {count} trials:\n{driver.output[-4000:]}")


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_and_by_kill_9_resumes_without_rerunning_or_duplicating(
    tmp_path, shards, space_file, ray_env
):
    """Ctrl+C once trial 2 has started, ``--resume``; ``kill -9`` of that driver once it has
    reopened trial 2's run, ``--resume`` again: the sweep finishes with every trial run once.

    With ``--max-concurrent 1`` the searcher suggests trial 2 only after Tune has recorded
    trial 1 as finished, so trial 2's MLflow run appearing is the moment to strike. Ctrl+C
    makes Tune stop the trials and save its state; kill -9 leaves no chance to close anything:
    the killed driver's local Ray and MLflow server end with it, and the resumed sweep closes
    what it left RUNNING, reruns only the unfinished trial, and reuses its MLflow run. (Two
    trials prove it: each driver's strike lands on the sweep's second trial.)
    """
    run_dir = tmp_path / "runs"
    args = sweep_args(
        shards, run_dir, space_file, "--max-concurrent", "1", "--no-baseline", "--name", "rs"
    )
    first = Driver(args, ray_env)
    _, parent, _ = wait_for_children(first, 2)
    first.proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune stops the trials and saves its state
    assert first.wait(timeout=180) == 130, first.output[-4000:]
    assert "--resume rs" in first.output
    assert_clean_console(first.output)

    store = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    # an interrupted sweep is not a finished one: nothing left RUNNING, nothing claimed FINISHED
    # but the trial that did finish
    assert store.get_run(parent).info.status == "KILLED", first.output[-4000:]
    before = {child_name(r): r for r in child_runs(store, parent)}
    status = sorted(r.info.status for r in before.values())
    assert status == ["FINISHED", "KILLED"], (status, first.output[-4000:])
    done = next(r for r in before.values() if r.info.status == "FINISHED")
    stopped = next(r for r in before.values() if r.info.status == "KILLED")

    second = Driver([*args[:-2], "--resume", "rs"], ray_env)
    deadline = time.time() + 420  # until the resumed sweep reruns trial 2, reopening its run
    while store.get_run(stopped.info.run_id).info.status != "RUNNING":
        assert time.time() < deadline and second.proc.poll() is None, second.output[-4000:]
        time.sleep(0.5)
    second.proc.kill()  # kill -9 of the driver, mid-trial
    second.wait(timeout=60)
    assert f"[{child_name(done)}] epoch" not in second.output  # trial 1 was not rerun

    third = Driver([*args[:-2], "--resume", "rs"], ray_env)
    rc = third.wait(timeout=420)
    assert rc == 0, third.output[-4000:]
    assert "resuming sweep rs" in third.output
    assert "sweep rs: 2 trials: 2 ran all their epochs" in third.output, third.output[-4000:]
    assert f"[{child_name(done)}] epoch" not in third.output  # trial 1 was not rerun
    assert_clean_console(third.output)

    resumed = parent_run(store, "tune-dsts", "rs")
    assert resumed.info.run_id == parent and resumed.info.status == "FINISHED"
    assert len(store.get_metric_history(parent, "val/best_top1")) == 1  # logged once, at the end
    after = child_runs(store, parent)
    names = [child_name(r) for r in after]
    assert len(names) == len(set(names)) == 2, names  # no run duplicated, none lost
    assert set(before) == set(names)
    assert all(r.info.status == "FINISHED" for r in after), [r.info.status for r in after]
    again = store.get_run(done.info.run_id)
    assert (again.info.start_time, again.info.end_time, again.info.status) == (
        done.info.start_time,
        done.info.end_time,
        "FINISHED",
    )
    for run in after:  # trial 1's epoch logged once; trial 2 reran from scratch
        steps = [m.step for m in store.get_metric_history(run.info.run_id, "val/top1")]
        assert steps and set(steps) == {1}, (child_name(run), steps)
    # Tune's result files, which the results table reads, and no TensorBoard files, resumed too
    trials = [p for p in (run_dir / "tune" / "rs").iterdir() if p.is_dir()]
    assert trials and all((t / "progress.csv").is_file() for t in trials), trials
    assert not list((run_dir / "tune" / "rs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_time_budget_that_stops_a_training_trial_leaks_nothing(tmp_path, shards, monkeypatch):
    """Trials stopped mid-run (their TorchTrainer's controller dies with the trial's actor):
    ASHA stops the first after its first epoch (no quorum of 2 trials has reached it), the time
    budget the second, as it starts or trains depending on the machine's load. Every run is
    KILLED as stopped early, the first with the bad video it met already counted; within
    seconds of the sweep's end every CPU of the cluster is free again (Ray Train's cleaner,
    served by the dashboard's State API, removed the placement groups of the dead controllers,
    or the sweep did where no cleaner watched), and the coordinator Ray Data shares the cluster
    through holds nothing for the dead controllers."""
    import optuna
    import pyarrow.parquet as pq
    import ray

    from finegrain.platform import cluster
    from finegrain.platform.tune import FirstEpochBudget, run_sweep

    # the budget must stop a running trial here: the sweep's searcher would not start the
    # second one where the budget left is shorter than the first one's first epoch (a test of
    # its own above), which on a loaded machine it may be
    monkeypatch.setattr(FirstEpochBudget, "fits", lambda self, kind=None: True)
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    first = sorted(bad.glob("shards/train-*.parquet"))[0]
    table = pq.read_table(first)
    videos = table.column("video").to_pylist()
    videos[0] = b"\x13" * 2000  # not a video
    table = table.set_column(table.schema.get_field_index("video"), "video", [videos])
    pq.write_table(table.cast(pq.read_schema(first)), first)

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(num_cpus=2)
    try:
        base = load_config(
            "tune_synthetic",
            [*TINY, "optim.epochs=200", f"data.shards={bad}", f"run.dir={tmp_path / 'runs'}"],
        )

        def sweep(name: str, trials: int, budget: float):
            space = yaml.safe_load(yaml.safe_dump(SPACE))
            return run_sweep(
                base,
                space=space,
                num_samples=trials,
                max_concurrent=trials,
                time_budget=budget,
                name=name,
                baseline=False,
            )

        # an epoch must end inside the budget, on a loaded 2-core machine too (90 s was too
        # short on 2026-12-02, with the job-submit test on the other pytest worker)
        result = sweep("budget", 2, 150)
        leaked = {
            k: ray.cluster_resources().get(k, 0) - ray.available_resources().get(k, 0)
            for k in ("CPU", "GPU")
        }
        live = cluster.live_placement_groups()
        client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        runs = sorted(child_runs(client, result.parent_run_id), key=lambda r: r.info.start_time)
        # nor does Ray Data's resource coordinator hold the dead controllers' requests (which
        # would starve the next trial's reads for 180 s)
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        requests = [r.data.tags.get(cluster.TRAIN_REQUEST_TAG) for r in runs]
        owners = [r.data.tags.get(cluster.TRIAL_ACTOR_TAG) for r in runs]
        held = ray.get(  # every Ray Train request it holds, tagged on a run or not
            coordinator.__ray_call__.remote(
                lambda c: sorted(k for k in c._ongoing_reqs if str(k).startswith("train-"))
            )
        )
        # Ray Data's cluster actors belong to the driver (cluster.connect), not to a trial's
        # placement group, which would kill them at the trial's end (every next trial would
        # start both again)
        from ray.util.state import list_actors

        alive = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE")],
            detail=True,
        )
        data_actors = {
            a.class_name: a.placement_group_id
            for a in alive
            if a.class_name in ("_StatsActor", "ActorLocationTracker")
        }
        # a budget in which no trial finishes an epoch: the sweep fails, and says so in MLflow
        with pytest.raises(RuntimeError, match="no trial finished an epoch") as failure:
            sweep("too-short", 1, 2)
    finally:
        ray.shutdown()
    too_short = parent_run(client, base.tracking.experiment, "too-short")
    assert too_short.info.status == "FAILED"  # not left RUNNING
    assert "no trial finished an epoch" in too_short.data.tags["error"], failure.value
    assert leaked == {"CPU": 0, "GPU": 0} and not live, (leaked, live)
    assert data_actors == {"_StatsActor": None, "ActorLocationTracker": None}, data_actors
    # the trained trial's run names its request, and the trial actor that owns its controller
    # (the request is cancelled once that actor is gone); a trial stopped before its trainer
    # was built (as its run opened) made none
    assert requests[0] and all(q is None or q.startswith("train-") for q in requests), requests
    assert all(bool(o) == bool(q) for o, q in zip(owners, requests)), (owners, requests)
    assert held == [], held
    assert runs and all(r.info.status == "KILLED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    assert all(r.data.tags.get("early_stopped") == "true" for r in runs)
    stopped = runs[0]  # the first trial, which trained an epoch
    tuned = tmp_path / "runs" / "tune" / "budget" / "optuna.db"
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{tuned}")
    assert {t.state.name for t in study.trials} == {"PRUNED"}, study.trials  # none RUNNING
    assert 1 <= len(client.get_metric_history(stopped.info.run_id, "val/top1")) < 200
    assert stopped.data.metrics["sys/bad_videos"] == 1  # counted as met, not lost with the trial


def test_the_sweep_table_accounts_for_a_trial_stopped_as_it_reported(tmp_path, capsys):
    """A trial the time budget stopped just as its epoch ended has no result in Tune (or one
    epoch less than it ran), but its epoch is in its MLflow run: the sweep's table lists it from
    there (what the space sampled: not a conditional key's default), and the best
    configuration is the reconciled table's."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.entities import Metric, Param

    from finegrain.platform.tune import _best, _with_unreported

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sw").info.run_id
    curves = {"aaa": [30.0, 50.0], "bbb": [20.0], "ccc": [], "ddd": [10.0, 60.0]}
    for trial, curve in curves.items():
        rid = client.create_run(
            exp, run_name=f"sw-{trial}", tags={"mlflow.parentRunId": parent}
        ).info.run_id
        client.log_batch(
            rid,
            metrics=[Metric("val/top1", v, 0, i + 1) for i, v in enumerate(curve)],
            params=[  # a run logs its whole config, unsampled keys too
                Param("model.neurons", "7"),
                Param("model.udl", "false" if trial == "bbb" else "true"),
                Param("model.udl_alpha_scale", "1.0"),
                Param("optim.momentum", "0.9"),
            ],
        )
    space = {
        "model.neurons": {"type": "int", "low": 2, "high": 16},
        "model.udl": {"type": "choice", "values": [True, False]},
        "model.udl_alpha_scale": {
            "type": "uniform", "low": 0.5, "high": 3.0, "when": {"model.udl": True}
        },
    }  # fmt: skip
    tune_rows = pd.DataFrame(
        [{"model.neurons": 4, "model.udl": True, "model.udl_alpha_scale": 2.0,
          "val/best_top1": 50.0, "val/top1_last": 50.0, "epochs": 2, "trial_id": "aaa"},
         {"model.neurons": 3, "model.udl": True, "model.udl_alpha_scale": 2.0,
          "val/best_top1": 10.0, "val/top1_last": 10.0, "epochs": 1,
          "trial_id": "ddd"}]  # Tune missed ddd's second epoch
    )  # fmt: skip
    table = _with_unreported(tune_rows, uri, parent, "sw", space)
    assert table["trial_id"].tolist() == ["ddd", "aaa", "bbb"]  # ccc finished no epoch
    ddd, bbb = table.iloc[0], table.iloc[2]
    assert (ddd["val/best_top1"], ddd["val/top1_last"], ddd["epochs"]) == (60.0, 60.0, 2)
    assert (bbb["model.neurons"], bbb["val/best_top1"], bbb["epochs"]) == (7, 20.0, 1)
    assert not bbb["model.udl"] and pd.isna(bbb["model.udl_alpha_scale"])  # not sampled
    assert "optim.momentum" not in table  # not searched
    assert "stopped 2 trial(s) as an epoch was reported" in capsys.readouterr().out

    def result(trial_id, neurons):
        return SimpleNamespace(metrics={"trial_id": trial_id}, config={"model.neurons": neurons})

    assert _best(table, [result("aaa", 4), result("ddd", 3)]) == ({"model.neurons": 3}, 60.0)
    # the best trial has no Tune result at all: its sampled values come from the table
    only_mlflow = table[table["trial_id"] == "bbb"].reset_index(drop=True)
    assert _best(only_mlflow, [result("aaa", 4)]) == (
        {"model.neurons": 7, "model.udl": False},
        20.0,
    )


def test_the_sweep_accounts_for_every_trial_by_how_it_ended(tmp_path):
    """Every trial is counted, including one the time budget stopped before its first epoch
    (it has no row in the table) and one it stopped before it opened its MLflow run (Tune and
    Optuna know it, MLflow does not); the baseline is not a trial."""
    from mlflow.entities import Metric

    from finegrain.platform.tune import SweepResult, _outcomes

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sw").info.run_id
    ended = {"a": ("FINISHED", 4), "b": ("KILLED", 1), "c": ("KILLED", 0), "d": ("FAILED", 0)}
    ended |= {"e": ("FINISHED", 4), "baseline-onepass": ("FINISHED", 4)}
    for trial, (status, epochs) in ended.items():
        rid = client.create_run(
            exp, run_name=f"sw-{trial}", tags={"mlflow.parentRunId": parent}
        ).info.run_id
        client.log_batch(rid, metrics=[Metric("val/top1", 9.0, 0, i + 1) for i in range(epochs)])
        client.set_terminated(rid, status)
    assert _outcomes(uri, parent, trials=5) == {
        "finished": 2, "stopped": 1, "unstarted": 1, "failed": 1
    }  # fmt: skip
    outcomes = _outcomes(uri, parent, trials=6)  # the sixth never opened its run
    assert outcomes == {"finished": 2, "stopped": 1, "unstarted": 2, "failed": 1}
    line = SweepResult("sw", parent, {}, 0.0, None, uri, None, outcomes).accounting()
    assert line == (
        "6 trials: 2 ran all their epochs, 1 stopped early (ASHA or the time budget), "
        "2 stopped before their first epoch (the time budget), 1 failed"
    )
    one = {"finished": 1, "stopped": 0, "unstarted": 1, "failed": 0}
    line = SweepResult("sw", parent, {}, 0.0, None, uri, None, one).accounting()
    assert "1 stopped before its first epoch" in line, line


def test_tunes_warning_on_a_trial_that_never_reported_is_dropped_and_other_failures_shown(
    tmp_path, caplog
):
    """Ray's own message for a trial with no result files (the time budget stopped it before it
    reported: the sweep counts it) is dropped; a trial whose metrics could not be read for
    another reason still warns."""
    from types import SimpleNamespace

    from pyarrow.fs import LocalFileSystem
    from ray.tune.analysis.experiment_analysis import ExperimentAnalysis

    from finegrain.platform.logs import quiet_worker_logs

    quiet_worker_logs()

    def fetch(*folders):
        trials = [
            SimpleNamespace(
                trial_id=f.name,
                last_result={"trial_id": f.name},  # what Trial gives for one that never reported
                storage=SimpleNamespace(trial_fs_path=str(f), storage_filesystem=LocalFileSystem()),
            )
            for f in folders
        ]
        analysis = SimpleNamespace(trials=trials)
        analysis._fetch_trial_dataframe = ExperimentAnalysis._fetch_trial_dataframe.__get__(
            analysis
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ExperimentAnalysis._fetch_trial_dataframes(analysis)
        return [r.getMessage() for r in caplog.records if "Failed to fetch" in r.getMessage()]

    unreported, broken = tmp_path / "unreported", tmp_path / "broken"
    unreported.mkdir(), broken.mkdir()
    (broken / "result.json").write_text("{not json\n")
    assert fetch(unreported) == []
    (warning,) = fetch(unreported, broken)
    assert "2 trial(s)" in warning and "JSONDecodeError" in warning


def test_a_trial_closing_its_run_while_the_sweep_stops_it_ends_killed(tmp_path):
    """A sweep stopping its trials (ASHA, the time budget, Ctrl+C) tags their runs
    ``early_stopped`` first; what a trial then closes its run with — FAILED because its trainer
    died with the trial's process, FINISHED because its last epoch landed inside Tune's stop
    window (Tune reruns it on --resume all the same) — ends KILLED, with no error; an untagged
    run's failure stays a failure."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("r", artifact_location=(tmp_path / "art").as_uri())
    for status in ("FAILED", "FINISHED"):
        stopped = client.create_run(exp).info.run_id
        client.set_tag(stopped, "early_stopped", "true")  # the sweep's first step
        died = RuntimeError("The actor is dead because its owner has died")
        assert tracking.close_run(uri, stopped, status, error=died if status == "FAILED" else None)
        run = client.get_run(stopped)
        assert (run.info.status, run.data.tags.get("error")) == ("KILLED", None), status
        assert not tracking.close_run(uri, stopped, "FAILED", error=RuntimeError("late"))
    failed = client.create_run(exp).info.run_id
    assert tracking.close_run(uri, failed, "FAILED", error=RuntimeError("a real bug"))
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: a real bug"


def test_a_stopped_trials_run_reopened_by_resume_ends_by_its_new_outcome(tmp_path):
    """``--resume`` reruns a trial Ctrl+C stopped (its run KILLED, tagged ``early_stopped``) or
    that failed, reusing its run: the reopened run sheds the old tags, and finishing ends it
    FINISHED, not KILLED by the earlier stop."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for status, tags in (("KILLED", {"early_stopped": "true"}), ("FAILED", {"error": "E: x"})):
        first = tracking.open_run(uri, "sweep", f"rs-{status}", tmp_path, tags=tags)
        client.set_terminated(first, status=status)
        again = tracking.open_run(uri, "sweep", f"rs-{status}", tmp_path)
        run = client.get_run(again)
        assert again == first and run.info.status == "RUNNING"
        assert not {"early_stopped", "error"} & set(run.data.tags), status
        assert tracking.close_run(uri, again, "FINISHED")
        assert client.get_run(again).info.status == "FINISHED"


def test_ctrl_c_tags_the_running_trials_of_the_sweep_and_then_stops_tune(tmp_path):
    """Ctrl+C inside ``graceful_interrupt``: Tune's stop signal (SIGUSR1) at once, and
    :func:`mark_stopping` tags exactly the sweep's runs still RUNNING before the context ends."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    running, done = (
        client.create_run(exp, run_name=n, tags={PARENT_TAG: parent}).info.run_id
        for n in ("running", "done")
    )
    client.set_terminated(done, status="FINISHED")
    foreign = client.create_run(exp, run_name="foreign").info.run_id
    stops = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: stops.append(time.time()))
    try:
        with graceful_interrupt(lambda: mark_stopping(uri, parent)) as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.time() + 10
            while not stops and time.time() < deadline:
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert interrupted.is_set() and len(stops) == 1
    tags = {r: client.get_run(r).data.tags.get("early_stopped") for r in (running, done, foreign)}
    assert tags == {running: "true", done: None, foreign: None}


def test_tunes_python_resume_hint_is_dropped_and_its_other_warnings_shown(caplog):
    """After Ctrl+C Tune tells the user to call ``Tuner.restore(path, trainable=...)``; our
    command prints its own ``--resume NAME`` right after, so Tune's hint is dropped, and only
    that line of Tune's."""
    import logging

    from finegrain.platform.logs import quiet_worker_logs

    quiet_worker_logs()
    tune_logger = logging.getLogger("ray.tune.tune")
    with caplog.at_level(logging.WARNING, logger="ray.tune.tune"):
        tune_logger.warning(
            "Experiment has been interrupted, but the most recent state was saved.\n"
            'Resume experiment with: Tuner.restore(path="/x", trainable=...)'
        )
        tune_logger.warning("Trials did not complete: [t1]")
    assert [r.getMessage() for r in caplog.records] == ["Trials did not complete: [t1]"]
