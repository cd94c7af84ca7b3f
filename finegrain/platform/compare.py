"""Comparison tables from MLflow: one row per method/variant, best and mean ± std over seeds.

Reads the runs with ``mlflow.search_runs`` (one run = one seed of one variant) and aggregates the
final value of a per-epoch metric (``val/top1`` at the last epoch by default) per group:

- groups: the tags ``method`` + ``variant`` when the runs carry a ``variant`` tag (the ablation
  suites set it), else ``method`` + ``backbone``; with several experiments the experiment name
  comes first. ``group_by`` takes tag or param names (``variant``, ``model.neurons``,
  ``tags.method``, ``params.run.seed``);
- columns: ``best`` (max over runs), ``mean``, ``std`` (sample std, n-1; NaN for one run),
  ``n``, the seeds (param ``run.seed``) and the short MLflow run ids.

Only FINISHED runs count unless ``all_statuses``; a sweep's parent run (a run other selected
runs name as ``mlflow.parentRunId``) is a summary, not a seed, and is left out. Runs without the
metric are not averaged; they are listed in ``df.attrs["skipped"]``.

Metric names are the grouped keys of :mod:`finegrain.platform.keys` (accuracies in %); a run
logged before them (``val_top1``, a fraction) is read under its old name, converted to %.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from finegrain.platform import keys as metric_keys
from finegrain.platform.tracking import resolve_tracking_uri

DEFAULT_EXPERIMENT = "Default"
SEED_PARAM = "params.run.seed"
PARENT_TAG = "tags.mlflow.parentRunId"


class CompareError(ValueError):
    """A bad selection: unknown experiment, metric or grouping key."""


def metric_key(metric: str) -> str:
    """``top1`` / ``val_top1`` / ``metrics.val_top1`` / ``val/top1`` → ``val/top1``;
    ``best_top1`` → ``val/best_top1``; ``train_loss`` → ``train/loss``. Names with a ``/``
    (``mech/…``, a method's ``dsts/…``) are kept (:func:`finegrain.platform.keys.metric_key`)."""
    key = metric_keys.metric_key(metric)
    if not key:
        raise CompareError("metric: empty name; e.g. top1, top5, mean_class_acc, best_top1")
    return key


def _with_legacy(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """``runs`` with the column of ``key`` filled, for runs logged before the grouped keys,
    from its old name (an accuracy then a fraction: converted to %)."""
    old = metric_keys.legacy_name(key)
    column, old_column = f"metrics.{key}", f"metrics.{old}"
    if old is None or old_column not in runs.columns:
        return runs
    values = runs[old_column].astype(float) * (100.0 if metric_keys.is_accuracy(key) else 1.0)
    runs = runs.copy()
    runs[column] = runs[column].fillna(values) if column in runs.columns else values
    return runs


@contextmanager
def _tracking_uri(uri: str):
    """Point ``mlflow.search_runs`` at ``uri`` and put the caller's setting back afterwards.

    MLflow's own helper (private ``_use_tracking_uri``) restores the global URI but unsets a
    user's ``MLFLOW_TRACKING_URI`` on the way out, so the variable is restored here too.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _experiments(client, names: Sequence[str] | None) -> dict[str, str]:
    """{experiment id: name} for ``names`` (default: every active experiment but Default)."""
    existing = {e.name: e.experiment_id for e in client.search_experiments()}
    if not names:
        chosen = {i: n for n, i in existing.items() if n != DEFAULT_EXPERIMENT}
        if not chosen:
            raise CompareError(
                f"no experiments besides {DEFAULT_EXPERIMENT!r} in {client.tracking_uri}"
            )
        return chosen
    missing = [n for n in names if n not in existing]
    if missing:
        listed = ", ".join(sorted(existing)) or "(none)"
        raise CompareError(
            f"experiment {', '.join(repr(n) for n in missing)} not found in "
            f"{client.tracking_uri}; existing experiments: {listed}"
        )
    return {existing[n]: n for n in dict.fromkeys(names)}


def _group_column(runs: pd.DataFrame, key: str) -> str:
    """The runs column a ``group_by`` key names (tags first, then params)."""
    if key == "experiment" or key.startswith(("tags.", "params.")):
        if key in runs.columns:
            return key
    else:
        for column in (f"tags.{key}", f"params.{key}"):
            if column in runs.columns:
                return column
    tags = sorted(c[5:] for c in runs.columns if c.startswith("tags.") and "mlflow." not in c)
    params = sorted(c[7:] for c in runs.columns if c.startswith("params."))
    raise CompareError(
        f"group_by {key!r}: no run has a tag or param of that name; "
        f"tags: {', '.join(tags) or '(none)'}; params: {', '.join(params) or '(none)'}"
    )


def _default_groups(runs: pd.DataFrame, several_experiments: bool) -> list[str]:
    groups = ["experiment"] if several_experiments else []
    has_variant = "tags.variant" in runs.columns and runs["tags.variant"].notna().any()
    second = "tags.variant" if has_variant else "tags.backbone"
    found = [c for c in ("tags.method", second) if c in runs.columns]
    return groups + found if found else ["experiment"]  # not finegrain runs: one row each


def _label(column: str) -> str:
    return column.split(".", 1)[1] if column.startswith(("tags.", "params.")) else column


def _seed_sort_key(seed: str):
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def compare(
    experiments: Sequence[str] | None = None,
    metric: str = "top1",
    uri: str | None = None,
    group_by: Sequence[str] | None = None,
    *,
    all_statuses: bool = False,
    run_dir: str | os.PathLike = "runs",
) -> pd.DataFrame:
    """One row per group of runs: group keys, ``n``, ``best``, ``mean``, ``std``, ``seeds``,
    ``runs`` (short run ids, in start order).

    ``uri``: tracking URI (default ``$MLFLOW_TRACKING_URI`` or the embedded store under
    ``run_dir``). Rows keep the order in which their first run started (an ablation suite's
    order). ``df.attrs`` holds ``metric``, ``uri``, ``experiments`` and ``skipped`` (ids of
    selected runs without the metric).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    key = metric_key(metric)
    uri = resolve_tracking_uri(uri, run_dir)
    chosen = _experiments(MlflowClient(uri), experiments)
    status = "" if all_statuses else "attributes.status = 'FINISHED'"
    with _tracking_uri(uri):
        runs = mlflow.search_runs(
            experiment_ids=list(chosen), filter_string=status, output_format="pandas"
        )
    where = f"experiment(s) {', '.join(chosen.values())} of {uri}"
    if runs.empty:
        kind = "runs" if all_statuses else "FINISHED runs (--all-statuses to include others)"
        raise CompareError(f"no {kind} in {where}")
    runs["experiment"] = runs["experiment_id"].map(chosen)
    if PARENT_TAG in runs.columns:  # sweep parents summarise their trials: not a seed
        runs = runs[~runs["run_id"].isin(set(runs[PARENT_TAG].dropna()))]

    runs = _with_legacy(runs, key)
    column = f"metrics.{key}"
    if column not in runs.columns:
        have = sorted(c[8:] for c in runs.columns if c.startswith("metrics."))
        raise CompareError(
            f"metric {metric!r} (MLflow metric {key!r}): no run in {where} has it; "
            f"metrics: {', '.join(have) or '(none)'}"
        )
    groups = (
        [_group_column(runs, k) for k in group_by]
        if group_by
        else _default_groups(runs, len(chosen) > 1)
    )
    skipped = runs.loc[runs[column].isna(), "run_id"].tolist()
    runs = runs[runs[column].notna()].sort_values(["start_time", "run_id"], kind="stable")

    rows = []
    keys = runs[groups].astype("string").fillna("-")
    for values, part in runs.groupby([keys[g] for g in groups], sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        scores = part[column].astype(float)
        seeds = part[SEED_PARAM].dropna().tolist() if SEED_PARAM in part.columns else []
        rows.append(
            {
                **{_label(g): v for g, v in zip(groups, values)},
                "n": len(part),
                "best": scores.max(),
                "mean": scores.mean(),
                "std": scores.std(ddof=1) if len(part) > 1 else math.nan,
                "seeds": ", ".join(sorted(map(str, seeds), key=_seed_sort_key)),
                "runs": ", ".join(r[:8] for r in part["run_id"]),
                "run_ids": list(part["run_id"]),
                "run_seeds": [
                    str(x) for x in (part[SEED_PARAM] if SEED_PARAM in part else part["run_id"])
                ],
                "scores": scores.tolist(),
            }
        )
    df = pd.DataFrame(rows)
    df.attrs.update(
        metric=key, uri=uri, experiments=list(chosen.values()), skipped=skipped, groups=groups
    )
    return df


STAT_COLUMNS = ("ci_lo", "ci_hi", "videos", "delta", "p", "significant", "baseline")
HIDDEN = ("run_ids", "run_seeds", "scores")


def _group_labels(df: pd.DataFrame) -> list[str]:
    taken = ("n", "best", "mean", "std", "seeds", "runs", *HIDDEN, *STAT_COLUMNS)
    return [c for c in df.columns if c not in taken]


def per_video_correctness(uri: str, run_id: str) -> dict[str, int] | None:
    """The run's ``eval/per_video.csv`` as ``{video_id: correct}`` (None when it has none:
    runs from before it was logged, or not a finegrain run)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from finegrain.platform.metrics import PER_VIDEO_FILE, read_per_video

    client = MlflowClient(uri)
    # one small file per run: MLflow's per-download progress bar would print a line for each
    bar, os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = (
        os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"),
        "false",
    )
    try:
        with tempfile.TemporaryDirectory() as d:
            path = client.download_artifacts(run_id, f"eval/{PER_VIDEO_FILE}", d)
            return read_per_video(Path(path).read_text())
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        return None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def with_intervals(df: pd.DataFrame, baseline: int | None = 0) -> pd.DataFrame:
    """``df`` (from :func:`compare`) with a 95 % interval per row and, against row
    ``baseline``, a paired test (:mod:`finegrain.platform.stats`).

    For ``val/top1`` the rows are each run's per-video correctness (``eval/per_video.csv``):
    the interval is a two-way bootstrap over seeds and videos, the test a sign-flip permutation
    test paired by seed and video. Other metrics, or runs without the file: the interval is a
    bootstrap over the runs' values and there is no test. Adds ``ci_lo``, ``ci_hi``, ``videos``,
    ``delta``, ``p``, ``significant``, and ``df.attrs["baseline"]`` (the row's label); for an
    accuracy, ``ci_lo``, ``ci_hi`` and ``delta`` are in %, like the metric.
    """
    from finegrain.platform.stats import Correctness, bootstrap_ci, paired_test

    df = df.copy()
    uri = df.attrs.get("uri")
    metric = df.attrs.get("metric", "")
    # statistics on fractions (per-video correctness is 0/1), reported like the metric: in %
    scale = 100.0 if is_accuracy(metric) else 1.0
    rows: list[Correctness] = []
    for _, row in df.iterrows():
        per_run = None
        if metric == metric_keys.TOP1 and uri:
            found = [per_video_correctness(uri, r) for r in row["run_ids"]]
            if found and all(f is not None for f in found):
                per_run = dict(zip(_unique(row["run_seeds"]), found, strict=True))
        rows.append(
            Correctness.from_runs(per_run)
            if per_run
            else Correctness.from_accuracies(
                dict(zip(_unique(row["run_seeds"]), [x / scale for x in row["scores"]]))
            )
        )
    intervals = [bootstrap_ci(c) for c in rows]
    df["ci_lo"] = [lo * scale for lo, _ in intervals]
    df["ci_hi"] = [hi * scale for _, hi in intervals]
    df["videos"] = [len(c.videos) for c in rows]
    tests = [
        paired_test(c, rows[baseline]) if baseline is not None and i != baseline else None
        for i, c in enumerate(rows)
    ]
    df["delta"] = [t.difference * scale if t else math.nan for t in tests]
    df["p"] = [t.p_value if t else math.nan for t in tests]
    df["significant"] = [bool(t and t.significant) for t in tests]
    labels = _group_labels(df)
    if baseline is not None and len(df):
        df.attrs["baseline"] = " / ".join(str(df.iloc[baseline][c]) for c in labels)
    return df


def baseline_row(df: pd.DataFrame, label: str | None) -> int | None:
    """The index of the row labelled ``label`` (its group values joined by " / ", or any one of
    them when that is unique); the first row by default."""
    if df.empty:
        return None
    if label is None:
        return 0
    labels = _group_labels(df)
    names = [" / ".join(str(row[c]) for c in labels) for _, row in df.iterrows()]
    hits = [i for i, n in enumerate(names) if n == label] or [
        i for i, (_, row) in enumerate(df.iterrows()) if label in {str(row[c]) for c in labels}
    ]
    if len(hits) != 1:
        raise CompareError(
            f"--baseline {label!r}: {'ambiguous' if hits else 'no such row'}; rows: "
            + ", ".join(names)
        )
    return hits[0]


def _unique(seeds: Sequence[str]) -> list[str]:
    """Seed labels made unique (two runs of one seed count as two)."""
    seen: dict[str, int] = {}
    out = []
    for s in seeds:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}#{seen[s]}")
    return out


def interval_cell(row, percent: bool = True) -> str:
    """``[lo, hi]`` of a row from :func:`with_intervals` (``percent``: an accuracy, already
    in %: one decimal)."""
    if math.isnan(row.get("ci_lo", math.nan)):
        return "—"
    return f"[{_fmt(row['ci_lo'], percent)}, {_fmt(row['ci_hi'], percent)}]"


def delta_cell(row, percent: bool = True) -> str:
    """``+3.2 (p 0.01) *`` of a row from :func:`with_intervals` (``—`` for the baseline)."""
    if math.isnan(row.get("p", math.nan)):
        return "—"
    sign = "+" if row["delta"] >= 0 else "−"
    delta = f"{sign}{_fmt(abs(row['delta']), percent)}"
    p = "p < 0.001" if row["p"] < 0.001 else f"p {row['p']:.3f}"
    return f"{delta} ({p})" + (" *" if row["significant"] else "")


def intervals_caption(df: pd.DataFrame) -> str:
    """How the intervals and tests of :func:`with_intervals` were made, with n."""
    if "ci_lo" not in df:
        return ""
    videos = sorted({int(v) for v in df["videos"] if v})
    seeds = sorted({int(n) for n in df["n"]})
    if videos:
        how = (
            f"95 % CI: bootstrap over seeds and validation videos ({'/'.join(map(str, seeds))} "
            f"seeds × {'/'.join(map(str, videos))} videos per row, 2000 resamples); "
            f"Δ: difference to `{df.attrs.get('baseline', 'the first row')}` on the same seeds "
            "and videos, sign-flip permutation test paired by video (two-sided), "
            "* p < 0.05."
        )
    else:
        how = (
            f"95 % CI: bootstrap over runs ({'/'.join(map(str, seeds))} per row; no per-video "
            "results, so no paired test)."
        )
    return how


def is_accuracy(metric: str) -> bool:
    """An accuracy, logged in % (:func:`finegrain.platform.keys.is_accuracy`)."""
    return metric_keys.is_accuracy(metric)


def _fmt(value: float, percent: bool) -> str:
    """A value as the tables print it: an accuracy (already in %) to one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.1f}" if percent else f"{value:.4f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """The comparison as a Markdown table (accuracies in %), with a caption line.

    Written by hand: ``DataFrame.to_markdown`` needs ``tabulate``, not a project dependency.
    """
    metric = df.attrs.get("metric", "value")
    percent = is_accuracy(metric)
    unit = " (%)" if percent else ""
    labels = _group_labels(df)
    stats = "ci_lo" in df
    header = [*labels, f"best {metric}{unit}", f"mean ± std{unit}"]
    header += ["95 % CI", f"Δ vs `{df.attrs.get('baseline', 'first row')}` (p)"] if stats else []
    header += ["n", "seeds", "MLflow runs"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--"] * len(labels) + ["--:"] * (3 + 2 * stats) + [":--", ":--"]) + "|",
    ]
    for _, row in df.iterrows():
        spread = _fmt(row["mean"], percent)
        if not (isinstance(row["std"], float) and math.isnan(row["std"])):
            spread += f" ± {_fmt(row['std'], percent)}"
        cells = [*(row[c] for c in labels), _fmt(row["best"], percent), spread]
        cells += [interval_cell(row, percent), delta_cell(row, percent)] if stats else []
        cells += [row["n"], row["seeds"] or "—", row["runs"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    caption = (
        f"`{metric}`: final-epoch value of each run; best = max over runs, mean ± sample std "
        f"(n-1) over runs (seeds). Experiments: {', '.join(df.attrs.get('experiments', []))}. "
        f"MLflow: `{df.attrs.get('uri', '?')}`."
    )
    if stats:
        caption += " " + intervals_caption(df)
    return caption + "\n\n" + "\n".join(lines) + "\n"


CHART_DPI = 150  # the saved bar chart's resolution
CHART_PT = 9  # its smallest text
CHART_CHAR_IN = CHART_PT * 0.6 / 72  # width of a character of that text, inches
METRIC_WORDS = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "best_top1": "best top-1 accuracy",
    "mean_class_acc": "mean class accuracy",
    "spatial_top1": "top-1 accuracy on spatial-subtle classes",
    "temporal_top1": "top-1 accuracy on temporal-subtle classes",
}


def _chart_title(df: pd.DataFrame, labels: Sequence[str]) -> str:
    """``attrs['title']`` (or the suite, or the experiments) and the metric in words."""
    metric = df.attrs.get("metric", "value")
    name = metric.removeprefix("val/").removeprefix("train/")
    what = METRIC_WORDS.get(name, name.replace("_", " "))
    split = "Validation" if metric.startswith("val/") else "Training" if metric != name else ""
    what = f"{split} {what}".strip()
    head = df.attrs.get("title") or (
        f"Ablation {df.attrs['suite']}" if df.attrs.get("suite") else None
    )
    head = head or ", ".join(map(str, df.attrs.get("experiments") or []))
    per = " / ".join(labels) or "group"
    return f"{head}: {what} per {per}" if head else f"{what[0].upper()}{what[1:]} per {per}"


def bar_figure(df: pd.DataFrame, chance: float | None = None):
    """The figure of :func:`bar_chart`."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.transforms import blended_transform_factory

    metric = df.attrs.get("metric", "value")
    percent = is_accuracy(metric)  # values already in %; ``chance`` is a fraction (1 / classes)
    chance = chance if chance is not None else df.attrs.get("chance")
    chance = chance if percent else None  # a chance level is an accuracy
    group_labels = _group_labels(df)
    names = [" / ".join(str(row[c]) for c in group_labels) for _, row in df.iterrows()]
    longest_word = max((len(w) for n in names for w in n.split()), default=1)
    column = max(0.95, longest_word * CHART_CHAR_IN + 0.15)  # inches per bar
    chars = int(column / CHART_CHAR_IN)
    ticks = [textwrap.fill(n, chars, break_long_words=False, break_on_hyphens=False) for n in names]
    mean = df["mean"].to_numpy(float)
    std = df["std"].to_numpy(float)  # NaN (one run): no error bar
    best = df["best"].to_numpy(float)
    x = list(range(len(df)))
    width = max(6.0, 1.4 + column * len(df))
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=CHART_DPI, layout="constrained")
    if "ci_lo" in df and df["ci_lo"].notna().any():  # the 95 % interval of with_intervals
        lo, hi = df["ci_lo"].to_numpy(float), df["ci_hi"].to_numpy(float)
        err = np.nan_to_num(np.stack([mean - lo, hi - mean]), nan=0.0)
        upper, bars = hi, "mean over seeds, 95 % CI"
        stars = df["significant"].to_numpy(bool)
        spread = (
            "error bars: 95 % interval (bootstrap over seeds and validation videos, or over "
            "seeds without per-video results)"
        )
        if "p" in df and df["p"].notna().any():
            spread += (
                f"; *: differs from {df.attrs.get('baseline', 'the first bar')} (paired "
                "permutation test, p < 0.05)"
            )
    else:
        err, upper, bars = std, mean + std, "mean over seeds ± std"
        stars = np.zeros(len(df), bool)
        spread = "error bars: ± sample std (n−1), none for a single run"
    ax.bar(x, mean, 0.7, yerr=err, color="#4c72b0", capsize=4, label=bars)
    ax.scatter(x, best, color="#dd8452", zorder=3, s=22, label="best run")
    top = np.fmax(np.nan_to_num(upper, nan=-np.inf), np.fmax(mean, best))
    for xi, m, t, star in zip(x, mean, top, stars):
        if not np.isnan(m):
            text = (f"{m:.1f} %" if percent else f"{m:.4g}") + (" *" if star else "")
            ax.annotate(
                text,
                (xi, t),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=CHART_PT,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            )
    if chance is not None:
        level = 100.0 * float(chance)
        ax.axhline(level, color="0.25", linestyle="--", linewidth=1.2, label="chance")
        ax.text(
            1.01,
            level,
            f"chance {level:.1f} %",
            transform=blended_transform_factory(ax.transAxes, ax.transData),
            ha="left",
            va="center",
            fontsize=CHART_PT,
            color="0.25",
        )
    ax.set_xticks(x, ticks)
    ax.tick_params(labelsize=CHART_PT)
    ax.set_xlim(-0.6, len(df) - 0.4)
    if percent:
        ax.set_ylim(0, 100)
    elif np.isfinite(mean).any():
        ax.set_ylim(bottom=min(0.0, float(np.nanmin(mean - np.nan_to_num(std)))))
    ax.set_ylabel(f"{metric}{' (%)' if percent else ''}", fontsize=CHART_PT + 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    title = _chart_title(df, group_labels)
    fig.suptitle(textwrap.fill(title, int((width - 0.3) * 72 / (11 * 0.6))), fontsize=11)
    caption = (
        f"Bars: mean over runs (seeds) of each run's final-epoch {metric}; {spread}; dots: "
        "best run"
        + ("; dashed line: chance (1 / number of classes)." if chance is not None else ".")
    )
    lines = textwrap.wrap(caption, int((width - 0.3) * 72 / (CHART_PT * 0.55)))
    band = 0.45 + len(lines) * CHART_PT * 1.3 / 72 + 0.15  # legend row, caption lines
    total = fig.get_figheight() + band
    fig.set_figheight(total)
    fig.get_layout_engine().set(rect=(0, band / total, 1, 1 - band / total))
    handles = sorted(ax.get_legend_handles_labels()[0], key=lambda h: h.get_label() != bars)
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, band / total),
        ncols=len(handles),
        fontsize=CHART_PT,
        frameon=False,
    )
    fig.text(0.15 / width, 0.08 / total, "\n".join(lines), fontsize=CHART_PT, color="0.2")
    return fig


def bar_chart(df: pd.DataFrame, path: str | os.PathLike, chance: float | None = None) -> Path:
    """Bars of the mean over seeds with ± std error bars, the best run as a dot (accuracies,
    logged in %: axis 0–100 %) and, with ``chance`` (default ``df.attrs["chance"]``, a
    fraction, e.g. 1 / number of classes), a dashed chance line; titled from ``df.attrs``
    (``title``, ``suite`` or ``experiments``)."""
    import matplotlib.pyplot as plt

    fig = bar_figure(df, chance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)
    return path


def write_report(df: pd.DataFrame, out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` (Markdown) and the bar chart beside it (same name, ``.png``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    bar_chart(df, png)
    out.write_text(to_markdown(df) + f"\n![{df.attrs.get('metric', '')}]({png.name})\n")
    return out, png
