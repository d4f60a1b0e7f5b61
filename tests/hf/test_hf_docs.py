"""The examples of ``docs/hf.md`` marked ``<!-- readme-test -->`` run as written (the README section
is pasted from that file; ``tests/test_readme.py`` runs them again there)."""

from __future__ import annotations

import re

import pytest

import hf_train
from conftest import ROOT

DOC = ROOT / "docs" / "hf.md"
BLOCKS = re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", DOC.read_text(), flags=re.S)

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


def test_doc_has_a_runnable_example():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/hf.md example {index + 1}", "exec"), {"__name__": "__doc_example__"})
    # every `print(...)  # value` line documents what it prints
    documented = re.findall(r"^\s*print\(.*\)\s+# (.*)$", BLOCKS[index], flags=re.M)
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line in documented] == documented
