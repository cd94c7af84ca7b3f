"""DSTS (METHODS.md): shapes, the synapse and gates, evaluation grouping, UDL and its hook."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_clips
from torch.func import functional_call
from torch.nn import functional as F

from finegrain.models import build_model, method_options
from finegrain.models.backbones import tiny
from finegrain.models.base import MetaContext, TrainingStage, trainable_parameters
from finegrain.models.dsts import DSTSLayer, improved_semhash, saturating_sigmoid
from finegrain.models.dsts import model as dsts_module


def _clips(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)


def _tiny_dsts(**options):
    options = {"neurons": 3, "layers": 2, "dropout": 0.0, **options}
    return build_model("dsts", 5, "tiny", width=4, **options)


def _meta(labels, extras, reduce=lambda grads: None, lr=0.01, optimizer=None) -> MetaContext:
    return MetaContext(labels=labels, extras=extras, reduce=reduce, lr=lr, optimizer=optimizer)


def _randomise_batchnorm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize(
    ("backbone", "options"),
    [("tiny", {"width": 4}), ("r3d_18", {"keep_time": True, "neurons": 2, "layers": 1})],
)
def test_output_shapes_and_diagnostics(backbone, options):
    torch.manual_seed(0)
    model = build_model("dsts", 5, backbone, **options)
    n, layers = options.get("neurons", 10), options.get("layers", 3)
    clips = torch.randn(2, 3, 8, 32, 32)
    for train in (True, False):
        model.train(train)
        out = model(clips)
        assert out.logits.shape == (2, 5)
        assert out.aux_losses == {}
        for j in range(layers):
            selected = out.diagnostics[f"dsts/layer{j}/selected"]
            assert selected.shape == (n,) and selected.sum() == 2
            share = out.diagnostics[f"dsts/layer{j}/temporal_share"]
            assert share.shape == (n,) and ((share >= 0) & (share <= 1)).all()
        assert not any(v.requires_grad for v in out.diagnostics.values())


def test_eval_is_deterministic_and_training_is_noisy():
    torch.manual_seed(0)
    model = _tiny_dsts().eval()  # dropout 0: the noise is the synapse's and the gates'
    clips, _ = _clips()
    with torch.no_grad():
        assert torch.equal(model(clips).logits, model(clips).logits)
        model.train()
        assert not torch.equal(model(clips).logits, model(clips).logits)


def test_every_scoring_kernel_and_gate_gets_a_gradient():
    """Standardized impulses (the default) keep the Gumbel softmax soft enough that its
    straight-through gradient reaches every scoring kernel."""
    torch.manual_seed(0)
    model = _tiny_dsts().train()
    clips, labels = _clips(batch=8)
    out = model(clips)
    model.loss(out, labels).backward()
    for j, layer in enumerate(model.head.layers):
        assert (layer.scoring.grad.flatten(1).abs().sum(1) > 0).all()  # every m_i, via y_soft
        assert layer.gates.grad is not None
        # a neuron's gates act through Z'_i · y_i, so they move where the neuron was selected
        picked = out.diagnostics[f"dsts/layer{j}/selected"] > 0
        assert picked.sum() >= 2
        assert (layer.gates.grad[picked].abs().sum(1) > 0).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("impulse", ["sum", "mean"])
def test_impulse_matmul_equals_per_neuron_conv_and_sum(impulse):
    """Eqs. 1–2: v_i = Σ_{c,t,h,w} m_i(X) with m_i a 1×1×1 conv, for all i in one matmul."""
    torch.manual_seed(0)
    layer = DSTSLayer(6, 3, "gates", "gumbel", impulse, 1.0).double()
    x = torch.randn(2, 6, 4, 3, 5, dtype=torch.float64)
    explicit = torch.stack(
        [F.conv3d(x, m[:, :, None, None, None]).sum(dim=(1, 2, 3, 4)) for m in layer.scoring],
        dim=1,
    )
    if impulse == "mean":
        explicit = explicit / (6 * 4 * 3 * 5)
    torch.testing.assert_close(layer.impulses(x), explicit)


def test_semhash_is_binary_in_eval_and_straight_through_in_training():
    g = torch.randn(16, dtype=torch.float64, requires_grad=True)
    b = improved_semhash(g, 3, training=False)
    assert b.shape == (16,) and torch.equal(b, (g > 0).double())

    torch.manual_seed(0)
    b = improved_semhash(g, 64, training=True)
    torch.manual_seed(0)
    x = (g.detach() + torch.randn(64, 16, dtype=torch.float64)).requires_grad_()
    soft = saturating_sigmoid(x)
    hard_rows = ((b == 0) | (b == 1)).all(dim=1) & ~torch.isclose(b, soft).all(dim=1)
    assert 10 < hard_rows.sum() < 54  # about half the samples take the hard bit
    assert torch.equal(b[hard_rows], (x[hard_rows] > 0).double())
    torch.testing.assert_close(b[~hard_rows], soft[~hard_rows])
    # the gradient of both the hard (straight-through) and the soft rows is satsig's
    w = torch.randn(64, 16, dtype=torch.float64)
    (grad_g,) = torch.autograd.grad(b, g, grad_outputs=w)
    (grad_x,) = torch.autograd.grad(soft, x, grad_outputs=w)
    torch.testing.assert_close(grad_g, grad_x.sum(dim=0))


def test_eval_groups_the_batch_by_neuron_and_equals_the_one_hot_mixture():
    torch.manual_seed(0)
    layer = DSTSLayer(8, 4, "gates", "gumbel", "sum", 1.0)
    _randomise_batchnorm(layer)
    layer.eval()
    x = torch.randn(16, 8, 4, 3, 3)
    calls = []
    for i, neuron in enumerate(layer.neurons):
        neuron.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    with torch.no_grad():
        z, selected = layer(x)
        assert len(selected.unique()) >= 2
        assert sorted(calls) == sorted(
            (int(i), int((selected == i).sum())) for i in selected.unique()
        )
        one_hot = F.one_hot(layer.impulses(x).argmax(1), 4).float()
        mixture = sum(
            one_hot[:, i, None, None, None, None] * neuron(x, layer.routing(i, 16))
            for i, neuron in enumerate(layer.neurons)
        )
    torch.testing.assert_close(z, mixture)


def test_channel_split_equals_masking():
    """Evaluation runs S_i / T_i on their own channels only; same result as Eqs. 4–7's masks."""
    torch.manual_seed(0)
    layer = DSTSLayer(8, 1, "gates", "gumbel", "sum", 1.0)
    _randomise_batchnorm(layer)
    neuron = layer.neurons[0].eval()
    x = torch.randn(3, 8, 4, 3, 3)
    for b in (torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0]), torch.zeros(8), torch.ones(8)):
        with torch.no_grad():
            torch.testing.assert_close(neuron(x, b), neuron(x, b.expand(3, 8)))


@pytest.mark.parametrize(
    "options",
    [
        {"synapse": "average_all", "udl": False},
        {"synapse": "average_all", "sts": "conv3d", "udl": False},
        {"sts": "fixed_halves"},
        {"sts": "conv3d"},
        {"synapse": "average_all"},  # gates are upstream parameters, so UDL has work to do
    ],
)
def test_ablation_variants_run(options):
    torch.manual_seed(0)
    model = _tiny_dsts(**options)
    clips, labels = _clips()
    model.train()
    meta = _meta(labels, [_clips(seed=1)]) if model.extra_batches else None
    out = model(clips, meta=meta)
    model.loss(out, labels).backward()
    model.eval()
    with torch.no_grad():
        assert model(clips).logits.shape == (4, 5)
    if options.get("synapse") == "average_all":
        assert "dsts/layer0/selected" not in out.diagnostics
    if options.get("sts") == "conv3d":
        assert "dsts/layer0/temporal_share" not in out.diagnostics
    if options.get("sts") == "fixed_halves":
        assert torch.equal(out.diagnostics["dsts/layer0/temporal_share"], torch.full((3,), 0.5))
    names = set(model.upstream_parameters())
    assert all(n.endswith(("scoring", "gates")) for n in names)


def test_udl_gradient_matches_finite_differences(monkeypatch):
    """∇_u ℓ(û, d̂(u); D_val) of Eqs. 9–10 against central differences, float64.

    The Gumbel synapse and the semhash gates are piecewise constant in u (their gradients are
    straight-through estimates), so for this check they are replaced by their smooth noiseless
    relaxations, softmax(V/τ) and satsig(g): then the finite difference is defined.
    """
    monkeypatch.setattr(dsts_module.F, "gumbel_softmax", lambda v, tau, hard: (v / tau).softmax(-1))
    monkeypatch.setattr(
        dsts_module,
        "improved_semhash",
        lambda g, batch, training: saturating_sigmoid(g).expand(batch, -1),
    )
    torch.manual_seed(0)
    alpha = 0.5
    model = dsts_module.build(
        3, tiny(width=1), neurons=2, layers=2, impulse="mean", dropout=0.0
    ).double()
    model.train()
    head = model.head
    x, val_x = torch.randn(2, 5, 8, 4, 2, 2, dtype=torch.float64)
    labels, val_labels = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([2, 2, 1, 0, 1])

    grads, _, _ = model.udl_gradients(x, labels, val_x, val_labels, alpha)

    u0 = {n: p.detach().clone() for n, p in model.upstream_parameters().items()}
    d = {n: p for n, p in head.named_parameters() if n not in u0}

    def val_loss_after_simulated_step(u: dict[str, torch.Tensor]) -> float:
        loss = F.cross_entropy(functional_call(head, {**u, **d}, (x,))[0], labels)
        step = torch.autograd.grad(loss, list(d.values()))
        d_hat = {n: p - alpha * g for (n, p), g in zip(d.items(), step)}
        return F.cross_entropy(
            functional_call(head, {**u0, **d_hat}, (val_x,))[0], val_labels
        ).item()

    assert all(g.abs().sum() > 0 for g in grads)  # both scoring kernels and gates
    eps = 1e-6
    for _ in range(4):
        r = {n: torch.randn_like(p) for n, p in u0.items()}
        plus = val_loss_after_simulated_step({n: u0[n] + eps * r[n] for n in u0})
        minus = val_loss_after_simulated_step({n: u0[n] - eps * r[n] for n in u0})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * r[n]).sum() for g, n in zip(grads, u0)).item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_a_udl_forward_moves_u_only_then_runs_the_head_on_the_same_features():
    """Steps 1–2 run inside the training forward on the backbone features it computes anyway:
    u moves (by the run's optimizer), d and the backbone do not, and D_val's backbone pass
    leaves the backbone's BatchNorm statistics alone."""
    import copy

    torch.manual_seed(0)
    model = _tiny_dsts().train()
    upstream = {f"head.{n}" for n in model.upstream_parameters()}
    assert upstream == {f"head.layers.{j}.{p}" for j in range(2) for p in ("scoring", "gates")}
    assert {id(p) for p in model.hook_parameters()} == {
        id(p) for p in model.upstream_parameters().values()
    }
    main = {id(p) for p in trainable_parameters(model, TrainingStage("train"))}
    assert main.isdisjoint(id(p) for p in model.hook_parameters())
    assert model.extra_batches == 1

    plain = copy.deepcopy(model)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.AdamW(model.hook_parameters(), lr=0.01)
    reduced = []
    clips, labels = _clips(seed=0)
    meta = _meta(labels, [_clips(seed=1)], reduce=reduced.append, optimizer=optimizer)
    torch.manual_seed(1)
    model(clips, meta=meta)
    torch.manual_seed(1)
    plain(clips)
    moved = {k for k in before if not torch.equal(before[k], params[k].detach())}
    assert moved == upstream
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in backbone.items())
    assert [g.shape for g in reduced[0]] == [p.shape for p in model.hook_parameters()]
    assert all(g.is_contiguous() for g in reduced[0])  # all_reduce works in place on them
    assert set(meta.stats) == {"udl/train_loss", "udl/val_loss", "udl/grad_norm", "udl/alpha"}
    assert meta.stats["udl/alpha"] == pytest.approx(0.01)  # α is the run's learning rate
    assert all(p.grad is None for p in model.hook_parameters())


def test_the_udl_step_uses_what_reduce_leaves_and_the_runs_optimizer():
    """``reduce`` averages across ranks in place; the step must use what it leaves."""
    torch.manual_seed(0)
    model = _tiny_dsts().train()
    before = [p.detach().clone() for p in model.hook_parameters()]

    def fake_reduce(grads):
        for g in grads:
            g.fill_(0.5)

    clips, labels = _clips(seed=0)
    sgd = torch.optim.SGD(model.hook_parameters(), lr=1.0)
    model(clips, meta=_meta(labels, [_clips(seed=1)], fake_reduce, lr=1.0, optimizer=sgd))
    for p, p0 in zip(model.hook_parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 0.5)
    # the old decision: its own SGD at udl_outer_lr, whatever the run's optimizer
    fixed = _tiny_dsts(udl_alpha="fixed", udl_outer_lr=2.0).train()
    before = [p.detach().clone() for p in fixed.hook_parameters()]
    fixed(clips, meta=_meta(labels, [_clips(seed=1)], fake_reduce, optimizer=sgd))
    for p, p0 in zip(fixed.hook_parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 1.0)
    state = fixed.hook_state_dict()
    other = _tiny_dsts(udl_alpha="fixed")
    other.load_hook_state_dict(state)
    assert other.hook_state_dict() == state


@pytest.mark.parametrize("mode", ["run", "fixed"])
def test_the_trainer_makes_an_optimizer_for_u_only_when_the_udl_step_uses_it(
    mode, monkeypatch, tmp_path
):
    """``udl_alpha="fixed"`` moves u with its own SGD: the trainer makes no optimizer and no
    schedule for u (one nobody steps only had its schedule advanced, and torch warned
    "lr_scheduler.step() before optimizer.step()" in every such run). Either way the main
    optimizer never trains u, and a step and the epoch's schedule steps warn of nothing."""
    import warnings

    from finegrain.platform import stages as stages_module
    from finegrain.platform.config import load_config
    from finegrain.platform.stages import Stages
    from finegrain.platform.worker import Worker

    monkeypatch.setattr(stages_module.ray.train.torch, "prepare_model", lambda m, **kw: m)
    cfg = load_config("synthetic", ["model.method=dsts", "model.weights=null"])
    model = _tiny_dsts(udl_alpha=mode).train()
    stages = Stages(Worker(cfg, {}, 0, 1, torch.device("cpu"), tmp_path, None), model)
    stages.enter(0, lambda: [])
    u = {id(p) for p in model.hook_parameters()}
    main = {id(p) for group in stages.optimizer.param_groups for p in group["params"]}
    assert u and not u & main
    if mode == "fixed":
        assert stages.hook_optimizer is None and stages.hook_scheduler is None
    else:
        groups = stages.hook_optimizer.param_groups
        assert {id(p) for group in groups for p in group["params"]} == u
    clips, labels = _clips(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = _meta(labels, [_clips(seed=1)], optimizer=stages.hook_optimizer)
        stages.optimizer.zero_grad()
        model.loss(model(clips, meta=meta), labels).backward()
        stages.optimizer.step()
        stages.scheduler.step()
        if stages.hook_scheduler:
            stages.hook_scheduler.step()
    assert meta.stats["udl/alpha"] == pytest.approx(0.01)


def test_without_udl_the_main_optimizer_trains_u():
    model = _tiny_dsts(udl=False)
    assert model.extra_batches == 0 and model.hook_parameters() == []
    clips, labels = _clips()
    meta = _meta(labels, [_clips(seed=1)])
    model.train()(clips, meta=meta)
    assert meta.stats == {} and model.hook_state_dict() == {}


def test_gates_start_at_plus_or_minus_two_so_training_noise_perturbs_routing():
    torch.manual_seed(0)
    gates = _tiny_dsts().head.layers[0].gates.detach()
    assert set(gates.abs().unique().tolist()) == {2.0}
    share = (gates > 0).float().mean().item()
    assert 0.3 < share < 0.7  # about half the channels start temporal
    small = _tiny_dsts(gate_init="small").head.layers[0].gates.detach()
    assert small.abs().max() < 0.1  # the old decision: a coin flip under N(0, 1) noise


def test_too_few_time_steps_is_a_clear_error():
    model = _tiny_dsts()
    with pytest.raises(ValueError, match="T >= 4.*got T=2 from 4-frame clips.*keep_time=True"):
        model(torch.randn(1, 3, 4, 32, 32))


def test_options_and_validation():
    assert method_options("dsts") == {
        "neurons": 10,
        "layers": 3,
        "sts": "gates",
        "synapse": "gumbel",
        "impulse": "standardized",
        "gate_init": "signed",
        "udl": True,
        "udl_alpha": "run",
        "udl_alpha_scale": 1.0,
        "tau": 1.0,
        "udl_inner_lr": 0.01,
        "udl_outer_lr": 0.01,
        "dropout": 0.5,
    }
    with pytest.raises(
        ValueError, match="experts: not an option of method 'dsts'; valid:.*neurons"
    ):
        build_model("dsts", 5, "tiny", experts=3)
    bad = [
        ({"neurons": 0}, "neurons: Input should be greater than or equal to 1"),
        ({"neurons": True}, "neurons: Input should be a valid integer"),
        ({"layers": 2.0}, "layers: Input should be a valid integer"),
        ({"sts": "gate"}, "sts: Input should be 'gates', 'fixed_halves' or 'conv3d'"),
        ({"synapse": "softmax"}, "synapse: Input should be 'gumbel' or 'average_all'"),
        ({"impulse": "max"}, "impulse: Input should be 'standardized', 'sum' or 'mean'"),
        ({"gate_init": "zeros"}, "gate_init: Input should be 'signed' or 'small'"),
        ({"udl_alpha": "sgd"}, "udl_alpha: Input should be 'run' or 'fixed'"),
        ({"udl": "on"}, "udl: Input should be a valid boolean"),
        ({"udl": 1}, "udl: Input should be a valid boolean"),
        ({"tau": 0}, "tau: Input should be greater than 0"),
        ({"tau": True}, "tau: Input should be a valid number"),
        ({"udl_alpha_scale": 0}, "udl_alpha_scale: Input should be greater than 0"),
        ({"udl_inner_lr": -1.0}, "udl_inner_lr: Input should be greater than 0"),
        ({"udl_outer_lr": "x"}, "udl_outer_lr: Input should be a valid number"),
        ({"dropout": 1.0}, "dropout: Input should be less than 1"),
        ({"synapse": "average_all", "sts": "conv3d"}, "udl=True needs upstream parameters"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            build_model("dsts", 5, "tiny", width=4, **options)
    model = build_model("dsts", 5, "tiny", width=4, tau=2, layers=1)  # numbers accept ints
    assert type(model.head.layers[0].tau) is float and model.head.layers[0].tau == 2.0


# --- behaviour on real clips of the synthetic benchmark (METHODS.md, revised) ---------------


def _train_steps(model, steps: int, per_step: int = 8, **adamw):
    x, y = synthetic_clips(per_class=2, classes=12, size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, **adamw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:per_step]
        loss = model.loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x, y, g


@pytest.mark.parametrize("impulse", ["standardized", "sum"])
def test_after_20_adamw_steps_routing_still_learns_and_spreads_only_when_standardized(impulse):
    """The paper's raw impulse sum has a sample-independent offset that AdamW grows until the
    Gumbel choice is one-hot: the scoring kernels get exactly zero gradient and one neuron takes
    every clip. Standardized impulses keep learning and spread the clips over the neurons."""
    torch.manual_seed(0)
    model = build_model(
        "dsts", 12, "tiny", width=8, neurons=4, layers=2, udl=False, impulse=impulse, dropout=0.0
    ).train()
    x, y, g = _train_steps(model, 20)
    idx = torch.randperm(len(y), generator=g)[:8]
    model.zero_grad()
    model.loss(model(x[idx]), y[idx]).backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
    for j, layer in enumerate(model.head.layers):
        kernels_learn = bool((layer.scoring.grad.flatten(1).abs().sum(1) > 0).all())
        used = int((out.diagnostics[f"dsts/layer{j}/selected"] > 0).sum())
        if impulse == "standardized":
            assert kernels_learn and used >= 2, (j, used)
        else:  # the failure the revision fixes, as measured
            assert not kernels_learn and used == 1, (j, used)


def test_udl_with_the_runs_optimizer_moves_u_over_ten_times_more_than_the_old_sgd():
    """One α from the run and u moved by the run's optimizer (AdamW here) vs the old decision:
    SGD at 0.01 on a meta-gradient already scaled by α = 0.01 barely moved the gates."""
    import copy

    x, y = synthetic_clips(per_class=2, classes=12, size=32)
    torch.manual_seed(0)
    base = build_model("dsts", 12, "tiny", width=8, neurons=4, layers=2, dropout=0.0).train()
    moved = {}
    for mode in ("run", "fixed"):
        model = copy.deepcopy(base)
        model.udl_alpha = mode
        u0 = [p.detach().clone() for p in model.hook_parameters()]
        opt = torch.optim.AdamW(model.hook_parameters(), lr=3e-3, weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        for step in range(5):
            i, j = (torch.randperm(len(y), generator=g)[:8] for _ in range(2))
            torch.manual_seed(step)
            model(x[i], meta=_meta(y[i], [(x[j], y[j])], lr=3e-3, optimizer=opt))
        moved[mode] = sum(
            (p.detach() - p0).norm() ** 2 for p, p0 in zip(model.hook_parameters(), u0)
        ).sqrt()
    assert moved["run"] > 10 * moved["fixed"], moved


def test_the_d_val_pass_prunes_unselected_neurons_without_changing_the_meta_gradient(monkeypatch):
    """UDL's D_val pass runs neurons that no sample selected off the graph: ∇_u is the same as
    with every neuron on the graph (float64, real hard Gumbel and semhash noise, three layers,
    so the straight-through gradient through later layers' impulses is covered)."""
    torch.manual_seed(0)
    model = _tiny_dsts(neurons=4, layers=3).double()
    model.train()
    x, val_x = torch.randn(2, 2, model.backbone.out_channels, 4, 3, 3, dtype=torch.float64)
    labels, val_labels = torch.tensor([0, 3]), torch.tensor([4, 1])
    pruned = []
    forward = DSTSLayer.forward

    def spy(layer, z, prune_unselected=False):
        out, chosen = forward(layer, z, prune_unselected)
        if prune_unselected:
            pruned.append(len(layer.neurons) - len(chosen.unique()))
        return out, chosen

    monkeypatch.setattr(DSTSLayer, "forward", spy)
    state = torch.get_rng_state()
    grads, loss, val_loss = model.udl_gradients(x, labels, val_x, val_labels, alpha=0.5)
    assert len(pruned) == 3 and all(n >= 2 for n in pruned)  # 2 samples choose ≤ 2 of 4

    stateless = model._stateless
    monkeypatch.setattr(
        model, "_stateless", lambda module, params, x, **kw: stateless(module, params, x)
    )
    torch.set_rng_state(state)
    reference, ref_loss, ref_val_loss = model.udl_gradients(x, labels, val_x, val_labels, alpha=0.5)
    assert len(pruned) == 3  # the reference pruned nothing
    assert loss == ref_loss and val_loss == ref_val_loss
    assert all(g.abs().sum() > 0 for g in reference)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
