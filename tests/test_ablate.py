"""Ablation suites (issue 6 §3): suite definitions, errors, and one 2 × 2 suite end to end."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import ray
from helpers import TINY_RUN
from mlflow.tracking import MlflowClient

from finegrain.platform import ablate
from finegrain.platform.config import ConfigError
from finegrain.platform.tracking import RUN_NAME_TAG, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "scaling.cpus_per_worker=0.5", "data.decode_cpus=0.5"]


@pytest.mark.parametrize("name", list(ablate.suites()))
def test_every_suite_builds_valid_configs(name):
    suite = ablate.get_suite(name)
    names = [v.name for v in suite.variants]
    assert len(set(names)) == len(names)
    base = ablate.load_base(suite)  # tune_synthetic: 8 frames (DSTS), 4 epochs (U2S: 3 stages)
    ablate.check_suite(base, suite, suite.variants)  # validate + build + a dummy clip, no training
    for v in suite.variants:
        cfg = ablate.variant_config(base, suite, v, seed=2)
        assert cfg.run.name == f"ablate-{name}-{v.name}-s2" and cfg.run.seed == 2
        assert cfg.tracking.experiment == f"ablate-{name}"
        for key, value in {**v.overrides}.items():
            section, _, option = key.partition(".")
            assert getattr(getattr(cfg, section), option) == value
        if v.evaluates:  # evaluation-only rows: the trained row's config + their own options
            ref = ablate.variant_config(base, suite, suite.variant(v.evaluates), seed=2)
            assert cfg.model.model_dump() == {**ref.model.model_dump(), **cfg.model.model_extra}


def test_a_suite_row_names_the_runs_that_did_not_finish(tmp_path):
    """A crashed run is a row that says "failed: <its error>", never a silent "— / n 0"."""
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ablate-dfb")

    def run(variant: str, seed: int, status: str, **tags: str) -> None:
        r = client.create_run(exp, tags={"suite": "dfb", "variant": variant, **tags})
        client.log_param(r.info.run_id, "run.seed", seed)
        client.set_terminated(r.info.run_id, status)

    run("gb", 0, "FINISHED")
    run("gb", 1, "FAILED", error="ActorDiedError: the actor died")
    run("gb_df", 0, "KILLED", early_stopped="true")
    unfinished = ablate._unfinished(uri, "ablate-dfb")
    assert unfinished == {
        "gb": ["seed 1 failed: ActorDiedError: the actor died"],
        "gb_df": ["seed 0 stopped early"],
    }
    table = pd.DataFrame(
        [
            {"table": 1, "variant": v, "setting": "x", "top1_mean": m, "top1_std": float("nan"),
             "n": n, "seeds": s, "runs": "", "failed": "; ".join(unfinished.get(v, []))}
            for v, m, n, s in (("gb", 50.0, 1, "0"), ("gb_df", float("nan"), 0, ""))
        ]
    )  # fmt: skip
    table.attrs["columns"] = ["top1"]
    lines = [line for line in ablate.to_markdown(table).splitlines() if line.startswith("|")]
    assert lines[0].endswith("| not finished |")
    assert lines[2].endswith("| seed 1 failed: ActorDiedError: the actor died |")
    assert "| — |" in lines[3] and lines[3].endswith("| seed 0 stopped early |")


def test_a_mechanism_verdict_needs_two_seeds(tmp_path):
    """One seed's mechanism scores give no interval (they are per run: nothing to resample), so
    no verdict either; two seeds give both, in the method's own words."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ablate-dfb")
    suite = ablate.get_suite("dfb")
    variants = ablate.select(suite, ["gb_df", "gb_df_lb"])

    def run(variant: str, hit: float) -> None:
        r = client.create_run(exp, tags={"suite": "dfb", "variant": variant})
        scores = {"evidence_hit": hit, "evidence_chance": 0.06, "evidence_lift": hit - 0.06}
        for key, value in scores.items():
            client.log_metric(r.info.run_id, f"mech/{key}", value)
        client.set_terminated(r.info.run_id, "FINISHED")

    run("gb_df", 0.30)  # one seed
    run("gb_df_lb", 0.30)
    run("gb_df_lb", 0.34)  # two seeds
    df = ablate.mechanism_table(uri, "ablate-dfb", suite, variants)
    one = df[df["variant"] == "gb_df"]
    assert (one["n"] == 1).all() and one["ci_lo"].isna().all()
    md = ablate.mechanisms_markdown(df, suite, variants)
    assert "| `gb_df` | dfb | evidence_hit | 0.300 | — | 1 |" in md
    assert "- `gb_df` (DFB): not tested: one seed gives no interval" in md
    assert "- `gb_df_lb` (DFB): holds: the true class's top filter cell 32 % in the part" in md


def test_unknown_suite_variant_and_bad_epochs_are_clear_errors(capsys):
    with pytest.raises(ConfigError, match=r"--suite 'nope'.*valid: dsts, u2s"):
        ablate.get_suite("nope")
    with pytest.raises(ConfigError, match=r"'nope': not a variant of suite 'dfb'; valid: gb, "):
        ablate.select(ablate.get_suite("dfb"), ["nope"])
    u2s = ablate.get_suite("u2s")
    assert [v.name for v in ablate.select(u2s, ["oracle"])] == ["full", "oracle"]
    with pytest.raises(ConfigError, match=r"variant 'full': optim.epochs=2 is fewer than"):
        ablate.check_suite(ablate.load_base(u2s, epochs=2), u2s, ablate.select(u2s, ["full"]))
    cli = _load_cli()  # the CLI exits 2 with the message, before Ray or MLflow start
    assert cli.main(["--suite", "dfb", "--variants", "nope"]) == 2
    assert "not a variant of suite 'dfb'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def _load_cli():
    spec = importlib.util.spec_from_file_location("ablate_cli", ROOT / "experiments/ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_variants_table_matches_mlflow_and_rerun_adds_nothing(tmp_path, capsys):
    """A suite end to end, at its smallest: two variants, one seed each (two runs, at once).

    What a row does with several seeds (mean ± std over them, the two-way bootstrap interval
    over seeds × videos, the test paired by seed and video) is :func:`compare`'s and
    :func:`with_intervals`'s, tested on a store of logged runs in tests/test_compare.py; the
    suite table is built from them (test_a_suite_row_names_the_runs_that_did_not_finish). Here:
    the runs a suite trains, their names and tags, its table against their MLflow values, its
    markdown, figure and summary run, the evaluation path, and a rerun that trains nothing."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")
    try:
        base = ablate.load_base("dfb", None, [*TINY, f"run.dir={tmp_path}"])
        # two runs at once: half a logical CPU for each trainer and decode actor fits both in 4
        result = ablate.run_suite(
            "dfb", base, seeds=[0], variants=["gb", "gb_df"], max_concurrent=2
        )
        assert result.failed == []
        table = result.table
        assert table["variant"].tolist() == ["gb", "gb_df"] and table["n"].tolist() == [1, 1]

        client = MlflowClient(resolve_tracking_uri(None, tmp_path))
        exp = client.get_experiment_by_name("ablate-dfb")
        runs = client.search_runs([exp.experiment_id])
        seeds = [r for r in runs if r.data.tags.get("ablation") != "summary"]
        assert sorted(r.data.tags[RUN_NAME_TAG] for r in seeds) == [
            f"ablate-dfb-{v}-s0" for v in ("gb", "gb_df")
        ]
        lines = result.markdown_path.read_text().splitlines()
        for row in table.itertuples():
            (mine,) = [r for r in seeds if r.data.tags["variant"] == row.variant]
            assert mine.data.tags["suite"] == "dfb" and mine.data.params["run.seed"] == "0"
            assert row.top1_mean == pytest.approx(mine.data.metrics["val/top1"])  # in %
            assert math.isnan(row.top1_std)  # one seed: no std, and the cell says so
            assert row.top5_mean == pytest.approx(mine.data.metrics["val/top5"])
            cell = f"| {mine.data.metrics['val/top1']:.1f} |"
            assert any(f"`{row.variant}`" in line and cell in line for line in lines), lines
        assert sum(line.startswith("| 1 | `") for line in lines) == 2  # 2 rows (paper Table 1)
        # an interval over the videos, and gb_df tested against the first row, gb
        assert (table["top1_ci_lo"] <= table["top1_mean"]).all()
        assert (table["top1_mean"] <= table["top1_ci_hi"]).all()
        assert table["videos"].tolist() == [4, 4] and math.isnan(table["top1_p"][0])
        assert 0 < table["top1_p"][1] <= 1
        assert any(line.startswith("|") and "Δ top-1 vs `gb` (p)" in line for line in lines)
        assert result.png_path.stat().st_size > 0

        summary = client.get_run(result.summary_run_id)
        assert summary.data.tags["ablation"] == "summary" and summary.info.status == "FINISHED"
        # artifacts went through the suite's mlflow server into <run dir>/mlartifacts
        folder = next((tmp_path / "mlartifacts").glob(f"*/{result.summary_run_id}/artifacts"))
        assert {"table.md", "table.png", "suite.yaml"} <= {p.name for p in folder.iterdir()}
        assert (folder / "table.md").read_text() == result.markdown_path.read_text()
        child = next((tmp_path / "mlartifacts").glob(f"*/{seeds[0].info.run_id}/artifacts"))
        assert (child / "config.yaml").is_file()
        # (that the README's `mlflow ui`, started elsewhere, serves what a sweep's server stored
        # there is test_tune.py's job-submit test: suites and sweeps share tracking_server)

        # the evaluation path (U2S's oracle / fusion rows) reproduces a run's own val metrics
        cfg = ablate.variant_config(
            base, ablate.get_suite("dfb"), ablate.get_suite("dfb").variants[0], 0
        )
        task = ray.remote(ablate.evaluate_checkpoint)  # as run_suite runs it: a Ray task
        out = ray.get(task.remote(cfg.model_dump(mode="json"), ablate.final_checkpoint(cfg)))
        gb0 = next(r for r in seeds if r.data.tags[RUN_NAME_TAG] == cfg.run.name)
        assert out["epoch"] == 1
        assert out["metrics"]["val/top1"] == pytest.approx(gb0.data.metrics["val/top1"])

        again = ablate.run_suite("dfb", base, seeds=[0], variants=["gb", "gb_df"], max_concurrent=1)
        assert "2 already finished, 0 to train" in capsys.readouterr().out
        assert len(client.search_runs([exp.experiment_id])) == len(runs)
        assert again.table["top1_mean"].tolist() == table["top1_mean"].tolist()

        # a rerun with another config would reuse these names: run_suite refuses it
        other = ablate.load_base("dfb", None, [*TINY, f"run.dir={tmp_path}", "optim.lr=0.2"])
        other = ablate.variant_config(
            other, ablate.get_suite("dfb"), ablate.get_suite("dfb").variants[0], 0
        )
        assert ablate.config_diff(other, gb0.data.params) == ["optim.lr: 0.003 → 0.2"]
        assert ablate.config_diff(cfg, gb0.data.params) == []
    finally:
        ray.shutdown()
