"""Data flows one way between ``tspo.data`` and ``tspo.retrieval``: retrieval reads corpora
through ``tspo.data.corpus``, and no module of ``tspo.data`` imports ``tspo.retrieval`` when it
runs (an import under ``if TYPE_CHECKING:`` only names a type, e.g. the experts' ``Retriever``).
docs/architecture.md, "Packages"."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tspo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def runtime_imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Modules the code of ``module`` imports when it runs: at module level or inside functions,
    not under ``if TYPE_CHECKING:``. ``from a import b`` counts as ``a`` and as ``a.b``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(module, node, is_package)
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _imports_of(package: str) -> dict[str, set[str]]:
    return {
        _module_name(path): runtime_imports(
            path.read_text(encoding="utf-8"), _module_name(path), is_package=path.stem == "__init__"
        )
        for path in sorted((SRC / package).rglob("*.py"))
    }


def _into(graph: dict[str, set[str]], target: str) -> dict[str, list[str]]:
    edges = {
        module: sorted(name for name in names if name == target or name.startswith(target + "."))
        for module, names in graph.items()
    }
    return {module: names for module, names in edges.items() if names}


def test_data_does_not_import_retrieval() -> None:
    back = _into(_imports_of("data"), "tspo.retrieval")
    assert not back, (
        f"tspo.data imports tspo.retrieval at run time: {back}; data flows data -> retrieval "
        "(move the shared code into tspo.data, or import a type under `if TYPE_CHECKING:`)"
    )


def test_retrieval_reads_corpora_through_data() -> None:
    """The scan sees the imports it must allow, so the test above is not vacuous."""
    forward = _into(_imports_of("retrieval"), "tspo.data")
    assert "tspo.retrieval.index" in forward
    assert "tspo.data.corpus" in forward["tspo.retrieval.index"]


def test_the_scan_skips_type_checking_and_resolves_relative_imports() -> None:
    code = (
        "from typing import TYPE_CHECKING\n"
        "from . import qa\n"
        "from .world import World\n"
        "if TYPE_CHECKING:\n"
        "    from tspo.retrieval.base import Retriever\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    from tspo.retrieval.bm25 import BM25Retriever\n"
    )
    found = runtime_imports(code, "tspo.data.probe")
    assert {"tspo.data.qa", "tspo.data.world.World", "json", "tspo.retrieval.bm25"} <= found
    assert "tspo.retrieval.base" not in found
    assert "tspo.data.qa" in runtime_imports("from . import qa\n", "tspo.data", is_package=True)
