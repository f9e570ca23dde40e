"""The docs name code by symbol (`chatrlhf.stages.ppo.train_ppo`), never by file and line: a line number
rots with the next edit above it, a symbol that moves fails here. Every backticked ``chatrlhf.`` dotted
reference in README.md, docs/*.md and bench/README.md must import and resolve."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `chatrlhf.a.b.C.d`, alone in its backticks (a call like `chatrlhf.x(...)` or a command is not a reference)
SYMBOL = re.compile(r"`(chatrlhf(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
# `engine.py:410`, `stages/ppo.py:133`, and `:87` after one: line references
LINE_REF = re.compile(r"[\w/.-]+\.py:\d+|`:\d+`")


def _references() -> list[tuple[str, str]]:
    refs = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            refs += [(f"{path.relative_to(ROOT)}:{n}", m.group(1)) for m in SYMBOL.finditer(line)]
    return refs


def resolve(dotted: str) -> object:
    """Imports the longest importable module prefix of ``dotted`` and getattr's the rest; raises
    ImportError or AttributeError naming what is missing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no importable module in {dotted}")


def test_doc_files_exist():
    assert all(p.is_file() for p in DOC_FILES), [str(p) for p in DOC_FILES if not p.is_file()]
    assert len(_references()) > 50  # the docs do cite code; an empty scan would pass vacuously


def test_every_symbol_reference_resolves():
    broken = []
    for where, ref in _references():
        try:
            resolve(ref)
        except (ImportError, AttributeError) as e:
            broken.append(f"{where}: {ref} ({type(e).__name__}: {e})")
    assert not broken, "doc references that do not resolve:\n" + "\n".join(broken)


def test_no_line_number_references():
    found = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{n}: {m.group(0)}" for m in LINE_REF.finditer(line)]
    assert not found, (
        "line-number references (name the symbol instead, `chatrlhf.module.name`):\n" + "\n".join(found)
    )


def test_resolve_finds_attributes_and_reports_missing_ones():
    import chatrlhf.algorithms.losses as losses

    assert resolve("chatrlhf.algorithms.losses.answer_mask") is losses.answer_mask
    assert resolve("chatrlhf.algorithms") is importlib.import_module("chatrlhf.algorithms")
    for bad in ("chatrlhf.algorithms.losses.no_such_function", "chatrlhf.no_such_module.thing"):
        try:
            resolve(bad)
        except (ImportError, AttributeError):
            continue
        raise AssertionError(f"{bad} resolved")
