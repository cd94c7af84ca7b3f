"""JointAttn (Wu et al. 2016): its model, options, search space, ablation suite and pictures."""

from finegrain.models.joint_attn.model import (
    CALIBRATED_LAM,
    PAPER_GRID,
    DeepSupervisionHead,
    JointAttn,
    JointAttnOptions,
    JointLSTMCell,
    LevelBranch,
    attention_regularization,
    build,
    pyramid_pool,
)
from finegrain.models.spec import MethodSpec, Suite, variant

__all__ = [
    "CALIBRATED_LAM",
    "PAPER_GRID",
    "SPEC",
    "DeepSupervisionHead",
    "JointAttn",
    "JointAttnOptions",
    "JointLSTMCell",
    "LevelBranch",
    "attention_regularization",
    "build",
    "pyramid_pool",
]

SPEC = MethodSpec(
    name="joint_attn",
    title="JointAttn",
    options=JointAttnOptions,
    build=build,
    needs_stages=True,
    space={
        "model.lam": {"type": "loguniform", "low": 2.0, "high": 200.0},  # around the calibrated 15
        "model.hidden": {"type": "choice", "values": [128, 256, 512]},
        "model.fusion": {"type": "choice", "values": ["early", "late"]},
    },
    suite=Suite(
        "joint_attn",
        "joint_attn",
        "JointAttn Table 4 (early vs late fusion) and the attention regularization",
        (
            variant("full", {}, "late fusion, w/ attention reg. (λ calibrated: 15)", "4"),
            variant("early", {"model.fusion": "early"}, "early fusion", "4"),
            variant(
                "no_attention_reg",
                {"model.attention_reg": False},
                "late fusion, w/o attention reg.",
                "—",
            ),
            variant(
                "paper_lam",
                {"model.lam": 1000.0, "model.reg_detach": False, "model.lam_warmup_epochs": 0},
                "the paper's λ = 1000 into the backbone, no warm-up",
                "rev.",
            ),
            variant("votes", {"model.predict": "votes"}, "prediction by votes (§3.5)", "—"),
        ),
    ),
    figures="finegrain.models.joint_attn.figures:draw",
    mechanisms="finegrain.models.joint_attn.mechanisms:score",
    mechanisms_need_evidence=True,
)
