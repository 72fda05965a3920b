"""`tspo compare`: aggregation over seeds, the summary table, and a miniature run end to end."""

from __future__ import annotations

import json

import pytest
from quickstart_helpers import mini_settings
from rich.console import Console

from tspo.quickstart.compare import COMPARE_PLOTS, aggregate, run_compare, summary_table
from tspo.quickstart.report import Curve, mean_std_curve, steps_to_reach


def test_mean_std_curve_uses_steps_every_seed_has():
    curve = mean_std_curve([[(0, 0.2), (10, 0.4), (20, 0.6)], [(0, 0.4), (10, 0.6)]])
    assert curve.steps == [0, 10]
    assert curve.mean == pytest.approx([0.3, 0.5])
    assert curve.std == pytest.approx([0.1, 0.1])


def test_steps_to_reach_is_the_first_step_at_or_above_target():
    curve = Curve([0, 10, 20, 30], [0.1, 0.3, 0.5, 0.4], [0, 0, 0, 0])
    assert steps_to_reach(curve, 0.3) == 10
    assert steps_to_reach(curve, 0.5) == 20
    assert steps_to_reach(curve, 0.6) is None


def test_summary_table_reports_final_em_and_steps_to_grpo_final():
    results = [
        {"estimator": "grpo", "seed": s, "dev_em": [(0, 0.2), (10, 0.3), (20, 0.4)]}
        for s in range(2)
    ] + [
        {"estimator": "tspo", "seed": 0, "dev_em": [(0, 0.2), (10, 0.4), (20, 0.5)]},
        {"estimator": "tspo", "seed": 1, "dev_em": [(0, 0.2), (10, 0.4), (20, 0.3)]},
    ]
    for r, test_em in zip(results, (0.3, 0.3, 0.5, 0.3), strict=True):
        r["test_em_final"] = test_em
        for key, *_ in COMPARE_PLOTS:
            r.setdefault(key, [(1, 0.5)])
    table = summary_table(aggregate(results, ["grpo", "tspo"]), results)
    assert "| grpo | 0.300 ± 0.000 | 0.400 ± 0.000 | 20 | 0.500 | 0.500 | 0.500 |" in table
    assert "| tspo | 0.400 ± 0.100 | 0.400 ± 0.100 | 10 |" in table


def test_miniature_compare_runs_end_to_end(tmp_path):
    console = Console(record=True, width=160)
    report = run_compare(
        tmp_path,
        mini_settings(steps=2, checkpoint_every=None),
        ["grpo", "tspo"],
        seeds=1,
        eval_every=1,
        console=console,
    )
    text = report.read_text()
    assert "| grpo |" in text and "| tspo |" in text
    for _, filename, *_ in COMPARE_PLOTS:
        assert (tmp_path / "img" / filename).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "runs/tspo-seed0/stage.json").read_text())
    assert [step for step, _ in record["result"]["dev_em"]] == [0, 1, 2]
    assert 0.0 <= record["result"]["test_em_final"] <= 1.0
    # A rerun reuses every finished run instead of training again.
    console = Console(record=True, width=160)
    run_compare(
        tmp_path,
        mini_settings(steps=2, checkpoint_every=None),
        ["grpo", "tspo"],
        seeds=1,
        eval_every=1,
        console=console,
    )
    assert console.export_text().count("reusing") >= 5
    # The report times the runs, not only the invocation that reused them.
    assert record["result"]["seconds"] > 0
    minutes = (
        sum(
            json.loads((tmp_path / f"runs/{name}-seed0/stage.json").read_text())["result"][
                "seconds"
            ]
            for name in ("grpo", "tspo")
        )
        / 60
    )
    assert f"the runs themselves {minutes:.1f} min" in report.read_text()


def test_run_minutes_says_how_many_runs_were_not_timed():
    from tspo.quickstart.compare import run_minutes

    assert run_minutes([{"seconds": 60.0}, {"seconds": 30.0}]) == "1.5 min"
    assert run_minutes([{"seconds": 60.0}, {}]) == "1.0 min (1 of 2 runs not timed)"
