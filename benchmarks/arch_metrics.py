"""Size and shape of the package: modules, lines, longest functions, import cycles.

    python benchmarks/arch_metrics.py <package dir>   # e.g. slmcompress
    python benchmarks/arch_metrics.py <package dir> --skeletons   # + run two tiny streamed stages

Import edges are every ``import``/``from`` naming a package module, module level or inside
functions (a lazy import is still a dependency); cycles are the strongly connected
components of that graph with more than one module.

Issue #26 measures (static unless said):

- lines of ``runner.py`` and ``passes/gptq.py``;
- *eval branches*: functions that call the in-memory ``evaluate`` and also decide or take
  the streamed route (``evaluate_streamed``, ``_streamed_metrics``, ``summary_from_checkpoint``,
  ``_over_budget``, ``should_stream``): each is a copy of "fits? evaluate : stream-evaluate";
- call sites of the budget check used for evaluation (``_over_budget``, ``over_budget``);
- *lazy imports*: internal imports inside function bodies, over all internal imports
  (``if TYPE_CHECKING`` imports left out), overall and outside the CLI (``cli.py``, or the ``cli/`` package); and how many of the
  lazy ones repeat a module-level import of the same file;
- imports of another module's private (``_``) names;
- ``--skeletons`` (runs code): weightless skeletons built during one streamed GPTQ stage and
  one streamed prune stage of a tiny sharded Llama (``streaming.loader.build_skeleton`` calls).
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


STREAMED_EVAL = {
    "evaluate_streamed",
    "_streamed_metrics",
    "summary_from_checkpoint",
    "_over_budget",
    "over_budget",
    "should_stream",
}
BUDGET_CHECKS = {"_over_budget", "over_budget"}


def _names(node: ast.AST) -> set[str]:
    """Every name or attribute a function body mentions."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def internal_imports(tree: ast.AST, package: str) -> list[tuple[bool, str]]:
    """``(inside a function, module)`` for each import of a package module (runtime only)."""
    out: list[tuple[bool, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith(package):
                out.append((in_function, child.module))
            elif isinstance(child, ast.Import):
                out.extend((in_function, a.name) for a in child.names if a.name.startswith(package))
            visit(child, nested)

    visit(tree, False)
    return out


def issue26(root: Path, files: list[Path]) -> None:
    """The issue #26 measures (see the module docstring)."""
    package = root.name
    for rel in ("runner.py", "passes/gptq.py"):
        path = root / rel
        print(f"lines of {rel}: {path.read_text().count(chr(10)) if path.is_file() else '-'}")
    branches, checks, private, lazy = [], [], [], {"all": [0, 0, 0], "outside cli": [0, 0, 0]}
    for f in files:
        tree = ast.parse(f.read_text())
        name = module_name(root, f)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                used = _names(node)
                if "evaluate" in used and used & STREAMED_EVAL:
                    branches.append(f"{name}.{node.name}")
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in BUDGET_CHECKS and name != f"{package}.plan":
                    checks.append(name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                private += [
                    f"{name} <- {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
        found = internal_imports(tree, package)
        top = {m for inside, m in found if not inside}
        for key in ("all", "outside cli"):
            if key == "outside cli" and (name + ".").startswith(f"{package}.cli."):
                continue
            lazy[key][0] += len(found)
            lazy[key][1] += sum(inside for inside, _ in found)
            lazy[key][2] += sum(inside and m in top for inside, m in found)
    print(f"eval branches (in-memory evaluate + streamed route in one function): {len(branches)}")
    for b in branches:
        print(f"  {b}")
    print(
        "call sites of the evaluation budget check (_over_budget/over_budget; plan's own "
        f"estimate left out): {len(checks)} "
        f"{ {m: checks.count(m) for m in sorted(set(checks))} }"
    )
    for key, (total, inside, dup) in lazy.items():
        share = 100 * inside / total if total else 0
        print(
            f"internal imports inside functions ({key}): {inside}/{total} = {share:.1f}%"
            f" ({dup} repeat a module-level import)"
        )
    print(f"imports of private names: {len(private)}")
    for p in private:
        print(f"  {p}")


def count_skeletons() -> None:
    """Skeletons built while a tiny sharded Llama, one byte over the budget, runs one streamed
    GPTQ stage and (another run) one streamed prune stage: the input report, the stage and
    its report. Prints the count per run and who built each (``build_skeleton``'s caller)."""
    import inspect
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    import slmcompress.streaming.loader as loader
    from slmcompress.io.load import load_model
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe
    from slmcompress.streaming import should_stream  # both sides of the issue #26 move

    callers: list[str] = []
    original = loader.build_skeleton

    def counted(*args, **kwargs):
        frame = inspect.stack()[1]
        callers.append(f"{Path(frame.filename).stem}.{frame.function}")
        return original(*args, **kwargs)

    for module in [m for n, m in list(sys.modules.items()) if n.startswith("slmcompress")]:
        if getattr(module, "build_skeleton", None) is original:
            module.build_skeleton = counted
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    stages = {
        "gptq": {"type": "quantize", "name": "w4", "method": "gptq", "group_size": 32},
        "prune": {
            "type": "prune",
            "name": "p",
            "target": {"ffn_hidden_size": 64},
            "depth_metric": "cosine",
            "align": "none",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size="200KB")
        load_model("smollm2-135m", dtype="float32", device="cpu").tokenizer.save_pretrained(
            model_dir
        )
        budget = str(should_stream(model_dir, "1TB").model_bytes - 1)
        for name, stage in stages.items():
            recipe = {
                "name": name,
                "model": str(model_dir),
                "output_dir": f"{tmp}/{name}",
                "max_memory": budget,
                "data": {
                    "calibration": {"source": "c4", "n_samples": 4, "seq_len": 64},
                    "eval": {"max_tokens": 128, "seq_len": 64},
                },
                "eval": {"tasks": [], "speed": False},
                "stages": [stage],
            }
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            callers.clear()
            run_recipe(load_recipe(path))
            print(
                f"skeletons built by a streamed {name} run: {len(callers)} ({', '.join(callers)})"
            )


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
    issue26(Path(sys.argv[1]), sorted(Path(sys.argv[1]).rglob("*.py")))
    if "--skeletons" in sys.argv:
        count_skeletons()
