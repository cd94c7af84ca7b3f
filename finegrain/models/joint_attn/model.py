"""Joint attention on multi-level deep features (Wu, Wang, Yang, Ji 2016; METHODS.md "JointAttn").

Pipeline (paper Fig. 1): backbone levels ("pre-conv net", paper: VGG16 pool4 and conv5_3) →
per level a two-layer 3×3×3 "3d-convnet" with deep supervision and attention regularization
(§3.2) → soft-attention joint LSTM over the time steps of the feature map (§3.3) with a spatial
pyramid input (§3.4) → prediction from the average softmax of the last steps (§3.5).

Time steps: the LSTM runs over the T of the tapped feature maps (the paper runs it over frames).
The backbone must keep some time: ``tiny`` keeps T/2, the torchvision ResNets T/8 of the last
stage (``keep_time=True``: T/2). The levels are resized to a common (T, K, K) with T the largest
T among the levels (trilinear interpolation, also in space).

Decisions METHODS.md leaves open (all options of :func:`build` unless noted):

- Width: each level is projected by a 1×1×1 conv + BN + ReLU to ``channels`` (paper 256), so
  the features stay non-negative like VGG's and the channel sums of §3.2 are valid masses.
  The 3d-convnet is conv-BN-ReLU twice (BN: not in the paper, trains from scratch; fixed).
- Input width: the joint LSTM's late fusion needs x_k ⊙ i_k, so every pyramid vector (5·C) is
  first mapped to the hidden width by a linear embedding E_k (the paper's input units have the
  hidden width, 1024); early and late fusion then have exactly the same parameters.
- Stacking: the first layer is the joint (multi-input) LSTM, layers 2.. are plain LSTM cells;
  attention and prediction use the top layer's hidden state.
- Initial state: ``init_state="mean"`` (Sharma et al., whose soft-attention model this paper
  extends): h_0, c_0 = tanh(linear(mean over T, K, K of the levels' features)) per layer;
  ``"zeros"``: zeros (the first attention is then the same for every clip).
- Quadrants: rows/columns [0, ⌈K/2⌉) and [⌊K/2⌋, K) (the middle row/column is shared when K is
  odd); a quadrant's vector is Σ_{i ∈ quadrant} att_i X_i with the same (not renormalised)
  attention weights, so the pyramid also encodes where the attention mass lies (fixed).
- Attention regularization scale: per level, λ · (K²/11²) · mean_t Σ_i (x̄_{t,i} − att_{t,i})²,
  averaged over the batch. Both x̄ and att sum to 1 over the K² locations, so Σ_i (·)² shrinks
  like 1/K² for the same relative mismatch; the factor K²/11² removes that dependence and equals
  1 at the paper's 11×11 grid (per time step: mean over t instead of the paper's sum, so the
  scale does not depend on T either).
- Attention regularization on a trained backbone (METHODS.md revised): the paper's λ = 1000
  trains a 3D-convnet on *fixed*, pretrained VGG features; here the backbone trains too, so the
  term's gradient must not reach it. With ``reg_detach`` (default) the term is computed by the
  levels' branches on the backbone features detached (a second, gradient-only pass of the
  branches with their BatchNorm statistics untouched): it trains the 3D-convnets, never the
  backbone. λ is calibrated so that at initialisation the term's gradient on the parameters it
  shares with the cross-entropy (the branches) is at most 0.1× the cross-entropy's, and warmed
  up linearly from 0 over ``lam_warmup_epochs``. See ``CALIBRATED_LAM``.
- LSTM loss: ``lstm_loss="every_step"`` is the cross-entropy of every step's prediction,
  averaged over steps (Sharma et al.); ``"prediction"`` is the cross-entropy of the averaged
  prediction (``logits``). Deep supervision adds ``ds_weight`` · CE per level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool, StrictInt, field_validator
from torch import Tensor, nn

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.spec import Options, parse_options

PAPER_GRID = 11  # the paper's 11×11 feature maps: the grid at which λ has the paper's meaning
# λ by the gradient-ratio rule (METHODS.md): at initialisation, on 48-px 8-frame clips of the
# synthetic benchmark through the project's pretrained tiny backbone (width 16), with the default
# head (2 levels, 7×7 grid, 256 channels, 2 LSTM layers) and reg_detach, the regularizer's
# gradient norm on the parameters it shares with the cross-entropy (the levels' branches) was
# 0.0046× the cross-entropy's for λ = 1 (median of 8 batches of 16 clips, range 0.0038–0.0055;
# the paper's λ = 1000 gives 4.6×). λ = 0.1 / 0.0055 = 18 keeps every batch ≤ 0.1; rounded down:
# 15, a median ratio of 0.068 (max 0.083). tests/test_joint_attn.py re-measures it at the default.
CALIBRATED_LAM = 15.0
Predict = Literal["softmax", "votes"]
Fusion = Literal["early", "late"]
Convnet = Literal["3d", "2d", "none"]
InitState = Literal["mean", "zeros"]
LstmLoss = Literal["every_step", "prediction"]
PREDICTS = get_args(Predict)
FUSIONS = get_args(Fusion)
CONVNETS = get_args(Convnet)
INIT_STATES = get_args(InitState)
LSTM_LOSSES = get_args(LstmLoss)


class JointAttnOptions(Options):
    """JointAttn's options (see :func:`build` for what each one means).

    ``levels`` are checked here as stage indices only; whether they index the backbone's stages
    (and stay distinct once negative indices are resolved) is checked by :func:`build`, which
    sees the backbone.
    """

    levels: tuple[StrictInt, ...] = (-2, -1)
    grid: StrictInt = Field(7, ge=2)
    channels: StrictInt = Field(256, ge=1)
    convnet: Convnet = "3d"
    fusion: Fusion = "late"
    hidden: StrictInt = Field(256, ge=1)
    lstm_layers: StrictInt = Field(2, ge=1)
    predict_steps: StrictInt = Field(0, ge=0)
    predict: Predict = "softmax"
    attention_reg: bool = True
    lam: float = Field(CALIBRATED_LAM, ge=0.0)
    reg_detach: StrictBool = True
    lam_warmup_epochs: float = Field(1.0, ge=0.0)
    deep_supervision: bool = True
    ds_weight: float = Field(1.0, ge=0.0)
    pyramid: bool = True
    init_state: InitState = "mean"
    lstm_loss: LstmLoss = "every_step"
    dropout: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("levels")
    @classmethod
    def _some_levels(cls, levels: tuple[int, ...]) -> tuple[int, ...]:
        if not levels:
            raise ValueError("levels must be a non-empty sequence of stage indices")
        return levels


def _conv_bn_relu(c_in: int, c_out: int, kernel: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, padding=tuple(k // 2 for k in kernel), bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class LevelBranch(nn.Module):
    """One feature level: projection to the common width, then the two-layer "3d-convnet"."""

    def __init__(self, in_channels: int, channels: int, convnet: str) -> None:
        super().__init__()
        self.project = _conv_bn_relu(in_channels, channels, (1, 1, 1))
        kernel = {"3d": (3, 3, 3), "2d": (1, 3, 3)}.get(convnet)
        self.convnet = (
            nn.Sequential(
                _conv_bn_relu(channels, channels, kernel), _conv_bn_relu(channels, channels, kernel)
            )
            if kernel
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convnet(self.project(x))


class DeepSupervisionHead(nn.Module):
    """§3.2: GAP → two fully connected layers → class scores (trained with CE)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3, 4)))


def attention_regularization(features: Tensor, attention: Tensor) -> Tensor:
    """§3.2, grid-normalised: (K²/11²) · mean over (B, t) of Σ_i (x̄_{t,i} − att_{t,i})².

    features: (B, C, T, K, K) non-negative; x̄ = channel sum normalised over the K² locations.
    attention: (B, T, K, K), summing to 1 over the locations (pass it detached).
    """
    mass = features.sum(dim=1).flatten(2)  # (B, T, K²)
    x_bar = mass / mass.sum(dim=2, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    sq = (x_bar - attention.flatten(2)).pow(2).sum(dim=2)  # (B, T)
    return sq.mean() * (mass.shape[2] / PAPER_GRID**2)


def pyramid_pool(x: Tensor, att: Tensor, pyramid: bool = True) -> Tensor:
    """§3.3–3.4: attention pooling of x (B, C, K, K) with att (B, K, K).

    Returns [x_full, x_region1..4] concatenated (B, 5C), or x_full (B, C) without the pyramid.
    """
    weighted = x * att[:, None]
    pooled = [weighted.sum(dim=(2, 3))]
    if pyramid:
        k = x.shape[-1]
        lo, hi = slice(0, math.ceil(k / 2)), slice(k // 2, k)
        pooled += [weighted[:, :, r, c].sum(dim=(2, 3)) for r in (lo, hi) for c in (lo, hi)]
    return torch.cat(pooled, dim=1)


class JointLSTMCell(nn.Module):
    """§3.3: an LSTM cell with several inputs x_k (B, H) of the hidden width H.

    sub-gates  i_k, f_k, o_k = tanh(W_x·k x_k + W_h·k h + b_·k)
    gates      i = σ(Σ_k A_k i_k),  f = σ(Σ_k B_k f_k),  o = σ(Σ_k C_k o_k)
    candidate  early: g = tanh(Σ_k W_xck x_k + W_hc h + b_c)
               late:  g = tanh(Σ_k W_xck (x_k ⊙ i_k) + W_hc h + b_c)
    c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')
    """

    def __init__(self, inputs: int, hidden: int, fusion: str) -> None:
        super().__init__()
        self.fusion = fusion
        self.hidden = hidden
        self.x_sub = nn.ModuleList(nn.Linear(hidden, 3 * hidden, bias=False) for _ in range(inputs))
        self.x_cell = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(inputs))
        # W_h·k and b_·k of every input's three sub-gates, then W_hc and b_c: one matmul.
        self.h_all = nn.Linear(hidden, (3 * inputs + 1) * hidden)
        # A_k, B_k, C_k (no bias in the paper): one (3H × 3H) block-diagonal map per input,
        # stored as the three (H × H) blocks.
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default initialisation
        self.mix = nn.Parameter(torch.empty(inputs, 3, hidden, hidden).uniform_(-bound, bound))

    def forward(self, xs: Sequence[Tensor], h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        H = self.hidden
        hs = self.h_all(h)
        gates = h.new_zeros(h.shape[0], 3, H)
        cell = hs[:, -H:]
        for k, x in enumerate(xs):
            sub = torch.tanh(self.x_sub[k](x) + hs[:, 3 * H * k : 3 * H * (k + 1)]).view(-1, 3, H)
            gates = gates + torch.einsum("bgj,gij->bgi", sub, self.mix[k])
            cell = cell + self.x_cell[k](x * sub[:, 0] if self.fusion == "late" else x)
        i, f, o = torch.sigmoid(gates).unbind(dim=1)
        c = f * c + i * torch.tanh(cell)
        return o * torch.tanh(c), c


class JointAttn(FineGrainModel):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        levels: tuple[int, ...],
        *,
        grid: int,
        channels: int,
        convnet: str,
        fusion: str,
        hidden: int,
        lstm_layers: int,
        predict_steps: int,
        attention_reg: bool,
        lam: float,
        deep_supervision: bool,
        ds_weight: float,
        pyramid: bool,
        init_state: str,
        lstm_loss: str,
        dropout: float,
        reg_detach: bool = True,
        lam_warmup_epochs: float = 1.0,
        predict: str = "softmax",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.levels = levels
        self.grid = grid
        self.predict_steps = predict_steps
        self.lam = lam if attention_reg else 0.0
        self.reg_detach, self.lam_warmup_epochs, self.predict = (
            reg_detach,
            lam_warmup_epochs,
            predict,
        )
        self.ds_weight = ds_weight if deep_supervision else 0.0
        self.pyramid = pyramid
        self.init_state = init_state
        self.lstm_loss = lstm_loss
        self.branches = nn.ModuleList(
            LevelBranch(backbone.stage_channels[s], channels, convnet) for s in levels
        )
        self.ds_heads = (
            nn.ModuleList(DeepSupervisionHead(channels, num_classes, dropout) for _ in levels)
            if deep_supervision
            else None
        )
        pooled = channels * (5 if pyramid else 1)
        self.embed = nn.ModuleList(nn.Linear(pooled, hidden) for _ in levels)  # E_k
        self.joint = JointLSTMCell(len(levels), hidden, fusion)
        self.stack = nn.ModuleList(nn.LSTMCell(hidden, hidden) for _ in range(lstm_layers - 1))
        self.init = (
            nn.Linear(channels * len(levels), 2 * lstm_layers * hidden)
            if init_state == "mean"
            else None
        )
        self.attend = nn.Linear(hidden, grid * grid)  # W_att
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)  # W_prob

    def levels_in(self, clips: Tensor) -> list[Tensor]:
        """The tapped backbone stages, resized to the common (T, K, K)."""
        x = self.backbone.stem(clips)
        taps = {}
        for s, stage in enumerate(self.backbone.stages):
            x = stage(x)
            taps[s] = x
        t = max(taps[s].shape[2] for s in self.levels)
        size = (t, self.grid, self.grid)
        return [
            F.interpolate(taps[s], size=size, mode="trilinear", align_corners=False)
            for s in self.levels
        ]

    def features(self, clips: Tensor) -> list[Tensor]:
        """The levels' 3d-convnet outputs, each (B, channels, T, K, K)."""
        return [branch(x) for branch, x in zip(self.branches, self.levels_in(clips))]

    def lam_now(self) -> float:
        """λ warmed up linearly from 0 over the first ``lam_warmup_epochs`` of training."""
        if not self.lam_warmup_epochs:
            return self.lam
        return self.lam * min(1.0, self.progress / self.lam_warmup_epochs)

    def _initial_state(self, feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        layers = 1 + len(self.stack)
        b, hidden = feats[0].shape[0], self.classifier.in_features
        if self.init is None:
            zero = feats[0].new_zeros(b, hidden)
            return [(zero, zero)] * layers
        means = torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)
        hc = torch.tanh(self.init(means)).view(b, layers, 2, hidden)
        return [(hc[:, j, 0], hc[:, j, 1]) for j in range(layers)]

    def forward(self, clips: Tensor) -> ModelOutput:
        inputs = self.levels_in(clips)
        feats = [branch(x) for branch, x in zip(self.branches, inputs)]
        b, _, steps, k, _ = feats[0].shape
        state = self._initial_state(feats)
        step_logits, attention = [], []
        for t in range(steps):
            att = torch.softmax(self.attend(state[-1][0]), dim=1).view(b, k, k)  # from h_{t−1}
            xs = [
                emb(pyramid_pool(f[:, :, t], att, self.pyramid))
                for emb, f in zip(self.embed, feats)
            ]
            state[0] = self.joint(xs, *state[0])
            for j, cell in enumerate(self.stack, start=1):
                state[j] = cell(state[j - 1][0], state[j])
            step_logits.append(self.classifier(self.dropout(state[-1][0])))
            attention.append(att)
        step_logits = torch.stack(step_logits, dim=1)  # (B, T, K)
        attention = torch.stack(attention, dim=1)  # (B, T, K, K)

        # §3.5: average the softmax (or the one-hot decisions: "votes") of the last L2 steps;
        # logits = log of that average
        last = step_logits[:, -min(self.predict_steps or steps, steps) :]
        if self.predict == "votes":
            votes = F.one_hot(last.argmax(dim=2), last.shape[2]).float().mean(dim=1)
            logits = torch.log(votes.clamp_min(1e-6))
        else:
            logits = torch.logsumexp(last.log_softmax(dim=2), dim=1) - math.log(last.shape[1])

        aux = {}
        lam = self.lam_now() if self.training else self.lam
        if lam and self.training:
            att = attention.detach()
            reg_feats = feats
            if self.reg_detach:  # the term trains the branches, never the backbone
                reg_feats = [
                    self._stateless(branch, x.detach()) for branch, x in zip(self.branches, inputs)
                ]
            for j, f in enumerate(reg_feats):
                aux[f"attention_reg_{j}"] = lam * attention_regularization(f, att)
        extras = {"step_logits": step_logits}
        if self.ds_heads is not None:
            for j, (head, f) in enumerate(zip(self.ds_heads, feats)):
                extras[f"ds_logits_{j}"] = head(f)
        return ModelOutput(
            logits=logits,
            aux_losses=aux,
            diagnostics={  # attention (B, T, K, K): step t's weights over the K×K cells
                "attention": attention.detach(),
                "input_size": torch.tensor([float(s) for s in clips.shape[2:]]),
            },
            extras=extras,
        )

    @staticmethod
    def _stateless(module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)`` without moving BatchNorm's running statistics (a copy of the buffers)."""
        state = {n: p for n, p in module.named_parameters()}
        state.update({n: b.clone() for n, b in module.named_buffers()})
        return torch.func.functional_call(module, state, (x,))

    def loss(self, output: ModelOutput, labels: Tensor) -> Tensor:
        if self.lstm_loss == "every_step":
            steps = output.extras["step_logits"]
            main = F.cross_entropy(steps.flatten(0, 1), labels.repeat_interleave(steps.shape[1]))
        else:
            main = F.cross_entropy(output.logits, labels)
        for name, z in output.extras.items():
            if name.startswith("ds_logits_"):
                main = main + self.ds_weight * F.cross_entropy(z, labels)
        return main + sum(output.aux_losses.values(), torch.zeros((), device=main.device))


def _keep_stages(backbone: Backbone, n: int) -> None:
    """Drop the stages after the first ``n``: they would get no gradient (and DDP expects every
    parameter to take part). Their torchvision keys, if the backbone records them, become
    ignored keys, so torchvision state dicts still load into the shortened backbone."""
    backbone.stages = backbone.stages[:n]
    backbone.stage_channels = backbone.stage_channels[:n]
    mapping = getattr(backbone, "torchvision_keys", None)
    if mapping:
        kept = backbone.state_dict().keys()
        dropped = tuple(v for k, v in mapping.items() if k not in kept)
        backbone.torchvision_keys = {k: v for k, v in mapping.items() if k in kept}
        backbone.torchvision_ignored = (*backbone.torchvision_ignored, *dropped)


def build(
    num_classes: int,
    backbone: Backbone,
    options: JointAttnOptions | None = None,
    **kwargs,
) -> JointAttn:
    """JointAttn on ``backbone``; options as a ``JointAttnOptions`` or keyword arguments.

    levels: backbone stage indices tapped (paper: two; one gives the single-level ablation of
        Table 2). Stages deeper than the deepest level are removed from ``backbone``.
    grid: K, the common K×K grid (7: a 112-px ResNet's last stage; paper 11). Shallower grids
        are upsampled, so small test inputs work too.
    channels: common width of the levels and of the 3d-convnet (paper 256).
    convnet: "3d" (paper, 3×3×3), "2d" (1×3×3) or "none" (projection only): Table 3.
    fusion: "early" or "late" (paper Table 4; late is its best).
    hidden, lstm_layers: LSTM width and depth (paper 1024 × 3; the default 256 keeps the head
        small next to ResNet-18-sized backbones and CPU-trainable).
    predict_steps: average the softmax of the last ``predict_steps`` steps (paper L2 = 16 of
        L1 = 30); 0 = all steps; more than the feature map has = all steps.
    predict: "softmax" (average the steps' softmax) or "votes" (average their decisions, as the
        paper's §3.5 counts them).
    attention_reg, lam: the attention regularization and its weight λ (see module docstring for
        the grid normalisation); ``attention_reg=False`` and ``lam=0`` both drop the term. The
        default λ is calibrated (``CALIBRATED_LAM``); the paper's is 1000.
    reg_detach: the term on backbone features detached (revised; False: the old decision, its
        gradient flows into the backbone). lam_warmup_epochs: λ rises linearly from 0 over this
        many epochs (0: from the start).
    deep_supervision, ds_weight: the per-level GAP → FC → FC → CE loss and its weight.
    pyramid: full + 4 quadrants (§3.4) or the full attention-pooled vector only.
    init_state: "mean" (Sharma et al.) or "zeros". lstm_loss: "every_step" or "prediction".
    dropout: before the LSTM's classifier and between the deep-supervision FC layers.
    """
    opts = options if options is not None else parse_options("joint_attn", JointAttnOptions, kwargs)
    n = len(backbone.stages)
    levels = opts.levels
    if any(not -n <= s < n for s in levels):
        raise ValueError(
            f"levels must index the backbone's {n} stages (-{n} .. {n - 1}), got {levels!r}"
        )
    levels = tuple(s % n for s in levels)
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct stages, got {levels!r}")
    _keep_stages(backbone, max(levels) + 1)
    return JointAttn(
        backbone,
        num_classes,
        levels,
        grid=opts.grid,
        channels=opts.channels,
        convnet=opts.convnet,
        fusion=opts.fusion,
        hidden=opts.hidden,
        lstm_layers=opts.lstm_layers,
        predict_steps=opts.predict_steps,
        attention_reg=opts.attention_reg,
        lam=opts.lam,
        deep_supervision=opts.deep_supervision,
        ds_weight=opts.ds_weight,
        pyramid=opts.pyramid,
        init_state=opts.init_state,
        lstm_loss=opts.lstm_loss,
        dropout=opts.dropout,
        reg_detach=opts.reg_detach,
        lam_warmup_epochs=opts.lam_warmup_epochs,
        predict=opts.predict,
    )
