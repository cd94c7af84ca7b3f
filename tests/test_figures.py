"""MLflow pictures: confusion matrix, per-class CSV, and the method diagnostics of real models."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from finegrain.datasets.pipeline import to_model_input
from finegrain.models import build_model, method_spec
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


def texts(fig) -> list[Text]:
    """Every visible, non-empty text of the drawn figure (ticks, titles, legends, captions)."""
    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def whole_words(label: str, names) -> bool:
    """``label`` (wrapped, maybe with its index last) is one of ``names`` with every word whole."""
    words = re.sub(r"\s*\(\d+\)$", "", label).split()
    return any(words == n.split() for n in names)


def assert_publication_quality(fig) -> None:
    """Saved at >= 150 dpi, titled, no text under 9 pt, horizontal untruncated tick labels."""
    assert fig.dpi >= 150
    png = png_bytes(fig)
    assert png.startswith(b"\x89PNG")
    assert int.from_bytes(png[16:20], "big") >= fig.get_figwidth() * 150 - 1  # pixels wide
    assert fig.get_suptitle()
    small = [(t.get_text(), t.get_fontsize()) for t in texts(fig) if t.get_fontsize() < 9]
    assert not small
    for ax in fig.axes:
        for lbl in ax.get_xticklabels() + ax.get_yticklabels():
            assert "…" not in lbl.get_text()
            if lbl.get_text():
                assert lbl.get_rotation() == 0, lbl.get_text()
    # the panels' titles stay inside the picture and clear of each other (long ones ran into
    # their neighbours: "...temporal-subtle 0.56spatial-subtle 0.53...")
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    boxes = [
        (ax.title.get_text(), ax.title.get_window_extent(renderer))
        for ax in fig.axes
        if ax.title.get_text()
    ]
    for text, box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, text
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), (a, b)


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
        assert_publication_quality(fig)
        for t in texts(fig):  # class names in full: the row headings of the frame pictures
            if t.get_text().startswith("clip "):
                flat = " ".join(t.get_text().split())
                assert any(n in flat for n in NAMES) or flat.endswith("?")


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
def dsts_diagnostics(selection: list[int], layers: int = 1) -> dict:
    sel = torch.tensor(selection)
    return {
        f"dsts/layer{j}/{key}": value
        for j in range(layers)
        for key, value in {
            "selected": torch.bincount(sel, minlength=3),
            "selection": sel,
            "temporal_share": torch.tensor([0.2, 0.6, 0.8]),
        }.items()
    }


def bar_heights(ax) -> dict[tuple, list[float]]:
    """Bar heights in x order, keyed by face colour."""
    bars: dict[tuple, list[tuple[float, float]]] = {}
    for p in ax.patches:
        if isinstance(p, Rectangle):
            bars.setdefault(p.get_facecolor()[:3], []).append((p.get_x(), p.get_height()))
    return {c: [h for _, h in sorted(v)] for c, v in bars.items()}


def test_dsts_selection_split_by_subtlety():
    diagnostics = dsts_diagnostics([0, 0, 1, 2], layers=4)  # panels side by side (the demo's L)
    labels = torch.tensor([2, 3, 0, 1])  # two spatial-subtle clips, then two temporal-subtle
    sample = {"labels": labels, "all_labels": labels}
    figs = method_spec("dsts").draw(diagnostics, sample, NAMES, GROUPS)
    sel_fig = figs["dsts_neuron_selection"]
    heights = sorted(bar_heights(sel_fig.axes[0]).values())
    assert heights == sorted([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # share within each group
    legend = [t.get_text() for t in sel_fig.legends[0].get_texts()]
    assert legend == ["spatial-subtle classes (2 clips)", "temporal-subtle classes (2 clips)"]
    # mean temporal share of the neurons each group went through: spatial 0.2, temporal 0.7
    ax = figs["dsts_temporal_share"].axes[0]
    assert ax.get_title() == "layer 0\nspatial 0.20 · temporal 0.70"
    assert not ax.texts  # nothing drawn over the bars
    means = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label().startswith("mean")}
    assert [ln.get_ydata()[0] for ln in means.values()] == pytest.approx([0.2, 0.7])
    assert len({ln.get_linestyle() for ln in means.values()}) == 2  # told apart when they meet
    for fig in figs.values():
        assert_publication_quality(fig)
        assert "b = 1[g > 0]" not in fig.get_suptitle()  # notation lives in the caption


def test_dsts_equal_means_stay_readable():
    """Both groups through neurons of the same share: two line styles, both values named."""
    diagnostics = dsts_diagnostics([1, 1, 1, 1])
    labels = torch.tensor([2, 3, 0, 1])
    sample = {"labels": labels, "all_labels": labels}
    fig = method_spec("dsts").draw(diagnostics, sample, NAMES, GROUPS)["dsts_temporal_share"]
    ax = fig.axes[0]
    assert ax.get_title().endswith("spatial 0.60 · temporal 0.60")
    styles = [ln.get_linestyle() for ln in ax.get_lines() if ln.get_label().startswith("mean")]
    assert len(set(styles)) == 2
    assert any("b = 1[g > 0]" in t.get_text() for t in fig.texts)  # caption


def test_dsts_without_groups_or_labels_falls_back_to_counts():
    diagnostics = dsts_diagnostics([0, 0, 1, 2, 2, 2])
    cases = [
        ({"labels": torch.tensor([2, 3, 0, 1])}, GROUPS),  # labels of 4 clips, 6 selections
        ({"all_labels": torch.tensor([2, 3, 0, 1, 0, 0])}, {}),  # no class groups
    ]
    for sample, groups in cases:
        fig = method_spec("dsts").draw(diagnostics, sample, NAMES, groups)["dsts_neuron_selection"]
        (heights,) = bar_heights(fig.axes[0]).values()
        assert heights == pytest.approx([2 / 6, 1 / 6, 3 / 6])
        assert not fig.legends


def test_dsts_counts_only_and_share_only():
    counts = {"dsts/layer0/selected": torch.tensor([3, 1, 0]), "dsts/layer1/selected": [0, 4, 0]}
    figs = method_spec("dsts").draw(counts, {}, NAMES, GROUPS)
    assert set(figs) == {"dsts_neuron_selection"}
    assert len([ax for ax in figs["dsts_neuron_selection"].axes if ax.get_visible()]) == 2
    share = {"dsts/layer0/temporal_share": torch.tensor([0.5, 0.5])}
    assert set(method_spec("dsts").draw(share, {}, NAMES, GROUPS)) == {"dsts_temporal_share"}


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
    fig = method_spec("dfb").draw(diagnostics, sample, NAMES, GROUPS)["dfb_max_response"]
    row = [ax for ax in fig.axes if ax.images][:4]  # clip 0
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
    assert box.get_edgecolor()[:3] == (1.0, 0.0, 1.0)  # magenta: not a colour of the content
    assert box.get_path_effects()  # with a black outline stroke
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["true class", "strongest other class"]  # clip 1's strongest: class 0
    assert_publication_quality(fig)


def test_joint_attn_steps_spread_over_frames(sample):
    att = torch.softmax(torch.randn(3, 4, 5, 5).flatten(2), dim=2).view(3, 4, 5, 5)
    fig = method_spec("joint_attn").draw({"attention": att}, sample, NAMES, {})[
        "joint_attn_attention"
    ]
    titles = [ax.get_title() for ax in fig.axes if ax.images][:4]
    assert titles == [f"step {t} · frame {2 * t}" for t in range(4)]


# --- confusion matrix and per-class table ---------------------------------------------------------
def outlines(ax) -> list[tuple[int, int]]:
    """(row, column) of the outlined same-group cells."""
    return sorted(
        (round(p.get_y() + 0.5), round(p.get_x() + 0.5))
        for p in ax.patches
        if p.get_gid() == "same-group"
    )


def test_confusion_matrix_png():
    cm = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 4]])
    fig = figures.confusion_matrix(cm, NAMES)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3", "1", "2", "1", "4"])
    assert len(ax.get_xticklabels()) == len(NAMES)
    assert all(whole_words(t.get_text(), NAMES) for t in ax.get_yticklabels())
    assert not outlines(ax) and not fig.legends
    assert_publication_quality(fig)


def test_confusion_matrix_marks_same_group_pairs():
    cm = np.eye(4, dtype=int) * 5
    fig = figures.confusion_matrix(cm, NAMES, GROUPS)
    ax = fig.axes[0]
    same = [(i, j) for i, a in enumerate(NAMES) for j, b in enumerate(NAMES)]
    same = [
        (i, j) for i, j in same if i != j and GROUPS[NAMES[i]]["group"] == GROUPS[NAMES[j]]["group"]
    ]
    assert outlines(ax) == sorted(same) == [(0, 1), (1, 0), (2, 3), (3, 2)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["same fine-grained group"]
    assert_publication_quality(fig)


def test_large_confusion_matrix_stays_legible():
    """Too many classes for counts: none printed, the caption says so; names wrapped, whole."""
    words = "Pretending to put [something] next to [something] on a surface".split()
    names = [" ".join(words[: 4 + i % 7]) + f" {i}" for i in range(40)]
    groups = {n: {"group": f"g{i // 2}", "subtlety": "spatial"} for i, n in enumerate(names)}
    cm = np.eye(40, dtype=int) * 7 + 1
    fig = figures.confusion_matrix(cm, names, groups)
    ax = fig.axes[0]
    assert not ax.texts  # no counts in the cells
    assert any("counts not shown" in t.get_text() for t in fig.texts)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 40 and all(whole_words(lbl, names) for lbl in labels)
    assert len(outlines(ax)) == 40  # 20 groups of 2: 2 ordered pairs each
    assert_publication_quality(fig)
    huge = figures.confusion_matrix(np.eye(174, dtype=int), [f"c{i}" for i in range(174)])
    assert all(t.get_text().isdigit() for t in huge.axes[0].get_xticklabels())  # indices
    assert huge.get_figwidth() < 20  # about 3000 px wide at 150 dpi
    assert_publication_quality(huge)


def test_u2s_csm_names_whole(sample):
    diagnostics = eval_diagnostics("u2s", sample["clips"])
    fig = method_spec("u2s").draw(diagnostics, sample, NAMES, GROUPS)["u2s_csm"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == len(NAMES) and all(whole_words(lbl, NAMES) for lbl in labels)


def test_per_class_csv():
    text = figures.per_class_csv(["a", "b, with comma"], [0.5, 1.0])
    assert text.splitlines() == [
        "index,class,accuracy_pct",
        '0,"a",50.00',
        '1,"b, with comma",100.00',
    ]


# --- a sweep's Optuna pictures, at the same standard ---------------------------------------------
def test_sweep_pictures_name_every_setting_in_full_at_9_pt(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from finegrain.platform.tune import sweep_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = tmp_path / "optuna.db"
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{storage}", direction="maximize"
    )
    space = {
        "model.udl_alpha_scale": FloatDistribution(0.3, 3.0, log=True),
        "optim.weight_decay": FloatDistribution(0.001, 0.1, log=True),
    }
    for k, values in enumerate([(0.5, 0.01), (1.5, 0.03), (2.5, 0.002)]):
        params = dict(zip(space, values, strict=True))
        study.add_trial(create_trial(params=params, distributions=space, value=30.0 + 7 * k))
    figs = sweep_figures(storage, "s")
    assert set(figs) == {"parallel_coordinates", "param_importances"}
    for fig in figs.values():
        assert fig.dpi >= 150 and fig.get_suptitle()
        assert not [(t.get_text(), t.get_fontsize()) for t in texts(fig) if t.get_fontsize() < 9]
        labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
        labels += [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
        assert not [t for t in labels if t.endswith("...")]  # Optuna cuts long names
        assert "model.udl_alpha_scale" in labels and "Objective Value" not in labels
        assert png_bytes(fig).startswith(b"\x89PNG")
