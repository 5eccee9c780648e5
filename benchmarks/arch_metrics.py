"""Size and shape of the package: modules, lines, longest functions, import cycles.

    python benchmarks/arch_metrics.py <package dir>   # e.g. slmcompress

Import edges are every ``import``/``from`` naming a package module, module level or inside
functions (a lazy import is still a dependency); cycles are the strongly connected
components of that graph with more than one module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, name: str, is_pkg: bool, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def scc(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in comps if len(c) > 1]


def main(root: Path) -> None:
    files = sorted(root.rglob("*.py"))
    known = {module_name(root, f) for f in files}
    graph, funcs, lines = {}, [], 0
    for f in files:
        text = f.read_text()
        lines += text.count("\n")
        tree = ast.parse(text)
        name = module_name(root, f)
        graph[name] = imports(tree, name, f.name == "__init__.py", known) & known
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                funcs.append((n, f"{name}.{node.name}"))
    funcs.sort(reverse=True)
    print(f"modules: {len(files)}")
    print(f"lines: {lines}")
    lengths = sorted(n for n, _ in funcs)
    print(f"functions: {len(funcs)}, median {lengths[len(lengths) // 2]} lines")
    print("longest functions:")
    for n, fn in funcs[:5]:
        print(f"  {n:4d} {fn}")
    cycles = scc(graph)
    print(f"import cycles (SCCs > 1 module): {len(cycles)}")
    for c in cycles:
        print(f"  {len(c)} modules: {', '.join(c)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
