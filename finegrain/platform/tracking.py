"""MLflow tracking: where runs go, and the run lifecycle.

Embedded default: a SQLite store at an absolute path under the run directory
(``sqlite:////abs/runs/mlflow.db``; MLflow refuses ``file:`` stores and a relative SQLite path
would land in each Ray worker's working directory) with artifacts in ``runs/mlartifacts/``.
``--mlflow-uri`` (or ``MLFLOW_TRACKING_URI``) points anywhere else, e.g. an ``mlflow server``.

The driver opens the run (``open_run``) and closes it with FINISHED, FAILED or KILLED
(``close_run``), so a run is never left RUNNING even when a worker dies; rank 0 of the training
loop logs metrics and artifacts into it through :class:`RunLogger`. Re-running with the same run
name reuses the same MLflow run (the training resumes from its checkpoint), so curves continue.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

RUN_NAME_TAG = "finegrain.run_name"


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def run_root(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return (path if path.is_absolute() else project_root() / path).resolve()


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


def artifact_root(run_dir: str | os.PathLike) -> Path:
    return run_root(run_dir) / "mlartifacts"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri``, bound to localhost."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def get_experiment_id(client: MlflowClient, name: str, run_dir: str | os.PathLike) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (artifact_root(run_dir) / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
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


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    run_dir: str | os.PathLike,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create the run named ``run_name`` (or reuse it: resume) and return its id."""
    client = MlflowClient(uri)
    exp_id = get_experiment_id(client, experiment, run_dir)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_NAME_TAG: run_name, "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def close_run(uri: str, run_id: str, status: str) -> None:
    """End the run as FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    MlflowClient(uri).set_terminated(run_id, status=status)


def run_status(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


class RunLogger:
    """What rank 0 uses to log into an open run (metrics, files, figures, text)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
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

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def __enter__(self) -> str:
        import sys
        import urllib.request

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
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
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
            f"mlflow server did not answer on {self.uri} within 120 s; see {self.log}"
        )

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_file.close()
