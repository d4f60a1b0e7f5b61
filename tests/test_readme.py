"""The examples marked `<!-- readme-test -->` in the README and in docs/core.md run as written,
each in a temporary folder (docs/hf.md and docs/activation.md have their own doc tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/core.md"]


def marked_blocks(page: str) -> list[str]:
    return re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


EXAMPLES = [(page, index, code) for page in PAGES for index, code in enumerate(marked_blocks(page))]


@pytest.mark.parametrize("page", PAGES)
def test_page_has_runnable_examples(page):
    assert marked_blocks(page), f"{page} has no example marked <!-- readme-test -->"


def test_readme_has_a_quick_start_and_the_two_commands_near_the_top():
    top = (ROOT / "README.md").read_text().splitlines()[:60]
    assert any("make demo" in line for line in top) and any("make test" in line for line in top)
    assert len(marked_blocks("README.md")) >= 2


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES, ids=[f"{p}-{i + 1}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page} example {index + 1}", "exec"), {"__name__": "__readme__"})
