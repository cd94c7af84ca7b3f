"""Pictures and tables logged to MLflow: confusion matrix, per-class accuracy, method diagnostics.

Method diagnostics pictures (one function per method, from ``ModelOutput.diagnostics`` of the
first validation batch, model in eval mode): DSTS neuron-selection histogram and temporal-gate
share per neuron (split by the synthetic benchmark's spatial/temporal classes), U2S CSM heatmap
and masks, DFB max-response boxes on a few frames, JointAttn attention overlays.

``sample`` is ``{"clips": uint8 (b, T, H, W, 3), "labels": (b,)}`` for the first b <= 4 clips of
that batch (the cropped model input), optionally with ``"all_labels"``: the labels of the whole
batch, aligned with per-sample diagnostics. Every function returns ``{name: Figure}`` and skips
(never raises on) a picture whose diagnostics are missing.

Publication style: every figure is made at ``DPI`` (the resolution it is saved at), has a
plain-language title (``suptitle``) and, below the panels, a caption with the notation; no text
is smaller than ``TEXT_PT``, labels are horizontal and class names are wrapped between words,
never shortened.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections import Counter
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as pe  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

SUBTLETY_COLOURS = {"spatial": "tab:blue", "temporal": "tab:orange", "other": "tab:gray"}
DPI = 150  # dots per inch: figures are made (and so saved) at this resolution
TITLE_PT = 11  # figure titles
TEXT_PT = 9  # every other text: the smallest print in any picture
LINE_IN = TEXT_PT * 1.3 / 72  # height of a line of TEXT_PT text, inches
CHAR_IN = TEXT_PT * 0.6 / 72  # width of an average character of TEXT_PT text (generous), inches
PANEL = 1.8  # inches per image panel
MAX_SAMPLES = 2  # clips shown in the frame pictures
MAX_COLUMNS = 4  # time steps shown per clip
MAX_TICK_LABELS = 60  # beyond this many classes a heatmap shows indices, not names
MAX_COUNT_CLASSES = 30  # beyond this many classes the confusion matrix has no counts in its cells
GROUP_EDGE = "darkorange"  # outline of same-group cells (not in the "Blues" colour map)
TRUE_BOX, STRONGEST_BOX = "magenta", "cyan"  # DFB boxes, outlined in black: rare in videos
BOX_OUTLINE = [pe.Stroke(linewidth=4, foreground="black"), pe.Normal()]
DSTS_KEY = re.compile(r"dsts/layer(\d+)/(\w+)")


def close_all() -> None:
    plt.close("all")


def per_class_csv(names: Sequence[str], per_class) -> str:
    buf = io.StringIO()
    buf.write("index,class,accuracy\n")
    for i, (n, a) in enumerate(zip(names, np.asarray(per_class, dtype=float))):
        buf.write(f'{i},"{n}",{a:.4f}\n')
    return buf.getvalue()


def confusion_matrix(confusion, names: Sequence[str], class_groups: dict | None = None):
    """The validation confusion matrix: colour row-normalised, counts in the cells (up to
    ``MAX_COUNT_CLASSES`` classes), and with ``class_groups`` (name → ``{"group": ...}``) the
    off-diagonal cells of two classes of the same fine-grained group outlined."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = cm.shape[0]
    counts = k <= MAX_COUNT_CLASSES
    digits = len(str(int(cm.max()))) if cm.size else 1
    min_cell = max(digits * CHAR_IN + 0.12, min(0.6, 5 / max(k, 1))) if counts else 0.2
    labels, cell = _heatmap_layout(k, names, min_cell, 26 if counts else 44)
    fig, ax = _heatmap_figure(k, labels, cell)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    _heatmap_ticks(ax, k, labels, cell)
    ax.set_xlabel("predicted class (index)", fontsize=TEXT_PT + 1)
    ax.set_ylabel("true class", fontsize=TEXT_PT + 1)
    if counts:
        for i, j in zip(*np.nonzero(cm)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=TEXT_PT, color=color)
    pairs = _same_group_pairs(names, class_groups or {}, k)
    width = min(2.0, max(0.8, 0.06 * cell * 72))
    for i, j in pairs:
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                fill=False,
                edgecolor=GROUP_EDGE,
                linewidth=width,
                gid="same-group",
            )
        )
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the true class's clips")
    _title(fig, "Validation confusion matrix")
    caption = "Rows: true class, columns: predicted class; colour: share of each true class's "
    caption += "clips (rows sum to 1)"
    caption += (
        "; numbers: clip counts."
        if counts
        else f"; counts not shown: {k} classes are too many to print them legibly."
    )
    if labels is None:
        caption += " Class indices as in eval/per_class_accuracy.csv."
    handles = []
    if pairs:
        caption += " Outlined: two different classes of the same fine-grained group."
        handles = [_outline("same fine-grained group", GROUP_EDGE)]
    _footer(fig, caption, handles)
    return fig


def _same_group_pairs(names: Sequence[str], class_groups: dict, k: int) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j, of classes in the same group of ``class_groups``."""
    group = []
    for i in range(k):
        spec = class_groups.get(names[i]) if i < len(names) else None
        group.append(spec.get("group") if isinstance(spec, dict) else None)
    return [
        (i, j) for i in range(k) for j in range(k) if i != j and group[i] and group[i] == group[j]
    ]


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def method_figures(method: str, diagnostics, sample, names, class_groups) -> dict:
    """``{name: Figure}`` for ``method``'s diagnostics (empty when it has none)."""
    fn = {
        "dsts": dsts_figures,
        "u2s": u2s_figures,
        "dfb": dfb_figures,
        "joint_attn": joint_attn_figures,
    }.get(method)
    if fn is None or not diagnostics:
        return {}
    try:
        return fn(diagnostics, sample or {}, list(names or []), class_groups or {})
    except (KeyError, ValueError, IndexError, TypeError) as e:  # a picture must never kill a run
        print(f"warning: could not draw {method} diagnostics: {e}", flush=True)
        return {}


# --- shared helpers ---------------------------------------------------------------------------
def _ints(x) -> np.ndarray:
    return np.rint(_np(x)).astype(np.int64)


def _subplots(*args, **kwargs):
    """``plt.subplots`` at ``DPI`` with constrained layout."""
    return plt.subplots(*args, dpi=DPI, layout="constrained", **kwargs)


def _wrap(text: str, chars: int) -> str:
    """``text`` on lines of at most ``chars`` characters, broken only between words (a longer
    word keeps its own line, whole)."""
    return textwrap.fill(str(text), max(chars, 8), break_long_words=False, break_on_hyphens=False)


def _chars(width: float) -> int:
    """How many TEXT_PT characters fit on ``width`` inches."""
    return int(width / CHAR_IN)


def _name(names: Sequence[str], i: int) -> str:
    return str(names[i]) if 0 <= i < len(names) else f"class {i}"


def _title(fig, text: str) -> None:
    """The figure's plain-language title, wrapped to its width."""
    chars = int((fig.get_figwidth() - 0.2) * 72 / (TITLE_PT * 0.6))
    fig.suptitle(_wrap(text, chars), fontsize=TITLE_PT)


def _outline(label: str, colour: str, linestyle: str = "-", effects=None):
    """A legend entry for an outlined box: a patch, or with path ``effects`` a line (clearer)."""
    if effects:
        return Line2D(
            [],
            [],
            color=colour,
            linestyle=linestyle,
            linewidth=2,
            label=label,
            path_effects=effects,
        )
    return Patch(facecolor="none", edgecolor=colour, linestyle=linestyle, linewidth=2, label=label)


def _footer(fig, caption: str, handles: Sequence = ()) -> None:
    """A legend of ``handles`` (one row when it fits) and ``caption`` (how to read the picture,
    its notation) below the panels; the figure grows to make room for them."""
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(
        caption, int((width - 0.3) * 72 / (TEXT_PT * 0.55)), break_long_words=False
    )
    labels = [h.get_label() for h in handles]
    one_row = sum(len(s) * CHAR_IN + 0.6 for s in labels) < width - 0.3
    rows = (1 if one_row else len(labels)) if labels else 0
    legend = rows * 1.5 * TEXT_PT / 72 + 0.15 if rows else 0.0
    band = legend + len(lines) * LINE_IN + 0.15
    total = height + band
    fig.set_figheight(total)
    fig.get_layout_engine().set(rect=(0, band / total, 1, 1 - band / total))
    if rows:
        fig.legend(
            handles=list(handles),
            loc="upper center",
            bbox_to_anchor=(0.5, band / total),
            ncols=len(labels) if one_row else 1,
            fontsize=TEXT_PT,
            frameon=False,
        )
    if lines:
        fig.text(
            0.15 / width,
            0.08 / total,
            "\n".join(lines),
            ha="left",
            va="bottom",
            fontsize=TEXT_PT,
            color="0.2",
        )


def _nice_step(at_least: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``at_least``."""
    step = 1
    while step < at_least:
        step = step * 5 // 2 if str(step).startswith("2") else step * 2
    return step


def _heatmap_layout(k: int, names: Sequence[str], min_cell: float, chars: int):
    """Row labels of a ``k`` × ``k`` class heatmap (each class name wrapped at ``chars``
    characters or more, its index last; None beyond MAX_TICK_LABELS classes: indices only) and
    the side of a cell in inches, tall enough for the longest label."""
    if k > MAX_TICK_LABELS:
        return None, max(0.06, min(0.2, 14 / k))
    full = [f"{_name(names, i)} ({i})" for i in range(k)]
    chars = max(chars, min(max(map(len, full)) // 2 + 2, 48))  # long names: two lines, not four
    labels = [_wrap(s, chars) for s in full]
    lines = max((lbl.count("\n") + 1 for lbl in labels), default=1)
    return labels, max(min_cell, lines * LINE_IN + 0.06)


def _heatmap_figure(k: int, labels, cell: float):
    """A figure sized for a ``k`` × ``k`` heatmap of ``cell``-inch cells, its row labels and a
    colour bar."""
    label_w = max(len(line) for lbl in labels or ["000"] for line in lbl.split("\n")) * CHAR_IN
    side = k * cell
    width = max(5.0, label_w + side + 2.3)
    return _subplots(figsize=(width, side + 1.4))


def _heatmap_ticks(ax, k: int, labels, cell: float) -> None:
    """Class names on the rows, indices on the columns (all horizontal); without names indices on
    both, every few classes."""
    step = 1 if labels else _nice_step(0.3 / cell)
    idx = list(range(0, k, step))
    ax.set_xticks(idx, [str(i) for i in idx])
    if labels:
        ax.set_yticks(range(k), labels)
    else:
        ax.set_yticks(idx, [str(i) for i in idx])
    ax.tick_params(labelsize=TEXT_PT)


def _frames(sample) -> np.ndarray | None:
    """The sample clips as uint8 ``(b, T, H, W, 3)`` (channels-first or float clips converted for
    display), or None when there are none."""
    clips = sample.get("clips")
    if clips is None:
        return None
    x = clips.detach().cpu().numpy() if isinstance(clips, torch.Tensor) else np.asarray(clips)
    if x.ndim != 5:
        return None
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 4, 1)
    if x.shape[-1] != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        return None
    if x.dtype != np.uint8:  # e.g. normalised model input: stretch to the full range
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        x = ((x - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    return x


def _labels(sample, key: str = "labels") -> np.ndarray | None:
    y = sample.get(key)
    return None if y is None else _ints(y).reshape(-1)


def _span(cell: int, stride: float, limit: int) -> tuple[int, int]:
    """Frames ``[start, stop)`` covered by time cell ``cell`` of a map with ``stride`` frames per
    cell, clipped to a clip of ``limit`` frames."""
    start = min(int(math.floor(cell * stride + 1e-6)), limit - 1)
    stop = min(max(start + 1, int(math.ceil((cell + 1) * stride - 1e-6))), limit)
    return start, stop


def _columns(cells: int, must: Sequence[int] = ()) -> list[int]:
    """At most MAX_COLUMNS time cells out of ``cells``: those in ``must``, then evenly spaced."""
    chosen = {c for c in must if 0 <= c < cells}
    for c in np.linspace(0, cells - 1, MAX_COLUMNS).round().astype(int):
        if len(chosen) >= min(MAX_COLUMNS, cells):
            break
        chosen.add(int(c))
    for c in range(cells):  # fill gaps left by duplicate evenly-spaced picks
        if len(chosen) >= min(MAX_COLUMNS, cells):
            break
        chosen.add(c)
    return sorted(chosen)


def _overlay(ax, frame: np.ndarray | None, heat: np.ndarray, vmin: float, vmax: float):
    """``heat`` (h, w) stretched over ``frame`` (H, W, 3) (bilinear), or alone without a frame."""
    if frame is not None:
        ax.imshow(frame)
        height, width = frame.shape[:2]
    else:
        height, width = heat.shape
    ax.imshow(
        heat,
        cmap="jet",
        alpha=0.45 if frame is not None else 1.0,
        vmin=vmin,
        vmax=vmax,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="bilinear",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _colorbar(fig, axes, vmin: float, vmax: float, label: str) -> None:
    """An opaque colour bar for the (semi-transparent) overlays of ``axes``."""
    mappable = ScalarMappable(norm=Normalize(vmin, vmax), cmap="jet")
    fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.03, label=label)


def _subtlety_per_clip(
    sample, names: Sequence[str], class_groups: dict, selection: np.ndarray | None
) -> list[str] | None:
    """The subtlety ("spatial" / "temporal" / "other") of each clip of the diagnostics' batch,
    from ``all_labels`` (or ``labels`` when it covers the whole batch); None when unknown or not
    aligned with the per-clip ``selection``."""
    if not class_groups or selection is None:
        return None
    for key in ("all_labels", "labels"):
        y = _labels(sample, key)
        if y is not None and len(y) == len(selection):
            return [_subtlety(names, class_groups, i) for i in y.tolist()]
    return None


def _subtlety(names: Sequence[str], class_groups: dict, i: int) -> str:
    spec = class_groups.get(names[i]) if 0 <= i < len(names) else None
    kind = spec.get("subtlety") if isinstance(spec, dict) else None
    return kind if kind in ("spatial", "temporal") else "other"


def _colour_ticks(labels, names: Sequence[str], class_groups: dict) -> None:
    for lbl, name in zip(labels, names):
        kind = class_groups.get(name, {}).get("subtlety")
        if kind in SUBTLETY_COLOURS:
            lbl.set_color(SUBTLETY_COLOURS[kind])


def _clip_rows(headings: Sequence[str], ncols: int, title_lines: int = 1, extra: float = 0.0):
    """A figure with, per clip, a full-width heading (horizontal, wrapped between words) over a
    row of ``ncols`` image panels (titles of ``title_lines`` lines); ``extra`` inches of width
    for a colour bar. Returns the figure and the panels ``(clips, ncols)``."""
    width = PANEL * ncols + extra
    texts = ["\n".join(_wrap(s, _chars(width - 0.3)) for s in h.split("\n")) for h in headings]
    heads = [(t.count("\n") + 1) * LINE_IN for t in texts]
    rows = len(texts)
    height = sum(heads) + rows * (PANEL + title_lines * LINE_IN + 0.15) + 0.7
    fig = plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2 * rows, ncols, height_ratios=[x for h in heads for x in (h, PANEL)])
    axes = np.empty((rows, ncols), dtype=object)
    for r, text in enumerate(texts):
        head = fig.add_subplot(grid[2 * r, :])
        head.axis("off")
        head.text(0, 0, text, ha="left", va="bottom", fontsize=TEXT_PT, transform=head.transAxes)
        for c in range(ncols):
            axes[r, c] = fig.add_subplot(grid[2 * r + 1, c])
    return fig, axes


# --- DSTS -------------------------------------------------------------------------------------
def dsts_figures(diagnostics, sample, names, class_groups) -> dict:
    """Per layer: how often each neuron is selected, and each neuron's temporal share.

    Reads ``dsts/layer{j}/selected`` (N,) counts, ``dsts/layer{j}/temporal_share`` (N,) and,
    when the model provides it, ``dsts/layer{j}/selection`` (B,): each clip's selected neuron.
    With that and the synthetic benchmark's groups, the selection bars are split into
    spatial-subtle / temporal-subtle clips (share of each group's clips) and the temporal-share
    panel marks the mean temporal share of the neurons each group's clips went through.
    """
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in diagnostics.items():
        m = DSTS_KEY.fullmatch(str(key))
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = _np(value).reshape(-1)
    figs = {}
    selected = {j: d for j, d in sorted(layers.items()) if "selected" in d or "selection" in d}
    if selected:
        figs["dsts_neuron_selection"] = _dsts_selection(selected, sample, names, class_groups)
    shared = {j: d for j, d in sorted(layers.items()) if "temporal_share" in d}
    if shared:
        figs["dsts_temporal_share"] = _dsts_temporal_share(shared, sample, names, class_groups)
    return figs


def _layer_axes(count: int, neurons: int):
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    width = min(12.0, max(5.0, cols * max(2.8, 0.8 + 0.25 * neurons)))
    fig, axes = _subplots(rows, cols, figsize=(width, 0.8 + 2.4 * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _neuron_axis(ax, n: int) -> None:
    """Neuron indices on the x axis (every few when they would not fit), shares on y."""
    width = ax.figure.get_figwidth() / min(3, len(ax.figure.axes)) - 0.5
    step = _nice_step(n * 0.25 / max(width, 0.5))
    ax.set_xticks(range(0, n, step), [str(i) for i in range(0, n, step)])
    ax.set_xlabel("neuron", fontsize=TEXT_PT)
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=TEXT_PT)


def _selection_of(d: dict[str, np.ndarray]) -> np.ndarray | None:
    return d["selection"].astype(np.int64) if "selection" in d else None


def _neurons(d: dict[str, np.ndarray]) -> int:
    n = max(len(d.get("selected", ())), len(d.get("temporal_share", ())))
    sel = _selection_of(d)
    return max(n, int(sel.max()) + 1 if sel is not None and len(sel) else 0, 1)


def _dsts_selection(layers, sample, names, class_groups):
    n_max = max(_neurons(d) for d in layers.values())
    fig, axes = _layer_axes(len(layers), n_max)
    for ax, (j, d) in zip(axes, layers.items()):
        n = _neurons(d)
        sel = _selection_of(d)
        kinds = _subtlety_per_clip(sample, names, class_groups, sel)
        x = np.arange(n)
        if kinds:
            present = [k for k in ("spatial", "temporal", "other") if k in kinds]
            width = 0.8 / len(present)
            for g, kind in enumerate(present):
                mask = np.array([k == kind for k in kinds])
                share = np.bincount(sel[mask], minlength=n)[:n] / mask.sum()
                ax.bar(
                    x - 0.4 + width * (g + 0.5),
                    share,
                    width,
                    color=SUBTLETY_COLOURS[kind],
                    label=f"{kind}-subtle classes ({mask.sum()} clips)",
                )
            total = len(sel)
        else:
            counts = np.bincount(sel, minlength=n)[:n] if sel is not None else d["selected"]
            total = max(int(counts.sum()), 1)
            ax.bar(x, counts / total, 0.7, color="tab:green")
        ax.set_title(f"layer {j} ({total} clips)", fontsize=TEXT_PT + 1)
        _neuron_axis(ax, n)
    axes[0].set_ylabel("share of clips", fontsize=TEXT_PT)
    handles, _ = axes[0].get_legend_handles_labels()
    _title(fig, "Which DSTS neuron each validation clip is routed to")
    caption = (
        "First validation batch, model in evaluation mode (each clip goes through the neuron "
        "with the largest impulse). Bars: share of the clips that select each neuron"
    )
    if handles:
        caption += (
            ", counted within each class group (classes that differ in appearance: "
            "spatial-subtle; in motion: temporal-subtle)"
        )
    _footer(fig, caption + ".", handles)
    return fig


def _dsts_temporal_share(layers, sample, names, class_groups):
    n_max = max(_neurons(d) for d in layers.values())
    fig, axes = _layer_axes(len(layers), n_max)
    for ax, (j, d) in zip(axes, layers.items()):
        share = d["temporal_share"]
        x = np.arange(len(share))
        sel = _selection_of(d)
        used = None
        if sel is not None:
            used = np.bincount(sel, minlength=len(share))[: len(share)] > 0
        elif "selected" in d and len(d["selected"]) == len(share):
            used = d["selected"] > 0
        alpha = np.where(used, 1.0, 0.35) if used is not None else np.ones(len(share))
        for i in x:  # faded: no clip of the batch selected the neuron
            ax.bar(i, share[i], 0.7, color="tab:purple", alpha=float(alpha[i]))
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=0.8)
        kinds = _subtlety_per_clip(sample, names, class_groups, sel)
        means = {}
        if kinds is not None and len(sel) and sel.max() < len(share):
            for kind in ("spatial", "temporal"):
                mask = np.array([k == kind for k in kinds])
                if mask.any():
                    means[kind] = float(share[sel[mask]].mean())
        _mean_lines(ax, means)
        ax.set_title(f"layer {j}", fontsize=TEXT_PT + 1)
        _neuron_axis(ax, len(share))
    axes[0].set_ylabel("share of channels to temporal op", fontsize=TEXT_PT)
    handles, _ = axes[0].get_legend_handles_labels()
    _title(fig, "Share of each DSTS neuron's channels that go to its temporal operation")
    caption = (
        "Gates b = 1[g > 0] send a channel to the neuron's temporal op T_i (b = 1) or to its "
        "spatial op S_i (b = 0); a bar is the mean of b over the channels. Faded bars: no clip "
        "of the first validation batch selected the neuron; dotted grey line: half."
    )
    if handles:
        caption += (
            " Lines: mean share of the neurons that the clips of spatial-subtle (dashed) and "
            "temporal-subtle (dotted) classes went through, values written beside them."
        )
    _footer(fig, caption, handles)
    return fig


def _mean_lines(ax, means: dict[str, float]) -> None:
    """A line per class group at its mean temporal share, in its own style and with its value
    written beside it: one above and one below its line when the two are close."""
    styles = {"spatial": "--", "temporal": ":"}
    close = len(means) == 2 and abs(means["spatial"] - means["temporal"]) < 0.1
    high = max(means, key=means.get) if means else None
    at_right = blended_transform_factory(ax.transAxes, ax.transData)
    for kind, mean in means.items():
        colour = SUBTLETY_COLOURS[kind]
        ax.axhline(
            mean,
            color=colour,
            linestyle=styles[kind],
            linewidth=2,
            label=f"mean over {kind}-subtle classes' clips",
        )
        below = close and kind != high
        ax.text(
            0.98,
            mean,
            f"{kind}-subtle {mean:.2f}",
            transform=at_right,
            ha="right",
            va="top" if below else "bottom",
            fontsize=TEXT_PT,
            color=colour,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
        )


# --- U2S --------------------------------------------------------------------------------------
def u2s_figures(diagnostics, sample, names, class_groups) -> dict:
    """The CSM (similarity S in colour, confusers C = 1 marked) and a few clips' masks.

    Empty in stage 1 (UN-only mode: no CSM yet, no diagnostics).
    """
    figs = {}
    if diagnostics.get("csm_similarity") is not None or diagnostics.get("csm") is not None:
        figs["u2s_csm"] = _u2s_csm(diagnostics, names, class_groups)
    if diagnostics.get("mask") is not None:
        fig = _u2s_masks(diagnostics, sample, names)
        if fig is not None:
            figs["u2s_masks"] = fig
    return figs


def _u2s_csm(diagnostics, names, class_groups):
    s, c = diagnostics.get("csm_similarity"), diagnostics.get("csm")
    c = None if c is None else _np(c)
    heat = _np(s) if s is not None else c
    k = heat.shape[0]
    labels, cell = _heatmap_layout(k, names, 0.2, 44)
    fig, ax = _heatmap_figure(k, labels, cell)
    off = heat[~np.eye(k, dtype=bool)]
    # S of trained models often lies in a narrow band near 1: start the colours at its minimum.
    vmin = min(max(math.floor(float(off.min()) * 10) / 10, 0.0), 0.9) if off.size else 0.0
    im = ax.imshow(heat, cmap="viridis", vmin=vmin, vmax=1)
    label = "similarity S (cosine of sparsity)" if s is not None else "confuser C"
    fig.colorbar(im, ax=ax, fraction=0.04, label=label)
    if c is not None and s is not None:
        i, j = np.nonzero((c > 0.5) & ~np.eye(k, dtype=bool))
        ax.scatter(j, i, marker="x", color="red", s=(0.35 * cell * 72) ** 2, linewidths=1)
    _heatmap_ticks(ax, k, labels, cell)
    coloured = bool(class_groups) and labels is not None and len(names) >= k
    if coloured:
        _colour_ticks(ax.get_xticklabels(), names, class_groups)
        _colour_ticks(ax.get_yticklabels(), names, class_groups)
    mc = diagnostics.get("mean_confusers")
    if mc is not None:
        mean = float(_np(mc).reshape(-1)[0])
    elif c is not None:
        mean = float(((c > 0.5).sum() - np.trace(c > 0.5)) / k)
    else:
        mean = float("nan")
    _title(fig, f"Which classes U2S treats as confusable ({mean:.2f} confusers per class)")
    caption = "Category similarity matrix (CSM) of the classes: "
    if s is not None:
        caption += "colour: similarity S of two classes (cosine of their feature sparsity)"
        caption += "; ×: confuser pair, C = 1 (masked for each other)." if c is not None else "."
    else:
        caption += "colour: C = 1 where the column class is a confuser of the row class."
    if coloured:
        caption += " Names in blue: spatial-subtle, orange: temporal-subtle classes."
    if labels is None:
        caption += " Class indices as in eval/per_class_accuracy.csv."
    _footer(fig, caption)
    return fig


def _u2s_masks(diagnostics, sample, names):
    mask = _np(diagnostics["mask"])  # (B, T, H, W), sigmoid in (0, 1)
    if mask.ndim != 4 or mask.shape[0] == 0:
        return None
    frames = _frames(sample)
    labels = _labels(sample)
    cls = diagnostics.get("mask_class")
    cls = None if cls is None else _ints(cls).reshape(-1)
    b = min(MAX_SAMPLES, mask.shape[0], len(frames) if frames is not None else MAX_SAMPLES)
    cells = mask.shape[1]
    cols = _columns(cells)
    headings = []
    for r in range(b):
        true = _name(names, int(labels[r])) if labels is not None and r < len(labels) else "?"
        chosen = _name(names, int(cls[r])) if cls is not None and r < len(cls) else "?"
        headings.append(f"clip {r + 1} · true class: {true}\nmasked for the confusers of: {chosen}")
    fig, axes = _clip_rows(headings, len(cols), extra=1.2)
    for r in range(b):
        for col, t in enumerate(cols):
            ax = axes[r, col]
            frame = None
            title = f"mask step {t}"
            if frames is not None:
                start, stop = _span(t, frames.shape[1] / cells, frames.shape[1])
                frame = frames[r, (start + stop - 1) // 2]
                title = f"frames {start}–{stop - 1}"
            _overlay(ax, frame, mask[r, t], 0.0, 1.0)
            ax.set_title(title, fontsize=TEXT_PT)
    _colorbar(fig, axes, 0.0, 1.0, "mask (sigmoid)")
    _title(fig, "Where U2S masks the features of the predicted class's confusers")
    _footer(
        fig,
        "Mask (sigmoid, 1 = kept) on the CSN features at each time step, stretched over the "
        "middle frame of the step's frames; computed for the confusers (C = 1 in the CSM) of the "
        "class the UN branch predicts.",
    )
    return fig


# --- DFB --------------------------------------------------------------------------------------
def dfb_figures(diagnostics, sample, names, class_groups) -> dict:
    """Boxes where the true class's (magenta) and the strongest class's (cyan, dashed) filters
    respond most, on the frames of the time cell that holds the maximum.

    A box is the feature cell ``[coord·stride, (coord + 1)·stride)`` in input pixels / frames
    (the receptive field is larger); "strongest" is the class with the largest max response.
    """
    thw, stride = diagnostics.get("max_response_thw"), diagnostics.get("feature_stride")
    frames = _frames(sample)
    if thw is None or stride is None or frames is None:
        return {}
    thw = _ints(thw)  # (B, K, 3)
    stride = _np(stride).astype(float).reshape(-1)
    value = diagnostics.get("max_response_value")
    value = None if value is None else _np(value)
    labels = _labels(sample)
    b = min(MAX_SAMPLES, len(frames), thw.shape[0])
    if b == 0 or thw.ndim != 3 or len(stride) != 3:
        return {}
    num_frames, height, width = frames.shape[1:4]
    cells = max(1, round(num_frames / stride[0]))
    per_row = []
    for r in range(b):
        boxes = []  # (class, colour, linestyle, role)
        true = int(labels[r]) if labels is not None and r < len(labels) else -1
        strongest = int(value[r].argmax()) if value is not None else -1
        if 0 <= true < thw.shape[1]:
            boxes.append((true, TRUE_BOX, "-", "true"))
        if 0 <= strongest < thw.shape[1] and strongest != true:
            boxes.append((strongest, STRONGEST_BOX, "--", "strongest"))
        per_row.append(boxes)
    columns = [_columns(cells, [int(thw[r, k, 0]) for k, *_ in per_row[r]]) for r in range(b)]
    ncols = max(len(c) for c in columns)
    headings = [
        f"clip {r + 1}\n"
        + "\n".join(
            f"{'true class' if role == 'true' else 'strongest other class'}: {_name(names, k)}"
            for k, _, _, role in boxes
        )
        if boxes
        else f"clip {r + 1}: true class unknown"
        for r, boxes in enumerate(per_row)
    ]
    # a panel's title: its frames, then a line per box in it (with values)
    per_cell = [Counter(int(thw[r, k, 0]) for k, *_ in boxes) for r, boxes in enumerate(per_row)]
    stacked = max(max(c.values(), default=0) for c in per_cell) if value is not None else 0
    fig, axes = _clip_rows(headings, ncols, title_lines=1 + stacked)
    for r, cols in enumerate(columns):
        for col in range(ncols):
            ax = axes[r, col]
            if col >= len(cols):
                ax.set_visible(False)
                continue
            start, stop = _span(cols[col], stride[0], num_frames)
            ax.imshow(frames[r, (start + stop - 1) // 2])
            ax.set_xticks([])
            ax.set_yticks([])
            notes = []
            for k, colour, style, role in per_row[r]:
                t, h, w = thw[r, k]
                if t != cols[col]:
                    continue
                ax.add_patch(
                    Rectangle(
                        (w * stride[2] - 0.5, h * stride[1] - 0.5),
                        stride[2],
                        stride[1],
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=2,
                        path_effects=BOX_OUTLINE,
                    )
                )
                if value is not None:
                    notes.append(f"{role} {value[r, k]:.2f}")
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_title("\n".join([f"frames {start}–{stop - 1}", *notes]), fontsize=TEXT_PT)
    roles = {role for boxes in per_row for *_, role in boxes}
    handles = [
        _outline(label, colour, style, BOX_OUTLINE)
        for role, label, colour, style in (
            ("true", "true class", TRUE_BOX, "-"),
            ("strongest", "strongest other class", STRONGEST_BOX, "--"),
        )
        if role in roles
    ]
    _title(fig, "Where the DFB filters of the true and the strongest class respond most")
    _footer(
        fig,
        f"Box: the feature cell ({stride[0]:g} frames × {stride[1]:g} × {stride[2]:g} pixels) "
        "holding a class's maximum filter response, on the middle frame of its time cell; the "
        "receptive field is larger. Strongest class: the class with the largest maximum "
        "response; numbers: maximum responses.",
        handles,
    )
    return {"dfb_max_response": fig}


# --- JointAttn --------------------------------------------------------------------------------
def joint_attn_figures(diagnostics, sample, names, class_groups) -> dict:
    """The LSTM's soft attention ``(B, T, K, K)`` per time step, upsampled over the frame of
    that step (LSTM steps spread evenly over the clip's frames)."""
    att = diagnostics.get("attention")
    if att is None:
        return {}
    att = _np(att)
    if att.ndim != 4 or att.shape[0] == 0 or att.shape[1] == 0:
        return {}
    frames = _frames(sample)
    labels = _labels(sample)
    b = min(MAX_SAMPLES, att.shape[0], len(frames) if frames is not None else MAX_SAMPLES)
    steps, grid = att.shape[1], att.shape[2]
    cols = _columns(steps)
    headings = [
        f"clip {r + 1} · true class: "
        + (_name(names, int(labels[r])) if labels is not None and r < len(labels) else "?")
        for r in range(b)
    ]
    fig, axes = _clip_rows(headings, len(cols), extra=1.4)
    # At least twice the uniform weight: flat attention stays mid-scale, not all red.
    vmax = max(float(att[:b, cols].max()), 2.0 / grid**2)
    for r in range(b):
        for col, t in enumerate(cols):
            ax = axes[r, col]
            frame, title = None, f"step {t}"
            if frames is not None:
                start, stop = _span(t, frames.shape[1] / steps, frames.shape[1])
                f = (start + stop - 1) // 2
                frame, title = frames[r, f], f"step {t} · frame {f}"
            _overlay(ax, frame, att[r, t], 0.0, vmax)
            ax.set_title(title, fontsize=TEXT_PT)
    _colorbar(fig, axes, 0.0, vmax, f"attention (uniform = {1 / grid**2:.3f})")
    _title(fig, "Where the JointAttn LSTM looks at each step")
    _footer(
        fig,
        f"Soft attention over the {grid} × {grid} feature grid at each LSTM step, stretched over "
        "the middle frame of the step's frames (steps spread evenly over the clip); weights sum "
        "to 1 over the grid.",
    )
    return {"joint_attn_attention": fig}
