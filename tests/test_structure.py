"""The code's shape: packages import one way, tests run the installed package, modules stay small."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lowmem
import quant

REPO = Path(__file__).resolve().parents[1]
QUANT_DIR = Path(quant.__file__).parent
LOWMEM_DIR = Path(lowmem.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_quant_never_imports_lowmem():
    """quant/ (format, reader, quantizer) is below lowmem/ (runtime): statically and at run time."""
    offenders = [p.name for p in sorted(QUANT_DIR.glob("*.py")) if "lowmem" in _imported_roots(p)]
    assert offenders == []
    modules = [f"quant.{p.stem}" for p in sorted(QUANT_DIR.glob("*.py")) if p.stem != "__init__"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lowmem'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines())
             for d in (QUANT_DIR, LOWMEM_DIR) for p in d.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 650} == {}


@pytest.mark.skipif(not os.environ.get("LOWMEM_TEST_INSTALLED"),
                    reason="set LOWMEM_TEST_INSTALLED=1 (as .ci/run does) to require an installed package")
def test_tests_import_the_installed_package():
    """CI installs the project (not editable) and must test that copy, not the checkout."""
    for pkg in (lowmem, quant):
        where = Path(pkg.__file__).resolve().parent
        assert where != REPO / pkg.__name__ and "site-packages" in where.parts, where
    assert (LOWMEM_DIR / "data" / "tokenizer.model").is_file()   # package data installed
