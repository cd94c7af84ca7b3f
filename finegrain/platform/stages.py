"""The method's training stages over a run's epochs, and each stage's optimizers and schedules
(:class:`Stages`): what the trainer, the checkpoints and the run log share."""

from __future__ import annotations

import math

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from finegrain.models.base import FineGrainModel, TrainingStage, trainable_named_parameters
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.worker import Worker


def stage_plan(stages: list[TrainingStage], epochs: int, explicit: list[int] | None) -> list[int]:
    """Epochs per stage: ``optim.stage_epochs`` if given, else the stages' shares of ``epochs``."""
    if explicit is not None:
        if len(explicit) != len(stages):
            names = [s.name for s in stages]
            raise ValueError(
                f"optim.stage_epochs has {len(explicit)} entries; this method has "
                f"{len(stages)} stages {names}"
            )
        return list(explicit)
    if len(stages) == 1:
        return [epochs]
    if epochs < len(stages):
        raise ValueError(f"optim.epochs={epochs} is fewer than the method's {len(stages)} stages")
    shares = np.array([s.epochs for s in stages], dtype=float)
    plan = np.maximum(1, np.floor(shares / shares.sum() * epochs)).astype(int)
    plan[-1] += epochs - plan.sum()
    return plan.tolist()


def make_optimizer(
    cfg: ExperimentConfig,
    params: list,
    lr_scale: float,
    pretrained: tuple[str, ...] = (),
) -> torch.optim.Optimizer:
    """The run's optimizer at ``optim.lr * lr_scale``. ``params``: parameters, or (name,
    parameter) pairs, in which case those named under the ``pretrained`` prefixes form a group
    of their own at ``optim.backbone_lr_scale`` times the rate (the first group is the rest)."""
    lr = cfg.optim.lr * lr_scale
    if params and isinstance(params[0], tuple):
        groups = [
            {"params": [p for n, p in params if not n.startswith(pretrained)], "lr": lr},
            {
                "params": [p for n, p in params if pretrained and n.startswith(pretrained)],
                "lr": lr * cfg.optim.backbone_lr_scale,
            },
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": list(params), "lr": lr}]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )


def make_scheduler(cfg: ExperimentConfig, optimizer, epochs: int, warmup: bool = True):
    """Per-epoch LR factor: linear warm-up (if ``warmup``), then cosine / step / constant."""
    warm = cfg.optim.warmup_epochs if warmup else 0
    kind, step = cfg.optim.schedule, cfg.optim.step_size

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        if kind == "cosine":
            span = max(1, epochs - warm)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
        if kind == "step":
            return 0.1 ** ((epoch - warm) // step)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def reduce_mean(tensors) -> None:
    """Average tensors in place across the DDP ranks (no-op on one worker)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    tensors = list(tensors)
    if not tensors:
        return
    # one collective on one contiguous buffer (gloo rejects non-contiguous views)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class Stages:
    """The method's training stages over the run's epochs, and the current stage's optimizers:
    fresh ones (the hook's too) and their own LR schedules at every stage, and the DDP model."""

    def __init__(self, worker: Worker, model: FineGrainModel) -> None:
        self.worker, self.model = worker, model
        cfg = worker.cfg
        self.items = model.training_stages()
        self.plan = stage_plan(self.items, cfg.optim.epochs, cfg.optim.stage_epochs)
        self.total_epochs = sum(self.plan)
        self.index = -1
        self.optimizer = self.scheduler = self.ddp = None
        self.hook_optimizer = self.hook_scheduler = None

    def __getitem__(self, index: int) -> TrainingStage:
        return self.items[index]

    def at(self, epoch: int) -> tuple[int, int]:
        """(stage index, epoch within the stage)."""
        for i, n in enumerate(self.plan):
            if epoch < n:
                return i, epoch
            epoch -= n
        return len(self.plan) - 1, self.plan[-1] - 1

    def enter(self, index: int, batches) -> None:
        """Stage ``index``: the model's own set-up (over ``batches()``, the replay), then fresh
        optimizers (warm-up in the first stage only, unless ``optim.warmup_every_stage``) and
        each stage its own schedule."""
        cfg, model = self.worker.cfg, self.model
        stage = self.items[index]
        model.begin_stage(index, batches, reduce_mean)
        params = trainable_named_parameters(model, stage)
        warmup = index == 0 or cfg.optim.warmup_every_stage
        pretrained = model.pretrained_prefixes()
        self.optimizer = make_optimizer(cfg, params, stage.lr_scale, pretrained)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.plan[index], warmup)
        # an optimizer (and schedule) for the meta step's parameters, only if the model steps
        # it: one nobody steps would only have its schedule advanced (and torch warn about it)
        hook = model.hook_parameters() if model.uses_run_optimizer else []
        self.hook_optimizer = make_optimizer(cfg, hook, stage.lr_scale) if hook else None
        self.hook_scheduler = (
            make_scheduler(cfg, self.hook_optimizer, self.plan[index], warmup) if hook else None
        )
        kwargs = {"find_unused_parameters": True} if self.worker.world > 1 else {}
        self.ddp = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs=kwargs
        )
        self.index = index
