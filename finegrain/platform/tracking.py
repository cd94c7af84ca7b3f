"""MLflow tracking: where runs go, and the run lifecycle (the run directory's paths: :mod:`.paths`).

Embedded default: a SQLite store at an absolute path under the run directory
(``sqlite:////abs/runs/mlflow.db``; MLflow refuses ``file:`` stores and a relative SQLite path
would land in each Ray worker's working directory) with artifacts in ``runs/mlartifacts/``.
``--mlflow-uri`` (or ``MLFLOW_TRACKING_URI``) points anywhere else, e.g. an ``mlflow server``.

The driver opens the run (``open_run``) and closes it with FINISHED, FAILED or KILLED
(``close_run``), so a run is never left RUNNING even when a worker dies; rank 0 of the training
loop logs metrics and artifacts into it through :class:`RunLogger`. Re-running with the same run
name reuses the same MLflow run (the training resumes from its checkpoint), so curves continue.

A store only the driver's machine can reach — the embedded SQLite file, or a server on
127.0.0.1 such as the sweep's own or the one ``ray_cluster.yaml`` starts on the head — is
reached from the other nodes of a cluster through a relay: ``start_relay`` puts a small Ray actor
on the driver's node, and :func:`client` hands every process elsewhere a client whose calls that
actor makes (files travel as bytes). So rank 0 on a GPU node logs to the head's loopback server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Every process that logs to MLflow imports this module first. MLflow prints a "View run at"
# link for every run it ends over HTTP: with a sweep's own temporary server, links that die with
# the sweep, one per trial; the commands print the lasting `mlflow ui` command instead. Its
# telemetry thread sets and unsets an environment variable while HTTP requests iterate
# os.environ (requests' proxy lookup): a KeyError that fails an MLflow call.
# MLflow's own INFO lines ("Creating initial MLflow database tables") signal no fault: its
# documented switch keeps them off the console, set before mlflow is imported.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from finegrain.datasets.layout import CLASSES_FILE, SHARDS_DIR  # noqa: E402
from finegrain.platform.cluster import on_one_node_ray  # noqa: E402
from finegrain.platform.paths import (  # noqa: E402
    artifact_root,
    project_root,
    run_root,
    script_name,
)

# artifact_root, project_root and run_root live in .paths (no MLflow there); callers that import
# them from here keep working.

RUN_NAME_TAG = "finegrain.run_name"
# set ("true") on a run whose trial a sweep or suite is stopping: it ends KILLED (see close_run)
EARLY_STOPPED_TAG = "early_stopped"


def resolve_tracking_uri(uri: str | None, run_dir: str | os.PathLike) -> str:
    """``uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded SQLite store under ``run_dir``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("file:") or (":" not in uri.split("/")[0] and not uri.startswith("/")):
            raise ValueError(
                f"tracking URI {uri!r}: MLflow 3 does not accept file stores; use "
                "sqlite:////absolute/path.db or http://host:port (an mlflow server)"
            )
        return uri
    root = run_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ui_command(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on ``uri``, bound to localhost (the README's), and
    the pages it shows: the run's, and the experiment's runs table in our :data:`RUNS_VIEW`.

    MLflow 3 opens every page in its GenAI view (traces, token costs) unless the URL says
    ``workflowType=machine_learning``; the experiment kind tag does not change that (3.17).
    """
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    pages = []
    if experiment_id:
        experiment = f"{base}/#/experiments/{experiment_id}"
        if run_id:
            pages.append(f"{experiment}/runs/{run_id}?{TRAINING_VIEW}")
        pages.append(f"{experiment}/runs?{TRAINING_VIEW}&viewStateShareKey={RUNS_VIEW_KEY}")
    page = " (run), ".join(pages) + (" (all runs)" if len(pages) == 2 else "")
    if uri.startswith(("http://", "https://")):
        return f"open {page or uri} in a browser"
    command = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return command + (f", then {page}" if page else "")


def ui_hint(uri: str, run_id: str) -> str:
    """:func:`ui_command` for ``run_id``'s page (its experiment looked up in the store)."""
    try:
        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # the store is unreachable now: the command alone still helps
        experiment_id = None
    return ui_command(uri, experiment_id, run_id if experiment_id else None)


# Our local `mlflow server`s (URI -> the folder it stores artifacts in): experiments created
# through them get that folder as an absolute artifact location, so that the plain
# `mlflow ui --backend-store-uri sqlite:///…` of the README serves their artifacts too (the
# server's default `mlflow-artifacts:/` location resolves against the UI's working directory).
_SERVED: dict[str, Path] = {}
# The experiment holds model training (MLflow's own kind tag; the UI lists it as such). MLflow
# 3.17 still opens pages in its GenAI view unless the URL asks for the training one.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
TRAINING_VIEW = "workflowType=machine_learning"
# The runs table a researcher wants first: MLflow's own shared-view feature (the "Share" button
# stores a view as the experiment tag `mlflow.sharedViewState.<key>`, opened by
# `?viewStateShareKey=<key>`). Without it MLflow 3 shows no metric or param column at all.
RUNS_VIEW_KEY = "finegrain"
RUNS_VIEW = {
    # the UI orders columns by kind (metrics, params, tags), each alphabetically
    "selectedColumns": [
        "metrics.`val/best_top1`",
        "metrics.`val/loss`",
        "metrics.`val/mean_class_acc`",
        "metrics.`val/top1`",
        "tags.`method`",
        "tags.`early_stopped`",
        "tags.`error`",
    ],
    "orderByKey": "metrics.`val/best_top1`",
    "orderByAsc": False,
}


def runs_view(params: Sequence[str] = (), tags: Sequence[str] = ()) -> dict[str, str]:
    """The experiment tag of :data:`RUNS_VIEW`, with columns for ``tags`` and ``params`` (a
    sweep's searched parameters, a suite's variant and its options)."""
    columns = [f"tags.`{t}`" for t in tags] + RUNS_VIEW["selectedColumns"]
    columns += [f"params.`{p}`" for p in params]
    view = {**RUNS_VIEW, "selectedColumns": list(dict.fromkeys(columns))}
    return {f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(view)}


def set_runs_view(
    uri: str, run_id: str, params: Sequence[str] = (), tags: Sequence[str] = ()
) -> None:
    """Show ``params`` and ``tags`` as columns of the runs table of ``run_id``'s experiment (a
    sweep's parent, a suite's summary; :func:`runs_view`)."""
    client = tracking_client(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    for key, value in runs_view(params, tags).items():
        client.set_experiment_tag(experiment_id, key, value)


def get_experiment_id(client: MlflowClient, name: str, run_dir: str | os.PathLike) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in {**EXPERIMENT_KIND, **runs_view()}.items():
            if key not in exp.tags:  # an experiment made before: same looks
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (artifact_root(run_dir) / name).as_uri()
    elif client.tracking_uri in _SERVED:
        location = (_SERVED[client.tracking_uri] / name).as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={**EXPERIMENT_KIND, **runs_view()}
        )
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's Source and User columns: the command that made the run, its commit, who."""
    import getpass
    import sys

    source = os.environ.get("FINEGRAIN_SOURCE") or script_name(sys.argv[0] if sys.argv else "")
    commit = git_commit()
    try:
        user = getpass.getuser()
    except Exception:  # no login name (some containers)
        user = "unknown"
    return {
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.user": user,
        "git_commit": commit,
    }


def log_dataset(uri: str, run_id: str, name: str, shards: Path, splits: dict[str, int]) -> None:
    """The run's dataset in MLflow's Dataset column: name, split sizes and a digest of the
    shards (their files' names and sizes, and the class list)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    h = hashlib.sha256()
    for f in sorted((Path(shards) / SHARDS_DIR).glob("*.parquet")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    classes = Path(shards) / CLASSES_FILE
    if classes.is_file():
        h.update(classes.read_bytes())
    dataset = Dataset(
        name=name,
        digest=h.hexdigest()[:12],
        source_type="local",
        source=json.dumps({"uri": str(Path(shards).resolve())}),
        profile=json.dumps({"videos_per_split": splits}),
    )
    context = InputTag("mlflow.data.context", "training")
    tracking_client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset, [context])])


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    run_dir: str | os.PathLike,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    display_name: str | None = None,
) -> str:
    """Create the run named ``run_name`` (or reuse it: resume) and return its id.

    ``display_name``: what MLflow's runs table shows, when not ``run_name`` (which stays the
    tag that finds the run again)."""
    client = tracking_client(uri)
    exp_id = get_experiment_id(client, experiment, run_dir)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:  # reopened: what ended it before (a stop, an error) no longer describes it
        run_id = found[0].info.run_id
        for stale in (EARLY_STOPPED_TAG, "error"):
            if stale in found[0].data.tags:
                client.delete_tag(run_id, stale)
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_NAME_TAG: run_name, **source_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=display_name or run_name, tags=all_tags)
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def close_run(
    uri: str,
    run_id: str,
    status: str,
    error: BaseException | str | None = None,
    *,
    force: bool = False,
) -> bool:
    """End the run as FINISHED, FAILED or KILLED; a FAILED run gets its error as the tag
    ``error`` (one line) and the artifact ``error.txt`` (the traceback).

    Only a RUNNING run is closed (unless ``force``): whoever ends it first — the run's own
    driver, or a sweep that saw its trial stop — decides, and a late second close cannot turn
    a KILLED trial into FAILED. A run a sweep tagged ``early_stopped`` (it is stopping the
    trial: ASHA, the time budget, Ctrl+C) ends KILLED whatever the trial closes it with: its
    trainer failing as it is torn down, or finishing inside Tune's stop window, is the stop.
    Returns whether this call closed it.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    client = tracking_client(uri)
    if not force:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return False
        if _stopped(run):
            status, error = "KILLED", None
    if error is not None:
        text = (
            error
            if isinstance(error, str)
            else "".join(traceback.format_exception(type(error), error, error.__traceback__))
        )
        client.set_tag(run_id, "error", error_line(error))
        client.log_text(run_id, text, "error.txt")
        now = client.get_run(run_id).info.status
        if not force and now != "RUNNING":  # closed meanwhile: its closer decided
            if now == "KILLED":  # as stopped: no error to show
                client.delete_tag(run_id, "error")
            return False
    client.set_terminated(run_id, status=status)
    if status != "KILLED" and not force and _stopped(client.get_run(run_id)):
        # the sweep tagged it while this close was on its way: its stop decides
        client.set_terminated(run_id, status="KILLED")
        if error is not None:
            client.delete_tag(run_id, "error")
    return True


def _stopped(run) -> bool:
    """A sweep tagged the run ``early_stopped``: it is stopping the trial."""
    return run.data.tags.get(EARLY_STOPPED_TAG) == "true"


def error_line(error: BaseException | str) -> str:
    """The one line that names an error: its last non-empty line (a traceback's message)."""
    if not isinstance(error, str):
        error = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


def run_status(uri: str, run_id: str) -> str:
    return tracking_client(uri).get_run(run_id).info.status


class RunLogger:
    """What rank 0 uses to log into an open run (metrics, files, figures, text).

    MLflow caches a run's artifact repository by run id alone (``_artifact_repos_cache``), so a
    run reopened in the same process under a new local ``mlflow server`` (another port) would
    still upload to the old, stopped one: the entry is dropped first.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking._tracking_service import utils as mlflow_utils

        getattr(mlflow_utils, "_artifact_repos_cache", {}).pop(run_id, None)
        self.client = tracking_client(uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        # 7 significant digits, what float32 resolves: a loss computed in float32 shows as
        # 1.538192, not 1.5381919145584106 (accuracies are rounded at the source: keys.percent)
        items = [
            Metric(k, float(f"{float(v):.7g}"), now, step)
            for k, v in values.items()
            if v is not None
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def artifacts(self, path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), folder)

    def figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def file(self, name: str, data: bytes) -> None:
        """Log ``data`` as the artifact ``name`` (which may contain a folder)."""
        folder, _, base = name.rpartition("/")
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / base
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), folder or None)


# ------------------------------------------------------------------------------------ relay


def is_local(uri: str) -> bool:
    """Only the driver's machine reaches it: a SQLite file or a server on the loopback."""
    if uri.startswith("sqlite:"):
        return True
    host = urlparse(uri).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _relay_name(uri: str) -> str:
    return "finegrain-mlflow-" + hashlib.sha1(uri.encode()).hexdigest()[:12]


def _write_files(files: dict[str, bytes], into: Path) -> None:
    for rel, data in files.items():
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class _Relay:
    """Ray actor on the driver's node: MLflow calls on behalf of processes on other nodes."""

    def __init__(self, uri: str) -> None:
        self.client = MlflowClient(uri)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.client, method)(*args, **kwargs)

    def log_files(self, run_id: str, files: dict[str, bytes], folder: str | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            _write_files(files, Path(d))
            self.client.log_artifacts(run_id, d, folder)


class RelayedClient:
    """The ``MlflowClient`` methods we use, made by the relay actor on the driver's node.

    Paths and figures are local to the caller: they are read (rendered) here and sent as bytes.
    """

    def __init__(self, uri: str, relay) -> None:
        self.tracking_uri, self._relay = uri, relay

    def __getattr__(self, method: str):
        import ray

        def call(*args, **kwargs):
            return ray.get(self._relay.call.remote(method, args, kwargs))

        return call

    def log_files(self, run_id: str, files: dict[str, bytes], folder: str | None = None) -> None:
        import ray

        ray.get(self._relay.log_files.remote(run_id, files, folder))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None):
        path = Path(local_path)
        self.log_files(run_id, {path.name: path.read_bytes()}, artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None):
        root = Path(local_dir)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.log_files(run_id, files, artifact_path)

    def log_figure(self, run_id: str, figure, artifact_file: str, **_) -> None:
        buf = io.BytesIO()
        figure.savefig(buf, format=Path(artifact_file).suffix.lstrip(".") or "png")
        folder, _, base = artifact_file.rpartition("/")
        self.log_files(run_id, {base: buf.getvalue()}, folder or None)


def start_relay(uri: str) -> None:
    """In the driver, with Ray up: the relay for ``uri`` on this node, if ``uri`` is local and
    the cluster may have other nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not is_local(uri) or not ray.is_initialized() or uri in _OWNED or on_one_node_ray():
        return
    node = ray.get_runtime_context().get_node_id()
    relay = (
        ray.remote(_Relay)
        .options(
            name=_relay_name(uri),
            get_if_exists=True,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(uri)
    )
    ray.get(relay.node.remote())  # up before any worker looks for it
    _OWNED[uri] = relay  # the handle keeps it alive as long as this driver


def tracking_client(uri: str):
    """An ``MlflowClient`` for ``uri`` — through the driver's relay on another node of a cluster."""
    relay = _find_relay(uri)
    return MlflowClient(uri) if relay is None else RelayedClient(uri, relay)


_RELAYS: dict[str, Any] = {}  # uri → relay handle (None: reach the store directly)
_OWNED: dict[str, Any] = {}  # the relays this driver started


def _find_relay(uri: str):
    """The relay actor when ``uri`` is local to another node than this process's; else None."""
    if not is_local(uri):
        return None
    if uri not in _RELAYS:
        _RELAYS[uri] = None
        try:
            import ray

            if ray.is_initialized():
                actor = ray.get_actor(_relay_name(uri))
                here = ray.get_runtime_context().get_node_id()
                if ray.get(actor.node.remote()) != here:
                    _RELAYS[uri] = actor
        except ValueError:  # no relay: a single machine, or no driver started one
            pass
    return _RELAYS[uri]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """An ``mlflow server`` on 127.0.0.1 over a SQLite store, for concurrent writers.

    Concurrent Tune trials each writing to one SQLite file would hit "database is locked"; one
    server process with one worker serializes the writes, and every trial logs over HTTP.
    Artifacts are proxied by the server into ``artifacts``.
    """

    start_timeout = 300.0  # seconds; a loaded 2-core machine has taken over 2 minutes

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def launch(self) -> None:
        """Start the server's process (once) without waiting for it to answer: what the caller
        does meanwhile overlaps its ~10 s of start-up (see ``sweeps.tracking_server``)."""
        import sys

        if self.proc is not None:
            return
        port = _free_port()
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        self._log_file = open(self.log, "ab")  # noqa: SIM115 (closed in __exit__)
        # no job runner (MLflow's GenAI jobs: a huey consumer per server), no telemetry thread
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,  # a driver killed with -9 takes its server along
        )
        self.uri = f"http://127.0.0.1:{port}"
        _SERVED[self.uri] = self.artifacts.resolve()

    def __enter__(self) -> str:
        """Launch the server (unless :meth:`launch` did) and wait until it answers."""
        import urllib.request

        self.launch()
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"mlflow server did not answer on {self.uri} within {self.start_timeout:.0f} s; "
            f"see {self.log}"
        )

    def __exit__(self, *exc) -> None:
        _SERVED.pop(self.uri, None)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None:
            self._log_file.close()
