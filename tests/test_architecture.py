"""The import contracts of pyproject.toml hold (CI runs only pytest), and what they cannot
express: the registry imports no pass, the built-ins register from one import site."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run(
        [exe, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout
    assert "ignored import" not in proc.stdout  # no exception to the layers left


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports at run time (function bodies included)."""
    import ast

    names = []
    tree = ast.parse(path.read_text())
    type_checking = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    ]
    skipped = {id(sub) for block in type_checking for sub in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_streaming_imports_nothing_from_passes_recipe_or_runner():
    """The algorithm never knows how the model is held: streaming/ is below the passes."""
    banned = ("slmcompress.passes", "slmcompress.recipe", "slmcompress.runner")
    for path in sorted((REPO / "slmcompress" / "streaming").glob("*.py")):
        for name in _imports(path):
            assert not name.startswith(banned), f"{path.name} imports {name}"


def test_the_registry_imports_no_pass_and_the_builtins_register_from_one_site():
    """No upward (lazy) import: ``slmcompress.passes`` imports every built-in pass module,
    and looking passes up there finds each of them."""
    assert not any(
        n.startswith("slmcompress.passes") for n in _imports(REPO / "slmcompress" / "registry.py")
    )
    import slmcompress.passes as passes

    modules = {p.stem for p in (REPO / "slmcompress" / "passes").glob("*.py")} - {
        "__init__",
        "base",
    }
    assert {m.__name__.rsplit(".", 1)[-1] for m in passes.BUILTIN} == modules
    assert passes.pass_types() == ["distill", "eval", "export", "prune", "quantize"]
    assert passes.get_pass("quantize", "gptq").__module__ == "slmcompress.passes.gptq"


def test_model_io_and_the_cli_each_live_in_one_package():
    """Model I/O is ``slmcompress/io/`` and the CLI ``slmcompress/cli/``: no loader or command
    module is left at the top or inside an algorithm package, and only the entry point
    (``__main__``) and the CLI itself import the CLI."""
    package = REPO / "slmcompress"
    top = {p.stem for p in package.glob("*.py")}
    moved = {"models", "model_sources", "checkpoint", "checkpoint_io", "checkpoint_info"}
    assert not top & (moved | {"remote_code", "cli", "cli_checks"})
    assert not [p for p in package.rglob("cli_*.py")]
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for name in _imports(path):
            assert not name.startswith("slmcompress.cli"), f"{rel} imports {name}"
