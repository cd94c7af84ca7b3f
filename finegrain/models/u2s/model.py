"""U2S: universal-to-specific framework (Zhao, Xie, Zhang, Tian; METHODS.md § U2S).

A universal network (UN) and a category-specific network (CSN) share the backbone's stem and
early stages and each own a copy of the later ones. The mask network (MN), a 1×1×1 conv C → K on
the UN's last feature map, gives one mask per class and, through global average pooling, the
bridge logits. For a sample the UN predicts as class i, the masks of i's confusing classes (row i
of the category similarity matrix, CSM) are averaged, squashed by a sigmoid and multiply the
CSN's last feature map:

    Ξ^c = 1 − Q^c  (Q^c: fraction of non-zero responses of channel c over T·H·W)   (Eq. 1)
    S_ij = cos(Ξ_i, Ξ_j),  C = 1[S ≥ α]          (Ξ_m: mean Ξ over class m)       (Eq. 2)
    L = L_U + L_C + L_M + λ·w_reg                                                  (Eq. 3)
    w_reg = (1/N_pos) Σ_{M_ij = 1} s(w_i, w_j),  s = (1 + cos)/2,  M = C − I      (Eqs. 4–6)
    prediction = mean(softmax(z_U), softmax(z_M), softmax(z_C))

Training runs in the paper's three stages, through the :class:`FineGrainModel` hook: (1) the UN
alone (the CSN and MN are frozen and unused: the model is in *UN-only mode* until the CSM
exists); at the start of stage 2 ``begin_stage`` computes the CSM from the trained UN over the
training set; (2) CSN + MN with the UN frozen; (3) everything jointly at a lower learning rate.

The CSM lives in buffers, so it is saved and restored with the ``state_dict``. Under DDP each
rank sees its own shard: :meth:`U2S.compute_csm` all-reduces the per-class sparsity sums and
counts across ranks (with the trainer's ``reduce`` given to ``begin_stage``, else
``torch.distributed.all_reduce`` when a process group exists) before installing, so every rank
installs the same matrix. Sum and mean reductions both work: the CSM
depends only on the ratio sums / counts.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from torch import Tensor, nn

from finegrain.models.backbones import Backbone
from finegrain.models.base import Batch, FineGrainModel, GradReducer, ModelOutput, TrainingStage
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options

PREDICTIONS = ("universal", "bridge", "specific")
CsmMode = Literal["binary", "soft"]
MaskMode = Literal["confusers", "own_class_only"]
CsnInit = Literal["initial", "universal"]
CSM_MODES: tuple[str, ...] = get_args(CsmMode)
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
CSN_INITS: tuple[str, ...] = get_args(CsnInit)
DEFAULT_TOPN_TARGET = 0.9  # paper: 0.85 SSv2, 0.90 HMDB51 / Stanford Dogs, 0.95 UCF101 / Cars
# Epoch shares of the three stages (revised, METHODS.md): the paper trains each stage until
# validation saturates; a short stage 1 leaves an unconverged universal network whose CSM misses
# the true confusers (a 2-epoch UN found the partner of 4 of 12 classes), so most epochs go to it.
# The old shares were (0.4, 0.4, 0.2).
STAGE_SHARES = (0.6, 0.2, 0.2)

ORACLE_ERROR = (
    "U2S with oracle=True selects the masks with the ground-truth class: it is for evaluation "
    "only (paper Table III f) and cannot be trained; train a model with oracle=False and load "
    "its state_dict into an oracle model to evaluate it"
)


# --- category similarity matrix (Eqs. 1–2) and category regularization (Eqs. 4–6) ----------


def channel_sparsity(features: Tensor) -> Tensor:
    """Ξ (Eq. 1): ``(B, C, T, H, W) → (B, C)``, 1 − fraction of responses > 0 per channel.

    After a ReLU "> 0" is "non-zero"; for a last stage without a ReLU (Swin ends with LayerNorm)
    it measures the sparsity of ReLU(x).
    """
    return 1.0 - (features > 0).flatten(2).float().mean(dim=2)


def similarity_from_sparsity(xi: Tensor) -> Tensor:
    """S (Eq. 2) from per-class sparsity vectors ``(K, C)``: cosine similarity, in [0, 1].

    A class whose vector is zero (never seen, or no sparse channel) is similar to no other class;
    the diagonal is 1.
    """
    unit = F.normalize(xi.double(), dim=1)
    s = (unit @ unit.T).clamp(0.0, 1.0)
    s.fill_diagonal_(1.0)
    return s.to(xi.dtype)


def binary_csm(similarity: Tensor, alpha: float) -> Tensor:
    """C = 1[S ≥ α] with C_ii = 1 (a class always "confuses" itself, as S_ii = 1)."""
    c = (similarity >= alpha).to(similarity.dtype)
    c.fill_diagonal_(1.0)
    return c


def mean_confusers(csm: Tensor) -> Tensor:
    """Mean number of confusing classes per class: mean row sum of M = C − I."""
    k = csm.shape[0]
    return (csm.sum() - csm.diagonal().sum()) / k


def alpha_for_confusers(similarity: Tensor, confusers: float) -> float:
    """The largest α whose binary CSM has at least ``confusers`` confusers per class on average.

    With distinct similarities the mean is exactly ``round(confusers·K) / K``; ties can add pairs.
    """
    k = similarity.shape[0]
    off = similarity[~torch.eye(k, dtype=torch.bool, device=similarity.device)]
    target = round(confusers * k)
    values = off.sort(descending=True).values
    if target <= 0:
        return float(torch.nextafter(values[0], values.new_tensor(math.inf)))
    return float(values[min(target, values.numel()) - 1])


def topn_confusers(topn_accuracy: Tensor, target: float) -> int:
    """The paper's rule for the number of confusing classes (§4.2): N is the smallest N whose
    top-N accuracy reaches ``target``; the N predictions then hold the class and N − 1 others,
    its confusers. ``topn_accuracy[n - 1]`` is the top-n accuracy (non-decreasing in n)."""
    reached = (topn_accuracy >= target - 1e-9).nonzero().flatten()
    n = int(reached[0]) + 1 if len(reached) else len(topn_accuracy)
    return n - 1


def category_regularization(weight: Tensor, csm: Tensor) -> Tensor:
    """w_reg (Eq. 5): mean of s(w_i, w_j) = (1 + cos(w_i, w_j)) / 2 over the pairs M_ij = 1.

    ``weight``: the MN's conv weight ``(K, C, 1, 1, 1)`` (row i makes class i's mask);
    ``csm``: binary C. M = C − I; 0 when no pair is confusable.
    """
    w = F.normalize(weight.flatten(1), dim=1)
    s = (1.0 + w @ w.T) / 2.0
    eye = torch.eye(csm.shape[0], dtype=torch.bool, device=csm.device)
    m = ((csm > 0) & ~eye).to(s.dtype)
    return (s * m).sum() / m.sum().clamp(min=1.0)


def _all_reduce(tensors: Sequence[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


# --- the model ------------------------------------------------------------------------------


class U2S(FineGrainModel):
    """UN (``backbone`` + ``universal_head``), CSN (``specific_stages`` + ``specific_head``), MN."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        owned_stages: int,
        alpha: float | None,
        confusers: float | None,
        confusers_topn_target: float,
        stage_shares: tuple[float, float, float],
        csm: str,
        lam: float,
        fuse: tuple[str, ...],
        category_reg: bool,
        mask: str,
        mask_network: bool,
        oracle: bool,
        csn_init: str,
        freeze_bn: bool,
        joint_lr_scale: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.split = len(backbone.stages) - owned_stages  # stages [split:] are owned
        self.alpha, self.confusers, self.csm_mode, self.lam = alpha, confusers, csm, lam
        self.topn_target, self.stage_shares = confusers_topn_target, stage_shares
        self.fuse, self.category_reg, self.mask = fuse, category_reg, mask
        self.oracle, self.csn_init, self.freeze_bn = oracle, csn_init, freeze_bn
        self.joint_lr_scale = joint_lr_scale
        self.needs_labels = oracle  # the evaluator must call forward(clips, labels=labels)
        self._frozen: tuple[str, ...] = ()

        channels = backbone.out_channels
        self.backbone = backbone
        self.universal_head = ClassifierHead(channels, num_classes, dropout)
        # The CSN owns a copy of the later stages, initialised like the UN's (paper: both from
        # the same pretrained weights); csn_init="universal" re-copies the trained UN at stage 2.
        self.specific_stages = copy.deepcopy(backbone.stages[self.split :])
        self.specific_head = ClassifierHead(channels, num_classes, dropout)
        self.mask_network = (
            nn.Conv3d(channels, num_classes, kernel_size=1) if mask_network else None
        )

        self.register_buffer("csm_similarity", torch.zeros(num_classes, num_classes))  # S
        self.register_buffer("csm", torch.zeros(num_classes, num_classes))  # C (binary)
        self.register_buffer("csm_alpha", torch.tensor(float("nan")))
        self.register_buffer("csm_topn", torch.zeros(num_classes))  # UN's top-n accuracy
        self.register_buffer("specific_enabled", torch.tensor(False))
        if oracle:
            self.eval()

    # --- forward --------------------------------------------------------------------------
    def _universal_features(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """Run the UN: (features at the split, shared with the CSN; UN's last feature map)."""
        x = self.backbone.stem(clips)
        shared = x
        for k, stage in enumerate(self.backbone.stages):
            x = stage(x)
            if k == self.split - 1:
                shared = x
        return shared, x

    def _mask_weights(self, cls: Tensor) -> Tensor:
        """Per sample, the weights over the K class masks (they sum to 1): ``(B,) → (B, K)``."""
        if self.mask == "own_class_only":
            w = F.one_hot(cls, self.num_classes).to(self.csm.dtype)
        elif self.csm_mode == "soft":
            w = self.csm_similarity[cls]
        else:
            w = self.csm[cls]
        return w / w.sum(dim=1, keepdim=True)

    def forward(self, clips: Tensor, *, labels: Tensor | None = None) -> ModelOutput:
        """``labels`` is read only by an oracle model (evaluation only), to select the masks."""
        if self.oracle:
            if self.training:
                raise RuntimeError(ORACLE_ERROR)
            if labels is None:
                raise ValueError("U2S oracle=True: forward needs labels= (the ground truth)")
            if not bool(self.specific_enabled):
                raise RuntimeError("U2S oracle=True needs a trained model with its CSM installed")

        shared, u = self._universal_features(clips)
        logits = {"universal": self.universal_head(u)}
        aux: dict[str, Tensor] = {}
        diag: dict[str, Tensor] = {}
        if bool(self.specific_enabled):
            s = shared
            for stage in self.specific_stages:
                s = stage(s)
            if self.mask_network is not None:
                masks = self.mask_network(u)  # (B, K, T, H, W): one mask per class
                logits["bridge"] = masks.mean(dim=(2, 3, 4))
                cls = labels if self.oracle else logits["universal"].argmax(dim=1)
                weights = self._mask_weights(cls).to(masks.dtype)
                mask = torch.sigmoid(torch.einsum("bk,bkthw->bthw", weights, masks))
                s = s * mask.unsqueeze(1)
                if self.category_reg:
                    w_reg = category_regularization(self.mask_network.weight, self.csm)
                    aux["category_reg"] = self.lam * w_reg
                diag.update(
                    mask=mask.detach(),
                    mask_class=cls.detach(),
                    csm=self.csm.detach(),
                    csm_similarity=self.csm_similarity.detach(),
                    mean_confusers=mean_confusers(self.csm).detach(),
                )
            logits["specific"] = self.specific_head(s)
            fused = [logits[k] for k in self.fuse]
        else:  # UN-only mode (stage 1, before the CSM exists)
            fused = [logits["universal"]]
        log_probs = torch.stack([F.log_softmax(z.float(), dim=1) for z in fused])
        log_mean = torch.logsumexp(log_probs, dim=0) - math.log(len(fused))
        return ModelOutput(logits=log_mean, aux_losses=aux, diagnostics=diag, extras=logits)

    def loss(self, output: ModelOutput, labels: Tensor) -> Tensor:
        """L_U (+ L_C + L_M once the CSN is on) + λ·w_reg (Eq. 3); logits from ``extras``."""
        total = sum(F.cross_entropy(z, labels) for z in output.extras.values())
        return total + sum(output.aux_losses.values(), torch.zeros((), device=labels.device))

    # --- category similarity matrix --------------------------------------------------------
    @torch.no_grad()
    def accumulate_sparsity(self, batches: Iterable[Batch]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-class sums of Ξ over ``batches`` ``(K, C)``, sample counts ``(K,)`` and, per n,
        how many samples the UN has in its top n ``(K,)`` (all float64).

        Runs the UN in eval mode without gradients (the mode is restored). Clips must be what
        ``forward`` takes; they are moved to the model's device.
        """
        device = self.csm.device
        k = self.num_classes
        sums = torch.zeros(k, self.backbone.out_channels, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        topn = torch.zeros(k, dtype=torch.float64, device=device)
        was_training = self.training
        self.eval()
        try:
            for clips, labels in batches:
                _, u = self._universal_features(clips.to(device))
                labels = labels.to(device)
                sums.index_add_(0, labels, channel_sparsity(u).double())
                counts += torch.bincount(labels, minlength=k).double()
                scores = self.universal_head(u)  # rank of the true class among the K
                rank = (scores > scores.gather(1, labels[:, None])).sum(dim=1)
                topn += (rank[:, None] < torch.arange(1, k + 1, device=device)).sum(0).double()
        finally:
            self.train(was_training)
        return sums, counts, topn

    @torch.no_grad()
    def install_csm(self, sums: Tensor, counts: Tensor, topn: Tensor | None = None) -> Tensor:
        """Ξ_m = sums / counts → S → α (given; else from ``confusers``, or by the top-N rule
        on ``topn``, the UN's top-n hit counts) → C; returns C.

        Call with sums, counts and topn already reduced over all ranks.
        """
        device = self.csm.device
        sums, counts = sums.to(device, torch.float64), counts.to(device, torch.float64)
        if counts.sum() <= 0:
            raise ValueError("U2S install_csm: no training samples (all class counts are 0)")
        unseen = (counts == 0).nonzero().flatten().tolist()
        if unseen:
            warnings.warn(
                f"U2S CSM: {len(unseen)} class(es) have no training sample, e.g. {unseen[:5]}; "
                "they confuse no other class",
                stacklevel=3,
            )
        xi = sums / counts.clamp(min=1.0).unsqueeze(1)
        similarity = similarity_from_sparsity(xi)
        confusers = self.confusers
        if topn is not None:
            self.csm_topn.copy_(topn.to(device, torch.float64) / counts.sum())
        if confusers is None and self.alpha is None:  # "auto": the paper's top-N rule
            if topn is None:
                raise ValueError("U2S confusers='auto' needs the UN's top-n accuracies")
            confusers = topn_confusers(self.csm_topn, self.topn_target)
        alpha = self.alpha if self.alpha is not None else alpha_for_confusers(similarity, confusers)
        csm = binary_csm(similarity, alpha)
        seen = counts > 0  # a class never seen has no evidence: it confuses no other class
        csm *= (seen.unsqueeze(0) & seen.unsqueeze(1)).to(csm.dtype)
        csm.fill_diagonal_(1.0)
        self.csm_similarity.copy_(similarity)
        self.csm.copy_(csm)
        self.csm_alpha.fill_(alpha)
        self.specific_enabled.fill_(True)
        return self.csm.clone()

    def compute_csm(self, batches: Iterable[Batch], reduce: GradReducer | None = None) -> Tensor:
        """Accumulate Ξ over ``batches``, reduce across ranks, install the CSM; returns C.

        ``reduce`` all-reduces a list of tensors in place (sum or mean); by default
        ``torch.distributed.all_reduce`` when a process group is initialised, else nothing.
        """
        sums, counts, topn = self.accumulate_sparsity(batches)
        (reduce or _all_reduce)([sums, counts, topn])
        return self.install_csm(sums, counts, topn)

    def csm_diagnostics(self) -> dict[str, Tensor]:
        """S (for a heatmap), C, α and the mean number of confusers per class."""
        return {
            "csm_similarity": self.csm_similarity.detach().cpu(),
            "csm": self.csm.detach().cpu(),
            "alpha": self.csm_alpha.detach().cpu(),
            "mean_confusers": mean_confusers(self.csm).detach().cpu(),
            "topn_accuracy": self.csm_topn.detach().cpu(),
        }

    def pretrained_prefixes(self) -> tuple[str, ...]:
        """The CSN's stages start as a copy of the (pretrained) backbone's: both at its rate."""
        return ("backbone.", "specific_stages.")

    def branch_logits(self, output: ModelOutput) -> dict[str, Tensor]:
        """Each prediction the fusion averages, evaluated on its own (paper Table I)."""
        return dict(output.extras)

    # --- training hook ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> U2S:
        """As ``nn.Module.train``; frozen parts stay in eval mode (``freeze_bn``); an oracle model
        refuses training mode."""
        if mode and self.oracle:
            raise RuntimeError(ORACLE_ERROR)
        super().train(mode)
        if mode and self.freeze_bn and self._frozen:
            for name, module in self.named_modules():
                if name and f"{name}.".startswith(self._frozen):
                    module.eval()
        return self

    def training_stages(self) -> list[TrainingStage]:
        if self.oracle:
            raise RuntimeError(ORACLE_ERROR)
        universal = ("backbone.", "universal_head.")
        specific = ("specific_stages.", "specific_head.", "mask_network.")
        e1, e2, e3 = self.stage_shares
        return [
            TrainingStage("universal", epochs=e1, frozen=specific),
            TrainingStage("specific", epochs=e2, frozen=universal),
            TrainingStage("joint", epochs=e3, lr_scale=self.joint_lr_scale),
        ]

    def begin_stage(
        self,
        index: int,
        train_batches: Callable[[], Iterable[Batch]],
        reduce: GradReducer | None = None,
    ) -> None:
        """Stage ≥ 2 (index ≥ 1): compute the CSM from ``train_batches()`` once (not again on
        resume: it is in the state_dict), reducing the sparsity statistics with ``reduce``."""
        stages = self.training_stages()
        if not 0 <= index < len(stages):
            raise ValueError(f"U2S stage index must be in [0, {len(stages) - 1}], got {index}")
        self._frozen = stages[index].frozen
        if index >= 1 and not bool(self.specific_enabled):
            if self.csn_init == "universal":
                self.specific_stages.load_state_dict(
                    self.backbone.stages[self.split :].state_dict()
                )
            if self.mask_network is not None:
                self.compute_csm(train_batches(), reduce)
            else:  # plain two-branch ensemble: no masks, no CSM needed
                self.specific_enabled.fill_(True)
        self.train(self.training)


# --- options and builder --------------------------------------------------------------------


def _fuse_names(fuse: str | Sequence[str]) -> set[str]:
    """The prediction names in ``fuse`` (a list, or a comma-separated string)."""
    items = fuse.split(",") if isinstance(fuse, str) else list(fuse)
    return {str(x).strip() for x in items if str(x).strip()}


def _available(mask_network: bool) -> tuple[str, ...]:
    """The predictions a model has: no bridge without the mask network."""
    return PREDICTIONS if mask_network else ("universal", "specific")


class U2SOptions(Options):
    """U2S's options (the paper's defaults and the revised decisions of METHODS.md).

    owned_stages: how many of the last backbone stages the UN and the CSN each own (the rest and
        the stem are shared; paper: the 3D part is owned); at most the backbone's stage count.
    alpha: CSM threshold in [0, 1]; given, it replaces ``confusers``.
    confusers: choose α so that the mean number of confusing classes per class is this (in
        [0, K − 1]); "auto" (default, revised): the paper's rule, N − 1 with N the smallest N
        whose top-N accuracy of the trained UN on the training batches reaches
        ``confusers_topn_target``. (The old fixed 5 came from 120–196-class datasets.)
    stage_shares: the epoch shares of the three stages (revised default 0.6 / 0.2 / 0.2; the old
        0.4 / 0.4 / 0.2); ``optim.stage_epochs`` overrides them. Warm-up happens in stage 1 only
        and every stage anneals on its own schedule (the trainer's rule for staged methods).
    csm: "binary" (C) or "soft" (S weights the masks; paper Table III c). Category
        regularization always uses the binary C.
    lam: λ of the category regularization (Eq. 3). category_reg=False drops the term.
    fuse: the predictions averaged: a subset of universal, bridge, specific (list or comma
        string); default all available. Training always uses all the losses.
    mask: "confusers" (paper) or "own_class_only" (the predicted class's mask; Table III b).
    mask_network: False → plain two-branch ensemble of UN and CSN (Table III d).
    oracle: the ground-truth class selects the masks (Table III f); evaluation only.
    csn_init: "initial" (the CSN starts from the backbone's initial, e.g. pretrained, weights;
        paper) or "universal" (copied from the UN trained in stage 1).
    freeze_bn: frozen parts run in eval mode (BatchNorm keeps its running statistics).
    joint_lr_scale: stage 3's learning-rate factor (paper: 10⁻⁴ after 10⁻³).

    Numbers accept ints, never bools or strings. The stages' default epoch shares are
    ``STAGE_SHARES``.
    """

    owned_stages: StrictInt = Field(2, ge=1)
    alpha: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    confusers: StrictFloat | Literal["auto"] | None = "auto"
    confusers_topn_target: StrictFloat = Field(DEFAULT_TOPN_TARGET, gt=0.0, le=1.0)
    stage_shares: tuple[StrictFloat, ...] = STAGE_SHARES
    csm: CsmMode = "binary"
    lam: StrictFloat = Field(0.5, ge=0.0)
    fuse: str | tuple[str, ...] | None = None
    category_reg: StrictBool = True
    mask: MaskMode = "confusers"
    mask_network: StrictBool = True
    oracle: StrictBool = False
    csn_init: CsnInit = "initial"
    freeze_bn: StrictBool = True
    joint_lr_scale: StrictFloat = Field(0.1, gt=0.0)
    dropout: StrictFloat = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("confusers", mode="before")
    @classmethod
    def _auto_or_a_number(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and value == "auto"):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError("must be 'auto' or a number in [0, K − 1]")
        return value

    @field_validator("stage_shares")
    @classmethod
    def _three_positive_shares(cls, shares: tuple[float, ...]) -> tuple[float, ...]:
        if len(shares) != 3 or any(not x > 0 for x in shares):
            raise ValueError("must be three numbers > 0")
        return shares

    @model_validator(mode="after")
    def _fuse_and_oracle_need_the_mask_network(self) -> U2SOptions:
        if self.oracle and not self.mask_network:
            raise ValueError("oracle=True selects masks: it needs mask_network=True")
        if self.fuse is not None:
            available = _available(self.mask_network)
            names = _fuse_names(self.fuse)
            bad = sorted(names - set(available))
            if not names or bad:
                raise ValueError(
                    f"fuse must be a non-empty subset of {{{', '.join(available)}}}"
                    f"{'' if self.mask_network else ' (no bridge without the mask network)'}; "
                    f"got {self.fuse!r}"
                )
        return self


def build(num_classes: int, backbone: Backbone, options: U2SOptions | None = None, **kwargs) -> U2S:
    """U2S on ``backbone``; options as a :class:`U2SOptions` or keyword arguments.

    The checks that need the backbone or the class count stay here: ``owned_stages`` at most the
    backbone's stage count, ``confusers`` at most K − 1.
    """
    opts = options if options is not None else parse_options("u2s", U2SOptions, kwargs)
    k = num_classes
    n_stages = len(backbone.stages)
    if opts.owned_stages > n_stages:
        raise ValueError(
            f"owned_stages must be an int in [1, {n_stages}], got {opts.owned_stages!r}"
        )
    confusers = None if opts.confusers == "auto" else opts.confusers
    if confusers is not None and confusers > k - 1:
        raise ValueError(f"confusers must be 'auto' or in [0, {k - 1}] (K − 1), got {confusers}")
    fuse = (
        _available(opts.mask_network)
        if opts.fuse is None
        else tuple(p for p in PREDICTIONS if p in _fuse_names(opts.fuse))
    )
    return U2S(
        backbone,
        num_classes,
        owned_stages=opts.owned_stages,
        alpha=opts.alpha,
        confusers=confusers,
        confusers_topn_target=opts.confusers_topn_target,
        stage_shares=opts.stage_shares,
        csm=opts.csm,
        lam=opts.lam,
        fuse=fuse,
        category_reg=opts.category_reg,
        mask=opts.mask,
        mask_network=opts.mask_network,
        oracle=opts.oracle,
        csn_init=opts.csn_init,
        freeze_bn=opts.freeze_bn,
        joint_lr_scale=opts.joint_lr_scale,
        dropout=opts.dropout,
    )
