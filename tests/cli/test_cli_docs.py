"""docs/cli.md shows real output: its ``ls`` and ``inspect`` samples match a fresh run of the run it
describes (ages, listed sizes and absolute paths aside)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_runs import plain_run

from ckpt_plugins.cli import main

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()


def documented(command: str) -> list[str]:
    """The output lines shown under ``$ ckpt-plugins COMMAND`` on the page."""
    start = PAGE.index(f"$ ckpt-plugins {command}\n") + len(f"$ ckpt-plugins {command}\n")
    return PAGE[start : PAGE.index("```", start)].rstrip("\n").splitlines()


def normal(lines: list[str], listing: bool) -> list[str]:
    """Ages, and in a listing folder sizes (the manifest's length varies by a few bytes), as words."""
    ages = re.compile(r"(?<=\s)\d+(\.\d)?[smhd](?=\s)")
    sizes = re.compile(r"\d+\.\d KiB")
    return [
        sizes.sub("SIZE", ages.sub("AGE", line)) if listing else line
        for line in lines
        if not line.startswith("DAMAGED ")
    ]


@pytest.mark.parametrize("command", ["ls runs/demo", "inspect runs/demo/step_4"])
def test_the_documented_output_is_what_the_command_prints(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    plain_run(Path("runs/demo"), keep_last=2, keep_best=1, monitor="loss")
    manifest = Path("runs/demo/step_3/manifest.json")
    manifest.write_bytes(manifest.read_bytes()[:100])
    assert main(command.split()) == 0
    listing = command.startswith("ls")
    assert normal(capsys.readouterr().out.splitlines(), listing) == normal(documented(command), listing)
