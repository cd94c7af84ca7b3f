"""Class Regularization (Stergiou, Poppe, Veltkamp; METHODS.md "ClassReg").

A Class Regularization block after each of the last ``stages`` backbone stages excites the stage's
channels with the row of the classifier that the stage itself would predict:

    a_l  = GAP(A_l)                                     (Eq. 1, pool over T, H, W)
    W_l  = W · P_l            W = classifier weight (K × C_f), detached; P_l: C_f → C_l
    c*   = argmax softmax(W_l a_l)                      (Eq. 2)
    w    = W_l[c*], min-max normalised to [1 − γ_l, 1 + γ_l]   (Eq. 3)
    A'_l = A_l · w            broadcast over (T, H, W)

``W`` is the head's current weight, detached: in the forward pass of iteration n it holds the
weights of iteration n − 1 (the paper's "class weights as updated by the preceding iteration").
The head is the one-pass baseline's GAP → dropout → linear, so ``stages=0`` is that baseline.

Revised (METHODS.md): the spread over seeds comes from a feedback loop (early wrong class choices
scale the features the classifier pools), so γ warms up linearly from 0 over the first
``gamma_warmup_epochs`` of training, and stages narrower than ``min_channels`` get no block by
default (a 16-channel stage has too little to select with). ``gamma_warmup_epochs=0`` and
``min_channels=0`` give the old behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, StrictInt, field_validator, model_validator
from torch import Tensor, nn

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options

DEFAULT_GAMMA = (0.1, 0.2, 0.3, 0.4)  # affection rates of the last four stages, shallow → deep


class ClassRegOptions(Options):
    """ClassReg's options.

    stages: blocks after the last ``stages`` backbone stages (all stages if the backbone has
        fewer), those narrower than ``min_channels`` skipped; 0 = no blocks = the one-pass
        baseline.
    gamma: affection rate per block of the last ``stages`` stages, shallow to deep (a float
        applies to all), each in [0, 1). The default schedule (0.1, 0.2, 0.3, 0.4) belongs to
        the last four stages; with fewer stages the deepest values are kept (three → 0.2, 0.3,
        0.4). A skipped stage drops its value. A sequence needs one value per block: how many
        blocks there are depends on the backbone's stages, checked when the model is built.
    min_channels: stages narrower than this get no block (0: every stage may get one).
    gamma_warmup_epochs: γ rises linearly from 0 over this many epochs (0: at once).
    dropout: before the classifier, as the one-pass head.
    """

    stages: StrictInt = Field(4, ge=0)
    gamma: float | tuple[float, ...] = DEFAULT_GAMMA
    min_channels: StrictInt = Field(32, ge=0)
    gamma_warmup_epochs: float = Field(1.0, ge=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("gamma")
    @classmethod
    def _affection_rates(cls, gamma: float | tuple[float, ...]) -> float | tuple[float, ...]:
        for g in gamma if isinstance(gamma, tuple) else (gamma,):
            if not 0.0 <= g < 1.0:
                raise ValueError("gamma (affection rate) must be in [0, 1)")
        return gamma

    @model_validator(mode="after")
    def _one_rate_per_block(self):
        # A backbone has at most ``stages`` blocks: more values can never match (the exact
        # count, which depends on the backbone's stages, is checked by ``build``).
        gamma = self.gamma
        if isinstance(gamma, tuple) and gamma != DEFAULT_GAMMA and len(gamma) > self.stages:
            raise ValueError(
                f"gamma must be a float or a sequence of {self.stages} values (one per "
                f"ClassReg block, shallow to deep), got {len(gamma)} values: {gamma!r}"
            )
        return self


def excitation_weights(w: Tensor, gamma: float) -> Tensor:
    """Eq. 3: min-max normalise each row of ``w`` (B, C) into [1 − γ, 1 + γ].

    A constant row (max = min, no channel preferred) maps to 1 everywhere (no excitation).
    """
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    span = hi - lo
    unit = torch.where(span > 0, (w - lo) / span.clamp_min(torch.finfo(w.dtype).tiny), 0.5)
    return (1.0 - gamma) + 2.0 * gamma * unit


class ClassRegBlock(nn.Module):
    """Class-specific excitation of one stage's activations ``A_l`` (B, C_l, T, H, W).

    Gradients: the argmax (Eq. 2) is piecewise constant, so neither the class scores ``s`` nor
    ``a_l`` receive gradient through the class choice. ``P_l`` is trained only through the
    selected, min-max normalised row ``w`` (a differentiable function of ``W_l[c*] = W P_l``
    everywhere except where two channels tie for the min or max), i.e. through the excitation
    ``A_l · w``. ``W`` is detached, so the classifier is trained by the head alone.
    """

    def __init__(self, feature_channels: int, channels: int, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        # P_l: the paper's point-wise convolution on the class weights; on a (K × C_f) matrix a
        # 1×1×1 convolution is a linear map of each row. No bias: W_l = W · P_l (METHODS.md).
        self.P = nn.Linear(feature_channels, channels, bias=False)

    def forward(self, A: Tensor, W: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """Returns ``(A'_l, c*)`` with ``c*`` (B,) the class this stage selected; ``scale``
        multiplies γ (its warm-up)."""
        a = A.mean(dim=(2, 3, 4))  # Eq. 1
        W_l = self.P(W)  # (K, C_l)
        c = (a @ W_l.t()).argmax(dim=1)  # Eq. 2; the softmax does not change the argmax
        w = excitation_weights(W_l[c], self.gamma * scale)  # Eq. 3
        return A * w[:, :, None, None, None], c


class ClassReg(FineGrainModel):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        block_stages: Sequence[int],
        gammas: Sequence[float],
        dropout: float,
        gamma_warmup_epochs: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.block_stages = tuple(block_stages)  # stage index of each block
        self.gamma_warmup_epochs = gamma_warmup_epochs
        c_f = backbone.out_channels
        self.blocks = nn.ModuleList(
            ClassRegBlock(c_f, backbone.stage_channels[s], g)
            for s, g in zip(self.block_stages, gammas)
        )
        self.head = ClassifierHead(c_f, num_classes, dropout)

    def gamma_scale(self) -> float:
        """γ's warm-up factor: linear from 0 to 1 over the first ``gamma_warmup_epochs``."""
        if not self.gamma_warmup_epochs:
            return 1.0
        return min(1.0, self.progress / self.gamma_warmup_epochs)

    def forward(self, clips: Tensor) -> ModelOutput:
        W = self.head.fc.weight.detach()  # the previous iteration's class weights
        blocks = dict(zip(self.block_stages, self.blocks))
        scale = self.gamma_scale()
        x = self.backbone.stem(clips)
        chosen = []
        for s, stage in enumerate(self.backbone.stages):
            x = stage(x)
            if s in blocks:
                x, c = blocks[s](x, W, scale)
                chosen.append(c)
        logits = self.head(x)
        return ModelOutput(logits=logits, diagnostics=self._diagnostics(chosen, logits))

    def _diagnostics(self, chosen: list[Tensor], logits: Tensor) -> dict[str, Tensor]:
        """Per block: the selected classes and how often they agree with the final prediction."""
        if not chosen:
            return {}
        c = torch.stack(chosen, dim=1).detach()  # (B, blocks)
        pred = logits.detach().argmax(dim=1, keepdim=True)
        agree = (c == pred).float().mean(dim=0)
        out: dict[str, Tensor] = {"chosen_class": c}
        out.update({f"agreement_stage{s}": agree[j] for j, s in enumerate(self.block_stages)})
        return out


def _gammas(gamma: float | Sequence[float], blocks: int) -> tuple[float, ...]:
    """One affection rate per block (the values are checked by :class:`ClassRegOptions`; their
    count, which depends on the backbone's stages, here)."""
    if isinstance(gamma, (int, float)):
        return (float(gamma),) * blocks
    gammas = tuple(float(g) for g in gamma)
    if len(gammas) != blocks:
        if tuple(gammas) == DEFAULT_GAMMA and blocks < len(DEFAULT_GAMMA):
            return gammas[len(gammas) - blocks :]  # default schedule: keep the deepest
        raise ValueError(
            f"gamma must be a float or a sequence of {blocks} values (one per "
            f"ClassReg block, shallow to deep), got {len(gammas)} values: {gamma!r}"
        )
    return gammas


def build(
    num_classes: int, backbone: Backbone, options: ClassRegOptions | None = None, **kwargs
) -> ClassReg:
    """ClassReg on ``backbone``; options as a :class:`ClassRegOptions` or keyword arguments."""
    opts = options if options is not None else parse_options("classreg", ClassRegOptions, kwargs)
    n = len(backbone.stages)
    candidates = list(range(n - min(opts.stages, n), n))
    gammas = _gammas(opts.gamma, len(candidates))
    kept = [
        (s, g)
        for s, g in zip(candidates, gammas)
        if backbone.stage_channels[s] >= opts.min_channels
    ]
    return ClassReg(
        backbone,
        num_classes,
        [s for s, _ in kept],
        [g for _, g in kept],
        opts.dropout,
        float(opts.gamma_warmup_epochs),
    )
