"""Training on Ray Train with MLflow tracking (issue 5), on a tiny synthetic set, 2 CPU workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import TINY_RUN, MlflowUI
from mlflow.tracking import MlflowClient

from finegrain.models import METHODS
from finegrain.platform import cluster
from finegrain.platform.config import load_config
from finegrain.platform.metrics import read_per_video
from finegrain.platform.tracking import ui_hint
from finegrain.platform.train import (
    CHECKPOINT_FILE,
    evaluate_checkpoint,
    run_experiment,
    stage_plan,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "optim.warmup_epochs=0", "scaling.workers=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    # 6 logical CPUs: three 1-CPU workers and their decode actors fit (evaluation test)
    cluster.connect(num_cpus=6)
    yield path
    ray.shutdown()


# The tests that read one plain two-epoch run share it: they run on one pytest-xdist worker
# (`--dist loadgroup`), which trains it once.
ONE_RUN = pytest.mark.xdist_group("two_epoch_run")


@pytest.fixture(scope="module")
def two_epochs(run_dir):
    """The one-pass baseline, 2 workers, 2 epochs: what an uninterrupted run of the seed gives."""
    return run_experiment(tiny_config(run_dir, "run.name=straight", "optim.epochs=2"), quiet=True)


def tiny_config(run_dir: Path, *overrides: str):
    return load_config("synthetic", [*TINY, f"run.dir={run_dir}", *overrides])


def tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def run_files(run_dir: Path, name: str) -> list[Path]:
    return sorted(p for p in (run_dir / "ray" / name).glob("checkpoint_*") if p.is_dir())


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=ONE_RUN) if m == "onepass" else m for m in METHODS],
)
def test_every_method_trains_with_two_workers(run_dir, method, request):
    overrides = [f"model.method={method}", f"run.name=all-{method}"]
    if method == "u2s":
        overrides.append("optim.epochs=3")  # one epoch per stage: UN, CSN+MN, joint
    if method == "dsts":
        overrides += ["model.udl=true", "model.neurons=3", "model.layers=1", "data.num_frames=8"]
    if method == "onepass":  # the baseline's plain run, which other tests read too
        result = request.getfixturevalue("two_epochs")
    else:
        result = run_experiment(tiny_config(run_dir, *overrides), quiet=True)
    m = result.metrics
    assert 0.0 <= m["val/top1"] <= 100.0 and m["val/videos"] == 4  # one val video per class
    assert m["val/top1"] in {0.0, 25.0, 50.0, 75.0, 100.0}  # in %: 4 videos
    assert m["sys/rank_param_drift"] == pytest.approx(0.0, abs=1e-6)  # DDP kept ranks identical
    assert m["train/loss"] == m["train/loss"]  # not NaN
    if method == "dsts":  # a method's own training statistics, under its name
        assert {"dsts/udl_train_loss", "dsts/udl_alpha"} <= set(m), m
    mechanisms = {k for k in m if k.startswith("mech/")}  # scored on every validation view
    expected = {
        "dsts": "mech/group_mi_l0",
        "u2s": "mech/csm_pairs",
        "classreg": "mech/agreement_stage3",
        "dfb": "mech/evidence_hit",  # against the benchmark's evidence boxes
        "joint_attn": "mech/object_mass",
        "onepass": "mech/evidence_hit",
    }
    assert expected[method] in mechanisms, mechanisms


@ONE_RUN
def test_mlflow_run_has_params_metrics_artifacts_and_finished(run_dir, two_epochs):
    result = two_epochs
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.method"] == "onepass"
    assert run.data.params["optim.epochs"] == "2"
    assert run.data.tags["method"] == "onepass" and run.data.tags["dataset"] == "synthetic"
    assert "git_commit" in run.data.tags
    history = client.get_metric_history(result.run_id, "val/top1")
    assert [h.step for h in history] == [1, 2]
    for key in ("val/top5", "val/mean_class_acc", "val/spatial_top1", "val/temporal_top1"):
        assert key in run.data.metrics
    for key in ("val/best_top1", "val/loss", "train/loss", "train/lr", "train/clips_per_s"):
        assert key in run.data.metrics
    assert {"train/stage", "sys/rank_param_drift"} <= set(run.data.metrics)
    seconds = [run.data.metrics[f"sys/{k}_s"] for k in ("train", "precise_bn", "eval")]
    assert all(s > 0 for s in seconds), seconds  # where the epoch's time went
    # constants are tags, not metrics; no key of the old flat names
    assert not {"val/videos", "total_epochs", "epoch"} & set(run.data.metrics)
    assert run.data.tags["val/videos"] == "4" and run.data.tags["total_epochs"] == "2"
    assert all("/" in k for k in run.data.metrics), sorted(run.data.metrics)
    best = max(h.value for h in history)
    assert run.data.metrics["val/best_top1"] == pytest.approx(best) and 0 <= best <= 100
    paths = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "eval", "model"} <= paths
    evals = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/per_class_accuracy.csv"} <= evals
    # each validation video's prediction (what suite tables pair rows on), agreeing with top-1
    text = client.download_artifacts(result.run_id, "eval/per_video.csv", str(run_dir / "pv"))
    per_video = read_per_video(Path(text).read_text())
    assert len(per_video) == result.metrics["val/videos"]
    top1 = 100 * sum(per_video.values()) / len(per_video)  # val/top1 is in %
    assert top1 == pytest.approx(result.metrics["val/top1"])
    # the model artifact: weights without optimizer state, and what rebuilds the model
    model = client.download_artifacts(result.run_id, "model/model.pt", str(run_dir / "dl"))
    saved = torch.load(model, map_location="cpu", weights_only=False)
    assert "optimizer" not in saved and saved["method"] == "onepass" and saved["model"]
    assert Path(model).stat().st_size < (result.run_dir / "best.pt").stat().st_size
    # every resolved option, defaults included, in params and config.yaml; bookkeeping as tags
    assert run.data.params["eval.precise_bn_batches"] == "16"
    assert "run.dir" not in run.data.params and run.data.tags["run.name"] == "straight"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
    assert "None" not in run.data.tags.values()  # unset bookkeeping is no tag
    assert (
        "one-pass baseline" in run.data.tags["mlflow.note.content"].lower()
    )  # the run page's description
    assert "best validation top-1" in run.data.tags["mlflow.note.content"]
    # the dataset in MLflow's Dataset column: split sizes and a digest of the shards
    (inp,) = client.get_run(result.run_id).inputs.dataset_inputs
    assert inp.dataset.name.startswith("synthetic-") and len(inp.dataset.digest) == 12
    assert '"train": 12' in inp.dataset.profile and '"val": 4' in inp.dataset.profile
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # model training
    # the printed links open the training view; the runs table shows the accuracy columns
    hint = ui_hint(result.tracking_uri, result.run_id)
    training_page = f"/#/experiments/{exp.experiment_id}/runs/{result.run_id}?workflowType="
    assert training_page + "machine_learning" in hint and "viewStateShareKey=finegrain" in hint
    view = json.loads(exp.tags["mlflow.sharedViewState.finegrain"])
    assert {"metrics.`val/top1`", "metrics.`val/loss`"} <= set(view["selectedColumns"])
    assert all(float(f"{v:.7g}") == v for v in run.data.metrics.values())  # no float32 noise
    assert exp.artifact_location.startswith("file:///")
    (run_dir / "elsewhere").mkdir()
    with MlflowUI(run_dir / "mlflow.db", run_dir / "elsewhere") as ui:  # the README's command
        assert {"config.yaml", "eval", "model"} <= ui.files(result.run_id)
        assert ui.read(result.run_id, "model/model.pt") == Path(model).read_bytes()


def yaml_file(text: str) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return f.name


@pytest.mark.parametrize("method", ["dsts", "dfb"])
def test_a_runs_params_hold_the_methods_resolved_defaults(method):
    from finegrain.models import method_options

    cfg = load_config("synthetic", [f"model.method={method}", "run.name=x", "run.dir=/tmp/r"])
    params = cfg.params()
    for key, default in method_options(method).items():
        assert params[f"model.{key}"] == (list(default) if isinstance(default, tuple) else default)
    if method == "dsts":
        assert {"model.neurons", "model.layers", "model.tau", "model.udl"} <= set(params)
    dumped = load_config(yaml_file(cfg.to_yaml())).model  # config.yaml rebuilds the run
    assert dumped.options() == {**cfg.model.options(), **dumped.model_extra}
    assert ("neurons" if method == "dsts" else "filters_per_class") in dumped.model_extra
    assert cfg.bookkeeping() == {  # unset ones (no URI, no parent) are no tags
        "run.name": "x", "run.dir": "/tmp/r", "tracking.experiment": "finegrain",
    }  # fmt: skip


@ONE_RUN
def test_resume_reproduces_the_uninterrupted_run_and_a_failed_run_names_its_error(
    run_dir, two_epochs
):
    """Epoch 1 completes and is checkpointed, then the run dies in epoch 2 (no retries): the
    run is FAILED with its error. Resumed under the same name it continues at epoch 2 with
    the optimizer, the schedule, the random state and epoch 2's clips of an uninterrupted
    run of the same seed, so epoch 2 ends exactly as that run's does. (It is also the test that
    the same seed gives the same metrics: two processes, identical losses and accuracies.)"""
    cfg = tiny_config(
        run_dir, "run.name=resume", "optim.epochs=2", "run.fail_at_step=3", "run.max_failures=0"
    )
    with pytest.raises(Exception, match="fault injection"):
        run_experiment(cfg, quiet=True)
    client = MlflowClient(tracking_uri(run_dir))
    failed = client.search_runs(
        [client.get_experiment_by_name("finegrain").experiment_id],
        filter_string="attributes.run_name = 'resume'",
    )[0]
    assert failed.info.status == "FAILED"
    assert "fault injection: rank 1 fails at step 3" in failed.data.tags["error"]
    trace = client.download_artifacts(failed.info.run_id, "error.txt", str(run_dir))
    assert "Traceback" in Path(trace).read_text()
    first = run_files(run_dir, "resume")
    assert len(first) == 1
    saved = torch.load(first[0] / CHECKPOINT_FILE, weights_only=False)
    assert saved["epoch"] == 0 and len(saved["rng"]) == 2  # both ranks' random states

    result = run_experiment(cfg, quiet=True)  # same name: resumes (the fault fires only once)
    assert result.metrics["epoch"] == 2
    assert (run_dir / "resume" / "fault_injected_at_3").exists()  # why it fired only once
    final = torch.load(run_files(run_dir, "resume")[-1] / CHECKPOINT_FILE, weights_only=False)
    assert final["epoch"] == 1
    assert final["scheduler"]["last_epoch"] == 2  # continued, not restarted
    momentum = saved["optimizer"]["state"]
    assert momentum and final["optimizer"]["state"].keys() == momentum.keys()
    assert [h.step for h in client.get_metric_history(result.run_id, "val/top1")] == [1, 2]
    assert client.get_run(result.run_id).info.status == "FINISHED"

    keys = ["train/loss", "val/top1", "val/top5", "val/mean_class_acc"]
    assert {k: result.metrics[k] for k in keys} == {k: two_epochs.metrics[k] for k in keys}


@ONE_RUN
def test_pretraining_saves_the_same_backbone_for_a_seed(run_dir, two_epochs):
    """`experiments/pretrain.py`'s path is deterministic for a seed (issue 11): pretrain() on
    the uninterrupted run's config, in another process, writes the same bytes as the backbone
    of that run's best epoch, and its JSON records the file's sha256 and how it was made."""
    from finegrain.platform import tracking
    from finegrain.platform.pretrain import pretrain, save_backbone

    out = run_dir / "pretrained" / "backbone.pt"
    made = pretrain(tiny_config(run_dir, "run.name=pretrained", "optim.epochs=2"), out)
    # the same file name: torch.save names its archive after the file, so the bytes depend on it
    again = run_dir / "reference" / "backbone.pt"
    reference = save_backbone(two_epochs.run_dir / "best.pt", again)
    assert made["sha256"] == reference and out.read_bytes() == again.read_bytes()
    recorded = json.loads(out.with_suffix(".json").read_text())
    assert recorded["sha256"] == reference
    assert recorded["commit"] == tracking.git_commit()  # and the code that made it
    state = torch.load(out, weights_only=True)  # an ordinary state dict
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


@ONE_RUN
def test_the_same_checkpoint_evaluates_identically_on_1_and_3_workers(run_dir, two_epochs):
    """Every validation view is evaluated exactly once whatever the number of workers (none is
    dropped to even out the ranks' shares: 8 views over 3 ranks), so the metrics are identical."""
    cfg = tiny_config(run_dir, "run.name=evaluated", "eval.clips=2")  # 2 views per video
    checkpoint = two_epochs.run_dir / "best.pt"
    results = [evaluate_checkpoint(cfg, checkpoint, workers=w) for w in (1, 3)]
    assert results[0]["val/videos"] == 4  # 4 videos x 2 views, each seen once
    assert results[0] == results[1]


def test_bad_set_value_exits_2_naming_the_field_before_ray_starts():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "experiments/train.py", "--method", "dsts", "--set", "model.neurons=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.neurons" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.split("model.neurons")[0]
    assert time.perf_counter() - start < 60


def test_incompatible_clip_shape_fails_before_ray_with_the_models_message(run_dir):
    cfg = tiny_config(run_dir, "model.method=dsts", "data.num_frames=4")
    with pytest.raises(ValueError, match="DSTS needs T >= 4"):
        run_experiment(cfg, quiet=True)


def test_stage_plan_splits_epochs_by_share_and_checks_explicit_lists():
    from finegrain.models.base import TrainingStage

    stages = [TrainingStage("a", 0.4), TrainingStage("b", 0.4), TrainingStage("c", 0.2)]
    assert stage_plan(stages, 10, None) == [4, 4, 2]
    assert sum(stage_plan(stages, 3, None)) == 3
    assert stage_plan(stages, 10, [1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="stage_epochs"):
        stage_plan(stages, 10, [1, 2])
    with pytest.raises(ValueError, match="fewer than"):
        stage_plan(stages, 2, None)


def test_a_corrupt_training_video_is_skipped_named_and_counted_in_the_run(run_dir, tmp_path):
    import pyarrow.parquet as pq

    from finegrain.platform.data import prepare_data

    spec = prepare_data(tiny_config(run_dir), quiet=True)
    shards = tmp_path / "shards-with-a-bad-video"
    shutil.copytree(spec.shards, shards)
    first = sorted(shards.glob("shards/train-*.parquet"))[0]
    table = pq.read_table(first)
    victim = table.column("video_id")[0].as_py()
    videos = table.column("video").to_pylist()
    videos[0] = b"\x13" * 2000  # not a video
    table = table.set_column(table.schema.get_field_index("video"), "video", [videos])
    pq.write_table(table.cast(pq.read_schema(first)), first)

    result = run_experiment(
        tiny_config(run_dir, f"data.shards={shards}", "run.name=bad-video"), quiet=True
    )
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"  # the run goes on without it
    assert run.data.metrics["sys/bad_videos"] >= 1
    note = client.download_artifacts(result.run_id, "bad_videos.txt", str(tmp_path))
    assert victim in Path(note).read_text()


def train_worker_pids() -> list[int]:
    """PIDs of this Ray's training-worker processes (children of its raylet)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and b"RayTrainWorker" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_a_training_worker_killed_mid_epoch_costs_at_most_an_epoch_and_no_run(run_dir, capfd):
    """`kill -9` of a training worker in epoch 2 with run.max_failures=1: Ray Train restarts
    the worker group from the last checkpoint; the run finishes in its one MLflow run."""
    import signal
    import threading

    cfg = load_config(
        "synthetic",
        [
            "data.synthetic.size=32",
            "data.short_side=32",
            "data.crop=32",
            "model.width=4",
            "model.weights=null",  # the project's pretrained weights are for width 16
            "data.synthetic.val_videos_per_class=null",  # a quarter of 18: a short evaluation
            "optim.epochs=4",
            "scaling.workers=1",
            "run.max_failures=1",
            f"run.dir={run_dir}",
            "run.name=killed-worker",
        ],
    )  # 12 classes x 18 training videos: epochs of ~1 s, so the kill lands inside one
    uri = tracking_uri(run_dir)
    done: dict = {}
    trainer = threading.Thread(
        target=lambda: done.update(result=run_experiment(cfg, quiet=True)), daemon=True
    )
    trainer.start()
    client, killed, deadline = MlflowClient(uri), [], time.time() + 300
    while not killed and time.time() < deadline and trainer.is_alive():
        time.sleep(0.2)
        exp = client.get_experiment_by_name("finegrain")
        runs = exp and client.search_runs(
            [exp.experiment_id], filter_string="attributes.run_name = 'killed-worker'"
        )
        # Ray Train writes its snapshot once a reported checkpoint is registered
        registered = run_dir / "ray" / "killed-worker" / "checkpoint_manager_snapshot.json"
        if runs and registered.is_file():
            for pid in train_worker_pids():  # epoch 1 is checkpointed: the worker is in epoch 2
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    trainer.join(timeout=300)
    assert killed, "never saw epoch 1 end"
    result = done["result"]
    assert result.metrics["epoch"] == 4
    runs = client.search_runs(
        [client.get_experiment_by_name("finegrain").experiment_id],
        filter_string="attributes.run_name = 'killed-worker'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "val/top1")]
    assert set(steps) == {1, 2, 3, 4} and len(steps) <= 5, steps  # at most one epoch again
    out, deadline = "", time.time() + 20  # the workers' lines come through Ray's log monitor
    while "resumed at epoch" not in out and time.time() < deadline:
        time.sleep(0.5)
        out += capfd.readouterr().out
    assert "[killed-worker] resumed at epoch 2" in out, out[-2000:]
