"""What one worker's loop reports: each epoch's line on the console and, from rank 0, the MLflow
run's facts, metrics, skipped videos and evaluation artifacts (:class:`RunLog`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray
import torch.distributed as dist

from finegrain.platform import keys, tracking
from finegrain.platform.data import bad_video_note
from finegrain.platform.metrics import PER_VIDEO_FILE, per_video_csv
from finegrain.platform.worker import say

if TYPE_CHECKING:
    from finegrain.platform.checkpoints import Checkpoints
    from finegrain.platform.stages import Stages
    from finegrain.platform.worker import Progress, Worker


class RunLog:
    """The run's console lines and MLflow record (rank 0 logs; without a run id, nothing)."""

    def __init__(
        self, worker: Worker, stages: Stages, progress: Progress, checkpoints: Checkpoints
    ) -> None:
        self.worker, self.stages, self.progress = worker, stages, progress
        self.checkpoints = checkpoints
        self.cfg, self.config = worker.cfg, worker.config
        self.logger = (
            tracking.RunLogger(self.config["tracking_uri"], self.config["run_id"])
            if worker.rank == 0 and self.config.get("run_id")
            else None
        )
        self.bad_logged = 0  # bad videos already logged to MLflow

    def record_run_facts(self) -> None:
        """Tag the run with each rank's Ray node id (``worker_nodes``, in rank order) and its
        ``total_epochs`` (what a sweep compares a stopped trial's progress with; a tag, as
        it is constant over the run)."""
        w = self.worker
        nodes: list[str | None] = [None] * w.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if w.rank == 0:
            total = self.stages.total_epochs
            tags = {"worker_nodes": ",".join(nodes), keys.TOTAL_EPOCHS: total}
            self.logger.tags(tags)

    def log_epoch(self, epoch, metrics, val, extra, run_start, is_best) -> None:
        total = self.stages.total_epochs
        done = epoch + 1 - self.progress.start_epoch
        per_epoch = (time.perf_counter() - run_start) / done
        eta = per_epoch * (total - epoch - 1)
        stage = self.stages[metrics["train/stage"]].name
        say(
            f"[{self.config['run_name']}] epoch {epoch + 1}/{total} ({stage}) "
            f"loss {metrics['train/loss']:.3f} val top1 {metrics[keys.TOP1]:.1f}% "
            f"top5 {metrics['val/top5']:.1f}% {metrics['train/clips_per_s']:.1f} clips/s "
            f"ETA {eta:.0f}s"
        )
        # the step, and values constant over a run: tags, not flat-line charts
        logged = {k: v for k, v in metrics.items() if k not in keys.CONSTANT}
        self.logger.metrics(logged, step=epoch + 1)
        self.logger.tags({keys.VIDEOS: int(metrics[keys.VIDEOS])})
        self.log_bad_videos(epoch + 1)
        # every epoch (overwritten): the last one's is what the suite tables pair rows on
        self.logger.text(per_video_csv(val["per_video"]), f"eval/{PER_VIDEO_FILE}")
        last = epoch + 1 == total
        if is_best or last:
            self.log_artifacts(val, extra, final=last)

    def log_bad_videos(self, step: int) -> None:
        """The videos skipped so far, logged as they appear (a run stopped later keeps them)."""
        bad = ray.get(self.worker.bad_log.summary.remote())
        if bad["count"] > self.bad_logged:
            self.logger.metrics({"sys/bad_videos": bad["count"]}, step=step)
            self.logger.text(bad_video_note(bad) + "\n", "bad_videos.txt")
            self.bad_logged = bad["count"]

    def log_artifacts(self, val, extra, final: bool) -> None:
        from finegrain.platform import figures

        names = self.config["classes"]
        self.logger.text(
            figures.per_class_csv(names, val["per_class"]), "eval/per_class_accuracy.csv"
        )
        self.logger.figure(
            figures.confusion_matrix(val["confusion"], names, self.config["class_groups"]),
            "eval/confusion_matrix.png",
        )
        for name, fig in figures.method_figures(
            self.cfg.model.method,
            extra["diagnostics"],
            extra["sample"],
            names,
            self.config["class_groups"],
        ).items():
            self.logger.figure(fig, f"diagnostics/{name}.png")
        run_dir = self.worker.run_dir
        if final and (run_dir / "best.pt").exists():
            self.logger.artifact(self.checkpoints.export_model(run_dir / "best.pt"), "model")
        figures.close_all()
