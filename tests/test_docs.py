"""The documentation that lives in the repository: current, and the only documents the code cites."""

import re
import subprocess
from pathlib import Path

from mutor_vision.configdocs import reference_markdown

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
    # Regenerate with `python -m mutor_vision.configdocs` after changing a config dataclass.
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


README_LIMIT = 12 * 1024  # bytes: what a reader finishes; the rest lives in docs/ (issue 27)


def test_readme_stays_short_and_its_docs_exist():
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= README_LIMIT, f"README.md is {readme.stat().st_size} bytes: move detail to docs/"
    linked = set(re.findall(r"docs/[\w.-]+\.md", readme.read_text()))
    assert linked, "README.md links no page under docs/"
    for name in sorted(linked):
        assert (ROOT / name).is_file(), f"README.md links {name}, which does not exist"
    # every page under docs/ is reachable from the README's table
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"docs/{page.name} is not linked from README.md"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the Markdown headings of ``text`` (outside code blocks)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_markdown_links_between_the_pages_resolve():
    # [text](path#anchor) links in the README and docs/: the file exists and so does the heading.
    link = re.compile(r"\]\(([^()\s]+?)\)")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.relative_to(ROOT)} links {target}, which does not exist"
            if anchor and file.suffix == ".md":
                found = heading_anchors(file.read_text())
                assert anchor in found, f"{page.relative_to(ROOT)} links {target}: no such heading"


def test_benchmark_tables_live_in_docs():
    # bench/report.py rewrites the text between these markers in docs/benchmarks.md.
    markers = ("<!-- bench:start -->", "<!-- bench:end -->")
    assert all(marker in (ROOT / "docs" / "benchmarks.md").read_text() for marker in markers)
    assert not any(marker in (ROOT / "README.md").read_text() for marker in markers)


def test_generated_sections_are_what_their_generator_writes_from_the_committed_results():
    # README's status and demo tables, docs/benchmarks.md's tables and docs/evaluation.md's protocol
    # table: each is bench/report.py's rendering of bench/results/*.json, so a figure cannot drift.
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import report

    sections = report.generated_sections()
    assert {name for _, name, _ in sections} >= {"bench", "status", "protocol"}
    for path, name, body in sections:
        text = path.read_text()
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert start in text and end in text, f"{path.name} lacks the {name} markers"
        current = text.split(start, 1)[1].split(end, 1)[0]
        assert current.strip("\n") == body.strip("\n"), (
            f"{path.relative_to(ROOT)}: the {name} section differs from what bench/report.py writes from "
            "bench/results/ (run python bench/report.py, or fix the JSON it comes from)"
        )
