"""Training on Ray Train with MLflow tracking (issue 5), on a tiny synthetic set, 2 CPU workers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import TINY_RUN
from mlflow.tracking import MlflowClient

from finegrain.models import METHODS
from finegrain.platform.config import load_config
from finegrain.platform.train import CHECKPOINT_FILE, run_experiment, stage_plan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "optim.warmup_epochs=0", "scaling.workers=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    yield path
    ray.shutdown()


def tiny_config(run_dir: Path, *overrides: str):
    return load_config("synthetic", [*TINY, f"run.dir={run_dir}", *overrides])


def run_files(run_dir: Path, name: str) -> list[Path]:
    return sorted(p for p in (run_dir / "ray" / name).glob("checkpoint_*") if p.is_dir())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_one_epoch_with_two_workers(run_dir, method):
    overrides = [f"model.method={method}", f"run.name=all-{method}"]
    if method == "u2s":
        overrides.append("optim.epochs=3")  # one epoch per stage: UN, CSN+MN, joint
    if method == "dsts":
        overrides += ["model.udl=true", "model.neurons=3", "model.layers=1", "data.num_frames=8"]
    result = run_experiment(tiny_config(run_dir, *overrides), quiet=True)
    m = result.metrics
    assert 0.0 <= m["val_top1"] <= 1.0 and m["val_videos"] == 4  # one val video per class
    assert m["rank_param_drift"] == pytest.approx(0.0, abs=1e-6)  # DDP kept ranks identical
    assert m["train_loss"] == m["train_loss"]  # not NaN
    if method == "dsts":
        assert any(k.startswith("train_udl") or k.startswith("train_val") for k in m), m


def test_mlflow_run_has_params_metrics_artifacts_and_finished(run_dir):
    result = run_experiment(tiny_config(run_dir, "run.name=tracked", "optim.epochs=2"), quiet=True)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.method"] == "onepass"
    assert run.data.params["optim.epochs"] == "2"
    assert run.data.tags["method"] == "onepass" and run.data.tags["dataset"] == "synthetic"
    assert "git_commit" in run.data.tags
    history = client.get_metric_history(result.run_id, "val_top1")
    assert [h.step for h in history] == [1, 2]
    for key in ("val_top5", "val_mean_class_acc", "val_spatial_top1", "val_temporal_top1"):
        assert key in run.data.metrics
    paths = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "eval", "checkpoints"} <= paths
    evals = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/per_class_accuracy.csv"} <= evals


def test_resume_continues_at_epoch_two_with_the_optimizer_state(run_dir):
    # epoch 1 completes and is checkpointed, then the run dies in epoch 2 (no retries)
    cfg = tiny_config(
        run_dir, "run.name=resume", "optim.epochs=2", "run.fail_at_step=3", "run.max_failures=0"
    )
    with pytest.raises(Exception, match="fault injection"):
        run_experiment(cfg, quiet=True)
    first = run_files(run_dir, "resume")
    assert len(first) == 1
    saved = torch.load(first[0] / CHECKPOINT_FILE, weights_only=False)
    assert saved["epoch"] == 0

    result = run_experiment(cfg, quiet=True)  # same name: resumes (the fault fires only once)
    assert result.metrics["epoch"] == 2
    final = torch.load(run_files(run_dir, "resume")[-1] / CHECKPOINT_FILE, weights_only=False)
    assert final["epoch"] == 1
    assert final["scheduler"]["last_epoch"] == 2  # continued, not restarted
    momentum = saved["optimizer"]["state"]
    assert momentum and final["optimizer"]["state"].keys() == momentum.keys()
    client = MlflowClient(result.tracking_uri)
    assert [h.step for h in client.get_metric_history(result.run_id, "val_top1")] == [1, 2]
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_fault_injection_recovers_with_max_failures(run_dir):
    cfg = tiny_config(
        run_dir, "run.name=faulty", "optim.epochs=2", "run.fail_at_step=3", "run.max_failures=1"
    )
    result = run_experiment(cfg, quiet=True)
    assert result.metrics["epoch"] == 2
    assert (run_dir / "faulty" / "fault_injected_at_3").exists()


def test_same_seed_twice_gives_identical_metrics(run_dir):
    a = run_experiment(tiny_config(run_dir, "run.name=seed-a", "scaling.workers=1"), quiet=True)
    b = run_experiment(tiny_config(run_dir, "run.name=seed-b", "scaling.workers=1"), quiet=True)
    keys = ["train_loss", "val_top1", "val_top5", "val_mean_class_acc"]
    assert {k: a.metrics[k] for k in keys} == {k: b.metrics[k] for k in keys}


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
    assert run.data.metrics["bad_videos"] >= 1
    note = client.download_artifacts(result.run_id, "bad_videos.txt", str(tmp_path))
    assert victim in Path(note).read_text()
