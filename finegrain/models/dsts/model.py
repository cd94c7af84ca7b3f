"""DSTS: Dynamic Spatio-Temporal Specialization (Li et al., ECCV 2022), as METHODS.md specifies.

backbone → X ``(B, C, T, H, W)`` → L DSTS layers of N specialized neurons → X + Z'_L (skip) → GAP →
dropout → linear. Neuron i of a layer owns a scoring kernel m_i (1×1×1 conv C→C, no bias), gate
logits g_i ∈ R^C, a spatial op S_i (1×3×3) and a temporal op T_i (3×1×1), each followed by
BN+ReLU, and a 1×1×1 fuse conv.

- Impulses (Eqs. 1–2): v_i = Σ m_i(X) over channels and positions = (column-summed m_i) · (X summed
  over positions), so a layer's N impulses are one matmul. ``impulse="standardized"`` (default,
  METHODS.md revised) then standardises each neuron's impulse across the batch (a BatchNorm1d
  over the N impulses without affine parameters; running statistics in evaluation), so the
  choice depends on the sample; ``"sum"`` is the paper's raw sum, ``"mean"`` divides it by
  C·T·H·W (a constant rescale that changes nothing).
- Synapse (Eq. 3): training ``gumbel_softmax(V, tau, hard=True)`` (straight-through) and the layer
  output is Σ_i y_i Z'_i, so every neuron runs on the whole batch; evaluation takes argmax V with
  no noise and runs each sample through its selected neuron only (the batch grouped by neuron).
- Gates (Improved Semhash): b = 1 routes a channel to T_i, b = 0 to S_i (Eqs. 4–8). In
  evaluation b is fixed per neuron, so S_i and T_i run only on their own input channels.
- Gate init (METHODS.md revised): each g_c = ±2 with a random sign (``gate_init="signed"``), so
  the N(0, 1) training noise perturbs the routing instead of making it a coin flip;
  ``"small"``: 0.01·randn (the old decision).
- UDL (Eqs. 9–11) through the trainer hook (:mod:`finegrain.models.base`): in a training forward
  with ``meta``, steps 1–2 run on the backbone features the forward computes anyway (detached,
  for D_train) and one no-grad backbone pass over D_val; then the head runs on the features
  with the new u, and the trainer's normal step is step 3. One α, as the paper: α is the run's
  current learning rate (times ``udl_alpha_scale``, 1 = the paper) and u is updated by an
  optimizer of the run's own type, rate and schedule (``udl_alpha="run"``); ``"fixed"`` is the
  old decision (α = ``udl_inner_lr``, u by SGD at ``udl_outer_lr``).

Ablations (paper Tables 3–7): ``sts`` gates | fixed_halves (first C//2 channels spatial, the rest
temporal; no gates) | conv3d (one 3×3×3 conv + BN + ReLU per neuron, then the fuse; no gates);
``synapse`` gumbel | average_all (every neuron on every sample, outputs averaged; no scoring
kernels, so nothing is left unused); ``impulse``; ``udl``; ``neurons``; ``layers``.

Usage notes:
- T >= 4 in the backbone's last stage (checked): ResNet-family backbones divide T by 8, so build
  them with ``keep_time=True``, e.g. ``build_model("dsts", K, "r2plus1d_18", keep_time=True)``
  with 8-frame clips gives T = 4 (``bench/model_cost.py`` does this).
- With ``impulse="sum"`` (the paper's Eq. 2) impulses are sums over C·T·H·W elements with a large
  sample-independent offset (x̄·Σ_out m_i) that AdamW grows from tens to thousands within a few
  steps: the Gumbel softmax becomes one-hot to float precision, the noise never changes the
  choice, the scoring kernels get exactly zero gradient and one neuron takes every clip.
  ``"mean"`` is a constant rescale of the same. ``"standardized"`` removes the offset.
- BatchNorm: in training every neuron normalises over the whole batch (all neurons run on all
  samples), in evaluation its running statistics are applied to the samples that selected it.
- Cost: training runs all N neurons (N× the head of N=1); evaluation runs one per sample. A UDL
  step costs one no-grad backbone forward (D_val) and the head passes of steps 1–2 on top of a
  plain step (``bench/model_cost.py``); in the D_val pass only the neurons some sample selected
  carry a graph, which the second-order backward then traverses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from finegrain.models.backbones import Backbone
from finegrain.models.base import FineGrainModel, MetaContext, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import Options, parse_options

UPSTREAM = ("scoring", "gates")  # parameter names of u (METHODS.md); everything else is d
MIN_TIME = 4


def saturating_sigmoid(x: Tensor) -> Tensor:
    """satsig(x) = clamp(1.2·sigmoid(x) − 0.1, 0, 1) (Kaiser & Bengio 2018)."""
    return torch.clamp(1.2 * torch.sigmoid(x) - 0.1, 0.0, 1.0)


def improved_semhash(g: Tensor, batch: int, training: bool) -> Tensor:
    """Binary channel routing b from gate logits ``g`` (C,).

    Training: x = g + n, n ~ N(0, 1) per sample; per sample with probability 0.5 the
    straight-through hard bit 1[x > 0] (gradient of satsig), else satsig(x): ``(batch, C)``.
    Evaluation: 1[g > 0], no noise: ``(C,)``.
    """
    if not training:
        return (g > 0).to(g.dtype)
    x = g + torch.randn(batch, g.shape[0], dtype=g.dtype, device=g.device)
    soft = saturating_sigmoid(x)
    hard = (x > 0).to(x.dtype) + (soft - soft.detach())  # exactly binary, gradient of soft
    use_hard = torch.rand(batch, 1, device=g.device) < 0.5
    return torch.where(use_hard, hard, soft)


def _conv_on(conv: nn.Conv3d, x: Tensor, idx: Tensor) -> Tensor:
    """``conv`` on ``x`` with all input channels but ``idx`` zeroed, computing only ``idx``.

    A shape-preserving conv of a channel-masked input equals the conv restricted to the kept
    input channels; evaluation uses this so S_i and T_i each cost only their share of channels.
    """
    if idx.numel() == x.shape[1]:
        return conv(x)
    if idx.numel() == 0:
        return x.new_zeros(x.shape[0], conv.out_channels, *x.shape[2:])
    weight = conv.weight.index_select(1, idx)
    return F.conv3d(x.index_select(1, idx), weight, conv.bias, conv.stride, conv.padding)


class SpecializedNeuron(nn.Module):
    """The downstream part of neuron i: Z' = fuse(ReLU(BN(S(X_S))) + ReLU(BN(T(X_T)))) (Eqs. 4–8).

    With ``sts="conv3d"``: Z' = fuse(ReLU(BN(conv3×3×3(X)))).
    """

    def __init__(self, channels: int, sts: str) -> None:
        super().__init__()
        c = channels
        if sts == "conv3d":
            self.conv3d = nn.Conv3d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm3d(c)
        else:
            self.spatial = nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1), bias=False)
            self.bn_s = nn.BatchNorm3d(c)
            self.temporal = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0), bias=False)
            self.bn_t = nn.BatchNorm3d(c)
        self.fuse = nn.Conv3d(c, c, 1)

    def forward(self, x: Tensor, b: Tensor | None) -> Tensor:
        """``b``: routing, ``(C,)`` binary (all samples) or ``(B, C)`` per sample; None: conv3d."""
        if b is None:
            return self.fuse(F.relu(self.bn(self.conv3d(x))))
        if b.dim() == 1:  # one binary routing for all samples: run each op on its channels only
            z_s = _conv_on(self.spatial, x, (b == 0).nonzero().squeeze(1))
            z_t = _conv_on(self.temporal, x, b.nonzero().squeeze(1))
        else:
            b = b[:, :, None, None, None]
            z_s, z_t = self.spatial((1 - b) * x), self.temporal(b * x)
        return self.fuse(F.relu(self.bn_s(z_s)) + F.relu(self.bn_t(z_t)))


class DSTSLayer(nn.Module):
    """One DSTS layer: N specialized neurons and their upstream parameters.

    ``scoring`` stacks the kernels m_1..m_N, ``(N, C_out, C_in)``; ``gates`` the g_i, ``(N, C)``.
    """

    def __init__(
        self,
        channels: int,
        neurons: int,
        sts: str,
        synapse: str,
        impulse: str,
        tau: float,
        gate_init: str = "signed",
    ) -> None:
        super().__init__()
        self.impulse, self.tau = impulse, tau
        self.neurons = nn.ModuleList(SpecializedNeuron(channels, sts) for _ in range(neurons))
        self.scoring = self.gates = self.standardize = None
        if synapse == "gumbel":
            self.scoring = nn.Parameter(torch.empty(neurons, channels, channels))
            for m in self.scoring.data:  # as a 1×1×1 Conv3d's default init
                nn.init.kaiming_uniform_(m, a=math.sqrt(5))
            if impulse == "standardized":  # each neuron's impulse centred and scaled (batch)
                self.standardize = nn.BatchNorm1d(neurons, affine=False)
        if sts == "gates":
            if gate_init == "signed":  # METHODS.md revised: ±2, half the channels temporal
                sign = torch.randint(0, 2, (neurons, channels)).float() * 2 - 1
                self.gates = nn.Parameter(2.0 * sign)
            else:  # the old decision: logits near 0 (routing a coin flip under the noise)
                self.gates = nn.Parameter(0.01 * torch.randn(neurons, channels))
        if sts == "fixed_halves":  # b: first C//2 channels spatial, the rest temporal
            halves = (torch.arange(channels) >= channels // 2).float()
            self.register_buffer("halves", halves, persistent=False)
        self.sts = sts

    def impulses(self, x: Tensor) -> Tensor:
        """V ``(B, N)``: v_i = Σ_{c,t,h,w} m_i(X) (Eqs. 1–2) = (Σ_pos X)·(Σ_out m_i), one matmul;
        standardised across the batch (running statistics in evaluation, and for a batch of
        one) with ``impulse="standardized"``."""
        v = x.sum(dim=(2, 3, 4)) @ self.scoring.sum(dim=1).T
        if self.impulse == "mean":
            return v / x[0].numel()
        if self.standardize is not None:
            bn = self.standardize
            if self.training and v.shape[0] > 1:
                return bn(v)
            return F.batch_norm(v, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
        return v

    def routing(self, i: int, batch: int) -> Tensor | None:
        """b of neuron i: ``(batch, C)`` sampled (training, gates) or ``(C,)``; None for conv3d."""
        if self.sts == "gates":
            return improved_semhash(self.gates[i], batch, self.training)
        return self.halves if self.sts == "fixed_halves" else None

    def temporal_share(self) -> Tensor | None:
        """Per neuron, the share of channels routed to the temporal op (evaluation routing)."""
        if self.sts == "gates":
            return (self.gates.detach() > 0).float().mean(dim=1)
        if self.sts == "fixed_halves":
            return self.halves.mean().expand(len(self.neurons))
        return None

    def forward(self, x: Tensor, prune_unselected: bool = False) -> tuple[Tensor, Tensor | None]:
        """Z' of the layer and each sample's selected neuron ``(B,)`` (None for average_all).

        ``prune_unselected`` (training, UDL's D_val pass): neurons whose y_i is 0 for every
        sample run without a graph. Exact: the gradient to such a Z'_i and its parameters is
        y_i·∂ℓ/∂Z' = 0 (straight-through ``(0 − s) + s`` is exactly 0); Z'_i still enters y's
        straight-through gradient to the layer's input, as a value, and is not computed at all
        where y needs no gradient (u detached and an input without one: the first layer). UDL's
        second-order backward then skips those neurons' graphs (``bench/model_cost.py``).
        """
        batch = x.shape[0]
        if self.scoring is None:  # synapse="average_all": every neuron, outputs averaged
            z = sum(nrn(x, self.routing(i, batch)) for i, nrn in enumerate(self.neurons))
            return z / len(self.neurons), None
        v = self.impulses(x)
        if self.training:
            y = F.gumbel_softmax(v, tau=self.tau, hard=True)
            used = (y.detach() != 0).any(dim=0).tolist() if prune_unselected else None
            z = 0
            for i, nrn in enumerate(self.neurons):
                b = self.routing(i, batch)  # drawn for every neuron: the same random stream
                if used is None or used[i]:
                    out = nrn(x, b)
                elif y.requires_grad:  # only y's straight-through gradient needs Z'_i
                    with torch.no_grad():
                        out = nrn(x, b)
                else:  # nothing needs Z'_i (the first layer of a pass with u detached)
                    continue
                z = z + y[:, i, None, None, None, None] * out
            return z, y.detach().argmax(dim=1)
        selected = v.argmax(dim=1)
        groups = selected.unique()
        if len(groups) == 1:
            i = int(groups[0])
            return self.neurons[i](x, self.routing(i, batch)), selected
        z = None
        for i in groups.tolist():
            idx = (selected == i).nonzero().squeeze(1)
            out = self.neurons[i](x[idx], self.routing(i, len(idx)))
            z = x.new_empty(batch, *out.shape[1:]) if z is None else z
            z[idx] = out
        return z, selected


class DSTSHead(nn.Module):
    """L DSTS layers → X + Z'_L (skip connection) → GAP → dropout → linear."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        neurons: int,
        layers: int,
        sts: str,
        synapse: str,
        impulse: str,
        tau: float,
        gate_init: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DSTSLayer(channels, neurons, sts, synapse, impulse, tau, gate_init)
            for _ in range(layers)
        )
        self.classifier = ClassifierHead(channels, num_classes, dropout)

    def forward(
        self, x: Tensor, prune_unselected: bool = False
    ) -> tuple[Tensor, list[Tensor | None]]:
        z, selected = x, []
        for layer in self.layers:
            z, a = layer(z, prune_unselected)
            selected.append(a)
        return self.classifier(x + z), selected


class DSTS(FineGrainModel):
    """Backbone + :class:`DSTSHead`; with ``udl`` a training forward given ``meta`` runs UDL.

    Upstream parameters u: every layer's ``scoring`` and ``gates``; downstream d: the rest of the
    head (neurons' S, T, BN, fuse and the classifier). The backbone is trained in step 3 only.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        udl: bool,
        udl_alpha: str,
        udl_alpha_scale: float,
        udl_inner_lr: float,
        udl_outer_lr: float,
        **head_options,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DSTSHead(backbone.out_channels, num_classes, **head_options)
        self.udl, self.udl_alpha, self.udl_alpha_scale = udl, udl_alpha, udl_alpha_scale
        self.udl_inner_lr, self.udl_outer_lr = udl_inner_lr, udl_outer_lr
        self.extra_batches = 1 if udl else 0
        self.uses_run_optimizer = udl_alpha == "run"  # "fixed": u has its own SGD
        self._upstream_optimizer: torch.optim.Optimizer | None = None

    def features(self, clips: Tensor) -> Tensor:
        """The backbone's last stage X; DSTS's temporal operator needs T >= 4 (METHODS.md)."""
        return self._check_time(self.backbone(clips)[-1], clips)

    def _check_time(self, x: Tensor, clips: Tensor) -> Tensor:
        if x.shape[2] < MIN_TIME:
            raise ValueError(
                f"DSTS needs T >= {MIN_TIME} time steps in the backbone features, got T="
                f"{x.shape[2]} from {clips.shape[2]}-frame clips on {self.backbone.name!r}; "
                "feed more frames or build the backbone with keep_time=True (ResNet family)"
            )
        return x

    def forward(self, clips: Tensor, meta: MetaContext | None = None) -> ModelOutput:
        """With ``meta`` (training, UDL on): steps 1–2 of UDL on these clips' backbone features
        (detached) and on ``meta.extras[0]`` (D_val), then the head on the same features with
        the updated u — the trainer's backward of this output is step 3."""
        x = self.features(clips)
        if meta is not None and self.udl and self.training:
            self.udl_step(x.detach(), meta)
        logits, selected = self.head(x)
        return ModelOutput(logits=logits, diagnostics=self._diagnostics(selected))

    def _diagnostics(self, selected: list[Tensor | None]) -> dict[str, Tensor]:
        diag = {}
        for j, (layer, a) in enumerate(zip(self.head.layers, selected)):
            if a is not None:
                diag[f"dsts/layer{j}/selected"] = torch.bincount(a, minlength=len(layer.neurons))
                diag[f"dsts/layer{j}/selection"] = a.detach()  # per clip, for class-split plots
            share = layer.temporal_share()
            if share is not None:
                diag[f"dsts/layer{j}/temporal_share"] = share
        return diag

    # --- Upstream-Downstream Learning ----------------------------------------------------------
    def upstream_parameters(self) -> dict[str, nn.Parameter]:
        """u, keyed by name in ``self.head``."""
        return {n: p for n, p in self.head.named_parameters() if n.rsplit(".", 1)[-1] in UPSTREAM}

    def hook_parameters(self) -> list[nn.Parameter]:
        return list(self.upstream_parameters().values()) if self.udl else []

    def _stateless(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, **kwargs):
        """``module(x)`` with ``params`` swapped in and BatchNorm's running statistics untouched.

        Decision: the simulated passes are training passes, so BN normalises with batch
        statistics, but they must not move the running statistics (only step 3 does): each call
        gets its own copy of the buffers.
        """
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        return functional_call(module, {**params, **buffers}, (x,), kwargs)

    def udl_gradients(
        self, x: Tensor, labels: Tensor, val_x: Tensor, val_labels: Tensor, alpha: float
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """∇_u ℓ(û, d̂; D_val) (Eq. 10) on backbone features X of D_train and D_val.

        Step 1 (Eq. 9): d̂ = d − α ∇_d ℓ(u, d; D_train), keeping the graph so d̂ depends on u.
        Step 2: û is u detached, so the gradient reaches u only through d̂ (second order);
        neurons no D_val sample selected run off the graph (exact, see ``DSTSLayer.forward``).
        Returns the gradients (in ``upstream_parameters()`` order) and the two losses.
        """
        u = self.upstream_parameters()
        d = {n: p for n, p in self.head.named_parameters() if n not in u}
        logits, _ = self._stateless(self.head, {**u, **d}, x)
        loss = self.loss(ModelOutput(logits=logits), labels)
        grads = torch.autograd.grad(loss, list(d.values()), create_graph=True, allow_unused=True)
        d_hat = {n: p if g is None else p - alpha * g for (n, p), g in zip(d.items(), grads)}
        u_hat = {n: p.detach() for n, p in u.items()}
        val_logits, _ = self._stateless(self.head, {**u_hat, **d_hat}, val_x, prune_unselected=True)
        val_loss = self.loss(ModelOutput(logits=val_logits), val_labels)
        grads_u = torch.autograd.grad(val_loss, list(u.values()), allow_unused=True)
        # contiguous: the scoring kernels' gradient comes out of a sum as an expanded view, which
        # in-place all-reduce (gloo) rejects
        grads_u = [
            torch.zeros_like(p) if g is None else g.contiguous()
            for p, g in zip(u.values(), grads_u)
        ]
        return grads_u, loss.detach(), val_loss.detach()

    def upstream_optimizer(self) -> torch.optim.Optimizer:
        """``udl_alpha="fixed"``: u's own SGD at ``udl_outer_lr`` (the old decision), lazily."""
        if self._upstream_optimizer is None:
            params = list(self.upstream_parameters().values())
            self._upstream_optimizer = torch.optim.SGD(params, lr=self.udl_outer_lr)
        return self._upstream_optimizer

    def udl_step(self, x: Tensor, meta: MetaContext) -> None:
        """UDL steps 1–2 on D_train's features ``x`` (detached) and D_val; updates u only.

        α is the run's learning rate now (``udl_alpha="run"``, times ``udl_alpha_scale``) and u
        moves with the run's own optimizer (``meta.optimizer``); ``"fixed"``: α =
        ``udl_inner_lr`` and SGD at ``udl_outer_lr``. D_val's backbone features come from one
        no-grad pass that leaves BatchNorm's running statistics alone.
        """
        val_clips, val_labels = meta.extras[0]
        with torch.no_grad():
            val_x = self._check_time(self._stateless(self.backbone, {}, val_clips)[-1], val_clips)
        run = self.udl_alpha == "run" and meta.optimizer is not None
        alpha = meta.lr * self.udl_alpha_scale if run else self.udl_inner_lr
        grads, loss, val_loss = self.udl_gradients(x, meta.labels, val_x, val_labels, alpha)
        meta.reduce(grads)
        optimizer = meta.optimizer if run else self.upstream_optimizer()
        for p, g in zip(self.upstream_parameters().values(), grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        meta.stats.update(  # tensors: read once an epoch, not a wait for the device each step
            {
                "udl/train_loss": loss.detach(),
                "udl/val_loss": val_loss.detach(),
                "udl/grad_norm": norm.detach(),
                "udl/alpha": alpha,
            }
        )

    def hook_state_dict(self) -> dict:
        if self._upstream_optimizer is None:
            return {}
        return {"upstream_optimizer": self._upstream_optimizer.state_dict()}

    def load_hook_state_dict(self, state: dict) -> None:
        if "upstream_optimizer" in state:
            self.upstream_optimizer().load_state_dict(state["upstream_optimizer"])


class DSTSOptions(Options):
    """DSTS's options: the paper's defaults (N=10, L=3, τ=1, gates, Gumbel synapse, UDL) and the
    revised decisions of METHODS.md (standardized impulse, ±2 gates, one α from the run).

    ``impulse``: standardized | sum (the paper's Eq. 2) | mean. ``gate_init``: signed (±2) |
    small (0.01·randn). ``udl_alpha``: run (α = the run's current learning rate ×
    ``udl_alpha_scale``; u moved by the run's optimizer) | fixed (α = ``udl_inner_lr``, u by SGD
    at ``udl_outer_lr``: the old decision). Numbers accept ints, never bools or strings.
    """

    neurons: StrictInt = Field(10, ge=1)
    layers: StrictInt = Field(3, ge=1)
    sts: Literal["gates", "fixed_halves", "conv3d"] = "gates"
    synapse: Literal["gumbel", "average_all"] = "gumbel"
    impulse: Literal["standardized", "sum", "mean"] = "standardized"
    gate_init: Literal["signed", "small"] = "signed"
    udl: StrictBool = True
    udl_alpha: Literal["run", "fixed"] = "run"
    udl_alpha_scale: StrictFloat = Field(1.0, gt=0.0)
    tau: StrictFloat = Field(1.0, gt=0.0)
    udl_inner_lr: StrictFloat = Field(0.01, gt=0.0)
    udl_outer_lr: StrictFloat = Field(0.01, gt=0.0)
    dropout: StrictFloat = Field(0.5, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _udl_needs_upstream_parameters(self) -> DSTSOptions:
        if self.udl and self.synapse == "average_all" and self.sts != "gates":
            raise ValueError(
                f"udl=True needs upstream parameters (scoring kernels or gates), but "
                f"synapse='average_all' with sts={self.sts!r} has none; use udl=False"
            )
        return self


def build(
    num_classes: int, backbone: Backbone, options: DSTSOptions | None = None, **kwargs
) -> DSTS:
    """DSTS on ``backbone``; options as a :class:`DSTSOptions` or keyword arguments."""
    opts = options if options is not None else parse_options("dsts", DSTSOptions, kwargs)
    return DSTS(
        backbone,
        num_classes,
        udl=opts.udl,
        udl_alpha=opts.udl_alpha,
        udl_alpha_scale=opts.udl_alpha_scale,
        udl_inner_lr=opts.udl_inner_lr,
        udl_outer_lr=opts.udl_outer_lr,
        neurons=opts.neurons,
        layers=opts.layers,
        sts=opts.sts,
        synapse=opts.synapse,
        impulse=opts.impulse,
        tau=opts.tau,
        gate_init=opts.gate_init,
        dropout=opts.dropout,
    )
