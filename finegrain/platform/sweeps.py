"""What a sweep (``tune.py``) and a suite (``ablate.py``) share: many runs as Tune trials.

- :func:`tracking_server`: the MLflow store every trial logs to (the configured server, or a
  local ``mlflow server`` that owns the embedded SQLite file, so concurrent trials never hit
  "database is locked"), with its relay for processes on other nodes.
- :class:`TrialRuns`: a Tune callback that closes a trial's MLflow run the moment Tune ends the
  trial — FINISHED when it reached its last epoch, KILLED and tagged ``early_stopped`` when ASHA
  or the time budget stopped it earlier, FAILED with its error when it errored — so a killed
  driver leaves no finished trial RUNNING. :func:`close_stopped_children` does the same for any
  child run still RUNNING (a trial whose driver died before the callback ran).
- :func:`graceful_interrupt`: Ctrl+C → Tune's graceful stop; :func:`mark_stopping` tags the
  trials it stops before they can close their runs as anything but KILLED.
- :func:`result_loggers` and :func:`no_default_loggers`: Tune's JSON and CSV result files,
  without its TensorBoard logger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from finegrain.platform import cluster, paths, tracking
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.keys import TOP1, TOTAL_EPOCHS, legacy_name


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl+C during a sweep: Tune saved its state; ``--resume NAME`` continues it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"sweep {name} interrupted; --resume {name} continues it")
        self.name = name


@contextlib.contextmanager
def graceful_interrupt(on_interrupt: Callable[[], None] | None = None):
    """Ctrl+C → Tune's graceful stop (SIGUSR1), and an event saying that it happened.

    On SIGINT ``Tuner.fit`` stops the trials, saves the experiment state and *returns*, like a
    finished sweep; the sweep must then end as KILLED, not pick a "best" trial and log it. Tune's
    own SIGINT handler is turned off and ours forwards to its SIGUSR1 handler, noting the
    interrupt. A second Ctrl+C falls to the previous handler (KeyboardInterrupt).

    ``on_interrupt`` (e.g. :func:`mark_stopping`) runs in a thread started at the interrupt,
    while Tune saves its state and before it stops the trials (that takes a checkpoint first,
    then gives each trial up to 5 s); the context waits for it on exit.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signals only reach the main thread; nothing to catch
        return
    previous = signal.getsignal(signal.SIGINT)
    helpers: list[threading.Thread] = []

    def on_sigint(sig, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
        os.kill(os.getpid(), signal.SIGUSR1)
        if on_interrupt is not None:  # not here: a signal handler must not wait on a socket
            helpers.append(threading.Thread(target=_quietly, args=(on_interrupt,), daemon=True))
            helpers[-1].start()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        with _environ("TUNE_DISABLE_SIGINT_HANDLER", "1"):
            yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        for helper in helpers:
            helper.join(timeout=30)


@contextlib.contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` inside the context, restored (or removed) after it."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def result_loggers() -> list[Callback]:
    """Tune's JSON and CSV loggers: a trial's ``result.json``/``progress.csv``, which the sweep's
    ``ResultGrid`` reads back. Pass them to ``RunConfig(callbacks=...)`` and fit inside
    :func:`no_default_loggers`."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def no_default_loggers():
    """Inside: Tune adds none of its default loggers to a run (it reads
    TUNE_DISABLE_AUTO_CALLBACK_LOGGERS when ``fit`` starts), so the run has only the callbacks
    it was given. Why: Tune's default TensorBoard logger wrote an event file per trial that
    nothing reads (runs are compared in MLflow) and printed "To visualize your results with
    TensorBoard, run: ..." on every sweep's console."""
    return _environ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _quietly(step: Callable[[], None]) -> None:
    try:
        step()
    except Exception as e:  # bookkeeping never blocks a stop; the end reconciles
        print(
            f"warning: could not tag the running trials as stopping ({type(e).__name__}: {e}); "
            "the sweep closes their runs when it ends",
            flush=True,
        )


def mark_stopping(uri: str, parent: str) -> None:
    """Tag every child run of ``parent`` still RUNNING ``early_stopped``: the sweep is being
    stopped (Ctrl+C), Tune reruns these trials on ``--resume``, and whatever the trial closes
    its run with while it is stopped ends KILLED (see :func:`tracking.close_run`): a trainer
    killed with its trial's process would otherwise end FAILED ("its owner has died"), and a
    trial that reported its last epoch in Tune's 5-s stop window FINISHED, then rerun."""
    client = tracking.tracking_client(uri)
    for run in _running_children(client, parent):
        client.set_tag(run.info.run_id, tracking.EARLY_STOPPED_TAG, "true")


def _running_children(client, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
    )


# The store this process's sweep logs to now. A resumed sweep runs its own new local server on
# another port, while Tune restores the trial callback it saved with the old one's address:
# the callback reads the address here when it runs.
_ACTIVE_URI: list[str] = []


@contextlib.contextmanager
def tracking_server(base: ExperimentConfig, address: str | None = None):
    """Ray (``cluster.connect(address)``) and the URI trials log to: the configured server, or
    a local one over the SQLite store.

    A local server's process is launched first and Ray starts while it comes up (each ~10 s on
    an idle 2-core machine; one after the other they took 22.5-24.5 s, together 13.4-16.3 s).
    A server on this machine's loopback gets its relay (``tracking.start_relay``, on Ray) so
    that trials and rank-0 workers on other nodes reach it.
    """
    uri = tracking.resolve_tracking_uri(base.tracking.mlflow_uri, base.run.dir)
    if not uri.startswith("sqlite:"):
        cluster.connect(address)
        tracking.start_relay(uri)  # a server on this machine's loopback: other nodes need it
        with _active(uri):
            yield uri
        return
    root = paths.run_root(base.run.dir)
    server = tracking.LocalServer(uri, paths.artifact_root(base.run.dir), root / "mlflow.log")
    server.launch()
    try:
        cluster.connect(address)
    except BaseException:
        server.__exit__(None, None, None)
        raise
    with server as http_uri, _active(http_uri):
        tracking.start_relay(http_uri)
        yield http_uri


@contextlib.contextmanager
def _active(uri: str):
    _ACTIVE_URI.append(uri)
    try:
        yield uri
    finally:
        _ACTIVE_URI.pop()


def find_run(uri: str, experiment: str, run_name: str):
    """The MLflow run named ``run_name`` in ``experiment`` (None if there is none)."""
    client = tracking.tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
    )
    return found[0] if found else None


def close_ended_run(uri: str, run, error: Any = None) -> str | None:
    """Close ``run`` (an MLflow run still RUNNING whose trial ended): FAILED with ``error``;
    else FINISHED if it logged its last epoch, KILLED and tagged ``early_stopped`` if not."""
    if run is None or run.info.status != "RUNNING":
        return None
    if request := run.data.tags.get(cluster.TRAIN_REQUEST_TAG):  # its controller is stopping
        cluster.release_train_request(request, run.data.tags.get(cluster.TRIAL_ACTOR_TAG))
    client = tracking.tracking_client(uri)
    run_id = run.info.run_id
    if error is not None:
        tracking.close_run(uri, run_id, "FAILED", error=error)
        return "FAILED"
    total = run.data.tags.get(TOTAL_EPOCHS)
    done = max(  # (a run of a sweep resumed across the rename logged val_top1)
        (
            m.step
            for key in (TOP1, legacy_name(TOP1))
            for m in client.get_metric_history(run_id, key)
        ),
        default=0,
    )
    if total is not None and done >= int(total):
        tracking.close_run(uri, run_id, "FINISHED")
        return "FINISHED"
    client.set_tag(run_id, tracking.EARLY_STOPPED_TAG, "true")
    tracking.close_run(uri, run_id, "KILLED")
    return "KILLED"


def trial_error(trial) -> Any:
    """The error a Tune trial ended with (its exception, or the text Tune kept), if any."""
    for get in (trial.get_pickled_error, trial.get_error):
        try:
            error = get()
        except Exception:  # storage unreadable: fall through to the next source
            error = None
        if error is not None:
            return error
    return None


class TrialRuns(Callback):
    """Closes each trial's MLflow run as soon as Tune ends the trial (see the module).

    Defined at module level, so that Tune's saved experiment state refers to it by name (a
    class pickled by value would take a frozen copy of this module's globals with it).
    """

    def __init__(self, uri: str, experiment: str, run_name: Callable[[Any], str]) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.closed: dict[str, str] = {}  # trial id → how this callback closed its run

    def _close(self, trial, error=None) -> None:
        uri = _ACTIVE_URI[-1] if _ACTIVE_URI else self.uri
        try:
            run = find_run(uri, self.experiment, self.run_name(trial))
            status = close_ended_run(uri, run, error)
        except Exception as e:  # bookkeeping never stops a sweep; the end reconciles
            print(f"warning: could not close the run of trial {trial}: {e}", flush=True)
            return
        if status:
            self.closed[trial.trial_id] = status

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, trial_error(trial) or "the trial failed (no error recorded)")


def close_stopped_children(uri: str, parent: str) -> None:
    """End the child runs of ``parent`` still RUNNING (see :func:`close_ended_run`): their
    trials ended while nobody could close them (a driver killed mid-sweep)."""
    for run in _running_children(tracking.tracking_client(uri), parent):
        close_ended_run(uri, run)
