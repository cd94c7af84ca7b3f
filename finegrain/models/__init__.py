"""Models: backbones with stage access, the one-pass baseline and the five methods.

``build_model(method, num_classes, backbone="tiny", **options)`` is the one entry point. Each
method lives in its own module, which defines ``build(num_classes, backbone, **options)``; the
keyword arguments of that function are the method's options (ablation switches included).
"""

from __future__ import annotations

import importlib
import inspect

from finegrain.models.backbones import BACKBONES, Backbone, build_backbone
from finegrain.models.base import FineGrainModel, ModelOutput, TrainingStage

METHODS = {
    "onepass": "finegrain.models.onepass",
    "dsts": "finegrain.models.dsts",
    "u2s": "finegrain.models.u2s",
    "dfb": "finegrain.models.dfb",
    "classreg": "finegrain.models.classreg",
    "joint_attn": "finegrain.models.joint_attn",
}
BACKBONE_OPTIONS = ("weights", "keep_time", "width")

__all__ = [
    "BACKBONES",
    "METHODS",
    "Backbone",
    "FineGrainModel",
    "ModelOutput",
    "TrainingStage",
    "build_backbone",
    "build_model",
    "method_options",
]


def method_options(method: str) -> dict[str, object]:
    """The options ``method`` accepts, with their defaults."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    build = importlib.import_module(METHODS[method]).build
    params = list(inspect.signature(build).parameters.values())[2:]  # after num_classes, backbone
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def build_model(method: str, num_classes: int, backbone: str = "tiny", **options) -> FineGrainModel:
    """Build ``method`` on ``backbone`` for ``num_classes`` classes.

    Backbone options (``weights=PATH``, ``keep_time``, ``width``) go to the backbone; the rest to
    the method. Unknown method, backbone or option → ``ValueError`` listing the valid ones.
    """
    valid = method_options(method)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    unknown = sorted(set(options) - set(valid) - set(BACKBONE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; valid: "
            f"{', '.join(sorted(valid)) or '(none)'}; backbone options: {', '.join(BACKBONE_OPTIONS)}"
        )
    bb_opts = {k: options.pop(k) for k in BACKBONE_OPTIONS if k in options}
    net = build_backbone(backbone, **bb_opts)
    net.check_method(method)
    return importlib.import_module(METHODS[method]).build(num_classes, net, **options)
