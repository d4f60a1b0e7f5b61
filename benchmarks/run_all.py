"""Run every ``benchmarks/bench_*.py`` in sequence, then rebuild the combined results table.

Each benchmark is a module with ``main(argv: list[str] | None = None)`` that writes its own
``benchmarks/results/<name>.md`` (and usually ``.json`` / ``.png``); it returns an exit code
(``0`` / ``None`` is success). By default every benchmark runs in a fresh Python process
(``python -c "import bench_x; sys.exit(bench_x.main([]))"``), so one benchmark's memory, threads or
``torch.distributed`` group cannot skew the next; ``--in-process`` imports and calls them here.

Afterwards ``benchmarks/results/summary.md`` is rewritten with a table of every benchmark (status,
time, result files) followed by the targets each one reports in its ``results/<name>.json``
headline. Run dates and commits live only in the result files; the hand-written pages
(``benchmarks/README.md``, ``docs/benchmarks.md``) link to them.

Usage::

    .venv/bin/python benchmarks/run_all.py                 # all of them (make bench)
    .venv/bin/python benchmarks/run_all.py save activation # only bench_save.py and bench_activation.py
    .venv/bin/python benchmarks/run_all.py --list
    .venv/bin/python benchmarks/run_all.py --tables-only   # rebuild the tables from results/ only
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SUMMARY = RESULTS / "summary.md"
SKIPPED = 77  # a benchmark's exit code for "cannot run here" (bench_gpu.py without CUDA)
sys.path.insert(0, str(HERE))


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit N)", "error: ...", "skipped"
    seconds: float


def discover(selected: list[str]) -> list[str]:
    """Module names of the benchmarks present (``bench_save``...), optionally filtered."""
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if selected:
        wanted = {s if s.startswith("bench_") else f"bench_{s}" for s in selected}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"no such benchmark(s): {sorted(unknown)}; present: {names}")
        names = [n for n in names if n in wanted]
    return names


def run_subprocess(name: str) -> Outcome:
    code = f"import sys; import {name}; sys.exit({name}.main([]) or 0)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-c", code], cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    return Outcome(name, _status(rc), seconds)


def _status(rc: object) -> str:
    """``0``: ok; ``77`` (the autotools convention): skipped, e.g. a GPU benchmark without a GPU."""
    return "ok" if rc == 0 else "skipped" if rc == SKIPPED else f"failed (exit {rc})"


def run_in_process(name: str) -> Outcome:
    for path in (str(HERE), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(name)
        if not callable(getattr(module, "main", None)):
            return Outcome(name, "error: no main() function", 0.0)
        rc = module.main([])
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:
        return Outcome(name, f"error: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
    rc = 0 if rc in (None, 0) else rc
    return Outcome(name, _status(rc), time.perf_counter() - t0)


def result_files(name: str) -> list[Path]:
    short = name.removeprefix("bench_")
    return sorted(
        p
        for p in RESULTS.glob(f"{short}*")
        if p.is_file() and p.suffix in (".md", ".json", ".png") and not p.stem.endswith("_quick")
    )


def headlines(name: str) -> list[dict]:
    """``headline`` rows of ``results/<name>.json``: ``{"target", "measured", "met", "note"}`` each.

    A benchmark opts in by writing such a list under the top-level key ``"headline"``; its
    targets then show up in the combined table with the others.
    """
    path = RESULTS / f"{name.removeprefix('bench_')}.json"
    try:
        rows = json.loads(path.read_text()).get("headline", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, dict) and "target" in r]


def results_date(files: list[Path], fresh: bool) -> str:
    """When these result files were written: now for a benchmark this run ran, else the date of
    the commit that last changed them (a clone's files all carry the checkout's mtime), else
    their mtime (not committed yet)."""
    mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime for f in files)))
    if fresh:
        return mtime
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%cd", "--date=format:%Y-%m-%d %H:%M", "--"]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return mtime
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", *map(str, files)], capture_output=True, text=True
    ).stdout.strip()
    if dirty:
        return mtime
    return out.stdout.strip() or mtime


def combined_table(outcomes: dict[str, Outcome]) -> str:
    """Markdown for every benchmark present: this run's outcome (if it ran), its result files, and
    the targets of those that report a headline."""
    lines = ["| benchmark | status | results |", "| :--- | :--- | :--- |"]
    targets = []
    for name in discover([]):
        o = outcomes.get(name)
        files = result_files(name)
        ran = f"{o.status}, {o.seconds:.0f} s" if o else "not run"
        if files:
            ran += ", results of " + results_date(files, fresh=o is not None)
        links = ", ".join(f"[{p.name}]({os.path.relpath(p, REPO)})" for p in files) or "none yet"
        lines.append(f"| `{name}.py` | {ran} | {links} |")
        targets += [(name, r) for r in headlines(name)]
    if targets:
        lines += ["", "| benchmark | target | measured | met |", "| :--- | :--- | :--- | :--- |"]
        for name, r in targets:
            met = {True: "met", False: "**not met**", None: "inconclusive"}.get(r.get("met", "-"), "-")
            lines.append(f"| `{name}` | {r['target']} | {r.get('measured', '')} | {met} |")
    return "\n".join(lines)


def write_summary(table: str) -> None:
    """``results/summary.md``: the combined table, with links relative to ``results/``."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    local = re.sub(
        r"\]\((benchmarks/[^)]+)\)", lambda m: f"]({os.path.relpath(REPO / m.group(1), SUMMARY.parent)})", table
    )
    SUMMARY.write_text(
        "# All benchmarks: status and targets\n\n"
        "Written by `benchmarks/run_all.py` (`make bench`) after each run; links are to the result files "
        "of\neach benchmark, and each target row is the headline that benchmark reports.\n\n"
        f"_Updated by `benchmarks/run_all.py` on {stamp}._\n\n{local}\n"
    )
    print(f"updated {os.path.relpath(SUMMARY, REPO)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("only", nargs="*", help="benchmark names (save, activation, ...); default: all")
    p.add_argument("--in-process", action="store_true", help="import and run them in this process")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite results/summary.md")
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="run nothing: rebuild the combined table from the result files present",
    )
    args = p.parse_args(argv)
    names = discover(args.only)
    if args.list:
        print("\n".join(names))
        return 0
    outcomes: dict[str, Outcome] = {}
    for name in [] if args.tables_only else names:
        print(f"=== {name} ===", flush=True)
        outcome = run_in_process(name) if args.in_process else run_subprocess(name)
        outcomes[name] = outcome
        print(f"=== {name}: {outcome.status} in {outcome.seconds:.0f} s ===", flush=True)
    table = combined_table(outcomes)
    print(table)
    if not args.no_docs:
        write_summary(table)
    failed = [o.name for o in outcomes.values() if o.status != "ok"]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
