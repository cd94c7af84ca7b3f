"""Models: backbones with stage access, the one-pass baseline and the five methods.

The registry: each method is a package ``finegrain/models/<method>/`` whose ``SPEC``
(:class:`~finegrain.models.spec.MethodSpec`) holds its options, builder, search space, ablation
suite and pictures. A method is registered by the module path of that package, imported only when
the method is used. ``build_model(method, num_classes, backbone="tiny", **options)`` is the one
entry point; :func:`register` adds a method (a seventh one needs no other edit).
"""

from __future__ import annotations

import importlib
import os

from finegrain.models.backbones import BACKBONES, Backbone, build_backbone
from finegrain.models.base import FineGrainModel, ModelOutput, TrainingStage
from finegrain.models.spec import MethodSpec, parse_options

METHODS: dict[str, str] = {}  # method name -> the module that defines its SPEC
BASELINE = "onepass"  # the row every comparison is made against
BACKBONE_OPTIONS = ("weights", "keep_time", "width")

__all__ = [
    "BACKBONES",
    "BASELINE",
    "METHODS",
    "Backbone",
    "FineGrainModel",
    "MethodSpec",
    "ModelOutput",
    "TrainingStage",
    "build_backbone",
    "build_model",
    "extra_batches",
    "method_options",
    "method_spec",
    "register",
]


ENV = "FINEGRAIN_METHODS"  # methods registered at run time: "name=module,..." (see register)


def register(name: str, module: str) -> None:
    """Register method ``name``, whose ``SPEC`` lives in ``module`` (imported on first use).

    A method registered at run time (outside this file) is also written to ``$FINEGRAIN_METHODS``,
    which processes started later inherit and the cluster passes to every Ray worker, so a trainer
    or a trial on another process finds it too (``module`` must be importable there).
    """
    if not name.isidentifier() or not module:
        raise ValueError(f"register({name!r}, {module!r}): a method name is an identifier")
    METHODS[name] = module
    if module != f"{__name__}.{name}":
        added = dict(item.split("=", 1) for item in os.environ.get(ENV, "").split(",") if item)
        os.environ[ENV] = ",".join(f"{k}={v}" for k, v in {**added, name: module}.items())


register("onepass", "finegrain.models.onepass")
register("dsts", "finegrain.models.dsts")
register("u2s", "finegrain.models.u2s")
register("dfb", "finegrain.models.dfb")
register("classreg", "finegrain.models.classreg")
register("joint_attn", "finegrain.models.joint_attn")
for _item in filter(None, os.environ.get(ENV, "").split(",")):  # registered by a parent process
    register(*_item.split("=", 1))


def method_spec(method: str) -> MethodSpec:
    """The registered method's :class:`MethodSpec`; unknown → ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    spec = importlib.import_module(METHODS[method]).SPEC
    if spec.name != method:
        raise ValueError(f"{METHODS[method]}.SPEC is named {spec.name!r}, registered as {method!r}")
    return spec


def method_options(method: str) -> dict[str, object]:
    """The options ``method`` accepts, with their defaults."""
    return method_spec(method).defaults()


def extra_batches(method: str, **options) -> int:
    """The ``extra_batches`` a ``method`` model built with ``options`` has, without building it
    (``MethodSpec.extra_batches``; options validated as :func:`build_model` does)."""
    spec = method_spec(method)
    if spec.extra_batches is None:
        return 0
    method_opts = {k: v for k, v in options.items() if k not in BACKBONE_OPTIONS}
    return int(spec.extra_batches(parse_options(method, spec.options, method_opts)))


def build_model(method: str, num_classes: int, backbone: str = "tiny", **options) -> FineGrainModel:
    """Build ``method`` on ``backbone`` for ``num_classes`` classes.

    Backbone options (``weights=PATH``, ``keep_time``, ``width``) go to the backbone; the rest are
    the method's options, validated by its ``Options``. Unknown method, backbone or option →
    ``ValueError`` listing the valid ones.
    """
    spec = method_spec(method)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    bb_opts = {k: options.pop(k) for k in BACKBONE_OPTIONS if k in options}
    opts = parse_options(method, spec.options, options)
    net = build_backbone(backbone, **bb_opts)
    if spec.needs_stages and not net.has_stages:
        raise ValueError(
            f"method {method!r} needs CNN stages that backbone {backbone!r} does not have; "
            f"{backbone!r} serves only methods that read the final tokens "
            f"({', '.join(m for m in METHODS if not method_spec(m).needs_stages)})"
        )
    return spec.build(num_classes, net, opts)
