"""The interface every finegrain model implements, and the one training hook the trainer calls.

A model takes float clips ``(B, 3, T, H, W)`` (normalised on the training device) and returns a
:class:`ModelOutput`. ``model.loss(output, labels)`` is the method's full training loss (main
cross-entropy plus its auxiliary terms). Everything else a method needs from the trainer goes
through :class:`FineGrainModel`'s small hook, used the same way for every method:

- ``training_stages()``: the stages of the training procedure (U2S has three; the others one).
  At the start of stage ``k`` the trainer calls ``begin_stage(k, train_batches, reduce)``, builds a
  fresh optimizer over :func:`trainable_parameters` at ``lr * stage.lr_scale`` and (re-)wraps DDP.
- ``progress``: the trainer sets it before every training step to the epochs done so far (a
  float: 1.5 is half-way through the second epoch), for warm-ups measured in epochs.
- ``pretrained_prefixes``: the parameter-name prefixes that hold pretrained weights (the
  backbone); the trainer trains them at ``optim.backbone_lr_scale`` times the rate.
- ``extra_batches``: how many batches of further, independent training samplers one step uses
  (DSTS's UDL needs one: D_val). When non-zero, the trainer calls ``forward(clips,
  meta=MetaContext(...))`` in training; the model runs its meta step inside its forward, on the
  backbone features it computes anyway. ``MetaContext.reduce`` all-reduces (averages) a list of
  tensors across DDP ranks, so a meta step that updates parameters keeps the ranks identical.
- ``hook_parameters()``: parameters the model updates itself in that meta step; the main
  optimizer skips them, and the trainer hands the model an optimizer of the run's own type,
  rate and schedule for them (``MetaContext.optimizer``), unless ``uses_run_optimizer`` is
  False (the model moves them with an optimizer of its own: DSTS's ``udl_alpha="fixed"``).
- ``hook_state_dict()`` / ``load_hook_state_dict()``: state the hook owns that is not in the
  module's ``state_dict``, saved with every checkpoint.
- ``branch_logits(output)``: further predictions to evaluate on their own (DFB's z_avg, z_max,
  z_xchannel); the trainer logs each one's validation top-1.

The trainer stays generic: it never checks which method it is training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]  # (clips (B, 3, T, H, W) float, labels (B,) int64)
GradReducer = Callable[[Sequence[Tensor]], None]


@dataclass
class ModelOutput:
    """What every model returns.

    logits: ``(B, K)`` scores used for prediction (for U2S the log of the fused probabilities).
    aux_losses: named auxiliary loss terms already weighted as the paper weights them; empty for
        the baseline. ``model.loss`` adds them to the main term.
    diagnostics: cheap, detached tensors for logging (selection counts, masks, attention maps).
    extras: method-specific tensors ``loss`` needs (e.g. DFB's four logits); not for logging.
    """

    logits: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MetaContext:
    """What a model's meta step gets from the trainer in a training forward.

    labels: the step's own labels (the batch is the one ``forward`` gets); extras: one batch of
    each further sampler (model input, labels); reduce: averages tensors in place across the
    ranks; lr: the run's learning rate right now (after warm-up and schedule); optimizer: an
    optimizer of the run's type and rate over ``hook_parameters()`` (None without them).
    The model writes scalars to log into ``stats``: floats, or 0-d tensors that the loop reads
    once an epoch (an ``.item()`` each step would make the host wait for the device).
    """

    labels: Tensor
    extras: list[Batch]
    reduce: GradReducer
    lr: float
    optimizer: torch.optim.Optimizer | None = None
    stats: dict[str, float | Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingStage:
    """One stage of a method's training procedure.

    epochs: this stage's share of the run's epochs (shares are normalised by the trainer).
    lr_scale: multiplies the configured learning rate during the stage.
    frozen: parameter-name prefixes not trained in this stage (``requires_grad`` off).
    """

    name: str
    epochs: float = 1.0
    lr_scale: float = 1.0
    frozen: tuple[str, ...] = ()


class FineGrainModel(nn.Module):
    """Base class: the default hook is plain supervised training with cross-entropy."""

    extra_batches: int = 0
    uses_run_optimizer: bool = True  # the meta step steps MetaContext.optimizer (see above)
    progress: float = 0.0  # epochs of training done (set by the trainer before each step)

    def loss(self, output: ModelOutput, labels: Tensor) -> Tensor:
        main = nn.functional.cross_entropy(output.logits, labels)
        return main + sum(output.aux_losses.values(), torch.zeros((), device=main.device))

    # --- training hook -------------------------------------------------------------------
    def training_stages(self) -> list[TrainingStage]:
        return [TrainingStage("train")]

    def begin_stage(
        self, index: int, train_batches: Callable[[], Iterable[Batch]], reduce: GradReducer
    ) -> None:
        """Called by the trainer when stage ``index`` starts (also when resuming into it).

        ``train_batches()`` returns an iterable over training batches (the trainer's replay of
        this rank's previous epoch), for work that must see the data between stages (U2S's
        category similarity matrix); ``reduce`` averages tensors in place across ranks
        (averaging both a sum and its count keeps their ratio), so every rank installs the same
        statistics.
        """

    def pretrained_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the pretrained part (trained at the backbone's rate)."""
        return ("backbone.",)

    def hook_parameters(self) -> list[nn.Parameter]:
        """Parameters the hook updates itself (the meta step); the main optimizer skips them."""
        return []

    def hook_state_dict(self) -> dict:
        return {}

    def load_hook_state_dict(self, state: dict) -> None:
        pass

    def branch_logits(self, output: ModelOutput) -> dict[str, Tensor]:
        """Named ``(B, K)`` predictions, besides ``logits``, to evaluate each on its own."""
        return {}


def trainable_parameters(model: FineGrainModel, stage: TrainingStage) -> list[nn.Parameter]:
    """Apply ``stage.frozen`` (requires_grad) and return what the main optimizer should train."""
    return [p for _, p in trainable_named_parameters(model, stage)]


def trainable_named_parameters(
    model: FineGrainModel, stage: TrainingStage
) -> list[tuple[str, nn.Parameter]]:
    """As :func:`trainable_parameters`, with the parameters' names."""
    hook = {id(p) for p in model.hook_parameters()}
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(stage.frozen) if stage.frozen else True)
        if p.requires_grad and id(p) not in hook:
            params.append((name, p))
    return params
