"""One training run on Ray Train: ``run_experiment(cfg)``.

The driver (``train.py``'s process, or the Tune trial actor of a sweep) prepares the data (the
synthetic benchmark is generated and sharded on first use), opens the MLflow run, creates the
run's bad-video log (it owns it, so the log lives exactly as long as the run), and runs a
``TorchTrainer``; it closes the MLflow run as FINISHED, FAILED (with an ``error`` tag) or KILLED.
Each worker runs :func:`train_loop_per_worker`:

- the model from ``build_model``; DDP through ``ray.train.torch.prepare_model`` (gloo on CPU,
  NCCL on GPU); AMP (bf16 by default, fp16 with a GradScaler) on GPU; seeds; gradient clipping;
  a warm-up + cosine/step LR schedule per training stage;
- everything it reads from *one* Ray Data execution for all the epochs it has left
  (:meth:`DataSpec.run_dataset`, :class:`~finegrain.datasets.pipeline.EpochBatches`): the
  decode actors start once per run; each epoch's clips are fixed by the seed and the epoch
  (restored from the checkpoint on resume); every rank takes the same number of steps; its
  exact share of the validation views comes decoded once and is kept (or, when they do not fit
  in ``eval.cache_mb``, after every epoch's training clips);
- the method's procedure through the model's hook (``finegrain.models.base``): stages (U2S),
  ``begin_stage`` between them (U2S's CSM pass, over a replay of the previous epoch's batches),
  ``meta_step`` on batches of further independent samplers (DSTS's UDL). The loop never asks
  which method it trains;
- evaluation every epoch on every validation view, exactly once across the ranks (views of a
  video averaged) with torchmetrics; a run fails rather than report a partial evaluation;
- a checkpoint every epoch through ``ray.train.report``; the best model by val top-1 is kept in
  the run directory. Re-running with the same run name resumes from the latest checkpoint;
  ``FailureConfig(max_failures)`` restarts the workers after a failure, from that checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig
from ray.train.torch import TorchTrainer

from finegrain.models import build_model
from finegrain.models.base import (
    FineGrainModel,
    MetaContext,
    TrainingStage,
    trainable_named_parameters,
)
from finegrain.platform import cluster, tracking
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.data import DataSpec, bad_video_note, dataset_name, prepare_data
from finegrain.platform.logs import quiet_ray_logs
from finegrain.platform.metrics import average_views, classification_metrics

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class RunResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    run_dir: Path


@dataclass(frozen=True)
class ModelFacts:
    """What the driver learns from building the model once (:func:`check_model`)."""

    extra_batches: int  # further training samplers one step draws from (DSTS's UDL: 1)


# ---------------------------------------------------------------------------------- driver


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.model.method}-{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_experiment(
    cfg: ExperimentConfig,
    *,
    callbacks: list | None = None,
    quiet: bool = False,
    address: str | None = None,
    in_trial: bool = False,
) -> RunResult:
    """Train ``cfg`` on the Ray cluster (a fresh local one if none is given) and track it.

    ``in_trial``: driven by a Tune trial (a sweep or suite sized the cluster already).
    """
    run_name = cfg.run.name or default_run_name(cfg)
    root = tracking.run_root(cfg.run.dir)
    uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.dir)
    facts = check_model(cfg)
    data = prepare_data(cfg, quiet=quiet)
    cluster.connect(address)
    if not in_trial:
        need = cluster.run_resources(cfg, in_trial=False)
        cluster.plan_concurrency(need, 1, what="run", say=not quiet)
    tracking.start_relay(uri)  # a store on this machine, workers on others: they log through it
    from finegrain.datasets.pipeline import new_bad_video_log

    bad_log = new_bad_video_log()  # this process owns it: it lives as long as the run

    run_id = tracking.open_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        cfg.run.dir,
        tags={
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "dataset": cfg.data.dataset,
            **cfg.bookkeeping(),
        },
        params=cfg.params(),
        parent_run_id=cfg.tracking.parent_run_id,
    )
    logger = tracking.RunLogger(uri, run_id)
    logger.text(cfg.to_yaml(), "config.yaml")
    tracking.log_dataset(uri, run_id, dataset_name(cfg), data.shards, data.split_sizes())
    if not quiet:
        print(f"MLflow run {run_id} ({run_name}) in {uri}", flush=True)

    status, error = "FAILED", None
    try:
        trainer = build_trainer(cfg, data, run_name, uri, run_id, facts, bad_log, callbacks)
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            bad = ray.get(bad_log.summary.remote(), timeout=30)
        except Exception:  # the report never hides the run's own outcome
            bad = {"count": 0, "events": 0, "first": []}
        if bad["count"]:  # reported, never silently dropped: on the console and in the run
            note = bad_video_note(bad)
            print(f"[{run_name}] note: {note}", flush=True)
            logger.text(note + "\n", "bad_videos.txt")  # (the loop logs the count per epoch)
        tracking.close_run(uri, run_id, status, error=error)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return RunResult(run_id, run_name, uri, metrics, root / run_name)


def check_model(cfg: ExperimentConfig) -> ModelFacts:
    """Build the model and run one dummy clip of the configured shape, before data and Ray.

    A bad method option or a backbone/method/clip mismatch (e.g. DSTS fed too few time steps)
    fails here with the model's own message — prefixed with ``model.<option>`` when it names
    one — instead of inside every worker, retry after retry.
    """
    classes = cfg.data.synthetic.classes if cfg.data.dataset == "synthetic" else 10
    try:
        model = build_model(
            cfg.model.method, classes, cfg.model.backbone, **cfg.model.options()
        ).eval()
    except ValueError as e:
        first = str(e).split(" ", 1)[0].strip(":'\"`")
        if first in (cfg.model.model_extra or {}):
            raise ValueError(f"model.{e}") from None
        raise
    facts = ModelFacts(extra_batches=int(getattr(model, "extra_batches", 0)))
    clip = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.crop, cfg.data.crop)
    with torch.no_grad():
        if not getattr(model, "needs_labels", False):  # an oracle needs an installed CSM
            model(clip)
    return facts


def build_trainer(
    cfg: ExperimentConfig,
    data: DataSpec,
    run_name: str,
    uri: str,
    run_id: str,
    facts: ModelFacts,
    bad_log: Any,
    callbacks: list | None = None,
) -> TorchTrainer:
    from ray.train import LoggingConfig, RunConfig, ScalingConfig

    use_gpu = cfg.scaling.gpus_per_worker > 0
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    root = tracking.run_root(cfg.run.dir)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "run_name": run_name,
        "run_dir": str(root / run_name),
        "tracking_uri": uri,
        "run_id": run_id,
        "shards": str(data.shards),
        "classes": data.classes,
        "class_groups": data.class_groups,
        "streams": 1 + facts.extra_batches,
        "bad_log": bad_log,
    }
    retries = cfg.run.startup_retries
    if retries is None:  # an autoscaler may take minutes to add the nodes a run waits for
        retries = 10 if cluster.capacity().autoscaling else 2
    cluster.watch_preemptions()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(root / "ray"),
            # worker failures: run.max_failures restarts from the last checkpoint; a worker
            # group that cannot start (its resources never come) is retried a bounded number of
            # times (Train V2's default is forever)
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures, controller_failure_limit=retries
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            # the console gets Ray Train's warnings and errors; its INFO lines (worker-group
            # start, process group set-up) stay in the session's logs/train/ files
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


# ---------------------------------------------------------------------------------- worker


def say(message: str) -> None:
    """One line of a worker's progress on the driver's console, once.

    Train V2 patches ``print`` to tee into its logger, which Ray also forwards to the driver:
    every line would show twice. Writing to the process's real stdout is forwarded once.
    """
    print(message, file=sys.__stdout__, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
def precise_bn(model: torch.nn.Module, batches, reduce) -> int:
    """Recompute the running statistics of every BatchNorm in training mode (PySlowFast's
    ``BN.USE_PRECISE_STATS``): reset them, forward ``batches`` in training mode with a
    cumulative average (momentum None), then average them across the ranks. Layers a method
    keeps in evaluation mode (frozen) keep theirs. Returns the batches used."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    used = 0
    try:
        for clips, _ in batches:
            model(clips)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    reduce([t for m in norms for t in (m.running_mean, m.running_var)])
    return used


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


def all_ranks_have(flag: bool, device: torch.device) -> bool:
    """True while every rank still has a batch (ranks must take the same number of steps)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def autocast_context(cfg: ExperimentConfig, device: torch.device):
    amp = cfg.scaling.amp
    if device.type != "cuda" or amp == "off":
        return nullcontext(), None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


class Replay:
    """A uniform sample of one epoch's training batches (``uint8`` clips, on the CPU), at most
    ``max_bytes``: every batch of the epoch when they fit (reservoir sampling, seeded).

    What a method may look at between epochs without decoding anything again: the batches
    ``begin_stage`` passes over (U2S's category similarity matrix from the trained universal
    network).
    """

    def __init__(self, max_bytes: int, seed: int) -> None:
        self.max_bytes, self.seed = max_bytes, seed
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def start(self, epoch: int) -> None:
        self.batches, self.seen, self.rng = [], 0, random.Random(f"{self.seed}/{epoch}")

    def offer(self, clips: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += 1
        size = clips.numel() * clips.element_size()
        capacity = max(1, self.max_bytes // max(size, 1))
        if len(self.batches) < capacity:
            self.batches.append((clips.cpu(), labels.cpu()))
        elif (k := self.rng.randrange(self.seen)) < capacity:
            self.batches[k] = (clips.cpu(), labels.cpu())


class _Loop:
    """State of one worker's training loop (kept in one place so checkpoints are complete)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from finegrain.datasets.pipeline import to_model_input

        self.cfg = ExperimentConfig.model_validate(config["cfg"])
        self.config = config
        self.to_model_input = to_model_input
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        quiet_ray_logs()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(self.cfg.scaling.threads_per_worker)
        seed_everything(self.cfg.run.seed)  # identical initial weights on every rank
        opts = self.cfg.model.options()
        self.model: FineGrainModel = build_model(
            self.cfg.model.method, len(config["classes"]), self.cfg.model.backbone, **opts
        ).to(self.device)
        seed_everything(self.cfg.run.seed * 1000 + self.rank + 1)  # per-rank noise (Gumbel...)
        self.needs_labels = getattr(self.model, "needs_labels", False)
        self.stages = self.model.training_stages()
        self.plan = stage_plan(self.stages, self.cfg.optim.epochs, self.cfg.optim.stage_epochs)
        self.total_epochs = sum(self.plan)
        self.run_dir = Path(config["run_dir"])
        self.logger = (
            tracking.RunLogger(config["tracking_uri"], config["run_id"])
            if self.rank == 0 and config.get("run_id")
            else None
        )
        self.autocast, self.scaler = autocast_context(self.cfg, self.device)
        self.spec = DataSpec(Path(config["shards"]), config["classes"], config["class_groups"])
        self.streams = int(config["streams"])
        self.bad_log = config["bad_log"]
        self.val_cache: list | None = None  # this rank's decoded validation batches, if kept
        self.replay = Replay(self.cfg.data.replay_mb * 2**20, self.cfg.run.seed)
        self.bad_logged = 0  # bad videos already logged to MLflow
        self.stream = None  # the training batches of every remaining epoch: made on first use
        self.stage_index = -1
        self.optimizer = self.scheduler = self.ddp = None
        self.hook_optimizer = self.hook_scheduler = None
        rows = self.spec.train_rows()
        per_rank = -(-rows // self.world)  # the training sequence is padded: every rank alike
        self.steps_per_epoch = max(1, -(-per_rank // self.cfg.optim.batch_size))
        self.start_epoch, self.best_top1, self.global_step = 0, -1.0, 0

    # --- stages --------------------------------------------------------------------------
    def stage_at(self, epoch: int) -> tuple[int, int]:
        """(stage index, epoch within the stage)."""
        for i, n in enumerate(self.plan):
            if epoch < n:
                return i, epoch
            epoch -= n
        return len(self.plan) - 1, self.plan[-1] - 1

    def enter_stage(self, index: int) -> None:
        """Stage ``index``: the model's own set-up, then fresh optimizers (warm-up in the first
        stage only, unless ``optim.warmup_every_stage``) and each stage its own schedule."""
        stage = self.stages[index]
        self.model.begin_stage(index, self.replayed_batches, reduce_mean)
        params = trainable_named_parameters(self.model, stage)
        warmup = index == 0 or self.cfg.optim.warmup_every_stage
        pretrained = self.model.pretrained_prefixes()
        self.optimizer = make_optimizer(self.cfg, params, stage.lr_scale, pretrained)
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.plan[index], warmup)
        hook = self.model.hook_parameters()
        self.hook_optimizer = make_optimizer(self.cfg, hook, stage.lr_scale) if hook else None
        self.hook_scheduler = (
            make_scheduler(self.cfg, self.hook_optimizer, self.plan[index], warmup)
            if hook
            else None
        )
        kwargs = {"find_unused_parameters": True} if self.world > 1 else {}
        self.ddp = ray.train.torch.prepare_model(
            self.model, move_to_device=False, parallel_strategy_kwargs=kwargs
        )
        self.stage_index = index

    # --- data ----------------------------------------------------------------------------
    def model_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        clips = self.to_model_input(batch["clips"].to(self.device, non_blocking=True))
        return clips, batch["labels"].to(self.device)

    def open_stream(self, epoch: int) -> None:
        """The run's one data stream, from ``epoch`` to the end."""
        from finegrain.datasets.pipeline import EpochBatches

        ds = self.spec.run_dataset(
            self.cfg,
            list(range(epoch, self.total_epochs)),
            self.rank,
            self.world,
            streams=self.streams,
            bad_log=self.bad_log,
        )
        self.stream = EpochBatches(
            ds,
            self.cfg.optim.batch_size,
            streams=self.streams,
            eval_batch_size=self.cfg.eval.batch_size,
        )
        self.keep_val = self.spec.val_fits(self.cfg, self.world)
        self.val_epoch = epoch  # where the stream plans the validation views when kept

    def epoch_batches(self, epoch: int):
        """This rank's training batches of ``epoch``, from the run's one data stream."""
        if self.stream is None:
            self.open_stream(epoch)
        return self.stream.epoch(epoch)

    def replayed_batches(self):
        """The previous epoch's training batches as the replay kept them (model input).

        A run resumed right at a stage boundary has no replay yet: the previous epoch's clips
        are decoded again, with their own seed-fixed sampling, in a pass of their own (before
        the run's stream starts).
        """
        if not self.replay.batches and self.start_epoch > 0:
            from finegrain.datasets.pipeline import iter_clip_batches

            previous = self.start_epoch - 1
            self.replay.start(previous)
            ds = self.spec.train_stream(
                self.cfg, [previous], self.rank, self.world, bad_log=self.bad_log
            )
            for batch in iter_clip_batches(ds, self.cfg.optim.batch_size):
                self.replay.offer(batch["clips"], batch["labels"])
        for clips, labels in self.replay.batches:
            yield self.to_model_input(clips.to(self.device)), labels.to(self.device)

    def val_batches(self, epoch: int):
        """This rank's share of every validation view: decoded once and kept, or decoded
        after each epoch's training clips, in the same stream."""
        if self.stream is None:
            self.open_stream(epoch)
        if self.keep_val:
            if self.val_cache is None:
                self.val_cache = list(self.stream.evaluation(self.val_epoch))
            batches = self.val_cache
        else:
            batches = self.stream.evaluation(epoch)
        for batch in batches:
            yield (*self.model_input(batch), batch)

    # --- checkpoints ---------------------------------------------------------------------
    def export_model(self, checkpoint: Path) -> Path:
        """``model.pt`` beside the best checkpoint: its weights and what rebuilds the model,
        without the optimizer state (the resumable checkpoint stays in the run directory)."""
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        cfg = self.cfg
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
                "classes": list(self.config["classes"]),
            },
            out,
        )
        return out

    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "stage": self.stage_index,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hook": self.model.hook_state_dict(),
            "best_top1": self.best_top1,
            "global_step": self.global_step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "hook_optimizer": self.hook_optimizer.state_dict() if self.hook_optimizer else None,
            "hook_scheduler": self.hook_scheduler.state_dict() if self.hook_scheduler else None,
            "rng": self.rng_states(),  # every rank's: a resumed run draws what it would have
        }

    def rng_states(self) -> list:
        """Every rank's (torch, numpy, python) random state, gathered to all ranks."""
        mine = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        if self.world == 1:
            return [mine]
        states: list = [None] * self.world
        dist.all_gather_object(states, mine)
        return states

    def restore(self) -> None:
        """Continue after the latest checkpoint: its weights, optimizer and schedule, and its
        epoch, from which the data stream is planned (each epoch's clips are fixed by the seed
        and the epoch, so the resumed epochs see what an uninterrupted run would)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            # this run's own checkpoint (optimizer and random states are not plain tensors)
            state = torch.load(
                Path(d) / CHECKPOINT_FILE, map_location=self.device, weights_only=False
            )
        self.model.load_state_dict(state["model"])
        self.model.load_hook_state_dict(state["hook"])
        self.start_epoch = state["epoch"] + 1
        self.best_top1 = state["best_top1"]
        self.global_step = state["global_step"]
        rng = state.get("rng")
        if rng and len(rng) == self.world:
            torch_state, np_state, py_state = rng[self.rank]
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)
        if self.start_epoch >= self.total_epochs:
            return
        index, _ = self.stage_at(self.start_epoch)
        self.enter_stage(index)
        if index == state["stage"]:  # same stage: continue its optimizer and schedule
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            if self.hook_optimizer and state.get("hook_optimizer"):
                self.hook_optimizer.load_state_dict(state["hook_optimizer"])
                self.hook_scheduler.load_state_dict(state["hook_scheduler"])
        if self.rank == 0:
            say(f"[{self.config['run_name']}] resumed at epoch {self.start_epoch + 1}")

    def save(self, epoch: int, metrics: dict, is_best: bool) -> None:
        state = self.state(epoch)  # every rank: it gathers their random states
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                if is_best:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(Path(d) / CHECKPOINT_FILE, self.run_dir / "best.pt")
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    # --- steps ---------------------------------------------------------------------------
    def maybe_fail(self) -> None:
        """Fault injection (``run.fail_at_step``): the last rank raises once, at that step."""
        step = self.cfg.run.fail_at_step
        if step is None or self.global_step != step or self.rank != self.world - 1:
            return
        marker = self.run_dir / f"fault_injected_at_{step}"
        if marker.exists():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"fault injection: rank {self.rank} fails at step {step}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.replay.start(epoch)
        batches = self.epoch_batches(epoch)
        losses, clips_seen, extra_stats, step = [], 0, {}, 0
        start = time.perf_counter()
        while True:
            batch = next(batches, None)
            extras = [self.stream.extra(epoch, s) for s in range(1, self.streams)]
            ready = batch is not None and all(e is not None for e in extras)
            if not all_ranks_have(ready, self.device):
                break  # ranks take the same number of steps (the rest of the epoch is skipped)
            self.maybe_fail()
            self.model.progress = epoch + step / self.steps_per_epoch
            self.replay.offer(batch["clips"], batch["labels"])
            clips, labels = self.model_input(batch)
            meta = None
            if extras:  # the model's meta step runs inside its forward (DSTS's UDL)
                meta = MetaContext(
                    labels=labels,
                    extras=[self.model_input(e) for e in extras],
                    reduce=reduce_mean,
                    lr=self.optimizer.param_groups[0]["lr"],
                    optimizer=self.hook_optimizer,
                )
            with self.autocast:
                output = self.ddp(clips, meta=meta) if meta else self.ddp(clips)
                loss = self.model.loss(output, labels)
            for k, v in (meta.stats if meta else {}).items():
                extra_stats.setdefault(k, []).append(float(v))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.cfg.optim.grad_clip:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            losses.append(loss.item())
            clips_seen += len(labels) + sum(len(e["labels"]) for e in extras)
            self.global_step += 1
            step += 1
            if (
                self.rank == 0
                and self.cfg.run.log_every
                and self.global_step % self.cfg.run.log_every == 0
            ):
                say(f"  step {self.global_step} loss {loss.item():.4f}")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        self.scheduler.step()
        if self.hook_scheduler:
            self.hook_scheduler.step()
        elapsed = time.perf_counter() - start
        out = {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_clips_per_s": clips_seen * self.world / max(elapsed, 1e-9),
            "lr": lr,
        }
        out.update({f"train_{k}": float(np.mean(v)) for k, v in extra_stats.items()})
        return out

    def recalibrate_bn(self, epoch: int) -> int:
        """Precise BN on ``eval.precise_bn_batches`` batches of the epoch's replay (a seeded
        uniform draw: a run's batches, not the epoch's last ones, which may hold few classes)."""
        k = self.cfg.eval.precise_bn_batches
        if not k or not self.replay.batches:
            return 0
        pool = self.replay.batches
        chosen = random.Random(f"{self.cfg.run.seed}/bn/{epoch}").sample(
            range(len(pool)), min(k, len(pool))
        )
        self.model.train()
        batches = ((self.to_model_input(pool[i][0].to(self.device)), pool[i][1]) for i in chosen)
        with self.autocast:
            return precise_bn(self.model, batches, reduce_mean)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> tuple[dict, dict]:
        self.model.eval()
        logits, labels, ids, diagnostics, sample = [], [], [], None, None
        branches: dict[str, list] = {}
        for clips, y, batch in self.val_batches(epoch):
            with self.autocast:  # U2S's oracle variant selects masks by the true class
                output = self.model(clips, labels=y) if self.needs_labels else self.model(clips)
            logits.append(output.logits.float().cpu())
            for name, z in self.model.branch_logits(output).items():
                branches.setdefault(name, []).append(z.float().cpu())
            labels.append(y.cpu())
            ids.extend(batch["video_id"])
            if diagnostics is None:
                diagnostics = output.diagnostics
                sample = {
                    "clips": batch["clips"][:4].cpu(),
                    "labels": y[:4].cpu(),
                    "all_labels": y.cpu(),  # aligned with the batch's diagnostics
                }
        k = len(self.config["classes"])
        local = (
            torch.cat(logits) if logits else torch.zeros(0, k),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            ids,
            {name: torch.cat(z) for name, z in branches.items()},
        )
        parts = [local]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, local)
        all_logits = torch.cat([p[0] for p in parts])
        all_labels = torch.cat([p[1] for p in parts])
        all_ids = [i for p in parts for i in p[2]]
        self.check_complete(all_ids)
        probs, video_labels, _ = average_views(all_logits, all_labels, all_ids)
        branch_top1 = {}
        for name in parts[0][3]:  # each branch's prediction, views averaged like the main one
            z = torch.cat([p[3][name] for p in parts])
            branch_probs, _, _ = average_views(z, all_labels, all_ids)
            hits = (branch_probs.argmax(1) == video_labels).float().mean().item()
            branch_top1[f"branch_top1_{name}"] = hits
        result = classification_metrics(
            probs,
            video_labels,
            len(self.config["classes"]),
            self.config["classes"],
            self.config["class_groups"],
        )
        result["videos"] = len(video_labels)
        result.update(branch_top1)
        return result, {"diagnostics": diagnostics, "sample": sample}

    def check_complete(self, ids: list[str]) -> None:
        """Every validation view of every decodable video, each exactly once across the ranks."""
        from finegrain.datasets.pipeline import split_rows

        views = self.cfg.eval.clips * self.cfg.eval.crops
        videos = sum(split_rows(self.spec.shards, self.spec.val_split).values())
        bad = ray.get(self.bad_log.summary.remote(self.spec.val_split))["count"]
        expected = (videos - bad) * views
        seen = {}
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
        if len(ids) != expected or any(n != views for n in seen.values()):
            raise RuntimeError(
                f"evaluation saw {len(ids)} validation clips of {len(seen)} videos; expected "
                f"{expected} = ({videos} videos - {bad} undecodable) x {views} views, each once"
            )
        if not ids:
            raise RuntimeError("the validation split produced no clips (see the data report)")

    def rank_drift(self) -> float:
        """Largest difference between ranks of the sum of |parameters| (0 when in sync)."""
        if not (dist.is_available() and dist.is_initialized()) or self.world == 1:
            return 0.0
        with torch.no_grad():
            total = torch.stack([p.detach().double().abs().sum() for p in self.model.parameters()])
            mine = total.sum().reshape(1).to(self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        values = torch.cat(gathered)
        return (values.max() - values.min()).item()

    def record_run_facts(self) -> None:
        """Tag the run with each rank's Ray node id (``worker_nodes``, in rank order) and its
        ``total_epochs`` (what a sweep compares a stopped trial's progress with)."""
        nodes: list[str | None] = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.rank == 0:
            self.logger.tags({"worker_nodes": ",".join(nodes), "total_epochs": self.total_epochs})

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        self.record_run_facts()
        self.restore()
        run_start = time.perf_counter()
        for epoch in range(self.start_epoch, self.total_epochs):
            index, _ = self.stage_at(epoch)
            if index != self.stage_index:
                self.enter_stage(index)
            train = self.train_epoch(epoch)
            last = epoch + 1 == self.total_epochs
            # the last epoch says what precise BN changed (when the views are kept: they are
            # read twice)
            measure = last and self.cfg.eval.precise_bn_batches and self.keep_val
            plain = self.evaluate(epoch)[0] if measure else None
            self.recalibrate_bn(epoch)
            val, extra = self.evaluate(epoch)
            if plain is not None:
                train["val_top1_without_precise_bn"] = plain["top1"]
            top1 = val["top1"]
            is_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
            metrics = {  # first the four that Tune's trial table shows
                "epoch": epoch + 1,
                "val_top1": top1,
                "val_best_top1": self.best_top1,
                **train,
                "stage": index,
                **{f"val_{k}": v for k, v in val.items() if isinstance(v, int | float)},
                "rank_param_drift": self.rank_drift(),
                "total_epochs": self.total_epochs,  # for Tune's searcher: stopped early or not
            }
            if self.rank == 0:
                self.log_epoch(epoch, metrics, val, extra, run_start, is_best)
            self.save(epoch, metrics, is_best)

    def log_epoch(self, epoch, metrics, val, extra, run_start, is_best) -> None:
        done = epoch + 1 - self.start_epoch
        per_epoch = (time.perf_counter() - run_start) / done
        eta = per_epoch * (self.total_epochs - epoch - 1)
        stage = self.stages[metrics["stage"]].name
        say(
            f"[{self.config['run_name']}] epoch {epoch + 1}/{self.total_epochs} ({stage}) "
            f"loss {metrics['train_loss']:.3f} val top1 {100 * val['top1']:.1f}% "
            f"top5 {100 * val['top5']:.1f}% {metrics['train_clips_per_s']:.1f} clips/s "
            f"ETA {eta:.0f}s"
        )
        constant = ("epoch", "total_epochs")  # the step, and a tag
        self.logger.metrics({k: v for k, v in metrics.items() if k not in constant}, step=epoch + 1)
        self.log_bad_videos(epoch + 1)
        last = epoch + 1 == self.total_epochs
        if is_best or last:
            self.log_artifacts(val, extra, final=last)

    def log_bad_videos(self, step: int) -> None:
        """The videos skipped so far, logged as they appear (a run stopped later keeps them)."""
        bad = ray.get(self.bad_log.summary.remote())
        if bad["count"] > self.bad_logged:
            self.logger.metrics({"bad_videos": bad["count"]}, step=step)
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
        if final and (self.run_dir / "best.pt").exists():
            self.logger.artifact(self.export_model(self.run_dir / "best.pt"), "model")
        figures.close_all()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _Loop(config).run()


def evaluate_loop_per_worker(config: dict[str, Any]) -> None:
    """Load ``config["checkpoint"]``'s weights and evaluate them as the training loop does."""
    from finegrain.datasets.pipeline import EVAL, EpochBatches

    loop = _Loop(config)
    state = torch.load(config["checkpoint"], map_location=loop.device, weights_only=False)
    loop.model.load_state_dict(state["model"] if "model" in state else state)
    # evaluation only: this rank's share of the validation views, in one pass
    ds = loop.spec.val_dataset(loop.cfg, loop.rank, loop.world, loop.bad_log, stream=EVAL)
    size = loop.cfg.eval.batch_size
    loop.stream = EpochBatches(ds, size, eval_batch_size=size)
    loop.keep_val = False
    val, _ = loop.evaluate(0)
    metrics = {f"val_{k}": v for k, v in val.items() if isinstance(v, int | float)}
    metrics["epoch"] = int(state.get("epoch", -1)) + 1
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None  # Train V2 keeps a run's final metrics only with a checkpoint
        if loop.rank == 0:
            (Path(d) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def evaluate_checkpoint(
    cfg: ExperimentConfig,
    checkpoint: str | Path,
    *,
    workers: int | None = None,
    address: str | None = None,
) -> dict[str, float]:
    """``checkpoint``'s weights (a training checkpoint or a weights file) evaluated on every
    validation view by the training loop's own evaluation, on ``workers`` Ray Train workers
    (default ``cfg.scaling.workers``). Returns ``{"val_top1": ..., "epoch": ...}``."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig

    from finegrain.datasets.pipeline import new_bad_video_log

    cfg = cfg.model_copy(deep=True)
    if workers is not None:
        cfg.scaling.workers = workers
    data = prepare_data(cfg, quiet=True)
    cluster.connect(address)
    bad_log = new_bad_video_log()
    use_gpu = cfg.scaling.gpus_per_worker > 0
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    config = {
        "cfg": cfg.model_dump(mode="json"),
        "run_name": f"evaluate-{Path(checkpoint).stem}",
        "run_dir": str(tracking.run_root(cfg.run.dir) / "evaluations"),
        "tracking_uri": None,
        "run_id": None,
        "shards": str(data.shards),
        "classes": data.classes,
        "class_groups": data.class_groups,
        "streams": 1,
        "bad_log": bad_log,
        "checkpoint": str(checkpoint),
    }
    cluster.watch_preemptions()
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            evaluate_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=config["run_name"],
                storage_path=storage,
                failure_config=FailureConfig(max_failures=0, controller_failure_limit=2),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            return json.loads((Path(d) / "metrics.json").read_text())


def summary_json(result: RunResult) -> str:
    return json.dumps(
        {"run_id": result.run_id, "run_name": result.run_name, **result.metrics}, indent=2
    )
