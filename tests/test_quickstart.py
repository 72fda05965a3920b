"""A miniature quickstart end to end: every stage, the report with its plots, stage reuse."""

from __future__ import annotations

import json

import pytest
from quickstart_helpers import mini_settings
from rich.console import Console

from tspo.quickstart.pipeline import (
    RunPaths,
    base_fingerprint,
    ensure_index,
    ensure_policy,
    ensure_world,
    rl_train_config,
)
from tspo.quickstart.run import run_quickstart
from tspo.quickstart.settings import QuickstartSettings

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
        fingerprint(
            changed.world,
            changed.policy,
            changed.rl.topk,
            changed.rl.max_turns,
            changed.rl.max_obs_tokens,
            base_fingerprint(changed.policy.base),
        ),
    )


def test_cli_help_lists_the_commands():
    from typer.testing import CliRunner

    from tspo.cli import app

    for command in (["quickstart", "--help"], ["compare", "--help"], ["sft", "--help"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        assert "--out" in result.output


def _kl_after_steps(out, tmp_path, lr: float) -> list[float]:
    """KL to the SFT start over a few RL steps with the quickstart's RL defaults at ``lr``."""
    from dataclasses import replace

    from tspo.train.loop import train

    rl = replace(
        QuickstartSettings().rl,
        lr=lr,
        top_p=1.0,  # full sampling, as when the collapse was seen: top-p 0.9 also damps it
        steps=COLLAPSE_STEPS,
        prompts_per_step=4,
        group_size=4,
        max_turns=2,
        max_turn_tokens=16,
        max_obs_tokens=48,
        topk=2,
        eval_every=0,
    )
    config = rl_train_config(
        RunPaths(out), rl, output_dir=tmp_path / f"rl-{lr}", show_progress=False
    )
    return [m["kl_ref"] for m in train(config).metrics]


COLLAPSE_STEPS = 5
COLLAPSE_KL = 0.05


def test_rl_defaults_stay_near_the_sft_start_where_a_high_lr_runs_away(finished_run, tmp_path):
    """Regression test for the collapse the quickstart once showed: at lr 3e-4 the KL to the SFT
    start passed 1 within five steps and the policy drifted into mixed, invalid tags. The default
    learning rate must keep the policy near its start; a much larger one must not (the control:
    1e-3, since from today's miniature SFT start 3e-4 stays under the threshold in five steps)."""
    out, _, _ = finished_run
    assert max(_kl_after_steps(out, tmp_path, QuickstartSettings().rl.lr)) < COLLAPSE_KL
    assert max(_kl_after_steps(out, tmp_path, 1e-3)) > COLLAPSE_KL


def test_sft_cuts_observations_to_the_rollout_budget(tmp_path, monkeypatch):
    """SFT must see observations as RL and evaluation will: cut to ``rl.max_obs_tokens``.

    A policy fine-tuned on whole observations but rolled out on cut ones learned to start most
    answers with a broken turn.
    """
    import tspo.train.sft

    budgets = []
    real_encode = tspo.train.sft.encode_episode

    def recording_encode(*args, **kwargs):
        budgets.append(kwargs["max_obs_tokens"])
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tspo.train.sft, "encode_episode", recording_encode)
    monkeypatch.setattr(tspo.train.sft, "train_sft", lambda *a, **k: [1.0])
    settings = mini_settings(max_obs_tokens=37)
    paths = RunPaths(tmp_path)
    console = Console(quiet=True)
    world = ensure_world(paths, settings, console)
    retriever = ensure_index(paths, settings, console)
    ensure_policy(paths, world, retriever, settings, console)
    assert budgets and set(budgets) == {37}


def test_sft_starts_from_distinct_tag_embeddings_and_weights_the_tags(tmp_path, monkeypatch):
    """The shipped base never saw the protocol tags and holds them as one vector; with it the
    policy closed `<search>` with `</answer>` on most later hops. The quickstart's SFT gives them
    distinct embeddings and up-weights the tags' tokens in the loss."""
    import torch
    from transformers import AutoTokenizer

    import tspo.train.sft
    from tspo.models.loading import resolve_model_path
    from tspo.protocol import PROTOCOL_TAGS

    seen = {}

    def recording_train(model, examples, config, **kwargs):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tspo-tiny-base"))
        ids = torch.tensor(tspo.train.sft.single_token_ids(tokenizer, PROTOCOL_TAGS))
        tags = model.get_input_embeddings().weight[ids].detach()
        unit = tags / tags.norm(dim=-1, keepdim=True)
        seen["cosine"] = (unit @ unit.T)[~torch.eye(len(ids), dtype=torch.bool)].max().item()
        seen["weights"] = {w for example in examples for w in example.loss_mask}
        return [1.0]

    monkeypatch.setattr(tspo.train.sft, "train_sft", recording_train)
    settings = mini_settings()
    paths = RunPaths(tmp_path)
    console = Console(quiet=True)
    world = ensure_world(paths, settings, console)
    retriever = ensure_index(paths, settings, console)
    ensure_policy(paths, world, retriever, settings, console)
    assert seen["cosine"] < 0.9
    weight = QuickstartSettings().policy.sft.action_tag_weight
    assert weight > 1 and seen["weights"] == {0.0, 1.0, weight}


def test_final_policy_is_the_rl_checkpoint_with_the_best_dev_em(tmp_path):
    from tspo.quickstart.pipeline import best_dev_checkpoint
    from tspo.quickstart.report_quickstart import _final_policy_sentence
    from tspo.train.checkpoint import STATE_FILE, TRAINER_STATE_FILE, checkpoint_name

    def save(step: int) -> None:
        folder = tmp_path / checkpoint_name(step)
        folder.mkdir()
        for name in (STATE_FILE, TRAINER_STATE_FILE):
            (folder / name).write_text("")

    rows = [
        {"step": step, "em": em} for step, em in ((0, 0.9), (10, 0.5), (20, 0.6), (30, 0.6))
    ]  # step 0 is the SFT start: never chosen
    assert best_dev_checkpoint([], tmp_path) is None  # nothing evaluated
    save(10)
    save(20)
    (tmp_path / checkpoint_name(30)).mkdir()  # a save that never finished does not count
    assert best_dev_checkpoint(rows, tmp_path) == (tmp_path / checkpoint_name(20), 20)
    save(40)
    assert best_dev_checkpoint(rows, tmp_path) == (tmp_path / checkpoint_name(20), 20)
    (tmp_path / checkpoint_name(30)).rmdir()
    save(30)
    assert best_dev_checkpoint(rows, tmp_path) == (
        tmp_path / checkpoint_name(30),
        30,
    )  # ties: later
    assert "step 20's" in _final_policy_sentence(20, 30)
    assert _final_policy_sentence(30, 30) == "The final policy is the last step's."


def test_rl_checkpoints_at_every_dev_evaluation(tmp_path):
    from dataclasses import replace

    settings = QuickstartSettings()
    config = rl_train_config(RunPaths(tmp_path), settings.rl, output_dir=tmp_path / "rl")
    assert config.checkpoint.every == settings.rl.eval_every
    assert config.checkpoint.keep_last > settings.rl.steps // settings.rl.eval_every
    no_eval = replace(settings.rl, eval_every=0)
    config = rl_train_config(RunPaths(tmp_path), no_eval, output_dir=tmp_path / "rl")
    assert config.checkpoint.every == settings.rl.steps


def test_quickstart_last_flag_keeps_the_last_rl_step(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tspo.quickstart.run as run_module
    from tspo.cli import app

    seen = []
    monkeypatch.setattr(
        run_module, "run_quickstart", lambda out, settings, **_: seen.append(settings)
    )
    for flags, keep_best in (([], True), (["--last"], False)):
        result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), *flags])
        assert result.exit_code == 0, result.output
        assert seen.pop().rl.keep_best_dev is keep_best


def test_after_rl_test_em_is_drawn_at_the_step_of_the_evaluated_policy(tmp_path, monkeypatch):
    import tspo.quickstart.report_quickstart as report
    from tspo.quickstart.pipeline import RunPaths

    drawn = {}

    def capture(metrics, keys, path, *, points=None, **_):
        drawn[path.name] = points

    monkeypatch.setattr(report, "plot_step_metrics", capture)
    metrics = [{"step": step} for step in range(1, 26)]
    report.write_plots(RunPaths(tmp_path), metrics, (0.35, 0.63), "tspo", final_step=20)
    assert drawn[report.PLOTS["reward"]]["test EM (held-out entities)"] == ([0, 20], [0.35, 0.63])
    report.write_plots(RunPaths(tmp_path), metrics, (0.35, 0.63), "tspo")  # --last: the last step
    assert drawn[report.PLOTS["reward"]]["test EM (held-out entities)"] == ([0, 25], [0.35, 0.63])
