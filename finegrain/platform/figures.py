"""Pictures and tables logged to MLflow: confusion matrix, per-class accuracy, and the house style
and helpers every method's diagnostics pictures share.

Each method draws its own diagnostics (``finegrain/models/<method>/figures.py``, named by its
spec's ``figures``), from ``ModelOutput.diagnostics`` of the first validation batch, model in eval
mode; :func:`method_figures` calls it. ``sample`` is ``{"clips": uint8 (b, T, H, W, 3), "labels": (b,)}`` for the first b <= 4 clips of
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
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

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


def close_all() -> None:
    plt.close("all")


def per_class_csv(names: Sequence[str], per_class) -> str:
    """``eval/per_class_accuracy.csv``: each class's accuracy (``per_class``, fractions) in %,
    like every logged accuracy."""
    buf = io.StringIO()
    buf.write("index,class,accuracy_pct\n")
    for i, (n, a) in enumerate(zip(names, np.asarray(per_class, dtype=float))):
        buf.write(f'{i},"{n}",{100 * a:.2f}\n')
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
    """``{name: Figure}`` for ``method``'s diagnostics, drawn by the method's own figures module
    (its spec's ``figures``); empty when it has none."""
    from finegrain.models import method_spec

    spec = method_spec(method)
    if not spec.figures or not diagnostics:
        return {}
    try:
        return spec.draw(diagnostics, sample or {}, list(names or []), class_groups or {})
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
