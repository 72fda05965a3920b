"""Thread policy under load: the quickstart's eval and RL step, quiet and next to busy processes.

Runs each measurement in a fresh process, at torch's default thread count and at the thread
policy's choice (the cores other processes leave free), first on an otherwise
quiet machine, then with two busy background processes (pure-Python spin loops). Needs a finished
quickstart run (``make quickstart``). Writes docs/bench/threads.json and prints a Markdown table.

    python benchmarks/threads.py [--run runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "threads.json"


def worker(run: Path, task: str, threads: int | str | None) -> dict[str, float]:
    """One measurement in this process: seconds for the eval or for one RL step."""
    import tempfile

    import torch

    from tspo.data.qa import read_qa
    from tspo.evaluation import evaluate
    from tspo.models.loading import load_policy
    from tspo.quickstart.pipeline import RunPaths, eval_rollout_config, rl_train_config
    from tspo.quickstart.settings import QuickstartSettings
    from tspo.retrieval.index import load_retriever
    from tspo.train.loop import train

    if threads == "policy":
        from tspo.utils import apply_thread_policy

        apply_thread_policy()
        threads = torch.get_num_threads()
    torch.set_num_threads(int(threads or torch.get_num_threads()))
    paths = RunPaths(run)
    settings = QuickstartSettings()
    if task == "eval":
        model, tokenizer = load_policy(str(paths.sft), device="cpu")
        torch.set_num_threads(int(threads or torch.get_num_threads()))
        examples = read_qa(paths.world / "dev.jsonl") + read_qa(paths.world / "test.jsonl")
        started = time.perf_counter()
        with torch.no_grad():
            evaluate(
                model,
                tokenizer,
                load_retriever(paths.index),
                examples,
                rollout=eval_rollout_config(settings.rl),
                batch_size=settings.eval.batch_size,
                show_progress=False,
            )
        return {"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
    from dataclasses import replace

    rl = replace(settings.rl, steps=2, eval_every=0)
    # The trainer applies the thread policy when it loads the model; pin it to this measurement's.
    os.environ["TSPO_THREADS"] = str(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as folder:
        config = rl_train_config(paths, rl, output_dir=Path(folder), show_progress=False)
        metrics = train(config).metrics
    return {"seconds": metrics[-1]["step_seconds"], "threads": torch.get_num_threads()}


def measure(run: Path, task: str, threads: int | str | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--run", str(run), "--worker", task]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--worker", choices=("eval", "rl_step"))
    parser.add_argument("--threads", help="a number, or 'policy' for tspo's thread policy")
    args = parser.parse_args()
    if args.worker:
        threads = args.threads if args.threads in (None, "policy") else int(args.threads)
        print(json.dumps(worker(args.run, args.worker, threads)))
        return
    from tspo.utils import machine_info

    if not (args.run / "sft" / "config.json").is_file():
        sys.exit(f"error: {args.run} holds no finished quickstart run; run `make quickstart` first")
    rows = []
    for load in (0, 2):
        spinners = busy_processes(load)
        try:
            time.sleep(2 if load else 0)
            for task in ("eval", "rl_step"):
                for label, threads in (("torch default", None), ("policy", "policy")):
                    result = measure(args.run, task, threads)
                    rows.append({"task": task, "busy": load, "setting": label, **result})
                    print(rows[-1], flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()
    quiet = {(r["task"], r["setting"]): r["seconds"] for r in rows if r["busy"] == 0}
    for row in rows:
        row["ratio_to_quiet_same_setting"] = row["seconds"] / quiet[(row["task"], row["setting"])]
        row["ratio_to_quiet_default"] = row["seconds"] / quiet[(row["task"], "torch default")]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print(
        "| task | busy processes | threads | seconds | vs quiet, same threads | vs quiet, default |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['task']} | {r['busy']} | {r['setting']} ({r['threads']}) | {r['seconds']:.1f} | "
            f"{r['ratio_to_quiet_same_setting']:.2f}x | {r['ratio_to_quiet_default']:.2f}x |"
        )


if __name__ == "__main__":
    main()
