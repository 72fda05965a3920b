"""The docs agree with each other and with the code: every command of the README's table runs with
--help and has the flags it shows, every config field the docs name exists, the quickstart in
README, docs/training.md and the preset header is one set of commands, and figures are measured."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tspo.cli import app
from tspo.train.config import field_paths

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def _table_commands() -> list[tuple[list[str], list[str]]]:
    """(command words, flags shown) for each row of the README's command table."""
    rows = []
    for line in README.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `tspo ([^`]*)`", line)
        if not match:
            continue
        tokens = match.group(1).split()
        words = []
        for token in tokens:
            if not re.fullmatch(r"[a-z]+", token):
                break
            words.append(token)
        flags = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", match.group(1))
        rows.append((words, flags))
    return rows


def _leaf_commands(command: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    sub = getattr(command, "commands", None)
    if not sub:
        return {prefix}
    found: set[tuple[str, ...]] = set()
    for name, child in sub.items():
        found |= _leaf_commands(child, (*prefix, name))
    return found


def _click_command(words: list[str]) -> object:
    command = get_command(app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    return command


def test_the_command_table_lists_every_command() -> None:
    listed = {tuple(words) for words, _ in _table_commands()}
    assert listed == _leaf_commands(get_command(app))


@pytest.mark.parametrize("row", _table_commands(), ids=lambda row: " ".join(row[0]))
def test_every_table_command_runs_with_help_and_has_its_flags(
    row: tuple[list[str], list[str]],
) -> None:
    words, flags = row
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    known = {opt for param in _click_command(words).params for opt in param.opts}  # type: ignore[attr-defined]
    assert not set(flags) - known, f"tspo {' '.join(words)} has no {set(flags) - known}"


# Python attributes that look like config fields: HF's model.generate, a weight's name, the
# Retriever protocol's method.
NOT_FIELDS = {"model.generate", "model.norm.weight", "retriever.search"}
FILE_SUFFIXES = {"json", "jsonl", "md", "parquet", "py", "yaml", "safetensors", "pt", "txt"}
SECTIONS = sorted({path.split(".")[0] for path in field_paths()})
FIELD = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_]+(?:\.[a-z_]+)?)(?![\w/-])")


def _is_module(section: str, name: str) -> bool:
    """``algo.folr``, ``train.loop.train``: a module of the tspo package, not a config field."""
    package = ROOT / "src" / "tspo" / section
    return (package / f"{name}.py").is_file() or (package / name / "__init__.py").is_file()


def _named_fields(text: str) -> set[str]:
    names = set()
    for section, rest in FIELD.findall(text):
        first = rest.split(".")[0]
        if first in FILE_SUFFIXES or f"{section}.{rest}" in NOT_FIELDS:
            continue  # eval.json, train.parquet, model.safetensors: files, not fields
        if _is_module(section, first):
            continue
        names.add(f"{section}.{rest}")
    return names


def test_every_config_field_named_in_the_docs_exists() -> None:
    valid = set(field_paths())
    valid |= {path.rsplit(".", 1)[0] for path in valid}  # model.lora, a nested section
    missing = {}
    for path in [README, *DOCS, *PRESETS]:
        unknown = _named_fields(path.read_text(encoding="utf-8")) - valid
        if unknown:
            missing[path.relative_to(ROOT).as_posix()] = sorted(unknown)
    assert not missing, f"config fields that do not exist: {missing}"


def test_the_field_scan_finds_fields() -> None:
    found = _named_fields(
        "set `train.steps=2`, model.lora.r and eval.every; eval.json is a file, algo.folr a module"
    )
    assert found == {"train.steps", "model.lora.r", "eval.every"}


def _commands(text: str, start: str) -> list[str]:
    """The `tspo …` commands of a block of text, continuation lines joined, comments dropped."""
    lines = [line.lstrip("# ").rstrip() for line in text.splitlines()]
    joined, current = [], ""
    for line in lines:
        current = f"{current} {line.strip()}" if current else line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current.startswith("tspo "):
            joined.append(" ".join(current.split("#")[0].split()))
        current = ""
    return [command for command in joined if command.startswith(start)]


def _first_bash_block(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_training_doc_and_preset_give_the_same_commands() -> None:
    readme = _commands(README.read_text(encoding="utf-8").split("Presets:", 1)[1], "tspo ")
    readme = readme[: readme.index(next(c for c in readme if c.startswith("tspo eval"))) + 1]
    training = _commands(_first_bash_block(ROOT / "docs" / "training.md"), "tspo ")
    header = (
        (ROOT / "configs" / "smollm2-wiki.yaml").read_text(encoding="utf-8").split("\nmodel:")[0]
    )
    preset = _commands(header, "tspo ")
    assert readme == training == preset
    assert sum(command.startswith("tspo eval") for command in readme) == 1


def _tiny_base_parameters() -> int:
    path = ROOT / "src" / "tspo" / "assets" / "tiny-base" / "model.safetensors"
    with path.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def test_one_policy_size_and_it_is_the_shipped_base() -> None:
    figure = f"{_tiny_base_parameters() / 1e6:.1f}M-parameter"
    texts = [README, ROOT / "docs" / "quickstart.md"]
    stated = {
        m for path in texts for m in re.findall(r"\d+(?:\.\d+)?M-parameter", path.read_text())
    }
    assert stated == {figure}


def test_quickstart_steps_help_is_the_rl_default() -> None:
    from tspo.quickstart.settings import RLStage

    for command in ("quickstart", "compare"):
        help_text = " ".join(CliRunner().invoke(app, [command, "--help"]).output.split())
        assert f"(default {RLStage.steps})" in help_text, command


SMOLLM2_MODULE = ROOT / "src" / "tspo" / "models" / "smollm2.py"


def test_no_stale_smollm2_conversion_time() -> None:
    """Converting SmolLM2 was measured at 25 s (22.6 s of CPU); the docs once said 35 s or 2 s."""
    for path in [README, ROOT / "docs" / "training.md", *PRESETS, SMOLLM2_MODULE]:
        text = path.read_text(encoding="utf-8")
        assert "35 s" not in text and "about 2 s" not in text, path
