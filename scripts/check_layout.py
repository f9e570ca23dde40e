"""Layout check (CI): files <= 400 lines, functions <= 60 lines, no import circles in the package.

    python scripts/check_layout.py [PACKAGE_DIR]      (default: src/chatrlhf; exit 1 on any violation)

Prints one line per violation: ``PATH has N lines (limit 400)``, ``PATH:LINE: function NAME has N lines
(limit 60)`` (end_lineno - lineno + 1; a method is ``Class.name``) and ``import circle: a -> b -> a`` (the
shortest circle through each module not on a circle printed before).

Import graph: module M has an edge to each package module it imports, at module level or inside a function
(imports under ``if TYPE_CHECKING:`` never run and are left out). ``import pkg.x`` is an edge to ``pkg.x``;
``from pkg.x import y`` one to ``pkg.x`` and, when y is a submodule, one to ``pkg.x.y``. A package whose
``__init__`` only imports its own submodules (beside a docstring and ``__all__``) is a table of contents, not
code: an edge into it goes on to the submodule meant (``pkg.y`` if y is one, else the submodule ``__init__``
takes y from; for ``import pkg``, every submodule it imports), so a re-export makes no false circle. A
package ``__init__`` with code of its own is an ordinary module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package directory ``root``."""
    names = {path: (root.name, *path.relative_to(root).with_suffix("").parts) for path in sorted(root.rglob("*.py"))}
    return {".".join(parts[:-1] if parts[-1] == "__init__" else parts): path for path, parts in names.items()}


def size_violations(files: dict[str, Path]) -> list[str]:
    """Files over MAX_FILE_LINES and functions over MAX_FUNCTION_LINES."""
    out = []
    for path in files.values():
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_FILE_LINES:
            out.append(f"{path} has {n} lines (limit {MAX_FILE_LINES})")
        out += [f"{path}:{line}: function {name} has {n} lines (limit {MAX_FUNCTION_LINES})"
                for name, line, n in _functions(ast.parse(source), "") if n > MAX_FUNCTION_LINES]
    return out


def _functions(node: ast.AST, prefix: str):
    for child in ast.iter_child_nodes(node):
        name = f"{prefix}{getattr(child, 'name', '')}"
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield name, child.lineno, child.end_lineno - child.lineno + 1
        yield from _functions(child, f"{name}." if isinstance(child, (ast.ClassDef, ast.FunctionDef,
                                                                      ast.AsyncFunctionDef)) else prefix)


def _imports(node: ast.AST, module: str, is_package: bool):
    """(module, name or None) for each import that can run; ``if TYPE_CHECKING:`` bodies are skipped."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            yield from ((alias.name, None) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            yield from ((_absolute(child, module, is_package), alias.name) for alias in child.names)
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from _imports(ast.Module(body=child.orelse, type_ignores=[]), module, is_package)
        else:
            yield from _imports(child, module, is_package)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (re-exporting packages followed, see the docstring)."""
    trees = {m: ast.parse(p.read_text()) for m, p in files.items()}
    edges = {m: list(_imports(tree, m, files[m].name == "__init__.py")) for m, tree in trees.items()}
    contents = {m: edges[m] for m in files if files[m].name == "__init__.py" and _only_reexports(m, trees[m])}

    def targets(target: str, name: str | None, seen: frozenset = frozenset()) -> set[str]:
        sub = f"{target}.{name}" if name else None
        if target not in files:
            return set()  # not a package module
        if target not in contents:
            return {target} | ({sub} if sub in files else set())
        if sub in files:
            return targets(sub, None, seen)
        if target in seen:
            return set()
        named = [(t, n) for t, n in contents[target] if name is None or n == name]
        return set().union(*(targets(t, n if name else None, seen | {target}) for t, n in named))

    return {m: set().union(*(targets(t, n) for t, n in es)) - {m} for m, es in edges.items()}


def _only_reexports(package: str, tree: ast.Module) -> bool:
    """Whether a package ``__init__`` holds only a docstring, ``__all__`` and imports from its own modules."""
    def own(node: ast.stmt) -> bool:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, package, True)
            return base in (package, "__future__") or base.startswith(package + ".")
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        return is_doc or isinstance(node, ast.Assign) and ast.unparse(node).startswith("__all__ =")

    return all(own(node) for node in tree.body)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest circle (first module repeated last) through each module not on a circle found before."""
    circles, done = [], set()
    for start in sorted(graph):
        if start not in done and (circle := _shortest_circle(graph, start)):
            circles.append(circle)
            done.update(circle)
    return circles


def _shortest_circle(graph: dict[str, set[str]], start: str) -> list[str]:
    """The shortest start -> ... -> start (breadth first), or [] if there is none."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for target in sorted(graph.get(path[-1], ())):
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                paths.append(path + [target])
    return []


def check(root: Path) -> list[str]:
    """Every violation under the package directory ``root``, one line each."""
    files = module_files(root)
    circles = import_circles(import_graph(files))
    return size_violations(files) + [f"import circle: {' -> '.join(c)}" for c in circles]


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src" / "chatrlhf"
    root = root.resolve().relative_to(Path.cwd()) if root.resolve().is_relative_to(Path.cwd()) else root
    problems = check(root) if root.is_dir() else [f"{root} is not a directory; pass the package dir (src/chatrlhf)"]
    print("\n".join(problems) or f"layout ok: {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
