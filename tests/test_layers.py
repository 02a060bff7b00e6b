"""The package's shape, kept by CI: the import-linter contracts in pyproject.toml (layers, no cycles, the library
never imports typer, private modules stay home) and no module importing another module's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "trace_erase"


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed; `make setup` installs it with the dev extra")
    run = subprocess.run([exe, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(path: Path) -> list[str]:
    """``from X import _name`` where X is another trace_erase module (a private name crossing a module boundary)."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            if not source.startswith("trace_erase") or source == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}:{node.lineno} imports {source}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in private_imports(path)]
    assert not found, "\n".join(found)


def test_the_private_import_check_sees_relative_imports(tmp_path) -> None:
    """The checker itself: a relative import of a private name from a sibling module is reported."""
    pkg = PACKAGE / "engines"
    probe = pkg / "_probe_private_import.py"
    probe.write_text("from .pool import _hidden\nfrom ..errors import TraceEraseError\n")
    try:
        assert private_imports(probe) == ["trace_erase.engines._probe_private_import:1 imports "
                                          "trace_erase.engines.pool._hidden"]
    finally:
        probe.unlink()
