"""Class Regularization (Stergiou et al.): its model, options, search space and ablation suite
(no pictures)."""

from finegrain.models.classreg.model import (
    DEFAULT_GAMMA,
    ClassReg,
    ClassRegBlock,
    ClassRegOptions,
    build,
    excitation_weights,
)
from finegrain.models.spec import MethodSpec, Suite, variant

__all__ = [
    "DEFAULT_GAMMA",
    "SPEC",
    "ClassReg",
    "ClassRegBlock",
    "ClassRegOptions",
    "build",
    "excitation_weights",
]

SPEC = MethodSpec(
    name="classreg",
    title="ClassReg",
    options=ClassRegOptions,
    build=build,
    needs_stages=True,  # a block after each of the last CNN stages
    space={f"model.gamma.{i}": {"type": "uniform", "low": 0.0, "high": 0.6} for i in range(4)},
    suite=Suite(
        "classreg",
        "classreg",
        "ClassReg on/off and the affection rate γ",
        (
            variant("off", {"model.stages": 0}, "w/o Class Regularization (one-pass)", "—"),
            variant("full", {}, "ClassReg, γ = 0.1, 0.2, 0.3, 0.4 (grows with depth)", "—"),
            variant("gamma_0.1", {"model.gamma": 0.1}, "ClassReg, γ = 0.1 at every stage", "—"),
            variant("gamma_0.4", {"model.gamma": 0.4}, "ClassReg, γ = 0.4 at every stage", "—"),
            variant("no_warmup", {"model.gamma_warmup_epochs": 0}, "γ without warm-up", "rev."),
            variant("all_stages", {"model.min_channels": 0}, "blocks on every stage", "rev."),
        ),
    ),
    figures=None,
    mechanisms="finegrain.models.classreg.mechanisms:score",
)
