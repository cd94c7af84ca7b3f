"""Pictures and tables logged to MLflow: confusion matrix, per-class accuracy, method diagnostics.

Method diagnostics pictures (one function per method, from ``ModelOutput.diagnostics`` of the
first validation batch, model in eval mode): DSTS neuron-selection histogram and temporal-gate
share per neuron (split by the synthetic benchmark's spatial/temporal classes), U2S CSM heatmap
and masks, DFB max-response boxes on a few frames, JointAttn attention overlays.

``sample`` is ``{"clips": uint8 (b, T, H, W, 3), "labels": (b,)}`` for the first b <= 4 clips of
that batch (the cropped model input), optionally with ``"all_labels"``: the labels of the whole
batch, aligned with per-sample diagnostics. Every function returns ``{name: Figure}`` and skips
(never raises on) a picture whose diagnostics are missing.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

SUBTLETY_COLOURS = {"spatial": "tab:blue", "temporal": "tab:orange", "other": "tab:gray"}
PANEL = 1.8  # inches per image panel
MAX_SAMPLES = 2  # clips shown in the frame pictures
MAX_COLUMNS = 4  # time steps shown per clip
MAX_TICK_LABELS = 60  # beyond this many classes a heatmap shows indices, not names
DSTS_KEY = re.compile(r"dsts/layer(\d+)/(\w+)")


def close_all() -> None:
    plt.close("all")


def per_class_csv(names: Sequence[str], per_class) -> str:
    buf = io.StringIO()
    buf.write("index,class,accuracy\n")
    for i, (n, a) in enumerate(zip(names, np.asarray(per_class, dtype=float))):
        buf.write(f'{i},"{n}",{a:.4f}\n')
    return buf.getvalue()


def confusion_matrix(confusion, names: Sequence[str]):
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * k, 1.5 + 0.4 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [_short(n) for n in names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("validation confusion (row-normalised colour, counts)")
    fig.tight_layout()
    return fig


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


def _short(name: str, n: int = 32) -> str:
    """A tick label: "[something]" → "[sth]", then an ellipsis in the middle (fine-grained class
    names often differ only at the end: "... from left to right" / "... from right to left")."""
    name = str(name).replace("[something]", "[sth]")
    if len(name) <= n:
        return name
    head = (n - 1) // 2
    return name[:head] + "…" + name[len(name) - (n - 1 - head) :]


def _name(names: Sequence[str], i: int) -> str:
    return _short(names[i]) if 0 <= i < len(names) else f"class {i}"


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


def _row_label(ax, text: str) -> None:
    ax.set_ylabel(text, fontsize=6)


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
    width = min(12.0, cols * max(2.4, 0.8 + 0.25 * neurons))
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, 0.6 + 2.2 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


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
        ax.set_title(f"layer {j} ({total} clips)", fontsize=8)
        ax.set_xticks(x, [str(i) for i in x], fontsize=6)
        ax.set_xlabel("neuron", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="y", labelsize=6)
    axes[0].set_ylabel("share of clips selecting it", fontsize=7)
    _figure_legend(fig, axes)
    title = "DSTS neuron selection (first validation batch, eval"
    fig.suptitle(title + (", share within each class group)" if fig.legends else ")"), fontsize=9)
    return fig


def _figure_legend(fig, axes) -> None:
    """One legend below the panels (the groups are the same in every panel)."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=7)


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
        means = []
        if kinds is not None and len(sel) and sel.max() < len(share):
            for kind in ("spatial", "temporal"):
                mask = np.array([k == kind for k in kinds])
                if mask.any():
                    mean = float(share[sel[mask]].mean())
                    means.append(f"{kind[0].upper()} {mean:.2f}")
                    ax.axhline(
                        mean,
                        color=SUBTLETY_COLOURS[kind],
                        linewidth=1.5,
                        label=f"mean over {kind}-subtle classes' clips",
                    )
        ax.set_title(f"layer {j}" + (f" ({' · '.join(means)})" if means else ""), fontsize=8)
        ax.set_xticks(x, [str(i) for i in x], fontsize=6)
        ax.set_xlabel("neuron", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="y", labelsize=6)
    axes[0].set_ylabel("channels routed to temporal op", fontsize=7)
    _figure_legend(fig, axes)
    fig.suptitle(
        "DSTS temporal share per neuron (gates b = 1[g > 0]; faded: not selected)", fontsize=9
    )
    return fig


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
    side = min(10.0, 2.5 + 0.27 * k)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), layout="constrained")
    off = heat[~np.eye(k, dtype=bool)]
    # S of trained models often lies in a narrow band near 1: start the colours at its minimum.
    vmin = min(max(math.floor(float(off.min()) * 10) / 10, 0.0), 0.9) if off.size else 0.0
    im = ax.imshow(heat, cmap="viridis", vmin=vmin, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.04, label="S (cosine of sparsity)" if s is not None else "C")
    if c is not None and s is not None:
        i, j = np.nonzero((c > 0.5) & ~np.eye(k, dtype=bool))
        cell = 72 * (side - 2.5) / k  # points per matrix cell
        ax.scatter(j, i, marker="x", color="red", s=(0.35 * cell) ** 2, linewidths=1)
    if k <= MAX_TICK_LABELS:
        labels = [_name(names, i) for i in range(k)]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(k), labels, fontsize=6)
        if class_groups and len(names) >= k:
            _colour_ticks(ax.get_xticklabels(), names, class_groups)
            _colour_ticks(ax.get_yticklabels(), names, class_groups)
    mc = diagnostics.get("mean_confusers")
    if mc is not None:
        mean = float(_np(mc).reshape(-1)[0])
    elif c is not None:
        mean = float(((c > 0.5).sum() - np.trace(c > 0.5)) / k)
    else:
        mean = float("nan")
    what = "S (colour), C = 1 (×)" if c is not None and s is not None else "CSM"
    extra = " · names: blue spatial-, orange temporal-subtle" if class_groups else ""
    ax.set_title(
        f"U2S category similarity: {what}\nmean confusers per class {mean:.2f}{extra}",
        fontsize=8,
    )
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
    fig, axes = plt.subplots(
        b,
        len(cols),
        figsize=(PANEL * len(cols) + 0.8, PANEL * b + 0.4),
        squeeze=False,
        layout="constrained",
    )
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
            ax.set_title(title, fontsize=7)
        true = _name(names, int(labels[r])) if labels is not None and r < len(labels) else "?"
        chosen = _name(names, int(cls[r])) if cls is not None and r < len(cls) else "?"
        _row_label(axes[r, 0], f"true: {true}\nmasks of: {chosen}")
    _colorbar(fig, axes, 0.0, 1.0, "mask (sigmoid)")
    fig.suptitle("U2S mask on the CSN features (UN-predicted class's confusers)", fontsize=9)
    return fig


# --- DFB --------------------------------------------------------------------------------------
def dfb_figures(diagnostics, sample, names, class_groups) -> dict:
    """Boxes where the true class's (green) and the strongest class's (red, dashed) filters
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
            boxes.append((true, "lime", "-", "true"))
        if 0 <= strongest < thw.shape[1] and strongest != true:
            boxes.append((strongest, "red", "--", "strongest"))
        per_row.append(boxes)
    columns = [_columns(cells, [int(thw[r, k, 0]) for k, *_ in per_row[r]]) for r in range(b)]
    ncols = max(len(c) for c in columns)
    fig, axes = plt.subplots(
        b, ncols, figsize=(PANEL * ncols, PANEL * b + 0.8), squeeze=False, layout="constrained"
    )
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
                    )
                )
                if value is not None:
                    notes.append(f"{role} {value[r, k]:.2f}")
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_title("\n".join([f"frames {start}–{stop - 1}", *notes]), fontsize=7)
        label = "\n".join(f"{role}: {_name(names, k)}" for k, _, _, role in per_row[r])
        _row_label(axes[r, 0], label or "?")
    fig.suptitle(
        "DFB max filter response (green: true class, red dashed: strongest class)", fontsize=9
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
    fig, axes = plt.subplots(
        b,
        len(cols),
        figsize=(PANEL * len(cols) + 0.8, PANEL * b + 0.5),
        squeeze=False,
        layout="constrained",
    )
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
            ax.set_title(title, fontsize=7)
        true = _name(names, int(labels[r])) if labels is not None and r < len(labels) else "?"
        _row_label(axes[r, 0], f"true: {true}")
    _colorbar(fig, axes, 0.0, vmax, f"attention (uniform = {1 / grid**2:.3f})")
    fig.suptitle(f"JointAttn soft attention ({grid}×{grid} grid) per LSTM step", fontsize=9)
    return {"joint_attn_attention": fig}
