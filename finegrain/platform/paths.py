"""Where a run's files go: the project root and the run directory, resolved (no MLflow import).

``run.dir`` of a config (``runs`` by default) is taken relative to the project root unless it
is absolute; under it live ``mlflow.db`` and ``mlartifacts/`` (see :mod:`.tracking`), ``data/``
(see :mod:`.data`), ``logs/`` and the runs' own folders.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository root (the folder that holds ``finegrain/``)."""
    return Path(__file__).resolve().parents[2]


def run_root(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as an absolute, resolved path; a relative one is under the project root."""
    path = Path(run_dir)
    return (path if path.is_absolute() else project_root() / path).resolve()


def artifact_root(run_dir: str | os.PathLike) -> Path:
    """The embedded store's artifact folder, ``<run dir>/mlartifacts``."""
    return run_root(run_dir) / "mlartifacts"


def script_name(path: str) -> str:
    """The script a command ran, relative to the project when it is in it."""
    if not path:
        return "python"
    script = Path(path).resolve()
    try:
        return str(script.relative_to(project_root()))
    except ValueError:
        return script.name
