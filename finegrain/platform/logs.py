"""What reaches the console: our progress lines, Tune's trial table, and real warnings and errors.

``quiet_worker_logs`` runs in every worker of a job ``cluster.connect`` starts (its
``worker_process_setup_hook``, :func:`setup_worker`, which also pins the worker to its cluster)
and is also called by our own processes (driver, Tune trial, training worker), so a cluster
started elsewhere (``ray job submit``) gets the same. Ray imports it in *every* worker process
it starts, so this module imports nothing but the standard library: a hook that imported torch
would add ~0.5 GB to each of the helper processes of a sweep.

Every line silenced here is INFO (progress that signals no fault) or a warning traced to a
harmless cause, named beside it. Everything still goes to Ray's session folder
(``/tmp/ray/session_*/logs``: worker-*.out/err, ray-data/, ray-train/), and :func:`console_log`
copies the console into a log file whose path the command prints at start.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Ray Data configures its logger when it is imported, from this file if the variable names one
# (its documented switch): ours keeps its console handler at WARNING. Set on import of this
# module, which every finegrain process imports before Ray Data (the worker hook below is it).
RAY_DATA_LOGGING = str(Path(__file__).with_name("ray_data_logging.yaml"))
os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)


class _StoppedTrialCleanup(logging.Filter):
    """Drops the one line Ray Train's placement-group cleaner logs when it has done its job.

    Tune ends the actor of a trial it stops (ASHA, the time budget, Ctrl+C), and the trial's
    TorchTrainer controller dies with it before it can remove its placement group; the cleaner
    (which needs the State API: ``cluster.connect`` starts the dashboard for it) then removes
    the group and says so, once per stopped trial. That is the designed clean-up of a stop
    we asked for, not a fault; the cleaner's other warnings (it cannot query the State API, it
    failed to remove the group) still show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Detected that the Ray Train controller actor")


class _UnreportedTrials(logging.Filter):
    """Drops Tune's "Failed to fetch metrics for N trial(s)" when every trial it names simply
    never reported: the time budget stopped it in the budget's last seconds, before its first
    epoch, so its folder has no ``result.json``/``progress.csv`` (Ray 2.60 builds the sweep's
    ResultGrid by reading them). Ray means to skip such a trial quietly — its
    ``_fetch_trial_dataframe`` returns an empty frame "if there were no reported results" — but
    tests ``trial.last_result is None``, which never holds (``Trial.last_result`` falls back to
    ``{"trial_id": …}``), so it warns instead. That is the stop we asked for, not a fault, and the
    sweep counts such a trial in its own accounting line ("stopped before their first epoch").
    The warning still shows when any trial's metrics failed to load for another reason.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to fetch metrics for"):
            return True
        failures = [line for line in message.splitlines() if line.startswith("- ")]
        return not failures or not all(
            "FileNotFoundError(" in line and "were not found" in line for line in failures
        )


class _TuneRestoreHint(logging.Filter):
    """Drops Tune's "Experiment has been interrupted, but the most recent state was saved.
    Resume experiment with: Tuner.restore(path=…, trainable=…)" after Ctrl+C. The state is
    saved, as it says; the hint is for Tune's Python API, which a user of our commands cannot
    run as written (it needs the sweep's trainable). Our sweeps and suites print their own
    resume command right after it (``--resume NAME``, which calls ``Tuner.restore`` with the
    trainable; the suites': rerun the same command), so the console gives one instruction,
    the one that works. Tune's other interrupt messages still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Experiment has been interrupted, but the most recent state was saved"
        )


def _add_filter(logger_name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_worker_logs() -> None:
    """Ray's INFO lines off the console, in the process that calls it."""
    # Ray Data: RAY_DATA_LOGGING above.
    # Ray Train and Tune: one INFO line per report, checkpoint and worker-group event. (Train
    # V2 configures its own console handler in its controller and workers: the runs set its
    # level through RunConfig(logging_config=LoggingConfig(log_level="WARNING")).)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    _add_filter(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        _StoppedTrialCleanup,
    )
    _add_filter("ray.tune.analysis.experiment_analysis", _UnreportedTrials)
    _add_filter("ray.tune.tune", _TuneRestoreHint)
    # Says at every ray.init that token authentication is on: the secure default of Ray 2.60,
    # which we keep (the dashboard listens on 127.0.0.1 only), no fault.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def setup_worker() -> None:
    """The ``worker_process_setup_hook`` of every job ``cluster.connect`` starts: pin the
    worker to its own cluster, then :func:`quiet_worker_logs`."""
    pin_cluster_address()
    quiet_worker_logs()


def pin_cluster_address() -> None:
    """Set ``RAY_ADDRESS`` in this Ray worker process to the GCS of the cluster it belongs to.

    Ray Train's placement-group cleaner (an actor of every run) asks the State API whether the
    run's controller is alive, through a client built with no address. Without ``RAY_ADDRESS``
    that client finds the cluster by listing the machine's GCS processes: with two Ray instances
    on one machine (two finegrain commands at once, the test suite's two workers) it raises
    "Found multiple active Ray instances", which the cleaner does not catch — its thread dies
    and the placement group of every trial stopped afterwards stays reserved (measured: a
    time-budget sweep leaked its 1-CPU group while another local Ray ran). Pointing the process
    at its own GCS makes the lookup exact whatever else runs. Only Ray workers: a driver keeps
    its environment (a later ``connect`` in the same process must not follow a dead cluster).
    """
    import ray

    worker = ray._private.worker.global_worker
    if worker.mode != ray.WORKER_MODE:
        return
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_ray_logs() -> None:
    """``quiet_worker_logs`` plus Train V2's loggers, which it names by file path."""
    quiet_worker_logs()
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


class _Tee:
    """A text stream that writes to the console and to a log file."""

    def __init__(self, console, file) -> None:
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        # Ray's log thread keeps the stream it found at ``ray.init`` as its sink and may still
        # print workers' last lines after the command's log file closed: those reach the
        # console only (a write to the closed file killed that thread, and later lines with it)
        if not self.file.closed:
            self.file.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()
        self.console.flush()

    def __getattr__(self, name):
        return getattr(self.console, name)


@contextmanager
def console_log(run_dir: str | Path, name: str):
    """Copy this process's console (stdout, stderr, and the worker lines Ray forwards to it)
    into ``<run dir>/logs/<name>-<time>.log``, with this process's INFO log records too;
    prints the file's path first. Yields the path."""
    folder = Path(run_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with open(path, "a", buffering=1) as file:  # line-buffered: readable while the run goes
        print(f"full log: {path}", flush=True)
        handler = logging.StreamHandler(file)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, file), _Tee(err, file)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err
            root.removeHandler(handler)
