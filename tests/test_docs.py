"""The documentation that lives in the repository: current, and the only documents the code cites."""

import re
import subprocess
from pathlib import Path

from mutor_vision.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def tracked(*patterns: str) -> list[Path]:
    """The repository's files matching ``patterns`` (git's list; a plain walk outside a git checkout)."""
    listed = subprocess.run(["git", "ls-files", *patterns], capture_output=True, text=True, cwd=ROOT)
    if listed.returncode == 0 and listed.stdout.strip():
        return [ROOT / name for name in listed.stdout.split() if (ROOT / name).is_file()]
    skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
    found = [p for pattern in patterns for p in ROOT.rglob(pattern) if p.is_file()]
    return [p for p in found if not skip & set(p.relative_to(ROOT).parts)]


def test_config_reference_is_current():
    # Regenerate with `python -m mutor_vision.config` after changing a config dataclass.
    assert (ROOT / "docs" / "configs.md").read_text() == reference_markdown()


def test_cited_docs_exist_and_nothing_outside_the_repository_is_cited():
    # Spelled in pieces so that this file does not match itself.
    names = ["shared" + "/spec", r"\.\./" + "shared", "ecosystem" + r"\.md"]
    names.append(r"(?<!docs/)(mutor|llamagen|style)" + r"\.md")
    outside = re.compile("|".join(names))
    cited = re.compile(r"docs/[\w./-]+\.md")
    files = tracked("*.py", "*.md", "*.yaml", "*.toml", "Makefile")
    assert files, "git ls-files found nothing"
    for path in files:
        text = path.read_text()
        assert not outside.search(text), f"{path.relative_to(ROOT)} cites a document outside the repository"
        for name in cited.findall(text):
            assert (ROOT / name).is_file(), f"{path.relative_to(ROOT)} cites {name}, which does not exist"
