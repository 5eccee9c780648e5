"""Static device check: library code never relies on the default device (issue #24).

Every CUDA crash found so far had one shape: a tensor factory without ``device=``
(``torch.arange(n)``) combined with a caller's tensor, which works on CPU and fails on a
GPU with "Expected all tensors to be on the same device". The CPU suite cannot see it at
run time, so this test reads the source instead:

* every tensor factory call in ``slmcompress/`` names its device (``device=x.device``,
  ``device=device`` from a parameter, or an explicit ``device="cpu"`` where host memory is
  the point). ``*_like`` factories inherit their input's device and are not factories here;
  module constructors take a ``device`` parameter like ``nn.Linear`` (``None`` keeps the
  ``torch.device(...)`` context working).
* every ``.numpy()`` is called on a chain that moved the tensor to the host first
  (``.cpu()`` or ``.to("cpu")``): numpy cannot read device memory.

The allowlist below is the complete set of exceptions, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slmcompress"

#: torch functions that allocate a new tensor on the default device unless told otherwise
FACTORIES = frozenset(
    {
        "arange",
        "as_tensor",
        "empty",
        "empty_strided",
        "eye",
        "full",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "range",
        "tensor",
        "tril_indices",
        "triu_indices",
        "zeros",
    }
)

#: (file relative to slmcompress/, enclosing function, call) -> why it needs no device
ALLOWLIST: dict[tuple[str, str, str], str] = {
    ("streaming/loader.py", "WeightSource.get", "numpy"): (
        "the host buffer a shard is pread into: it is created with device='cpu' two lines "
        "above, and numpy's memoryview of it is the point"
    ),
}


def _dotted(node: ast.AST) -> str:
    """``torch.nn.functional.pad`` for an attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _moved_to_host(node: ast.AST) -> bool:
    """Whether the receiver chain of a call contains ``.cpu()`` or ``.to("cpu"...)``."""
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name == "cpu":
                return True
            if name == "to" and any(
                isinstance(a, ast.Constant) and a.value == "cpu" for a in node.args
            ):
                return True
            node = node.func.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            node = node.value
    return False


class _Finder(ast.NodeVisitor):
    """Collects (function, call, line) of device-unsafe calls in one module."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int]] = []

    def _visit_scope(self, node: ast.AST) -> None:
        self.scope.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        where = ".".join(self.scope) or "<module>"
        if name.startswith("torch.") and name.removeprefix("torch.") in FACTORIES:
            if not any(k.arg == "device" for k in node.keywords):
                self.found.append((where, name.removeprefix("torch."), node.lineno))
        if isinstance(node.func, ast.Attribute) and node.func.attr == "numpy" and not node.args:
            if not _moved_to_host(node.func.value):
                self.found.append((where, "numpy", node.lineno))
        self.generic_visit(node)


def device_unsafe_calls(root: Path = PACKAGE) -> list[tuple[str, str, str, int]]:
    """Every (file, function, call, line) under ``root`` that the rules above refuse."""
    found = []
    for path in sorted(root.rglob("*.py")):
        finder = _Finder()
        finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        rel = path.relative_to(root).as_posix()
        found += [(rel, where, call, line) for where, call, line in finder.found]
    return found


def test_every_tensor_factory_names_its_device():
    offenders = [
        f"slmcompress/{rel}:{line} {where}: torch.{call}(...) without device="
        if call != "numpy"
        else f"slmcompress/{rel}:{line} {where}: .numpy() without .cpu() first"
        for rel, where, call, line in device_unsafe_calls()
        if (rel, where, call) not in ALLOWLIST
    ]
    assert not offenders, "device-unsafe calls (see this test's docstring):\n" + "\n".join(
        offenders
    )


def test_allowlist_entries_still_exist():
    """A stale entry would silently allow a new offender at the same place."""
    present = {(rel, where, call) for rel, where, call, _ in device_unsafe_calls()}
    assert set(ALLOWLIST) <= present, set(ALLOWLIST) - present


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\ndef f(x):\n    return x + torch.arange(3)\n", [("f", "arange")]),
        ("import torch\ndef f(x):\n    return torch.arange(3, device=x.device)\n", []),
        ("import torch\ndef f(n):\n    return torch.zeros(n, device=None)\n", []),
        ("import torch\ndef f(x):\n    return torch.zeros_like(x)\n", []),
        ("def f(x):\n    return x.float().numpy()\n", [("f", "numpy")]),
        ("def f(x):\n    return x.float().cpu().numpy()\n", []),
        ("def f(x):\n    return x.to('cpu').contiguous().numpy()\n", []),
        (
            "import torch\nclass A:\n    def g(self):\n        torch.tensor([1])\n",
            [("A.g", "tensor")],
        ),
    ],
)
def test_the_checker_itself(tmp_path, source, expected):
    (tmp_path / "mod.py").write_text(source)
    assert [(w, c) for _, w, c, _ in device_unsafe_calls(tmp_path)] == expected
