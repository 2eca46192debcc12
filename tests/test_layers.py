"""The layers of docs/concepts/architecture.md, checked: import-linter's contracts (pyproject.toml)
must hold, and no module imports ours inside a function to get around them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ticketserve"


def test_import_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_our_modules_are_imported_at_the_top_outside_the_cli():
    """The CLI defers imports to keep start-up fast; elsewhere a function-local import of our
    own code could only hide a cycle."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts or path.parts[-2:] == ("v1", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    module = inner.module if isinstance(inner, ast.ImportFrom) else None
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [module or ""]
                    if any(n.split(".")[0] == "ticketserve" for n in names):
                        hidden.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert not hidden, hidden
