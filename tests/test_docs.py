"""The documentation: the mkdocs site builds with --strict, the README stays a front door, and no page narrates how
the project was made (session or issue numbers, "people steering")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PROCESS_WORDS = re.compile(r"\bsession\s+#?\d+|\bissue\s*#?\d+|\bissue\s+#\w+|\bpeople\s+steering\b|\.\./shared/",
                           re.IGNORECASE)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    import importlib.util

    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed: `make setup` installs mkdocs and mkdocs-material (the dev extra)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_docs_page_is_in_the_nav() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    in_nav = set(walk(config["nav"]))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav


@pytest.mark.parametrize("path", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_process_narration(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    hits = [m.group(0) for m in PROCESS_WORDS.finditer(text)]
    assert not hits, f"{path.relative_to(ROOT)} narrates the project's process: {hits}"


def test_the_pattern_catches_what_it_should() -> None:
    for bad in ("session 6", "Session 12", "issue 16", "issue #16", "(issue 16)", "the people steering"):
        assert PROCESS_WORDS.search(bad), bad
    for good in ("a session of training", "pytorch/pytorch#196678", "known issues", "GPU session"):
        assert not PROCESS_WORDS.search(good), good
