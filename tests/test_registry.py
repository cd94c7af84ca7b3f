"""Every registered method, the timm way: one parametrised test over the registry (build,
forward, backward, eval determinism, options round trip, its search space at both ends, its
suite's configs); and a seventh method, registered from a temporary module, that the platform
validates, trains, tunes and ablates with no other edit."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from helpers import TINY_RUN
from mlflow.tracking import MlflowClient

import finegrain.models as models
from finegrain.models import METHODS, build_model, method_options, method_spec
from finegrain.platform.config import ConfigError, apply_params, load_config
from finegrain.platform.tune import _corner, check_space, default_space

TINY = [*TINY_RUN, "scaling.workers=1", "scaling.cpus_per_worker=0.5", "data.decode_cpus=0.5"]


def _clips(batch: int = 2, frames: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0))


def _model(method: str, num_classes: int = 4):
    torch.manual_seed(0)
    return build_model(method, num_classes, "tiny", width=4)  # 8 frames: T = 4 in the last stage


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_runs_forward_and_backward_on_its_defaults(method):
    model = _model(method)
    model.train()
    clips, labels = _clips(4), torch.tensor([0, 1, 2, 3])
    output = model(clips)
    assert output.logits.shape == (4, 4) and torch.isfinite(output.logits).all()
    loss = model.loss(output, labels)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_deterministic_in_evaluation(method):
    model = _model(method).eval()
    clips = _clips()
    with torch.no_grad():
        first, second = model(clips).logits, model(clips).logits
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_options_round_trip_and_unknown_ones_fail_naming_them(method):
    spec = method_spec(method)
    defaults = method_options(method)
    assert spec.options(**defaults).model_dump() == spec.options().model_dump()
    cfg = load_config("tune_synthetic", [f"model.method={method}"])
    resolved = cfg.resolved()["model"]
    assert {k: resolved[k] for k in defaults} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()
    }
    with pytest.raises(ConfigError, match=f"model.bogus: not an option of method '{method}'"):
        load_config("tune_synthetic", [f"model.method={method}", "model.bogus=1"])
    with pytest.raises(ValueError, match="bogus: not an option"):
        build_model(method, 4, "tiny", width=4, bogus=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_space_validates_at_both_ends_and_its_suite_configs_validate(method):
    spec = method_spec(method)
    space = check_space(default_space(method))
    assert list(space)[: len(spec.space)] == list(spec.space)  # the method's keys first
    base = load_config("tune_synthetic", [f"model.method={method}"]).model_dump(mode="json")
    for end in (0, 1):
        apply_params(base, _corner(space, end))  # raises ConfigError naming a bad field
    if spec.suite is not None:
        from finegrain.platform import ablate

        assert ablate.get_suite(spec.suite.name) is spec.suite
        suite_base = ablate.load_base(spec.suite)
        for v in spec.suite.variants:
            ablate.variant_config(suite_base, spec.suite, v, seed=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_spec_says_the_extra_batches_its_model_draws(method):
    """A worker plans the run's data stream (one sampler per batch a step draws) from the spec
    before it builds the model: the spec and the built model agree, at every corner of the
    method's search space (DSTS: UDL on and off)."""
    space = check_space(default_space(method))
    for end in (0, 1):
        corner = {k.removeprefix("model."): v for k, v in _corner(space, end).items()}
        options = {k: v for k, v in corner.items() if k in method_options(method)}
        torch.manual_seed(0)
        model = build_model(method, 12, "tiny", width=4, **options)  # 12: the benchmark's K
        assert models.extra_batches(method, width=4, **options) == model.extra_batches, options


def test_an_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: onepass, dsts"):
        build_model("nope", 4)
    with pytest.raises(ConfigError, match="model.method: 'nope' is not a method; valid: onepass"):
        load_config("synthetic", ["model.method=nope"])


# --- a seventh method, registered from a temporary module -----------------------------------
TOY = '''
"""A seventh method for the registry test: the baseline with a fixed logit scale."""
from pydantic import Field

from finegrain.models.base import FineGrainModel, ModelOutput
from finegrain.models.heads import ClassifierHead
from finegrain.models.spec import MethodSpec, Options, Suite, variant


class ToyOptions(Options):
    scale: float = Field(1.0, gt=0, le=10)


class Toy(FineGrainModel):
    def __init__(self, backbone, num_classes, scale):
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, 0.0)
        self.scale = scale

    def forward(self, clips):
        return ModelOutput(logits=self.scale * self.head(self.backbone(clips)[-1]))


def build(num_classes, backbone, options):
    return Toy(backbone, num_classes, options.scale)


SPEC = MethodSpec(
    name="toy",
    title="toy (scaled one-pass)",
    options=ToyOptions,
    build=build,
    needs_stages=False,
    space={"model.scale": {"type": "uniform", "low": 0.5, "high": 2.0}},
    suite=Suite("toy", "toy", "the toy's one ablation", (variant("half", {"model.scale": 0.5}, "scale 0.5", "-"),)),
)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    # Ray's workers import it too: they inherit PYTHONPATH and $FINEGRAIN_METHODS
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    monkeypatch.setenv(models.ENV, "")
    models.register("toy", "toy_method")
    yield "toy"
    del models.METHODS["toy"]
    sys.modules.pop("toy_method", None)


@pytest.mark.slow
def test_a_seventh_method_registered_elsewhere_validates_trains_tunes_and_ablates(toy, tmp_path):
    import ray

    from finegrain.platform import ablate, cluster
    from finegrain.platform.tune import run_sweep

    with pytest.raises(ConfigError, match="model.scale: Input should be greater than 0"):
        load_config("tune_synthetic", ["model.method=toy", "model.scale=0"])
    assert "toy" in [v.name for v in ablate.get_suite("methods").variants]
    base = load_config(
        "tune_synthetic", [*TINY, "model.method=toy", f"run.dir={tmp_path / 'runs'}"]
    )
    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(num_cpus=2)
    try:
        sweep = run_sweep(
            base,
            space=default_space("toy"),
            num_samples=1,
            max_concurrent=1,
            name="toy",
            baseline=False,
        )
        suite = ablate.run_suite(
            "toy",
            ablate.load_base("toy", None, [*TINY, f"run.dir={tmp_path / 'runs'}"]),
            seeds=[0],
            max_concurrent=1,
        )
    finally:
        ray.shutdown()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    trials = client.search_runs(
        [client.get_experiment_by_name(base.tracking.experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'",
    )
    assert [r.info.status for r in trials] == ["FINISHED"]
    assert trials[0].data.params["model.method"] == "toy"
    assert 0.5 <= float(trials[0].data.params["model.scale"]) <= 2.0
    assert suite.failed == [] and suite.table["variant"].tolist() == ["half"]
    assert suite.table["n"].tolist() == [1]
