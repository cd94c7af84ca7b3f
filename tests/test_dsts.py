"""DSTS (METHODS.md): shapes, the synapse and gates, evaluation grouping, UDL and its hook."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from finegrain.models import build_model, method_options
from finegrain.models import dsts as dsts_module
from finegrain.models.backbones import tiny
from finegrain.models.base import TrainingStage, trainable_parameters
from finegrain.models.dsts import DSTSLayer, improved_semhash, saturating_sigmoid


def _clips(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)


def _tiny_dsts(**options):
    options = {"neurons": 3, "layers": 2, "dropout": 0.0, **options}
    return build_model("dsts", 5, "tiny", width=4, **options)


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
    """With impulse="mean": summed impulses differ by 10^3-10^4 between neurons, so the Gumbel
    softmax is one-hot to float precision and its straight-through gradient underflows to 0."""
    torch.manual_seed(0)
    model = _tiny_dsts(impulse="mean").train()
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
    if model.extra_batches:
        model.meta_step((clips, labels), [_clips(seed=1)], lambda grads: None)
    out = model(clips)
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
        3, tiny(width=1), neurons=2, layers=2, impulse="mean", dropout=0.0, udl_inner_lr=alpha
    ).double()
    model.train()
    head = model.head
    x, val_x = torch.randn(2, 5, 8, 4, 2, 2, dtype=torch.float64)
    labels, val_labels = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([2, 2, 1, 0, 1])

    grads, _, _ = model.udl_gradients(x, labels, val_x, val_labels)

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


def test_meta_step_changes_u_and_only_u():
    torch.manual_seed(0)
    model = _tiny_dsts(impulse="mean").train()
    upstream = {f"head.{n}" for n in model.upstream_parameters()}
    assert upstream == {f"head.layers.{j}.{p}" for j in range(2) for p in ("scoring", "gates")}
    assert {id(p) for p in model.hook_parameters()} == {
        id(p) for p in model.upstream_parameters().values()
    }
    main = {id(p) for p in trainable_parameters(model, TrainingStage("train"))}
    assert main.isdisjoint(id(p) for p in model.hook_parameters())
    assert model.extra_batches == 1

    before = {k: v.clone() for k, v in model.state_dict().items()}  # buffers included
    reduced = []
    logs = model.meta_step(_clips(seed=0), [_clips(seed=1)], lambda grads: reduced.append(grads))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == upstream
    assert [g.shape for g in reduced[0]] == [p.shape for p in model.hook_parameters()]
    assert all(g.is_contiguous() for g in reduced[0])  # all_reduce works in place on them
    assert set(logs) == {"udl/train_loss", "udl/val_loss", "udl/grad_norm"}
    assert all(p.grad is None for p in model.hook_parameters())

    state = model.hook_state_dict()
    other = _tiny_dsts(impulse="mean")
    other.load_hook_state_dict(state)
    assert other.hook_state_dict() == state


def test_meta_step_reduces_before_stepping():
    """``reduce`` averages across ranks in place; the step must use what it leaves."""
    torch.manual_seed(0)
    model = _tiny_dsts(impulse="mean", udl_outer_lr=1.0).train()
    before = [p.detach().clone() for p in model.hook_parameters()]

    def fake_reduce(grads):
        for g in grads:
            g.fill_(0.5)

    model.meta_step(_clips(seed=0), [_clips(seed=1)], fake_reduce)
    for p, p0 in zip(model.hook_parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 0.5)


def test_without_udl_the_main_optimizer_trains_u():
    model = _tiny_dsts(udl=False)
    assert model.extra_batches == 0 and model.hook_parameters() == []
    assert model.meta_step(_clips(), [_clips(seed=1)], lambda grads: None) == {}
    assert model.hook_state_dict() == {}


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
        "impulse": "sum",
        "udl": True,
        "tau": 1.0,
        "udl_inner_lr": 0.01,
        "udl_outer_lr": 0.01,
        "dropout": 0.5,
    }
    with pytest.raises(ValueError, match="unknown option.*'experts'.*valid:.*neurons"):
        build_model("dsts", 5, "tiny", experts=3)
    bad = [
        ({"neurons": 0}, "neurons must be an int >= 1"),
        ({"layers": 2.0}, "layers must be an int >= 1"),
        ({"sts": "gate"}, "sts must be one of gates, fixed_halves, conv3d"),
        ({"synapse": "softmax"}, "synapse must be one of gumbel, average_all"),
        ({"impulse": "max"}, "impulse must be one of sum, mean"),
        ({"udl": "on"}, "udl must be True or False"),
        ({"tau": 0}, "tau must be a number > 0"),
        ({"udl_inner_lr": -1.0}, "udl_inner_lr must be a number > 0"),
        ({"udl_outer_lr": "x"}, "udl_outer_lr must be a number > 0"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"synapse": "average_all", "sts": "conv3d"}, "udl=True needs upstream parameters"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            build_model("dsts", 5, "tiny", width=4, **options)
