"""docs/architecture.md matches the code: it names every package and top-level module of
src/tspo, and every dotted ``tspo.…`` name it mentions exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tspo"
DOC = ROOT / "docs" / "architecture.md"


def _subpackages() -> list[str]:
    """``tspo.algo``, ``tspo.integrations.verl``, …: every folder of src/tspo with an __init__."""
    return sorted(
        "tspo." + ".".join(init.parent.relative_to(SRC).parts)
        for init in SRC.rglob("__init__.py")
        if init.parent != SRC
    )


def _top_level_modules() -> list[str]:
    return sorted(f"tspo.{path.stem}" for path in SRC.glob("*.py") if path.stem != "__init__")


def _module_file(parts: list[str]) -> Path | None:
    folder = SRC.joinpath(*parts)
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py"
    if folder.with_suffix(".py").is_file():
        return folder.with_suffix(".py")
    return None


def test_names_every_subpackage() -> None:
    text = DOC.read_text(encoding="utf-8")
    packages = _subpackages()
    assert "tspo.algo" in packages and "tspo.integrations.verl" in packages
    missing = [name for name in packages if f"`{name}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}: add a row for each"


def test_names_every_top_level_module() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in _top_level_modules() if f"`{name}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}: add a row for each"


def test_every_dotted_name_exists() -> None:
    """``tspo.a.b.c``: the longest prefix is a module, and the rest is defined in it."""
    text = DOC.read_text(encoding="utf-8")
    stale = []
    for name in sorted(set(re.findall(r"\btspo(?:\.[A-Za-z_]\w*)+", text))):
        parts = name.split(".")[1:]
        for cut in range(len(parts), 0, -1):
            module = _module_file(parts[:cut])
            if module is not None:
                rest = parts[cut:]
                source = module.read_text(encoding="utf-8")
                if rest and not re.search(rf"\b{re.escape(rest[0])}\b", source):
                    stale.append(name)
                break
        else:
            stale.append(name)
    assert not stale, f"docs/architecture.md names what src/tspo does not define: {stale}"


def test_every_file_path_exists() -> None:
    """``train/loop.py``, ``src/tspo/cli.py``, ``tests/test_docs_agree.py``: each file exists."""
    text = DOC.read_text(encoding="utf-8")
    missing = [
        path
        for path in sorted(set(re.findall(r"\b[\w/]+/\w+\.py\b", text)))
        if not any((base / path).is_file() for base in (ROOT, ROOT / "src", SRC))
    ]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


SPANNING_AREAS = ("cli", "docs", "architecture", "settings", "package")
"""What a test that spans packages is named after, in place of a package (CONTRIBUTING.md)."""


def test_test_files_are_named_after_a_package() -> None:
    """``test_<package>_<topic>.py`` or ``test_<package>.py`` (CONTRIBUTING.md, "Tests")."""
    areas = [name.split(".")[1] for name in _subpackages() + _top_level_modules()]
    areas += SPANNING_AREAS
    misnamed = [
        path.name
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if not any(
            path.stem == f"test_{area}" or path.stem.startswith(f"test_{area}_") for area in areas
        )
    ]
    assert not misnamed, f"name these after the package they test (CONTRIBUTING.md): {misnamed}"
