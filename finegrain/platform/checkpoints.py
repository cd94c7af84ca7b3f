"""One worker's checkpoints: saved every epoch through ``ray.train.report`` (the best one also
to the run directory), restored from on a restart, and the best exported as ``model.pt``."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

if TYPE_CHECKING:
    from finegrain.models.base import FineGrainModel
    from finegrain.platform.stages import Stages
    from finegrain.platform.worker import Progress, Worker

CHECKPOINT_FILE = "checkpoint.pt"


class Checkpoints:
    """What a checkpoint holds: the model and its hook, the current stage's optimizers and
    schedules, the run's :class:`~finegrain.platform.worker.Progress`, and every rank's random
    states (a resumed run draws what it would have)."""

    def __init__(
        self,
        worker: Worker,
        model: FineGrainModel,
        stages: Stages,
        scaler: torch.amp.GradScaler | None,
        progress: Progress,
    ) -> None:
        self.worker, self.model, self.stages = worker, model, stages
        self.scaler, self.progress = scaler, progress

    def export_model(self, checkpoint: Path) -> Path:
        """``model.pt`` beside the best checkpoint: its weights and what rebuilds the model,
        without the optimizer state (the resumable checkpoint stays in the run directory)."""
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        cfg = self.worker.cfg
        out = checkpoint.with_name("model.pt")
        torch.save(
            {
                "model": state["model"],
                "hook": state["hook"],
                "epoch": state["epoch"],
                "best_top1": state["best_top1"],
                "method": cfg.model.method,
                "backbone": cfg.model.backbone,
                "options": cfg.resolved()["model"],
                "classes": list(self.worker.config["classes"]),
            },
            out,
        )
        return out

    def state(self, epoch: int) -> dict:
        stages = self.stages
        return {
            "epoch": epoch,
            "stage": stages.index,
            "model": self.model.state_dict(),
            "optimizer": stages.optimizer.state_dict(),
            "scheduler": stages.scheduler.state_dict(),
            "hook": self.model.hook_state_dict(),
            "best_top1": self.progress.best_top1,
            "global_step": self.progress.global_step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "hook_optimizer": stages.hook_optimizer.state_dict() if stages.hook_optimizer else None,
            "hook_scheduler": stages.hook_scheduler.state_dict() if stages.hook_scheduler else None,
            "rng": self.rng_states(),  # every rank's: a resumed run draws what it would have
        }

    def rng_states(self) -> list:
        """Every rank's (torch, numpy, python) random state, gathered to all ranks."""
        mine = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        if self.worker.world == 1:
            return [mine]
        states: list = [None] * self.worker.world
        dist.all_gather_object(states, mine)
        return states

    def restore(self) -> dict | None:
        """The latest checkpoint's weights, progress and this rank's random states, loaded;
        returns the checkpoint (``None`` without one) for :meth:`restore_optimizers`."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        w = self.worker
        with ckpt.as_directory() as d:
            # this run's own checkpoint (optimizer and random states are not plain tensors)
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=w.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.model.load_hook_state_dict(state["hook"])
        self.progress.start_epoch = state["epoch"] + 1
        self.progress.best_top1 = state["best_top1"]
        self.progress.global_step = state["global_step"]
        rng = state.get("rng")
        if rng and len(rng) == w.world:
            torch_state, np_state, py_state = rng[w.rank]
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)
        return state

    def restore_optimizers(self, state: dict) -> None:
        """Continue the stage ``state`` was saved in: its optimizers and schedules (entered)."""
        stages = self.stages
        stages.optimizer.load_state_dict(state["optimizer"])
        stages.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if stages.hook_optimizer and state.get("hook_optimizer"):
            stages.hook_optimizer.load_state_dict(state["hook_optimizer"])
            stages.hook_scheduler.load_state_dict(state["hook_scheduler"])

    def save(self, epoch: int, metrics: dict, is_best: bool) -> None:
        state = self.state(epoch)  # every rank: it gathers their random states
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.worker.rank == 0:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                if is_best:
                    self.worker.run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(Path(d) / CHECKPOINT_FILE, self.worker.run_dir / "best.pt")
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
