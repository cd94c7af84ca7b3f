"""One worker's data: the run's one stream of batches (:class:`Streams`) and the replay of an
epoch's training batches (:class:`Replay`)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from finegrain.platform.data import DataSpec
    from finegrain.platform.worker import Worker


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


class Streams:
    """This rank's batches, from one Ray Data execution for all the epochs it has left (made
    on first use): each epoch's training batches and the further samplers' (``extras``), the
    validation views, and the replay of the previous epoch's training batches."""

    def __init__(self, worker: Worker, spec: DataSpec, total_epochs: int, samplers: int) -> None:
        from finegrain.datasets.pipeline import to_model_input

        cfg = worker.cfg
        self.worker, self.spec, self.total_epochs = worker, spec, total_epochs
        self.to_model_input = to_model_input
        self.count = samplers  # samplers a step draws from (1 + extras)
        self.val_cache: list | None = None  # this rank's decoded validation batches, if kept
        self.replay = Replay(cfg.data.replay_mb * 2**20, cfg.run.seed)
        self.stream = None  # the training batches of every remaining epoch: made on first use
        rows = spec.train_rows()
        per_rank = -(-rows // worker.world)  # the training sequence is padded: every rank alike
        self.steps_per_epoch = max(1, -(-per_rank // cfg.optim.batch_size))

    def model_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        clips = self.to_model_input(batch["clips"].to(self.worker.device, non_blocking=True))
        return clips, batch["labels"].to(self.worker.device)

    def open_stream(self, epoch: int) -> None:
        """The run's one data stream, from ``epoch`` to the end."""
        from finegrain.datasets.pipeline import EpochBatches

        w = self.worker
        ds = self.spec.run_dataset(
            w.cfg,
            list(range(epoch, self.total_epochs)),
            w.rank,
            w.world,
            streams=self.count,
            bad_log=w.bad_log,
        )
        self.stream = EpochBatches(
            ds,
            w.cfg.optim.batch_size,
            streams=self.count,
            eval_batch_size=w.cfg.eval.batch_size,
        )
        self.keep_val = self.spec.val_fits(w.cfg, w.world)
        self.val_epoch = epoch  # where the stream plans the validation views when kept

    def start(self, epoch: int) -> None:
        """Open the run's stream at ``epoch`` and start its execution now (its decode actors
        start while the loop sets up; see ``EpochBatches.start``)."""
        self.open_stream(epoch)
        self.stream.start()

    def close(self) -> None:
        """End the run's data stream (see ``EpochBatches.close``)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def epoch_batches(self, epoch: int):
        """This rank's training batches of ``epoch``, from the run's one data stream."""
        if self.stream is None:
            self.open_stream(epoch)
        return self.stream.epoch(epoch)

    def extras(self, epoch: int) -> list:
        """The next batch of each further sampler of ``epoch`` (``None`` where one ran out)."""
        return [self.stream.extra(epoch, s) for s in range(1, self.count)]

    def replayed_batches(self, start_epoch: int):
        """The previous epoch's training batches as the replay kept them (model input).

        A run resumed right at a stage boundary (at ``start_epoch``) has no replay yet: the
        previous epoch's clips are decoded again, with their own seed-fixed sampling, in a pass
        of their own (before the run's stream starts).
        """
        w = self.worker
        if not self.replay.batches and start_epoch > 0:
            from finegrain.datasets.pipeline import iter_clip_batches

            previous = start_epoch - 1
            self.replay.start(previous)
            ds = self.spec.train_stream(w.cfg, [previous], w.rank, w.world, bad_log=w.bad_log)
            for batch in iter_clip_batches(ds, w.cfg.optim.batch_size):
                self.replay.offer(batch["clips"], batch["labels"])
        for clips, labels in self.replay.batches:
            yield self.to_model_input(clips.to(w.device)), labels.to(w.device)

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
