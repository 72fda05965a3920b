"""A miniature quickstart end to end: every stage, the report with its plots, stage reuse."""

from __future__ import annotations

import json

import pytest
from quickstart_helpers import mini_settings
from rich.console import Console

from tspo.quickstart.pipeline import RunPaths, ensure_index, ensure_policy, ensure_world
from tspo.quickstart.run import run_quickstart

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    console = Console(record=True, width=120)
    report = run_quickstart(out, mini_settings(), console=console, show_progress=False)
    return out, report, console.export_text()


def test_quickstart_writes_report_with_table_plots_and_examples(finished_run):
    out, report, printed = finished_run
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    assert "| **all** |" in text and "EM before" in text and "searches after" in text
    assert text.count("### Example") == 3
    assert "Before RL (SFT start)" in text and "After RL" in text
    for name in ("quickstart-reward.png", "quickstart-zero-signal.png", "quickstart-near-miss.png"):
        assert f"img/{name}" in text
        assert (out / "img" / name).read_bytes()[:8] == PNG_MAGIC
    assert f"report: {report}" in printed.replace("\n", "")


def test_quickstart_evaluates_sft_start_and_final_policy_on_test_split(finished_run):
    out, _, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["overall"]["count"] == 4 == summary["after"]["overall"]["count"]
    assert summary["test_em_gain"] == pytest.approx(
        summary["test_em_final"] - summary["test_em_sft"]
    )
    test_ids = {json.loads(line)["id"] for line in (out / "world/test.jsonl").open()}
    for stage in ("sft", "final"):
        rows = [json.loads(line) for line in (out / "eval" / stage / "trajectories.jsonl").open()]
        assert {r["id"] for r in rows} <= test_ids
    metrics = [json.loads(line) for line in (out / "rl/metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "sft")
    AutoTokenizer.from_pretrained(out / "sft")


def test_rerun_reuses_world_index_and_sft(finished_run):
    out, _, _ = finished_run
    settings = mini_settings()
    paths = RunPaths(out)
    weights = next(paths.sft.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    console = Console(record=True, width=200)
    world = ensure_world(paths, settings, console)
    retriever = ensure_index(paths, settings, console)
    ensure_policy(paths, world, retriever, settings, console)
    printed = console.export_text()
    assert printed.count("reusing") == 3
    assert weights.stat().st_mtime_ns == before
    # A different policy setting invalidates only the SFT stage.
    from dataclasses import replace

    changed = replace(settings, policy=replace(settings.policy, wrong_query=0.3))
    console = Console(record=True, width=200)
    ensure_world(paths, changed, console)
    assert "reusing" in console.export_text()
    from tspo.quickstart.pipeline import fingerprint, is_done

    assert not is_done(
        paths.sft,
        fingerprint(changed.world, changed.policy, changed.rl.topk, changed.rl.max_turns),
    )


def test_cli_help_lists_the_commands():
    from typer.testing import CliRunner

    from tspo.cli import app

    for command in (["quickstart", "--help"], ["compare", "--help"], ["sft", "--help"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        assert "--out" in result.output
