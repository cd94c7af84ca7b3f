"""ray_cluster.yaml passes Ray's own cluster-config validation; .rayignore keeps uploads small.

Validation is what `ray up` runs before it contacts the cloud: ``prepare_config`` (merge with
the provider's defaults, per-node-type worker bounds) then ``validate_config`` (Ray's JSON
schema and cross-field checks). The command lines are parsed by the click commands of
`ray start` and `mlflow server` themselves, and by `bash -n`.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"
SHARED = "/mnt/shared"
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _args_after(commands: list[str], *program: str) -> list[str]:
    """The arguments of ``program`` (e.g. ``ray start``) in the command that runs it."""
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i in range(len(tokens) - len(program) + 1):
            if tuple(tokens[i : i + len(program)]) == program:
                rest = tokens[i + len(program) :]
                end = next((j for j, t in enumerate(rest) if set(t) <= set(";&|<>")), len(rest))
                return rest[:end]
    raise AssertionError(f"no command runs {' '.join(program)!r}")


def test_ray_validates_the_cluster_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(head_node_typo="head"),
        lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU="one"),
        lambda c: c["available_node_types"]["gpu_1x"].pop("node_config"),
        lambda c: c.update(head_node_type="no-such-type"),
    ],
)
def test_the_validation_is_live(raw, break_it):
    config = copy.deepcopy(raw)
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))


def test_cpu_head_and_gpu_workers_that_scale_from_zero(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["min_workers"] == 0, name
        assert node["max_workers"] >= 1, name
        assert node["resources"]["GPU"] >= 1, name
        assert node["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5")), name
    assert prepared["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_dashboard_and_mlflow_listen_on_loopback_only(raw):
    from mlflow.cli import server
    from ray.scripts.scripts import start

    head = raw["head_start_ray_commands"]
    ray_start = start.make_context("start", _args_after(head, "ray", "start")).params
    assert ray_start["head"] and ray_start["dashboard_host"] == "127.0.0.1"
    mlflow = server.make_context("server", _args_after(head, "mlflow", "server")).params
    assert mlflow["host"] == "127.0.0.1"
    # the SQLite store on the head's local disk (never on NFS), the artifacts on the share
    store = mlflow["backend_store_uri"]
    assert store == "sqlite:////home/ubuntu/mlflow/mlflow.db" and SHARED not in store
    assert mlflow["artifacts_destination"].startswith(SHARED)
    backup = " ".join(head)
    assert ".backup /mnt/shared/mlflow-backup.db" in backup and "crontab" in backup
    assert "0.0.0.0" not in json.dumps(raw)  # nothing listens on every interface


def test_workers_join_the_head(raw):
    from ray.scripts.scripts import start

    args = _args_after(raw["worker_start_ray_commands"], "ray", "start")
    assert start.make_context("start", args).params["address"] == "$RAY_HEAD_IP:6379"


def test_nodes_install_the_project_from_its_constraints(raw):
    mounts = {remote: local for remote, local in raw["file_mounts"].items()}
    project = next(remote for remote, local in mounts.items() if local in (".", "./"))
    install = [c for c in raw["setup_commands"] if "pip install" in c]
    assert any(f"cd {project} " in c and "-c constraints.txt -e ." in c for c in install)
    assert (ROOT / "constraints.txt").is_file()
    assert {".gitignore", ".rayignore"} <= set(raw["rsync_filter"])


def test_shared_storage_is_mounted_on_every_node(raw):
    # initialization_commands run on the head and on every worker, before setup
    assert any(f" {SHARED}" in c and "mount -t nfs" in c for c in raw["initialization_commands"])


def test_every_command_is_valid_bash(raw):
    commands = [c for key in COMMAND_LISTS for c in raw.get(key) or []]
    assert len(commands) > 8
    for command in commands:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"


# ------------------------------------------------------------ ray job submit --working-dir .


@pytest.mark.parametrize("include_gitignore", [True, False])
def test_working_dir_upload_leaves_out_venv_data_and_runs(tmp_path, include_gitignore):
    """The zip `ray job submit --working-dir .` uploads, built by Ray's own packaging code.

    ``include_gitignore=False`` is ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``: .rayignore alone must
    still keep the environment, data and run directories out.
    """
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    project = tmp_path / "project"
    for name in (".gitignore", ".rayignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text((ROOT / name).read_text())
    keep = ["finegrain/__init__.py", "experiments/tune_dsts.py", "experiments/configs/a.yaml"]
    drop = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "runs/mlflow.db",
        "runs/ray/trial/checkpoint.pt",
        "runs/data/synthetic/shard-0.parquet",
        "data/ssv2/videos/1.webm",
        "mlruns/0/meta.yaml",
        "finegrain.egg-info/PKG-INFO",
        "finegrain/__pycache__/x.cpython-311.pyc",
    ]
    for rel in keep + drop:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")

    uploaded = []

    def upload_fn(working_dir, excludes, is_file=False):
        out = tmp_path / "package.zip"
        create_package(working_dir, out, include_gitignore=include_gitignore, excludes=excludes)
        uploaded.extend(zipfile.ZipFile(out).namelist())

    upload_working_dir_if_needed(
        {"working_dir": str(project)}, include_gitignore=include_gitignore, upload_fn=upload_fn
    )
    files = {n for n in uploaded if not n.endswith("/")}
    assert set(keep) <= files
    assert not files & set(drop), sorted(files & set(drop))


def test_a_stream_kept_after_the_commands_log_closed_still_prints_to_the_console(tmp_path, capsys):
    """Ray's log thread keeps the stream it found at ``ray.init``: a worker line it prints after
    the command's log file closed reaches the console, and does not raise."""
    import sys

    from finegrain.platform.logs import console_log

    with console_log(tmp_path, "cmd") as path:
        kept = sys.stdout  # what Ray's print thread holds
        print("during")
    kept.write("after the log closed\n")
    kept.flush()
    assert "during" in path.read_text() and "after the log closed" not in path.read_text()
    assert "after the log closed" in capsys.readouterr().out
