"""Figures of the package's structure, read from its source with ``ast`` (nothing is imported).

    python scripts/structure.py [ROOT]     # ROOT: a checkout (default: this one)

* importers of ``torchtrain.train``: modules of the package (not tests or benchmarks) that import the
  entry point, which should import them, not the other way round;
* upward imports: imports that close a cycle in the module graph (module-level and in-function alike);
* longest import chain: the longest path of the module graph without cycles;
* check functions: ``check_*`` and ``validate*`` definitions, and string tuples of two or more values
  written in more than one place (a list of choices kept twice).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package, folder in (("torchtrain", root / "torchtrain"), ("torchtrain.kernels", root / "kernels")):
        for path in folder.rglob("*.py"):
            if "kernels" in path.relative_to(folder).parts[:1] or "recipes" in path.relative_to(folder).parts[:1]:
                continue  # the links to the top-level folders
            name = ".".join((package, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # the package imports absolutely
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            name = name.replace("kernels.", "torchtrain.kernels.", 1) if name.startswith("kernels.") else name
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    found = modules(root)
    graph = {name: imports(path, set(found)) - {name} for name, path in found.items()}
    # Parents import their packages' __init__ implicitly; count only what a file names.
    importers_of_train = sorted(m for m, deps in graph.items() if "torchtrain.train" in deps)

    order, state, upward = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                upward.append((node, dep))
            elif dep not in state:
                visit(dep)
        state[node] = "done"
        order.append(node)

    for name in sorted(graph):
        if name not in state:
            visit(name)
    acyclic = {m: graph[m] - {d for n, d in upward if n == m} for m in graph}

    @lru_cache(maxsize=None)
    def chain(node: str) -> tuple[str, ...]:
        longest = max((chain(dep) for dep in acyclic[node]), key=len, default=())
        return (node, *longest)

    longest = max((chain(m) for m in graph), key=len)
    checks, tuples = [], Counter()
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and (node.name.startswith("check_") or node.name.startswith("validate")
                                                      or node.name.startswith("_check") or node.name.startswith("_validate")):
                checks.append(f"{name}.{node.name}")
            if isinstance(node, ast.Tuple) and len(node.elts) >= 2 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                tuples[tuple(sorted(e.value for e in node.elts))] += 1
    repeated = {t: n for t, n in tuples.items() if n > 1}
    print(f"modules: {len(found)}")
    print(f"package modules importing torchtrain.train: {len(importers_of_train)} {importers_of_train}")
    print(f"upward imports (closing a cycle): {len(upward)} {sorted(upward)}")
    print(f"longest import chain: {len(longest)} modules: {' -> '.join(longest)}")
    print(f"check/validate functions: {len(checks)}")
    for check in sorted(checks):
        print(f"  {check}")
    print(f"string tuples written in more than one place: {len(repeated)}")
    for values, count in sorted(repeated.items(), key=lambda kv: -kv[1]):
        print(f"  {count}x {values}")


if __name__ == "__main__":
    main()
