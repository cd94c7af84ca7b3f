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

A worker's loop (``_Loop``) holds small parts that share its model: :class:`Stages` (the plan and
the current stage's optimizers), :class:`Trainer`, :class:`Evaluator`, and
:class:`~finegrain.platform.streams.Streams` (data),
:class:`~finegrain.platform.checkpoints.Checkpoints` and
:class:`~finegrain.platform.runlog.RunLog` (console and MLflow), in modules of their own.
"""

from __future__ import annotations

import json
import random
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

from finegrain.models import build_model, extra_batches, method_spec
from finegrain.models.base import (
    FineGrainModel,
    MetaContext,
)
from finegrain.platform import cluster, keys, paths, tracking
from finegrain.platform.checkpoints import CHECKPOINT_FILE as CHECKPOINT_FILE
from finegrain.platform.checkpoints import Checkpoints
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.data import DataSpec, bad_video_note, dataset_name, prepare_data
from finegrain.platform.metrics import (
    PER_VIDEO_FILE,
    average_views,
    classification_metrics,
    per_video_csv,
    per_video_rows,
)
from finegrain.platform.runlog import RunLog
from finegrain.platform.stages import (  # noqa: F401 (public here: tests and bench use them)
    Stages,
    make_optimizer,
    make_scheduler,
    reduce_mean,
    stage_plan,
)
from finegrain.platform.streams import Streams
from finegrain.platform.worker import Progress, Worker, say


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
    cfg: ExperimentConfig,
    *,
    callbacks: list | None = None,
    quiet: bool = False,
    address: str | None = None,
    in_trial: bool = False,
    display_name: str | None = None,
) -> RunResult:
    """Train ``cfg`` on the Ray cluster (a fresh local one if none is given) and track it.

    ``in_trial``: driven by a Tune trial (a sweep or suite sized the cluster already).
    ``display_name``: the MLflow run's name in the UI, when not ``cfg.run.name`` (which stays
    the tag that finds the run again, and the console's prefix).
    """
    run_name = cfg.run.name or default_run_name(cfg)
    root = paths.run_root(cfg.run.dir)
    uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.dir)
    if not in_trial:  # a sweep or suite checked its configurations before any trial started
        check_model(cfg)  # (in a trial it would only delay the run: ~3 s of imports and a pass)
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
        display_name=display_name,
    )
    logger = tracking.RunLogger(uri, run_id)
    logger.text(cfg.to_yaml(), "config.yaml")
    tracking.log_dataset(uri, run_id, dataset_name(cfg), data.shards, data.split_sizes())
    if not quiet:
        print(f"MLflow run {run_id} ({run_name}) in {uri}", flush=True)

    status, error = "FAILED", None
    try:
        trainer = build_trainer(cfg, data, run_name, uri, run_id, bad_log, callbacks)
        if request := cluster.train_request_of(trainer):
            tags = {cluster.TRAIN_REQUEST_TAG: request}
            if owner := cluster.current_actor():  # a trial's, whose death ends the controller
                tags[cluster.TRIAL_ACTOR_TAG] = owner
            logger.tags(tags)
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
    if keys.BEST_TOP1 in metrics:  # the run page's description, in words
        logger.tags({"mlflow.note.content": run_description(cfg, metrics)})
    return RunResult(run_id, run_name, uri, metrics, root / run_name)


def run_description(cfg: ExperimentConfig, metrics: dict[str, float]) -> str:
    """One line a researcher reads first on the run's page: what was trained and how it did."""
    m = cfg.model
    title = method_spec(m.method).title
    line = (
        f"**{title[:1].upper() + title[1:]}** ({m.backbone} backbone) on {dataset_name(cfg)}, "
        f"{cfg.optim.epochs} epoch(s), seed {cfg.run.seed}: best validation top-1 "
        f"{metrics[keys.BEST_TOP1]:.1f} %"
    )
    if keys.TOP1 in metrics:
        line += f", last epoch {metrics[keys.TOP1]:.1f} %"
    return line + " (every validation video, all views)."


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
        if not getattr(model, "needs_labels", False):  # an oracle needs an installed CSM
            model(clip)


def build_trainer(
    cfg: ExperimentConfig,
    data: DataSpec,
    run_name: str,
    uri: str,
    run_id: str,
    bad_log: Any,
    callbacks: list | None = None,
) -> TorchTrainer:
    from ray.train import LoggingConfig, RunConfig, ScalingConfig

    use_gpu = cfg.scaling.gpus_per_worker > 0
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    root = paths.run_root(cfg.run.dir)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "run_name": run_name,
        "run_dir": str(root / run_name),
        "tracking_uri": uri,
        "run_id": run_id,
        "shards": str(data.shards),
        "classes": data.classes,
        "class_groups": data.class_groups,
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precise_bn(model: torch.nn.Module, batches, reduce) -> int:
    """Recompute the running statistics of every BatchNorm in training mode (PySlowFast's
    ``BN.USE_PRECISE_STATS``): reset them, forward ``batches`` in training mode without
    gradients (METHODS.md: no graph is kept; the statistics update all the same) with a
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
        with torch.no_grad():
            for clips, _ in batches:
                model(clips)
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    reduce([t for m in norms for t in (m.running_mean, m.running_var)])
    return used


def all_ranks_have(flag: bool) -> bool:
    """True while every rank still has a batch (ranks must take the same number of steps).

    Asked before every step, so it is agreed on the host: over the default group when that is
    gloo, else over a gloo group of the same ranks (:func:`control_group`). A flag on the GPU
    (NCCL) waits for every kernel queued before it, so the host could never queue a step while
    the device runs the previous one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
    return bool(t.item())


_CONTROL: dict = {}  # the default group it was made for -> the gloo group (None: default is gloo)


def control_group():
    """A gloo group of every rank for the training loop's host-side agreements (made on first
    use, which every rank reaches at the same step; remade for a new default group)."""
    world = dist.group.WORLD
    if world not in _CONTROL:
        _CONTROL.clear()
        _CONTROL[world] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL[world]


def autocast_context(cfg: ExperimentConfig, device: torch.device):
    amp = cfg.scaling.amp
    if device.type != "cuda" or amp == "off":
        return nullcontext(), None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


class Trainer:
    """One epoch's training steps (every rank takes as many), with the model's meta step when
    it draws from further samplers; gradient clipping, AMP, fault injection."""

    def __init__(
        self,
        worker: Worker,
        model: FineGrainModel,
        stages: Stages,
        streams: Streams,
        progress: Progress,
        scaler: torch.amp.GradScaler | None,
        autocast,
    ) -> None:
        self.worker, self.model, self.stages, self.streams = worker, model, stages, streams
        self.progress, self.scaler, self.autocast = progress, scaler, autocast

    def maybe_fail(self) -> None:
        """Fault injection (``run.fail_at_step``): the last rank raises once, at that step."""
        w = self.worker
        step = w.cfg.run.fail_at_step
        if step is None or self.progress.global_step != step or w.rank != w.world - 1:
            return
        marker = w.run_dir / f"fault_injected_at_{step}"
        if marker.exists():
            return
        w.run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"fault injection: rank {w.rank} fails at step {step}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        w, cfg, model = self.worker, self.worker.cfg, self.model
        streams, stages = self.streams, self.stages
        model.train()
        streams.replay.start(epoch)
        batches = streams.epoch_batches(epoch)
        losses, clips_seen, extra_stats, step = [], 0, {}, 0
        start = time.perf_counter()
        while True:
            batch = next(batches, None)
            extras = streams.extras(epoch)
            ready = batch is not None and all(e is not None for e in extras)
            if not all_ranks_have(ready):
                break  # ranks take the same number of steps (the rest of the epoch is skipped)
            self.maybe_fail()
            model.progress = epoch + step / streams.steps_per_epoch
            streams.replay.offer(batch["clips"], batch["labels"])
            clips, labels = streams.model_input(batch)
            meta = None
            if extras:  # the model's meta step runs inside its forward (DSTS's UDL)
                meta = MetaContext(
                    labels=labels,
                    extras=[streams.model_input(e) for e in extras],
                    reduce=reduce_mean,
                    lr=stages.optimizer.param_groups[0]["lr"],
                    optimizer=stages.hook_optimizer,
                )
            with self.autocast:
                output = stages.ddp(clips, meta=meta) if meta else stages.ddp(clips)
                loss = model.loss(output, labels)
            for k, v in (meta.stats if meta else {}).items():
                extra_stats.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else v)
            stages.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(stages.optimizer)
            else:
                loss.backward()
            if cfg.optim.grad_clip:
                params = [p for g in stages.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if self.scaler:
                self.scaler.step(stages.optimizer)
                self.scaler.update()
            else:
                stages.optimizer.step()
            losses.append(loss.detach())  # on the device: .item() would wait for the step
            clips_seen += len(labels) + sum(len(e["labels"]) for e in extras)
            self.progress.global_step += 1
            step += 1
            global_step = self.progress.global_step
            if w.rank == 0 and cfg.run.log_every and global_step % cfg.run.log_every == 0:
                say(f"  step {global_step} loss {loss.item():.4f}")
        lr = stages.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        stages.scheduler.step()
        if stages.hook_scheduler:
            stages.hook_scheduler.step()
        elapsed = time.perf_counter() - start
        out = {
            "train/loss": torch.stack(losses).float().mean().item() if losses else float("nan"),
            "train/clips_per_s": clips_seen * w.world / max(elapsed, 1e-9),
            "train/lr": lr,
        }
        # the method's own statistics under its name: DSTS's udl/train_loss → dsts/udl_train_loss
        method = cfg.model.method
        out.update(
            {
                f"{method}/{k.replace('/', '_')}": float(np.mean([float(x) for x in v]))
                for k, v in extra_stats.items()
            }
        )
        return out

    def rank_drift(self) -> float:
        """Largest difference between ranks of the sum of |parameters| (0 when in sync)."""
        world = self.worker.world
        if not (dist.is_available() and dist.is_initialized()) or world == 1:
            return 0.0
        with torch.no_grad():
            total = torch.stack([p.detach().double().abs().sum() for p in self.model.parameters()])
            mine = total.sum().reshape(1).to(self.worker.device)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        values = torch.cat(gathered)
        return (values.max() - values.min()).item()


class Evaluator:
    """Every validation view, each exactly once across the ranks, views of a video averaged
    (torchmetrics); and precise BN on a sample of the epoch's replay before it."""

    def __init__(self, worker: Worker, model: FineGrainModel, streams: Streams, autocast) -> None:
        self.worker, self.model, self.streams, self.autocast = worker, model, streams, autocast
        self.needs_labels = getattr(model, "needs_labels", False)
        # the method's mechanism scores need the diagnostics of every view (None: it has none)
        self.spec = method_spec(worker.cfg.model.method)

    def recalibrate_bn(self, epoch: int) -> int:
        """Precise BN on ``eval.precise_bn_batches`` batches of the epoch's replay (a seeded
        uniform draw: a run's batches, not the epoch's last ones, which may hold few classes)."""
        cfg, replay = self.worker.cfg, self.streams.replay
        k = cfg.eval.precise_bn_batches
        if not k or not replay.batches:
            return 0
        pool = replay.batches
        chosen = random.Random(f"{cfg.run.seed}/bn/{epoch}").sample(
            range(len(pool)), min(k, len(pool))
        )
        self.model.train()
        to_input, device = self.streams.to_model_input, self.worker.device
        batches = ((to_input(pool[i][0].to(device)), pool[i][1]) for i in chosen)
        with self.autocast:
            return precise_bn(self.model, batches, reduce_mean)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> tuple[dict, dict]:
        config, world = self.worker.config, self.worker.world
        self.model.eval()
        logits, labels, ids, diagnostics, sample = [], [], [], None, None
        branches: dict[str, list] = {}
        every: list[dict] | None = [] if self.spec.mechanisms else None
        evidence: list[dict | None] = []  # each batch's ground truth, aligned with ``every``
        for clips, y, batch in self.streams.val_batches(epoch):
            with self.autocast:  # U2S's oracle variant selects masks by the true class
                output = self.model(clips, labels=y) if self.needs_labels else self.model(clips)
            logits.append(output.logits.float().cpu())
            if every is not None:
                truth = self.batch_evidence(batch)
                if not evidence and self.spec.mechanisms_need_evidence and not _has_boxes(truth):
                    every = None  # a dataset without evidence (real data): nothing to score
                else:
                    every.append(_to_cpu(output.diagnostics))
                    evidence.append(truth)
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
        k = len(config["classes"])
        local = (
            torch.cat(logits) if logits else torch.zeros(0, k),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            ids,
            {name: torch.cat(z) for name, z in branches.items()},
            every,
            evidence,
        )
        parts = [local]
        if dist.is_available() and dist.is_initialized() and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, local)
        all_logits = torch.cat([p[0] for p in parts])
        all_labels = torch.cat([p[1] for p in parts])
        all_ids = [i for p in parts for i in p[2]]
        self.check_complete(all_ids)
        probs, video_labels, video_ids = average_views(all_logits, all_labels, all_ids)
        branch_top1 = {}
        for name in parts[0][3]:  # each branch's prediction, views averaged like the main one
            z = torch.cat([p[3][name] for p in parts])
            branch_probs, _, _ = average_views(z, all_labels, all_ids)
            hits = (branch_probs.argmax(1) == video_labels).float().mean().item()
            branch_top1[f"branch_top1_{name}"] = hits
        result = classification_metrics(
            probs, video_labels, len(config["classes"]), config["classes"], config["class_groups"]
        )
        result["videos"] = len(video_labels)
        result.update(branch_top1)
        # each video's prediction: what tables pair rows on (finegrain.platform.stats)
        result["per_video"] = per_video_rows(video_ids, video_labels, probs.argmax(1))
        # the method's mechanism scores, on every view of every video (every rank collected)
        if all(p[4] is not None for p in parts) and self.spec.mechanisms:
            truth = [e for p in parts for e in p[5]]  # aligned with the diagnostics
            result["mechanisms"] = self.spec.score_mechanisms(
                [d for p in parts for d in p[4]],
                all_labels,
                all_logits.argmax(1),
                list(config["classes"]),
                config["class_groups"] or {},
                evidence=truth if any(e is not None for e in truth) else None,
            )
        return result, {"diagnostics": diagnostics, "sample": sample}

    @staticmethod
    def batch_evidence(batch: dict) -> dict | None:
        """The batch's ground truth (``batch["evidence"]``: ``"part"``, ``"object"`` boxes and
        ``"visible"`` frames, see :mod:`finegrain.models.spec`) on the CPU, or None where the
        batch has none (old shards, real datasets without evidence)."""
        truth = batch.get("evidence") if isinstance(batch, dict) else None
        if not isinstance(truth, dict):
            return None
        return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in truth.items()}

    def check_complete(self, ids: list[str]) -> None:
        """Every validation view of every decodable video, each exactly once across the ranks."""
        from finegrain.datasets.pipeline import split_rows

        cfg, spec = self.worker.cfg, self.streams.spec
        views = cfg.eval.clips * cfg.eval.crops
        videos = sum(split_rows(spec.shards, spec.val_split).values())
        bad = ray.get(self.worker.bad_log.summary.remote(spec.val_split))["count"]
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


class _Loop:
    """One worker's training loop: the model, and the parts that train, evaluate, checkpoint
    and log it (they share the model and state, so checkpoints are complete), epoch by epoch."""

    def __init__(self, config: dict[str, Any], *, train: bool = True) -> None:
        self.worker = w = Worker.start(config)
        cfg = w.cfg
        opts = cfg.model.options()
        spec = DataSpec(Path(config["shards"]), config["classes"], config["class_groups"])
        # A new run's data stream starts first, planned from the config: its decode actors
        # start (their own processes: ~5-7 s on 2 cores) while this one builds the model, so the
        # first step waits less for the first batch (measured: ~4.5 s less). The samplers are
        # the ones a training step draws from: the main one and the method's further ones
        # (DSTS's UDL: 1).
        samplers = 1 + extra_batches(cfg.model.method, **opts)
        epochs = sum(cfg.optim.stage_epochs) if cfg.optim.stage_epochs else cfg.optim.epochs
        self.streams = Streams(w, spec, epochs, samplers)
        early = train and ray.train.get_checkpoint() is None  # a new run starts at epoch 0
        if early:
            self.streams.start(0)
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.model: FineGrainModel = build_model(
            cfg.model.method, len(config["classes"]), cfg.model.backbone, **opts
        ).to(w.device)
        seed_everything(cfg.run.seed * 1000 + w.rank + 1)  # per-rank noise (Gumbel...)
        self.stages = Stages(w, self.model)
        self.progress = Progress()
        self.autocast, scaler = autocast_context(cfg, w.device)
        built = 1 + int(getattr(self.model, "extra_batches", 0))
        if (built, self.stages.total_epochs) != (samplers, epochs):
            # a method whose spec does not say its extra batches: plan the stream again
            self.streams.close()
            self.streams = Streams(w, spec, self.stages.total_epochs, built)
            if early:
                self.streams.start(0)
        self.checkpoints = Checkpoints(w, self.model, self.stages, scaler, self.progress)
        self.log = RunLog(w, self.stages, self.progress, self.checkpoints)
        self.trainer = Trainer(
            w, self.model, self.stages, self.streams, self.progress, scaler, self.autocast
        )
        self.evaluator = Evaluator(w, self.model, self.streams, self.autocast)

    def enter_stage(self, index: int) -> None:
        """Stage ``index``, set up over the replay of the previous epoch."""
        self.stages.enter(index, lambda: self.streams.replayed_batches(self.progress.start_epoch))

    def resume(self) -> None:
        """Continue after the latest checkpoint: its weights, random states and epoch, from
        which the data stream is planned (each epoch's clips are fixed by the seed and the
        epoch, so the resumed epochs see what an uninterrupted run would), and its stage's
        optimizers and schedule when it resumes in that stage."""
        state = self.checkpoints.restore()
        start = self.progress.start_epoch
        if state is None or start >= self.stages.total_epochs:
            return
        index, _ = self.stages.at(start)
        self.enter_stage(index)
        if index == state["stage"]:  # same stage: continue its optimizer and schedule
            self.checkpoints.restore_optimizers(state)
        if self.worker.rank == 0:
            say(f"[{self.worker.config['run_name']}] resumed at epoch {start + 1}")

    def run(self) -> None:
        try:
            self.epochs()
        finally:
            self.streams.close()  # its executor gives its resources back now, not at expiry

    def epochs(self) -> None:
        cfg, total, progress = self.worker.cfg, self.stages.total_epochs, self.progress
        self.log.record_run_facts()
        self.resume()
        run_start = time.perf_counter()
        for epoch in range(progress.start_epoch, total):
            index, _ = self.stages.at(epoch)
            if index != self.stages.index:
                self.enter_stage(index)
            began = time.perf_counter()
            train = self.trainer.train_epoch(epoch)
            trained = time.perf_counter()
            last = epoch + 1 == total
            # the last epoch says what precise BN changed (when the views are kept: they are
            # read twice)
            measure = last and cfg.eval.precise_bn_batches and self.streams.keep_val
            plain = self.evaluator.evaluate(epoch)[0] if measure else None
            self.evaluator.recalibrate_bn(epoch)
            recalibrated = time.perf_counter()
            val, extra = self.evaluator.evaluate(epoch)
            evaluated = time.perf_counter()
            top1 = val["top1"]  # a fraction here (and in checkpoints); reported in %
            is_best = top1 > progress.best_top1
            progress.best_top1 = max(progress.best_top1, top1)
            scores = keys.val_metrics(val)  # val/..., accuracies in %
            if plain is not None:
                scores["val/top1_without_precise_bn"] = keys.percent(plain["top1"])
            metrics = {  # first the four that Tune's trial table shows
                keys.EPOCH: epoch + 1,
                keys.TOP1: scores.pop(keys.TOP1),
                keys.BEST_TOP1: keys.percent(progress.best_top1),
                **train,
                "train/stage": index,
                **scores,
                **{f"mech/{k}": v for k, v in val.get("mechanisms", {}).items()},
                "sys/rank_param_drift": self.trainer.rank_drift(),
                # where the epoch's time went (seconds, this rank; the first epoch's training
                # includes the data stream's start)
                "sys/train_s": trained - began,
                "sys/precise_bn_s": recalibrated - trained,
                "sys/eval_s": evaluated - recalibrated,
                keys.TOTAL_EPOCHS: total,  # for Tune's searcher: stopped early or not
            }
            if self.worker.rank == 0:
                self.log.log_epoch(epoch, metrics, val, extra, run_start, is_best)
            self.checkpoints.save(epoch, metrics, is_best)


def _has_boxes(truth: dict | None) -> bool:
    """Whether a batch's evidence holds any box (a dataset has evidence for all or none)."""
    if not truth:
        return False
    return any(
        torch.is_tensor(truth.get(k)) and bool(torch.isfinite(truth[k]).any())
        for k in ("part", "object")
    )


def _to_cpu(diagnostics: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in diagnostics.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _Loop(config).run()


def evaluate_loop_per_worker(config: dict[str, Any]) -> None:
    """Load ``config["checkpoint"]``'s weights and evaluate them as the training loop does."""
    from finegrain.datasets.pipeline import EVAL, EpochBatches

    loop = _Loop(config, train=False)
    w, streams = loop.worker, loop.streams
    state = torch.load(config["checkpoint"], map_location=w.device, weights_only=False)
    loop.model.load_state_dict(state["model"] if "model" in state else state)
    # evaluation only: this rank's share of the validation views, in one pass
    ds = streams.spec.val_dataset(w.cfg, w.rank, w.world, w.bad_log, stream=EVAL)
    size = w.cfg.eval.batch_size
    streams.stream = EpochBatches(ds, size, eval_batch_size=size)
    streams.keep_val = False
    val, _ = loop.evaluator.evaluate(0)
    metrics = keys.val_metrics(val)  # the training loop's names: val/top1 (%), ...
    metrics |= {f"mech/{k}": v for k, v in val.get("mechanisms", {}).items()}
    metrics[keys.EPOCH] = int(state.get("epoch", -1)) + 1
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None  # Train V2 keeps a run's final metrics only with a checkpoint
        if w.rank == 0:
            (Path(d) / "metrics.json").write_text(json.dumps(metrics))
            (Path(d) / PER_VIDEO_FILE).write_text(per_video_csv(val["per_video"]))
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
    (default ``cfg.scaling.workers``). Returns ``{"val/top1": ... (%), "epoch": ...,
    "per_video": the CSV of each video's prediction}``."""
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
        "run_dir": str(paths.run_root(cfg.run.dir) / "evaluations"),
        "tracking_uri": None,
        "run_id": None,
        "shards": str(data.shards),
        "classes": data.classes,
        "class_groups": data.class_groups,
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
            metrics = json.loads((Path(d) / "metrics.json").read_text())
            metrics["per_video"] = (Path(d) / PER_VIDEO_FILE).read_text()
            return metrics


def summary_json(result: RunResult) -> str:
    return json.dumps(
        {"run_id": result.run_id, "run_name": result.run_name, **result.metrics}, indent=2
    )
