"""RL steps of the SmolLM2 preset (configs/smollm2-wiki.yaml, 8 trajectories) in bf16 autocast
and in fp32: step time split into rollout, log-probs (old and reference) and update, and peak RSS.

Each setting runs as its own ``tspo train --config configs/smollm2-wiki.yaml train.steps=N``
process (so its peak RSS is its own) with validation off, from the SFT start (``--model``,
default ``runs/smollm2-wiki/sft``). ``log-probs`` is the step minus rollout and update: the
recomputed old log-probs (none when the update's own pass gives them), the frozen reference's
log-probs and the advantages. With ``--steps N`` > 1 the times are the mean of steps 2..N and the
peak RSS is the whole run's (AdamW's state exists from the first optimizer step on, so step 1
alone understates what a run needs); ``peak_rss_gb_by_step`` lists the running peak.

    python benchmarks/smollm2_step.py [--model DIR] [--settings bf16,fp32] [--threads 2] \
        [--steps 1] [--set model.ref_dtype=model ...]

``--set FIELD=VALUE`` (repeatable) adds config overrides to every setting, e.g.
``model.ref_dtype=model`` for the float32 reference copy that was the only choice before
``model.ref_dtype`` (default ``auto``: bf16 linear weights under bf16 autocast). Prints one JSON
line per setting and a Markdown table; the machine's load average is recorded with each run (the
CPU may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "smollm2-wiki.yaml"


def run_steps(
    model: str, bf16: bool, threads: int, steps: int, out: Path, overrides: list[str]
) -> dict[str, object]:
    command = [
        sys.executable, "-m", "tspo.cli", "train", "--config", str(PRESET), "--threads",
        str(threads), f"model.name={model}", f"train.output_dir={out}", f"train.steps={steps}",
        f"train.bf16={'true' if bf16 else 'false'}", "eval.every=0", "logging.progress=false",
        f"data.train_files=[{ROOT / 'data/wiki/train.jsonl'}]",
        f"retriever.corpus={ROOT / 'data/wiki/corpus.jsonl'}", *overrides,
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    per_step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = per_step[1:] or per_step  # step 1 also pays for first-call warm-up

    def mean(key: str) -> float:
        return sum(m[key] for m in timed) / len(timed)

    rollout, update, step = (mean(k) for k in ("rollout_seconds", "update_seconds", "step_seconds"))
    metrics = per_step[-1]
    return {
        "setting": ("bf16 autocast" if bf16 else "fp32") + "".join(f", {o}" for o in overrides),
        "steps": steps,
        "step_s": round(step, 1),
        "rollout_s": round(rollout, 1),
        "logprobs_s": round(step - rollout - update, 1),
        "update_s": round(update, 1),
        "peak_rss_gb": round(metrics["peak_rss_mb"] / 1024, 2),
        "peak_rss_gb_by_step": [round(m["peak_rss_mb"] / 1024, 2) for m in per_step],
        "process_wall_s": round(wall, 1),
        "generated_tokens": metrics["generated_tokens"],
        "update_tokens": metrics["update_tokens"],
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "runs/smollm2-wiki/sft"))
    parser.add_argument("--settings", default="bf16,fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    rows = []
    for name in args.settings.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            bf16 = name.strip() == "bf16"
            row = run_steps(args.model, bf16, args.threads, args.steps, Path(tmp) / "run", args.set)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| setting | steps | step s | rollout s | log-probs s | update s | peak RSS GB | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['steps']} | {r['step_s']} | {r['rollout_s']} | "
            f"{r['logprobs_s']} | {r['update_s']} | {r['peak_rss_gb']} | {r['load_avg_1min']} |"
        )


if __name__ == "__main__":
    main()
