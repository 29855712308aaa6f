"""Every file the library writes goes through fastddpm.files / fastddpm.safe_open (issue 21, item 1).

A plain `open(path, "w")`, `Path.write_text` or `shutil.copyfile` follows a link planted at `path`
and writes wherever it points; the helpers never do. This test reads the source of fastddpm/*.py
and export/*.py and fails on any such call, so a new writer cannot slip past the audit.
export/ort_sample.py is copied alone to inference hosts without fastddpm and has its own writer.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"export/ort_sample.py"}  # self-contained (numpy + onnxruntime only); owned by its own issue
WRITE_METHODS = {"write_text", "write_bytes"}
COPIES = {"copyfile", "copy", "copy2", "copyfileobj_to_path"}


def _mode(call: ast.Call) -> str | None:
    if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
        return str(call.args[1].value)
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return str(kw.value.value)
    return None


def _plain_writes(path: Path, label: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name == "open" and not (isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "os"):
            mode = _mode(node)
            if mode is not None and any(c in mode for c in "wax+"):
                found.append(f"{label}:{node.lineno} open(..., {mode!r})")
        elif name in WRITE_METHODS or (name in COPIES and getattr(func, "value", None) is not None
                                       and getattr(func.value, "id", "") == "shutil"):
            found.append(f"{label}:{node.lineno} {name}(...)")
    return found


def test_no_plain_writes_in_the_library():
    sources = sorted(ROOT.glob("fastddpm/*.py")) + sorted(ROOT.glob("export/*.py"))
    assert len(sources) > 30
    labels = [str(p.relative_to(ROOT)) for p in sources]
    found = [hit for p, label in zip(sources, labels) if label not in EXEMPT for hit in _plain_writes(p, label)]
    assert not found, "write through fastddpm.files.open_output / atomic_write instead:\n" + "\n".join(found)


def test_the_checker_sees_a_plain_write(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from pathlib import Path\nopen('x', 'a')\nPath('y').write_text('z')\n"
                   "import shutil\nshutil.copyfile('a', 'b')\nopen('r', 'rb')\nos.open('q', 1)\n")
    assert len(_plain_writes(bad, "probe.py")) == 3
