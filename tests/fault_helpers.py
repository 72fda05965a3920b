"""Shared pieces of the trainer fault tests: the CLI in-process, file hashes, a `tspo serve`
process that can be killed with SIGKILL and restarted on its port, and a micro model that
searches."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from retrieval_helpers import free_port, wait_for_health
from train_helpers import FACTS, TinyWorld, tiny_config

from tspo.protocol import build_prompt

SEARCH_TURN = "<search> capital </search>"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run ``tspo ARGS`` in this process; return its exit status and its stderr lines, less the
    run header (``tspo train: …`` lines: config, model, data, output) printed before the work."""
    from tspo.cli import main

    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["tspo", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    lines = capsys.readouterr().err.splitlines()
    return code, [line for line in lines if not line.startswith("tspo train: ")]


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_config(world: TinyWorld, path: Path, output_dir: Path, *overrides: str) -> Path:
    """A YAML config for `tspo train --config` from the tiny trainer config plus overrides."""
    path.write_text(tiny_config(world, output_dir, *overrides).to_yaml(), encoding="utf-8")
    return path


class ServeProcess:
    """``tspo serve`` as a real process on a fixed loopback port: kill -9 it, start it again."""

    def __init__(self, index_dir: Path, *extra_args: str):
        self.index_dir = index_dir
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        command = [sys.executable, "-m", "tspo.cli", "serve", "--index", str(self.index_dir)]
        command += ["--port", str(self.port), *self.extra_args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ)
        )
        wait_for_health(self.url, self.process, timeout=120)  # a loaded 2-core machine
        return self

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_searching_model(world: TinyWorld, out: Path) -> Path:
    """The world's micro model fine-tuned to open every answer with ``<search> capital </search>``.

    A random micro model almost never searches, so a retriever fault would go unnoticed; after
    ~100 Adam steps (about 2 s) nearly every trajectory searches in its first turn.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    target = tokenizer.encode(SEARCH_TURN, add_special_tokens=False)
    prompts = [tokenizer.encode(build_prompt(q)) for _, _, q, _ in FACTS]
    length = max(len(p) for p in prompts) + len(target)
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), length), -100)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequence = prompt + target
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(target)
        mask[row, : len(sequence)] = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(100):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss.item() < 0.05, loss.item()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
