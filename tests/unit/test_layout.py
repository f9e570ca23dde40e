"""The layout check (scripts/check_layout.py): sizes and import circles on tiny trees, then on the real package."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)


def make_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under tmp_path with the given files (relative path -> source)."""
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_clean_tree_passes(tmp_path):
    root = make_tree(tmp_path, {
        "a.py": "from pkg import b\nfrom pkg.b import helper\n\ndef f():\n    return b.helper()\n",
        "b.py": "import json\n\ndef helper():\n    return json.dumps(1)\n",
    })
    assert layout.check(root) == []
    assert layout.main(["check_layout.py", str(root)]) == 0


def test_file_of_401_lines_fails(tmp_path):
    root = make_tree(tmp_path, {"big.py": "x = 1\n" * 401, "ok.py": "x = 1\n" * 400})
    assert layout.check(root) == [f"{root / 'big.py'} has 401 lines (limit 400)"]


def test_function_of_61_lines_fails(tmp_path):
    body = "    x = 1\n" * 58
    # def line + 59 body lines + return = 61 lines; the second function has 60
    root = make_tree(tmp_path, {"f.py": f"def long():\n    x = 1\n{body}    return x\n\n\ndef ok():\n{body}    return x\n"})
    assert layout.check(root) == [f"{root / 'f.py'}:1: function long has 61 lines (limit 60)"]


def test_method_of_60_lines_passes_and_61_fails(tmp_path):
    def method(name, n_body):
        return f"    def {name}(self):\n" + "        x = 1\n" * n_body + "        return x\n"

    root = make_tree(tmp_path, {"m.py": "class C:\n" + method("ok", 58) + method("long", 59)})
    assert layout.check(root) == [f"{root / 'm.py'}:62: function C.long has 61 lines (limit 60)"]


def test_circle_fails(tmp_path):
    root = make_tree(tmp_path, {
        "a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
        "b.py": "def g():\n    from pkg import a  # a function-local import counts\n    return a\n",
    })
    assert layout.check(root) == ["import circle: pkg.a -> pkg.b -> pkg.a"]
    assert layout.main(["check_layout.py", str(root)]) == 1


def test_type_checking_import_is_no_edge(tmp_path):
    root = make_tree(tmp_path, {
        "a.py": "from pkg.b import g\n",
        "b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.a import X\n\ndef g():\n    pass\n",
    })
    assert layout.check(root) == []


def test_relative_imports_resolve(tmp_path):
    root = make_tree(tmp_path, {"sub/__init__.py": "x = 1\n", "sub/a.py": "from . import b\n",
                                "sub/b.py": "from ..sub.a import y\n"})
    assert layout.import_graph(layout.module_files(root))["pkg.sub.a"] == {"pkg.sub", "pkg.sub.b"}
    assert layout.check(root) == ["import circle: pkg.sub.a -> pkg.sub.b -> pkg.sub.a"]


def test_reexporting_init_makes_no_false_circle(tmp_path):
    # pkg/r/__init__ only re-exports: `from pkg.r import Thing` is an edge to pkg.r.core, not to pkg.r.
    root = make_tree(tmp_path, {
        "r/__init__.py": '"""Doc."""\nfrom pkg.r.core import Thing\nfrom pkg.r import words\n__all__ = ["Thing"]\n',
        "r/core.py": "from pkg.r import words\n\nclass Thing:\n    pass\n",
        "r/words.py": "WORDS = ()\n",
        "user.py": "from pkg.r import Thing\n",
    })
    graph = layout.import_graph(layout.module_files(root))
    assert graph["pkg.user"] == {"pkg.r.core"} and graph["pkg.r.core"] == {"pkg.r.words"}
    assert layout.check(root) == []
    # an __init__ with code of its own is an ordinary module: the same imports now make a circle
    (root / "r" / "__init__.py").write_text("from pkg.r.core import Thing\nDEFAULT = Thing()\n")
    (root / "r" / "core.py").write_text("from pkg.r import words\nfrom pkg import r\n\nclass Thing:\n    pass\n")
    assert layout.check(root) == ["import circle: pkg.r -> pkg.r.core -> pkg.r"]


def test_real_tree_passes():
    problems = layout.check(ROOT / "src" / "chatrlhf")
    assert not problems, "\n".join(problems)
