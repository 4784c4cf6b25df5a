"""The README is the front door (short, with its contents); every link in it and in docs/ leads somewhere."""

import re

from conftest import REPO


def test_the_readme_is_short_and_says_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    assert "**Contents:**" in readme
    ci = (REPO / ".ci/run").read_text()
    assert "scripts/setup.sh --test-services && .venv/bin/python -m pytest -q" in readme and "scripts/setup.sh --test-services && .venv/bin/python -m pytest -q" in ci


def test_every_relative_link_leads_to_a_file_and_every_anchor_to_a_heading():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
