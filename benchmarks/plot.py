"""Plots for the benchmark results (matplotlib, Agg backend: no display needed).

``plot_save(results, path)`` draws the figure of ``bench_save.py`` from its results dict (the same
dict that is written to ``results/save.json``), so the figure can be redrawn without re-running:
``.venv/bin/python benchmarks/plot.py benchmarks/results/save.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_save"]

OURS, ANCHOR, FLOOR = "#1f77b4", "#9a9a9a", "#2ca02c"
MB = 1e6


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _color(name: str) -> str:
    return OURS if name.startswith("ours") else FLOOR if name.startswith("floor") else ANCHOR


def _label(value: float) -> str:
    if value < 0.01:
        return f"{value * 1e3:.2f} ms"
    if value < 1:
        return f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s"


def plot_save(res: dict[str, Any], path: str | Path) -> None:
    """Four panels: stall per save (log), time until durable, restore times, training-step dip."""
    saves = res["saves"]
    floor_name = next(n for n in saves if n.startswith("floor"))
    floor = saves[floor_name]["stall_s"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5), gridspec_kw={"height_ratios": [1.25, 1]})
    (ax_stall, ax_dur), (ax_rest, ax_dip) = axes

    # 1. stall, log scale, sorted
    order = sorted(saves, key=lambda n: saves[n]["stall_s"], reverse=True)
    vals = [saves[n]["stall_s"] for n in order]
    ax_stall.barh(order, vals, color=[_color(n) for n in order])
    for y, v in enumerate(vals):
        ax_stall.text(v * 1.08, y, _label(v), va="center", fontsize=8)
    ax_stall.axvline(floor, color=FLOOR, lw=1, ls="--")
    ax_stall.axvline(2 * floor, color=FLOOR, lw=1, ls=":")
    ax_stall.text(2 * floor, len(order) - 0.4, " 2x floor", color=FLOOR, fontsize=8, va="top")
    ax_stall.set_xscale("log")
    ax_stall.set_xlim(min(vals) / 2, max(vals) * 4)
    ax_stall.set_xlabel("seconds the training loop is blocked per save (log scale, median)")
    ax_stall.set_title("Stall per save")
    ax_stall.tick_params(axis="y", labelsize=8)

    # 2. durable
    dur = [n for n in order if "durable_s" in saves[n]]
    dvals = [saves[n]["durable_s"] for n in dur]
    ax_dur.barh(dur, dvals, color=[_color(n) for n in dur])
    for y, n in enumerate(dur):
        s = saves[n]
        ax_dur.text(
            s["durable_s"] * 1.01,
            y,
            f"{_label(s['durable_s'])}  {s['throughput'] / MB:.0f} MB/s",
            va="center",
            fontsize=8,
        )
    disk_floor = (
        _median([s["bytes"] for n, s in saves.items() if "bytes" in s and n.startswith("ours")]) / res["disk_bw"]
    )
    ax_dur.axvline(disk_floor, color="k", lw=1, ls="--")
    ax_dur.text(
        disk_floor,
        len(dur) - 0.45,
        f" state size / disk bw ({res['disk_bw'] / MB:.0f} MB/s, median)",
        fontsize=8,
        va="bottom",
    )
    ax_dur.set_ylim(-0.6, len(dur) + 0.2)
    ax_dur.set_xlim(0, max(dvals) * 1.45)
    ax_dur.set_xlabel("seconds from the call until fsynced and committed (median)")
    ax_dur.set_title("Time until durable")
    ax_dur.tick_params(axis="y", labelsize=8)

    # 3. restore
    r = res["restore"]["samples"]
    names = list(r)
    modes = [m for m in ("warm", "cold") if any(r[n][m] for n in names)]
    height = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ys = [y + (i - (len(modes) - 1) / 2) * height for y in range(len(names))]
        vals = [_median(r[n][mode]) for n in names]
        ax_rest.barh(
            ys,
            vals,
            height=height * 0.95,
            label=f"page cache {mode}",
            color=[_color(n) for n in names],
            alpha=1.0 if mode == "warm" else 0.55,
        )
        for y, v in zip(ys, vals, strict=False):
            ax_rest.text(v * 1.01, y, f"{_label(v)} ({mode})", va="center", fontsize=7)
    ax_rest.set_yticks(range(len(names)), names, fontsize=8)
    ax_rest.invert_yaxis()
    ax_rest.set_xlim(0, max(_median(r[n][m]) for n in names for m in modes) * 1.35)
    ax_rest.set_xlabel("seconds to restore (median); darker = warm page cache, lighter = cold")
    ax_rest.set_title("Restore")

    # 4. dip
    d = res["dip"]["rows"]
    names = list(d)
    busy = [_median(d[n]["busy"]) for n in names]
    idle = [_median(d[n]["idle"]) for n in names]
    ys = range(len(names))
    ax_dip.barh([y - 0.2 for y in ys], [i * 1e3 for i in idle], height=0.38, color="#cccccc", label="idle")
    ax_dip.barh(
        [y + 0.2 for y in ys],
        [b * 1e3 for b in busy],
        height=0.38,
        color=[_color(n) for n in names],
        label="while a persist runs",
    )
    for y, n, b in zip(ys, names, busy, strict=False):
        r = d[n]
        dip = (
            1 - (len(r["busy"]) / r["busy_wall"]) / (len(r["idle"]) / r["idle_wall"])
            if r.get("busy_wall")
            else _median(r.get("round_dips", []))
        )
        lost = r.get("lost_s")  # stall + persist window - steps done in it at the idle step time
        if lost is None:  # results written before the stall was counted
            lost = (
                (r["busy_wall"] - len(r["busy"]) * r["idle_wall"] / len(r["idle"])) / len(r["busy_s"])
                if r.get("busy_wall")
                else float("nan")
            )
        label = f"{b * 1e3:.0f} ms (dip {dip:.0%}" + (f", {lost * 1e3:.0f} ms lost per save)" if lost == lost else ")")
        ax_dip.text(b * 1e3 * 1.01, y + 0.2, label if dip == dip else "", va="center", fontsize=8)
    ax_dip.set_yticks(list(ys), names, fontsize=8)
    ax_dip.invert_yaxis()
    ax_dip.set_xlim(0, max(busy + idle) * 1e3 * 1.9)
    ax_dip.set_xlabel("training step time, ms (median)")
    ax_dip.set_title("Training steps while a save persists (dip = 1 - steps/s ratio)")
    ax_dip.legend(fontsize=8, loc="upper right")

    m = res["machine"]
    fig.suptitle(
        f"ckpt_plugins save benchmark: {res['state']['bytes'] / 2**20:.0f} MiB state, "
        f"{m['cores']} CPU cores, {m['filesystem']} (blue: ours, grey: others, green: floor copy)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "save.json")
    plot_save(json.loads(source.read_text()), source.with_suffix(".png"))
    print(f"wrote {source.with_suffix('.png')}")
