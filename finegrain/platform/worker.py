"""What the parts of one Ray Train worker's loop share: its place in the run (:class:`Worker`),
how far the run is (:class:`Progress`), and its line on the driver's console (:func:`say`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from finegrain.platform.config import ExperimentConfig
from finegrain.platform.logs import quiet_ray_logs


def say(message: str) -> None:
    """One line of a worker's progress on the driver's console, once.

    Train V2 patches ``print`` to tee into its logger, which Ray also forwards to the driver:
    every line would show twice. Writing to the process's real stdout is forwarded once.
    """
    print(message, file=sys.__stdout__, flush=True)


@dataclass(frozen=True)
class Worker:
    """This rank's place in the run: the config, the driver's loop config, rank and device."""

    cfg: ExperimentConfig
    config: dict[str, Any]  # what the driver passed: run name and directory, classes, data...
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    bad_log: Any  # the run's bad-video log (an actor the driver owns)

    @classmethod
    def start(cls, config: dict[str, Any]) -> Worker:
        """Join the run: this rank and the world, quiet Ray logs, the device, the threads."""
        cfg = ExperimentConfig.model_validate(config["cfg"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        quiet_ray_logs()
        device = ray.train.torch.get_device()
        torch.set_num_threads(cfg.scaling.threads_per_worker)
        return cls(cfg, config, rank, world, device, Path(config["run_dir"]), config["bad_log"])


@dataclass
class Progress:
    """How far the run is (what a checkpoint keeps besides the weights and optimizers)."""

    start_epoch: int = 0  # where this worker's loop started: 0, or the epoch it resumed at
    best_top1: float = -1.0
    global_step: int = 0
