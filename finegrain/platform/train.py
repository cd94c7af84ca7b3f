"""One training run on Ray Train: ``run_experiment(cfg)``.

The driver prepares the data (the synthetic benchmark is generated and sharded on first use),
opens the MLflow run, builds the Ray Data pipelines and runs a ``TorchTrainer``; it closes the
MLflow run as FINISHED, FAILED or KILLED. Each worker runs :func:`train_loop_per_worker`:

- the model from ``build_model``; DDP through ``ray.train.torch.prepare_model`` (gloo on CPU,
  NCCL on GPU); AMP (bf16 by default, fp16 with a GradScaler) on GPU; seeds; gradient clipping;
  a warm-up + cosine/step LR schedule per training stage;
- the method's procedure through the model's hook (``finegrain.models.base``): stages (U2S),
  ``begin_stage`` between them (U2S's CSM pass), ``meta_step`` on extra disjoint batches (DSTS's
  UDL). The loop never asks which method it trains;
- evaluation every epoch on the validation views (averaged per video) with torchmetrics;
- a checkpoint every epoch through ``ray.train.report``; the best model by val top-1 is kept in
  the run directory. Re-running with the same run name resumes from the latest checkpoint;
  ``FailureConfig(max_failures)`` restarts the workers after a failure, from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
from finegrain.models.base import FineGrainModel, TrainingStage, trainable_parameters
from finegrain.platform import tracking
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.data import DataSpec, bad_video_note, own_bad_video_log, prepare_data
from finegrain.platform.logs import quiet_worker_logs
from finegrain.platform.metrics import average_views, classification_metrics

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class RunResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    run_dir: Path


# ---------------------------------------------------------------------------------- driver


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.model.method}-{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_experiment(
    cfg: ExperimentConfig, *, callbacks: list | None = None, quiet: bool = False
) -> RunResult:
    """Train ``cfg`` on the Ray cluster (a local one if none is running) and track it."""
    run_name = cfg.run.name or default_run_name(cfg)
    root = tracking.run_root(cfg.run.dir)
    uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.dir)
    check_model(cfg)
    data = prepare_data(cfg, quiet=quiet)
    ensure_ray(cfg)
    tracking.start_relay(uri)  # a store on this machine, workers on others: they log through it
    own_bad_video_log()  # (in a sweep's trial this finds the sweep driver's)

    run_id = tracking.open_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        cfg.run.dir,
        tags={
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "dataset": cfg.data.dataset,
        },
        params=cfg.flat(),
        parent_run_id=cfg.tracking.parent_run_id,
    )
    logger = tracking.RunLogger(uri, run_id)
    logger.text(cfg.to_yaml(), "config.yaml")
    if not quiet:
        print(f"MLflow run {run_id} ({run_name}) in {uri}", flush=True)

    trainer = build_trainer(cfg, data, run_name, uri, run_id, callbacks=callbacks)
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        count, note = bad_video_note()
        if count:  # reported, never silently dropped: on the console and in the run
            print(f"[{run_name}] note: {note}", flush=True)
            logger.metrics({"bad_videos": count}, step=0)
            logger.text(note + "\n", "bad_videos.txt")
        tracking.close_run(uri, run_id, status)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return RunResult(run_id, run_name, uri, metrics, root / run_name)


def check_model(cfg: ExperimentConfig) -> None:
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
    clip = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.crop, cfg.data.crop)
    with torch.no_grad():
        if getattr(model, "needs_labels", False):
            return  # an oracle model needs an installed CSM; it is only evaluated
        model(clip)


def ensure_ray(cfg: ExperimentConfig, concurrent_runs: int = 1) -> None:
    """Connect to the running cluster (``RAY_ADDRESS`` / ``ray job submit``) or start a local one.

    A local Ray gets enough logical CPUs for the training workers plus the decode actors, even on
    a 2-core machine: logical CPUs are scheduling tokens, and without spare ones the Ray Data
    actors would wait forever for the CPUs the trainer holds.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    per_run = (
        cfg.scaling.workers * cfg.scaling.cpus_per_worker
        + cfg.data.decode_actors * cfg.data.decode_cpus
        + 0.5  # Parquet read tasks
        + 0.25  # a Tune trial's own share (finegrain.platform.tune)
    )
    need = concurrent_runs * per_run + 1
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": quiet_worker_logs},
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )


def build_trainer(
    cfg: ExperimentConfig,
    data: DataSpec,
    run_name: str,
    uri: str,
    run_id: str,
    callbacks: list | None = None,
) -> TorchTrainer:
    from ray.train import RunConfig, ScalingConfig

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
        "classes": data.classes,
        "class_groups": data.class_groups,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        datasets=data.datasets(cfg),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(root / "ray"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


# ---------------------------------------------------------------------------------- worker


def say(message: str) -> None:
    """One line of a worker's progress on the driver's console, once.

    Train V2 patches ``print`` to tee into its logger, which Ray also forwards to the driver:
    every line would show twice. Writing to the process's real stdout is forwarded once.
    """
    print(message, file=sys.__stdout__, flush=True)


def quiet_ray_logs() -> None:
    """One line per epoch is ours; Ray Train's per-report INFO lines would bury it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 names this logger by its file path
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


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


def make_optimizer(cfg: ExperimentConfig, params: list, lr_scale: float) -> torch.optim.Optimizer:
    lr = cfg.optim.lr * lr_scale
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )


def make_scheduler(cfg: ExperimentConfig, optimizer, epochs: int):
    """Per-epoch LR factor: linear warm-up, then cosine / step / constant."""
    warm, kind, step = cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.step_size

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
            tracking.RunLogger(config["tracking_uri"], config["run_id"]) if self.rank == 0 else None
        )
        self.autocast, self.scaler = autocast_context(self.cfg, self.device)
        self.stage_index = -1
        self.optimizer = self.scheduler = self.ddp = None
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
        stage = self.stages[index]
        self.model.begin_stage(index, self.train_batches, reduce_mean)
        params = trainable_parameters(self.model, stage)
        self.optimizer = make_optimizer(self.cfg, params, stage.lr_scale)
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.plan[index])
        kwargs = {"find_unused_parameters": True} if self.world > 1 else {}
        self.ddp = ray.train.torch.prepare_model(
            self.model, move_to_device=False, parallel_strategy_kwargs=kwargs
        )
        self.stage_index = index

    # --- data ----------------------------------------------------------------------------
    def batches(self, split: str, batch_size: int):
        from finegrain.datasets.pipeline import iter_clip_batches

        shard = ray.train.get_dataset_shard(split)
        for batch in iter_clip_batches(shard, batch_size):
            clips = self.to_model_input(batch["clips"].to(self.device, non_blocking=True))
            yield clips, batch["labels"].to(self.device), batch

    def train_batches(self):
        return ((c, y) for c, y, _ in self.batches("train", self.cfg.optim.batch_size))

    # --- checkpoints ---------------------------------------------------------------------
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
        }

    def restore(self) -> None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.model.load_hook_state_dict(state["hook"])
        self.start_epoch = state["epoch"] + 1
        self.best_top1 = state["best_top1"]
        self.global_step = state["global_step"]
        if self.start_epoch >= self.total_epochs:
            return
        index, _ = self.stage_at(self.start_epoch)
        self.enter_stage(index)
        if index == state["stage"]:  # same stage: continue its optimizer and schedule
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
        if self.rank == 0:
            say(f"[{self.config['run_name']}] resumed at epoch {self.start_epoch + 1}")

    def save(self, epoch: int, metrics: dict, is_best: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                torch.save(self.state(epoch), Path(d) / CHECKPOINT_FILE)
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

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        need = 1 + self.model.extra_batches
        it = self.batches("train", self.cfg.optim.batch_size)
        losses, clips_seen, extra_stats = [], 0, {}
        start = time.perf_counter()
        while True:
            group = []
            for _ in range(need):
                nxt = next(it, None)
                if nxt is None:
                    break
                group.append(nxt)
            if not all_ranks_have(len(group) == need, self.device):
                break
            self.maybe_fail()
            (clips, labels, _), extras = group[0], [(c, y) for c, y, _ in group[1:]]
            if extras:
                with self.autocast:
                    stats = self.model.meta_step((clips, labels), extras, reduce_mean)
                for k, v in stats.items():
                    extra_stats.setdefault(k, []).append(float(v))
            with self.autocast:
                output = self.ddp(clips)
                loss = self.model.loss(output, labels)
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
            clips_seen += sum(len(g[1]) for g in group)
            self.global_step += 1
            if (
                self.rank == 0
                and self.cfg.run.log_every
                and self.global_step % self.cfg.run.log_every == 0
            ):
                say(f"  step {self.global_step} loss {loss.item():.4f}")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        self.scheduler.step()
        elapsed = time.perf_counter() - start
        out = {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_clips_per_s": clips_seen * self.world / max(elapsed, 1e-9),
            "lr": lr,
        }
        out.update({f"train_{k}": float(np.mean(v)) for k, v in extra_stats.items()})
        return out

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, dict]:
        self.model.eval()
        logits, labels, ids, diagnostics, sample = [], [], [], None, None
        for clips, y, batch in self.batches("val", self.cfg.eval.batch_size):
            with self.autocast:  # U2S's oracle variant selects masks by the true class
                output = self.model(clips, labels=y) if self.needs_labels else self.model(clips)
            logits.append(output.logits.float().cpu())
            labels.append(y.cpu())
            ids.extend(str(v) for v in batch["video_id"])
            if diagnostics is None:
                diagnostics = output.diagnostics
                sample = {
                    "clips": batch["clips"][:4].cpu(),
                    "labels": y[:4].cpu(),
                    "all_labels": y.cpu(),  # aligned with the batch's diagnostics
                }
        local = (
            torch.cat(logits) if logits else torch.zeros(0, len(self.config["classes"])),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            ids,
        )
        parts = [local]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, local)
        all_logits = torch.cat([p[0] for p in parts])
        all_labels = torch.cat([p[1] for p in parts])
        all_ids = [i for p in parts for i in p[2]]
        if not all_ids:
            raise RuntimeError("the validation split produced no clips (see the data report)")
        probs, video_labels, _ = average_views(all_logits, all_labels, all_ids)
        result = classification_metrics(
            probs,
            video_labels,
            len(self.config["classes"]),
            self.config["classes"],
            self.config["class_groups"],
        )
        result["videos"] = len(video_labels)
        return result, {"diagnostics": diagnostics, "sample": sample}

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
            train = self.train_epoch()
            val, extra = self.evaluate()
            top1 = val["top1"]
            is_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
            metrics = {
                "epoch": epoch + 1,
                "stage": index,
                **train,
                **{f"val_{k}": v for k, v in val.items() if isinstance(v, int | float)},
                "val_best_top1": self.best_top1,
                "rank_param_drift": self.rank_drift(),
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
        self.logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
        last = epoch + 1 == self.total_epochs
        if is_best or last:
            self.log_artifacts(val, extra, final=last)

    def log_artifacts(self, val, extra, final: bool) -> None:
        from finegrain.platform import figures

        names = self.config["classes"]
        self.logger.text(
            figures.per_class_csv(names, val["per_class"]), "eval/per_class_accuracy.csv"
        )
        self.logger.figure(
            figures.confusion_matrix(val["confusion"], names), "eval/confusion_matrix.png"
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
            self.logger.artifact(self.run_dir / "best.pt", "checkpoints")
        figures.close_all()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _Loop(config).run()


def summary_json(result: RunResult) -> str:
    return json.dumps(
        {"run_id": result.run_id, "run_name": result.run_name, **result.metrics}, indent=2
    )
