"""The SmolLM2 recipe in miniature (`make smollm2-wiki`): wiki data -> `tspo sft --data` ->
`tspo train --config configs/smollm2-wiki.yaml` (two steps, then a resume) -> `tspo eval`, with a
micro Llama built in code in place of SmolLM2 and a six-article corpus in place of the extracts."""

from __future__ import annotations

import json
from pathlib import Path

from train_helpers import single_thread
from typer.testing import CliRunner
from wiki_helpers import build_wiki_folder

from tspo.evaluation import OVERALL

PRESET = Path(__file__).resolve().parents[1] / "configs" / "smollm2-wiki.yaml"


def test_recipe_in_miniature(tmp_path: Path) -> None:
    from tspo.cli import app

    data = build_wiki_folder(tmp_path / "wiki")
    run = tmp_path / "run"
    runner = CliRunner()

    def invoke(*args: str) -> str:
        with single_thread():
            result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.stdout

    invoke(
        "sft", "--data", str(data), "--base", str(data / "model"), "--out", str(run / "sft"),
        "--episodes", "4", "--batch-size", "2", "--topk", "2", "--max-obs-tokens", "96",
        "--device", "cpu", "--threads", "1",
    )  # fmt: skip
    assert json.loads((run / "sft" / "tspo_sft.json").read_text())["episodes"] == 4
    # The preset as `make smollm2-wiki` runs it, with the paths moved and the turns cut short.
    train = [
        "train", "--config", str(PRESET), "--resume", "auto", "--threads", "1",
        f"model.name={run / 'sft'}", f"train.output_dir={run / 'rl'}",
        f"data.train_files=[{data / 'train.jsonl'}]", f"retriever.corpus={data / 'corpus.jsonl'}",
        f"eval.files=[{data / 'dev.jsonl'}]", "rollout.max_turn_tokens=8",
        "rollout.use_chat_template=false", "logging.progress=false",
    ]  # fmt: skip
    invoke(*train, "train.steps=1")
    invoke(*train, "train.steps=2")  # resumes from step 1, as a restarted `make` does
    metrics = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["num_trajectories"] == 8 for m in metrics)  # the preset's 2 x 4
    checkpoint = sorted((run / "rl" / "checkpoints").glob("step-*"))[-1]
    assert checkpoint.name == "step-00000002"
    out = invoke(
        "eval", "--model", str(checkpoint), "--data", str(data / "test.jsonl"),
        "--corpus", str(data / "corpus.jsonl"), "--device", "cpu", "--threads", "1", "--json",
    )  # fmt: skip
    scores = json.loads(out)["scores"]
    assert list(scores) == ["wiki_single", "wiki_bridge", OVERALL]
    assert scores[OVERALL]["count"] == 6
