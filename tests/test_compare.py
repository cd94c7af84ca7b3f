"""compare.py reproduces the numbers stored in MLflow (a temp SQLite store of fake runs)."""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.text import Text
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from finegrain.platform.compare import (
    CompareError,
    bar_chart,
    bar_figure,
    compare,
    metric_key,
    to_markdown,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SUITE = "ablate-test"
OTHER = "other-suite"

# (method, variant) -> seed -> {step: val/top1 (%)}; the value at the last step is the final one.
LOGGED = {
    ("onepass", "baseline"): {0: {1: 30.0, 2: 41.0}, 1: {1: 28.0, 2: 39.0}, 2: {1: 35.0, 2: 44.0}},
    ("dsts", "full"): {0: {1: 40.0, 2: 52.0}, 1: {1: 45.0, 2: 47.0}, 2: {1: 38.0, 2: 55.0}},
}


def _log_run(
    client, exp_id, method, variant, seed, curve, start, status="FINISHED", tags=None, old=False
):
    """A run's val/top1 and val/best_top1 curves (in %); ``old``: as runs logged them before the
    grouped names, val_top1 and val_best_top1 as fractions."""
    run = client.create_run(
        exp_id,
        start_time=start,
        run_name=f"{method}-{variant}-s{seed}",
        tags={"method": method, "variant": variant, "backbone": "tiny", **(tags or {})},
    )
    rid = run.info.run_id
    best, metrics = -1.0, []
    for i, (step, value) in enumerate(sorted(curve.items())):
        best = max(best, value)
        # the last epoch is logged with the *earliest* timestamp: "final" must mean last step
        ts = start + 1000 * (len(curve) - i)
        if old:
            metrics += [Metric("val_top1", value / 100, ts, step)]
            metrics += [Metric("val_best_top1", best / 100, ts, step)]
        else:
            metrics += [
                Metric("val/top1", value, ts, step),
                Metric("val/best_top1", best, ts, step),
            ]
    client.log_batch(rid, metrics=metrics, params=[Param("run.seed", str(seed))])
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store: 2 methods x 3 seeds in SUITE, plus runs compare must leave out."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(SUITE, artifact_location=(root / "art").as_uri())
    ids: dict[tuple[str, str], list[str]] = {}
    start = 1_700_000_000_000
    for (method, variant), seeds in LOGGED.items():
        for seed, curve in seeds.items():
            start += 10_000
            rid = _log_run(client, exp, method, variant, seed, curve, start)
            ids.setdefault((method, variant), []).append(rid)
    failed = _log_run(client, exp, "dsts", "full", 3, {1: 99.0, 2: 99.0}, start + 10_000, "FAILED")
    # a sweep parent with one child: the parent is a summary, not a seed
    parent = client.create_run(exp, start_time=start + 20_000, tags={"method": "dsts"})
    client.log_metric(parent.info.run_id, "val/top1", 97.0, step=1)
    client.set_terminated(parent.info.run_id)
    child = _log_run(
        client,
        exp,
        "dsts",
        "sweep",
        0,
        {1: 50.0, 2: 60.0},
        start + 30_000,
        tags={"mlflow.parentRunId": parent.info.run_id},
    )
    other = client.create_experiment(OTHER, artifact_location=(root / "art2").as_uri())
    _log_run(client, other, "u2s", "full", 0, {1: 20.0, 2: 25.0}, start + 40_000)
    return {"uri": uri, "ids": ids, "failed": failed, "parent": parent.info.run_id, "child": child}


def _final(curve: dict[int, float]) -> float:
    return curve[max(curve)]


def test_compare_reproduces_the_numbers_stored_in_mlflow(store):
    df = compare([SUITE], "top1", store["uri"])
    rows = {(r.method, r.variant): r for r in df.itertuples()}
    assert list(rows) == [("onepass", "baseline"), ("dsts", "full"), ("dsts", "sweep")]
    for key, seeds in LOGGED.items():
        finals = [_final(c) for c in seeds.values()]
        row = rows[key]
        assert row.n == 3
        assert row.best == pytest.approx(max(finals), abs=1e-12)
        assert row.mean == pytest.approx(statistics.mean(finals), abs=1e-12)
        assert row.std == pytest.approx(statistics.stdev(finals), abs=1e-12)
        assert row.seeds == "0, 1, 2"
        assert row.runs == ", ".join(r[:8] for r in store["ids"][key])
    assert df.attrs["metric"] == "val/top1"
    assert df.attrs["skipped"] == []


def test_one_run_has_no_std_and_markdown_says_so(store):
    df = compare([SUITE], "top1", store["uri"])
    sweep = df[df["variant"] == "sweep"].iloc[0]
    assert sweep["n"] == 1 and sweep["best"] == pytest.approx(60.0)
    assert sweep["std"] != sweep["std"]  # NaN
    assert "| dsts | sweep | 60.0 | 60.0 | 1 | 0 |" in to_markdown(df)


def test_metric_names_and_best_top1(store):
    assert metric_key("top1") == metric_key("val_top1") == metric_key("metrics.val_top1")
    assert metric_key("top1") == metric_key("val/top1") == "val/top1"
    assert metric_key("best_top1") == "val/best_top1"
    assert metric_key("train_loss") == "train/loss" and metric_key("lr") == "train/lr"
    assert metric_key("branch_top1_z_avg") == "val/branch_top1/z_avg"
    assert metric_key("mech/csm_precision") == "mech/csm_precision"
    assert metric_key("dsts/udl_alpha") == "dsts/udl_alpha"
    a = compare([SUITE], "top1", store["uri"])
    b = compare([SUITE], "val_top1", store["uri"])
    assert a[["best", "mean"]].equals(b[["best", "mean"]])
    best = compare([SUITE], "best_top1", store["uri"]).set_index(["method", "variant"])
    for key, seeds in LOGGED.items():
        per_run = [max(c.values()) for c in seeds.values()]
        assert best.loc[key, "mean"] == pytest.approx(statistics.mean(per_run), abs=1e-12)
        assert best.loc[key, "best"] == pytest.approx(max(per_run), abs=1e-12)


def test_unfinished_runs_only_with_all_statuses_and_sweep_parents_never(store):
    df = compare([SUITE], "top1", store["uri"], all_statuses=True)
    full = df[(df["method"] == "dsts") & (df["variant"] == "full")].iloc[0]
    assert full["n"] == 4 and full["best"] == pytest.approx(99.0)
    assert store["failed"][:8] in full["runs"]
    every = ", ".join(df["runs"])
    assert store["parent"][:8] not in every and store["child"][:8] in every


def test_group_by_and_default_grouping_over_experiments(store):
    df = compare(None, "top1", store["uri"])  # every experiment but Default
    assert list(df.columns[:3]) == ["experiment", "method", "variant"]
    assert set(df["experiment"]) == {SUITE, OTHER}
    by_method = compare([SUITE], "top1", store["uri"], group_by=["method"])
    dsts = by_method.set_index("method").loc["dsts"]
    finals = [_final(c) for c in LOGGED[("dsts", "full")].values()] + [60.0]
    assert dsts["n"] == 4 and dsts["mean"] == pytest.approx(statistics.mean(finals))
    by_seed = compare([SUITE], "top1", store["uri"], group_by=["params.run.seed"])
    assert list(by_seed["run.seed"]) == ["0", "1", "2"]


def test_errors_name_the_bad_value(store):
    with pytest.raises(CompareError, match=r"'no-such-suite' not found.*existing experiments: "):
        compare(["no-such-suite"], "top1", store["uri"])
    with pytest.raises(CompareError) as err:
        compare(["no-such-suite"], "top1", store["uri"])
    assert SUITE in str(err.value) and OTHER in str(err.value)
    with pytest.raises(CompareError, match=r"'val/top9'.*metrics: val/best_top1, val/top1"):
        compare([SUITE], "top9", store["uri"])
    with pytest.raises(CompareError, match=r"group_by 'colour'.*tags: .*variant"):
        compare([SUITE], "top1", store["uri"], group_by=["colour"])


def test_caller_tracking_uri_is_left_alone(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    compare([SUITE], "top1", store["uri"])
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"


def test_markdown_and_png_are_written(store, tmp_path):
    df = compare([SUITE], "top1", store["uri"])
    md, png = write_report(df, tmp_path / "report.md")
    text = md.read_text()
    finals = [_final(c) for c in LOGGED[("dsts", "full")].values()]
    mean, std = statistics.mean(finals), statistics.stdev(finals)
    assert f"| dsts | full | {max(finals):.1f} | {mean:.1f} ± {std:.1f} | 3 |" in text
    assert "best val/top1 (%)" in text and "report.png" in text
    assert png == tmp_path / "report.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_smoke(store, tmp_path):
    out = tmp_path / "cmp" / "report.md"
    cmd = [sys.executable, str(ROOT / "experiments" / "compare.py"), "--mlflow-uri", store["uri"]]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ok = subprocess.run(
        cmd + ["--experiment", SUITE, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "| onepass | baseline |" in ok.stdout and out.is_file()
    assert out.with_suffix(".png").is_file()


def test_cli_unknown_experiment_exits_2(store, capsys):
    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "experiments/compare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--mlflow-uri", store["uri"], "--experiment", "nope"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'nope' not found" in err and SUITE in err


# --- the bar chart ---------------------------------------------------------------------------------
def top1_frame(**attrs) -> pd.DataFrame:
    """An ablation's ``top1`` frame as ``ablate.suite_table`` passes it (one run of ``one``)."""
    df = pd.DataFrame(
        {
            "variant": ["full", "no_udl", "average_all synapse"],
            "n": [3, 3, 1],
            "best": [62.0, 55.0, 20.0],
            "mean": [58.0, 50.0, 20.0],
            "std": [3.0, 4.0, math.nan],
            "seeds": ["0, 1, 2", "0, 1, 2", "0"],
            "runs": ["a", "b", "c"],
        }
    )
    df.attrs.update(metric="val/top1", experiments=["ablate-dsts"], **attrs)
    return df


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


def test_bar_chart_reads_as_a_publication_figure(close_figures):
    fig = bar_figure(top1_frame(title="DSTS ablations"), chance=1 / 12)
    ax = fig.axes[0]
    assert fig.dpi >= 150
    assert fig.get_suptitle().startswith("DSTS ablations: Validation top-1 accuracy")
    assert ax.get_ylim() == (0, 100)
    chance = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == pytest.approx([100 / 12] * 2)
    assert "chance 8.3 %" in [t.get_text() for t in ax.texts]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars] == pytest.approx([58, 50, 20])
    segments = bars.errorbar.lines[2][0].get_segments()  # ± std; none for the single run
    spans = [s[1][1] - s[0][1] for s in segments if len(s)]
    assert spans == pytest.approx([6, 8]) and len(segments) == 3
    assert {"58.0 %", "50.0 %", "20.0 %"} <= {t.get_text() for t in ax.texts}
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "full",
        "no_udl",
        "average_all\nsynapse",
    ]
    fig.canvas.draw()
    small = [t.get_text() for t in fig.findobj(Text) if t.get_text() and t.get_fontsize() < 9]
    assert not small
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["mean over seeds ± std", "best run", "chance"]


def test_bar_chart_chance_and_title_from_attrs(tmp_path, close_figures):
    fig = bar_figure(top1_frame(chance=0.25, suite="dsts"))
    ax = fig.axes[0]
    assert fig.get_suptitle().startswith("Ablation dsts: ")
    assert "chance 25.0 %" in [t.get_text() for t in ax.texts]
    plain = bar_figure(top1_frame())  # no chance known: no line; title from the experiment
    assert not [ln for ln in plain.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert plain.get_suptitle() == "ablate-dsts: Validation top-1 accuracy per variant"
    loss = top1_frame(chance=0.25)
    loss.attrs["metric"] = "val/loss"  # not an accuracy: no chance line, no 0-100 % axis
    ax = bar_figure(loss).axes[0]
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert ax.get_ylim() != (0, 100)
    png = bar_chart(top1_frame(chance=0.25), tmp_path / "chart.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") >= 6 * 150  # pixels: saved at 150 dpi


def test_intervals_and_paired_tests_from_each_runs_per_video_results(tmp_path, close_figures):
    """Rows built from per-video files whose answer is known: a row that fixes most of the
    baseline's errors is significant, a copy of the baseline is not (p = 1), the intervals
    contain the means, and a row without per-video files falls back to seeds (no test)."""
    import numpy as np

    from finegrain.platform.compare import with_intervals
    from finegrain.platform.metrics import per_video_csv

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("iv", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    base = {s: rng.random(120) < 0.5 for s in range(3)}
    rows = {
        "baseline": base,
        "copy": base,
        "better": {s: base[s] | (rng.random(120) < 0.6) for s in range(3)},
    }
    start = 1_700_000_000_000
    for variant, seeds in rows.items():
        for seed, correct in seeds.items():
            start += 1000
            rid = _log_run(client, exp, "m", variant, seed, {1: 100 * correct.mean()}, start)
            per_video = [
                {"video_id": f"v{i:03d}", "label": 0, "pred": 0 if c else 1, "correct": int(c)}
                for i, c in enumerate(correct)
            ]
            client.log_text(rid, per_video_csv(per_video), "eval/per_video.csv")
    start += 1000
    _log_run(client, exp, "m", "no_files", 0, {1: 40.0}, start)
    _log_run(client, exp, "m", "no_files", 1, {1: 60.0}, start + 1000)

    df = with_intervals(compare(["iv"], "top1", uri))
    by = df.set_index("variant")
    assert df.attrs["baseline"] == "m / baseline"
    assert by.at["copy", "p"] == 1.0 and not by.at["copy", "significant"]
    assert by.at["better", "significant"] and by.at["better", "delta"] > 20  # in %
    assert by.at["better", "videos"] == 120 and by.at["no_files", "videos"] == 0
    assert math.isnan(by.at["no_files", "p"])  # no per-video results: no paired test
    for row in df.itertuples():
        assert row.ci_lo <= row.mean <= row.ci_hi
    md = to_markdown(df)
    assert "95 % CI" in md and "Δ vs `m / baseline` (p)" in md and " *" in md
    assert "sign-flip permutation test" in md and "2/3 seeds × 120 videos per row" in md
    fig = bar_figure(df)
    assert "95 % CI" in " ".join(t.get_text() for t in fig.legends[0].get_texts())


def test_runs_logged_before_the_grouped_names_compare_in_percent(tmp_path):
    """A run that logged val_top1 / val_best_top1 as fractions sits in the same table as one
    that logged val/top1 in %: its values are read under the old name and converted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mixed", artifact_location=(tmp_path / "art").as_uri())
    start = 1_700_000_000_000
    _log_run(client, exp, "dsts", "full", 0, {1: 30.0, 2: 40.0}, start, old=True)
    _log_run(client, exp, "dsts", "full", 1, {1: 50.0, 2: 60.0}, start + 1000)
    for name in ("top1", "val_top1", "val/top1"):
        row = compare(["mixed"], name, uri).iloc[0]
        assert row["n"] == 2 and row["mean"] == pytest.approx(50.0)
        assert row["best"] == pytest.approx(60.0)
    best = compare(["mixed"], "best_top1", uri).iloc[0]
    assert best["mean"] == pytest.approx(50.0)
    only_old = tmp_path / "old.db"
    uri = f"sqlite:///{only_old}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old", artifact_location=(tmp_path / "art2").as_uri())
    _log_run(client, exp, "onepass", "-", 0, {1: 25.0}, start, old=True)
    df = compare(["old"], "top1", uri)
    assert df.attrs["metric"] == "val/top1" and df["best"].tolist() == pytest.approx([25.0])
    assert "| 25.0 |" in to_markdown(df)
