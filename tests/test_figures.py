"""MLflow pictures: confusion matrix, per-class CSV, and the method diagnostics of real models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from finegrain.datasets.pipeline import to_model_input
from finegrain.models import build_model
from finegrain.platform import figures

NAMES = [
    "Moving [something] from left to right",
    "Moving [something] from right to left",
    "Dropping a crimson [something]",
    "Dropping a scarlet [something]",
]
GROUPS = {
    NAMES[0]: {"group": "slide-direction", "subtlety": "temporal"},
    NAMES[1]: {"group": "slide-direction", "subtlety": "temporal"},
    NAMES[2]: {"group": "shade", "subtlety": "spatial"},
    NAMES[3]: {"group": "shade", "subtlety": "spatial"},
}
EXPECTED = {
    "dsts": {"dsts_neuron_selection", "dsts_temporal_share"},
    "u2s": {"u2s_csm", "u2s_masks"},
    "dfb": {"dfb_max_response"},
    "joint_attn": {"joint_attn_attention"},
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    figures.close_all()


@pytest.fixture
def sample() -> dict:
    """Three uint8 clips (T=8, 32 px) as the data layer gives them, labels of the whole batch."""
    rng = np.random.default_rng(0)
    clips = (rng.random((3, 8, 32, 32, 3)) * 80).astype(np.uint8)
    for t in range(8):
        clips[:, t, 10:16, 3 * t : 3 * t + 6] = (230, 40, 40)
    labels = torch.tensor([0, 2, 3])
    return {"clips": torch.from_numpy(clips), "labels": labels, "all_labels": labels}


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def eval_diagnostics(method: str, clips: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = build_model(method, len(NAMES), "tiny")
    if method == "u2s":
        sums = torch.rand(len(NAMES), model.backbone.out_channels)
        topn = torch.arange(1, len(NAMES) + 1).float().clamp(max=len(NAMES))  # hits per top-n
        model.install_csm(sums, torch.ones(len(NAMES)), topn)
    model.eval()
    with torch.no_grad():
        return model(to_model_input(clips)).diagnostics


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_real_model_diagnostics_draw(method, sample):
    diagnostics = eval_diagnostics(method, sample["clips"])
    figs = figures.method_figures(method, diagnostics, sample, NAMES, GROUPS)
    assert set(figs) == EXPECTED[method]
    for fig in figs.values():
        assert fig.get_suptitle() or fig.axes[0].get_title()  # titled
        assert png_bytes(fig).startswith(b"\x89PNG")


@pytest.mark.parametrize("method", ["dfb", "joint_attn", "u2s"])
def test_low_precision_diagnostics_draw(method, sample):
    """Under bf16 autocast the diagnostics may be bf16: they still draw."""
    diagnostics = {
        k: v.bfloat16() if v.is_floating_point() else v
        for k, v in eval_diagnostics(method, sample["clips"]).items()
    }
    figs = figures.method_figures(method, diagnostics, sample, NAMES, {})
    assert set(figs) == EXPECTED[method]


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_missing_keys_give_no_figures(method, sample):
    assert (
        figures.method_figures(method, {"unrelated": torch.zeros(2)}, sample, NAMES, GROUPS) == {}
    )
    assert figures.method_figures(method, {}, sample, NAMES, GROUPS) == {}
    assert figures.method_figures(method, {"unrelated": 1}, {}, [], {}) == {}


def test_unknown_method_and_bad_shapes_do_not_raise(sample):
    assert figures.method_figures("onepass", {"x": torch.zeros(1)}, sample, NAMES, GROUPS) == {}
    bad = {"attention": torch.zeros(2, 4, 7)}  # no grid dimension
    assert figures.method_figures("joint_attn", bad, sample, NAMES, GROUPS) == {}


def test_frames_needed_for_dfb_boxes(sample):
    diagnostics = eval_diagnostics("dfb", sample["clips"])
    assert figures.method_figures("dfb", diagnostics, {"labels": sample["labels"]}, NAMES, {}) == {}
    # attention and masks still draw without frames
    att = eval_diagnostics("joint_attn", sample["clips"])
    assert set(figures.method_figures("joint_attn", att, {}, NAMES, {})) == EXPECTED["joint_attn"]


def test_u2s_stage_one_has_no_pictures(sample):
    torch.manual_seed(0)
    model = build_model("u2s", len(NAMES), "tiny").eval()  # no CSM yet: UN-only mode
    with torch.no_grad():
        diagnostics = model(to_model_input(sample["clips"])).diagnostics
    assert figures.method_figures("u2s", diagnostics, sample, NAMES, GROUPS) == {}


# --- DSTS split by the synthetic benchmark's class groups ----------------------------------------
def dsts_diagnostics(selection: list[int]) -> dict:
    sel = torch.tensor(selection)
    return {
        "dsts/layer0/selected": torch.bincount(sel, minlength=3),
        "dsts/layer0/selection": sel,
        "dsts/layer0/temporal_share": torch.tensor([0.2, 0.6, 0.8]),
    }


def bar_heights(ax) -> dict[tuple, list[float]]:
    """Bar heights in x order, keyed by face colour."""
    bars: dict[tuple, list[tuple[float, float]]] = {}
    for p in ax.patches:
        if isinstance(p, Rectangle):
            bars.setdefault(p.get_facecolor()[:3], []).append((p.get_x(), p.get_height()))
    return {c: [h for _, h in sorted(v)] for c, v in bars.items()}


def test_dsts_selection_split_by_subtlety():
    diagnostics = dsts_diagnostics([0, 0, 1, 2])
    labels = torch.tensor([2, 3, 0, 1])  # two spatial-subtle clips, then two temporal-subtle
    sample = {"labels": labels, "all_labels": labels}
    figs = figures.dsts_figures(diagnostics, sample, NAMES, GROUPS)
    sel_fig = figs["dsts_neuron_selection"]
    heights = sorted(bar_heights(sel_fig.axes[0]).values())
    assert heights == sorted([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # share within each group
    legend = [t.get_text() for t in sel_fig.legends[0].get_texts()]
    assert legend == ["spatial-subtle classes (2 clips)", "temporal-subtle classes (2 clips)"]
    # mean temporal share of the neurons each group went through: spatial 0.2, temporal 0.7
    assert figs["dsts_temporal_share"].axes[0].get_title() == "layer 0 (S 0.20 · T 0.70)"


def test_dsts_without_groups_or_labels_falls_back_to_counts():
    diagnostics = dsts_diagnostics([0, 0, 1, 2, 2, 2])
    cases = [
        ({"labels": torch.tensor([2, 3, 0, 1])}, GROUPS),  # labels of 4 clips, 6 selections
        ({"all_labels": torch.tensor([2, 3, 0, 1, 0, 0])}, {}),  # no class groups
    ]
    for sample, groups in cases:
        fig = figures.dsts_figures(diagnostics, sample, NAMES, groups)["dsts_neuron_selection"]
        (heights,) = bar_heights(fig.axes[0]).values()
        assert heights == pytest.approx([2 / 6, 1 / 6, 3 / 6])
        assert not fig.legends


def test_dsts_counts_only_and_share_only():
    counts = {"dsts/layer0/selected": torch.tensor([3, 1, 0]), "dsts/layer1/selected": [0, 4, 0]}
    figs = figures.dsts_figures(counts, {}, NAMES, GROUPS)
    assert set(figs) == {"dsts_neuron_selection"}
    assert len([ax for ax in figs["dsts_neuron_selection"].axes if ax.get_visible()]) == 2
    share = {"dsts/layer0/temporal_share": torch.tensor([0.5, 0.5])}
    assert set(figures.dsts_figures(share, {}, NAMES, GROUPS)) == {"dsts_temporal_share"}


# --- DFB boxes and JointAttn time mapping ---------------------------------------------------------
def test_dfb_box_in_pixels_on_the_frames_of_its_time_cell(sample):
    k = len(NAMES)
    thw = torch.zeros(3, k, 3, dtype=torch.long)
    thw[0, 0] = torch.tensor([1, 2, 3])  # true class of clip 0: time cell 1, row 2, column 3
    value = torch.zeros(3, k)
    value[0, 0] = 5.0  # also the strongest class: one box
    diagnostics = {
        "max_response_thw": thw,
        "max_response_filter": torch.zeros(3, k, dtype=torch.long),
        "max_response_value": value,
        "feature_stride": torch.tensor([2.0, 8.0, 8.0]),
    }
    sample = {**sample, "labels": torch.tensor([0, 1, 2])}
    fig = figures.dfb_figures(diagnostics, sample, NAMES, GROUPS)["dfb_max_response"]
    row = fig.axes[:4]  # clip 0
    assert [ax.get_title().split("\n")[0] for ax in row] == [
        "frames 0–1",
        "frames 2–3",
        "frames 4–5",
        "frames 6–7",
    ]
    boxes = [(i, p) for i, ax in enumerate(row) for p in ax.patches]
    assert len(boxes) == 1
    col, box = boxes[0]
    assert col == 1
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (23.5, 15.5, 8, 8)


def test_joint_attn_steps_spread_over_frames(sample):
    att = torch.softmax(torch.randn(3, 4, 5, 5).flatten(2), dim=2).view(3, 4, 5, 5)
    fig = figures.joint_attn_figures({"attention": att}, sample, NAMES, {})["joint_attn_attention"]
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == [f"step {t} · frame {2 * t}" for t in range(4)]


# --- confusion matrix and per-class table ---------------------------------------------------------
def test_confusion_matrix_png():
    cm = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 4]])
    fig = figures.confusion_matrix(cm, NAMES)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3", "1", "2", "1", "4"])
    assert len(ax.get_xticklabels()) == len(NAMES)
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_per_class_csv():
    text = figures.per_class_csv(["a", "b, with comma"], [0.5, 1.0])
    assert text.splitlines() == ["index,class,accuracy", '0,"a",0.5000', '1,"b, with comma",1.0000']
