"""DSTS (Li et al., ECCV 2022): its model, options, search space, ablation suite and pictures."""

from finegrain.models.dsts.model import (
    DSTS,
    DSTSHead,
    DSTSLayer,
    DSTSOptions,
    SpecializedNeuron,
    build,
    improved_semhash,
    saturating_sigmoid,
)
from finegrain.models.spec import MethodSpec, Suite, variant

__all__ = [
    "DSTS",
    "SPEC",
    "DSTSHead",
    "DSTSLayer",
    "DSTSOptions",
    "SpecializedNeuron",
    "build",
    "improved_semhash",
    "saturating_sigmoid",
]

ONEPASS = {"model.method": "onepass"}

SPEC = MethodSpec(
    name="dsts",
    title="DSTS",
    options=DSTSOptions,
    build=build,
    needs_stages=False,  # works on the final tokens: one-stage backbones (MViT) serve it
    extra_batches=lambda options: int(options.udl),  # UDL's D_val batch (DSTS.extra_batches)
    space={
        "model.neurons": {"type": "int", "low": 2, "high": 16},
        "model.layers": {"type": "int", "low": 1, "high": 5},
        "model.tau": {"type": "loguniform", "low": 0.25, "high": 4.0},
        "model.udl": {"type": "choice", "values": [True, False]},
        # the simulated step's size relative to the run's rate (1: the paper's one α); only
        # sampled when UDL is on
        "model.udl_alpha_scale": {
            "type": "loguniform",
            "low": 0.3,
            "high": 3.0,
            "when": {"model.udl": True},
        },
    },
    suite=Suite(
        "dsts",
        "dsts",
        "DSTS Tables 3–7 (STS, synapse mechanism, UDL, N, L)",
        (
            variant("onepass", ONEPASS, "Baseline (one-pass)", "4"),
            variant("full", {}, "DSTS (w/ STS, w/ synapse, w/ UDL; N=10, L=3)", "3–7"),
            variant("conv3d", {"model.sts": "conv3d"}, "DSTS w/o STS (3D conv)", "3"),
            variant("fixed_halves", {"model.sts": "fixed_halves"}, "DSTS w/o Gates", "3"),
            variant("average_all", {"model.synapse": "average_all"}, "w/o Synapse Mechanism", "4"),
            variant("no_udl", {"model.udl": False}, "DSTS w/o UDL", "5"),
            variant("n5", {"model.neurons": 5}, "N = 5", "6"),
            variant("n15", {"model.neurons": 15}, "N = 15", "6"),
            variant("l1", {"model.layers": 1}, "L = 1", "7"),
            variant("l5", {"model.layers": 5}, "L = 5", "7"),
            # the decisions METHODS.md revised, each back to its old value
            variant("impulse_sum", {"model.impulse": "sum"}, "raw impulse sum (Eq. 2)", "rev."),
            variant("gates_small", {"model.gate_init": "small"}, "gate logits 0.01·randn", "rev."),
            variant(
                "udl_fixed",
                {"model.udl_alpha": "fixed"},
                "UDL with α = 0.01 and a separate SGD for u",
                "rev.",
            ),
        ),
    ),
    figures="finegrain.models.dsts.figures:draw",
    mechanisms="finegrain.models.dsts.mechanisms:score",
)
