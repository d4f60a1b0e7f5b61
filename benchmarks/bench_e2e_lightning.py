"""End to end with a Lightning ``Trainer``: Lightning's own checkpointing against ours, same run.

A GPT-2-style model (about 13 M parameters: ~155 MB of weights plus Adam state) trains for a fixed
number of steps on CPU and checkpoints every K steps, in one of these configurations:

* ``none``: ``enable_checkpointing=False`` (the floor);
* ``ModelCheckpoint``: Lightning's default (``TorchCheckpointIO``: ``torch.save`` on the training
  thread, not fsynced);
* ``ModelCheckpoint + AsyncCheckpointIO``: Lightning's async plugin (clones every tensor on the
  training thread, then ``torch.save`` on a thread);
* ``ModelCheckpoint + CheckpointIOPlugin``: the same callback with our IO plugin (async, our
  format, every file fsynced, atomic commit);
* ``CheckpointCallback``: ours (async, crash-safe, per-rank RNG and data position).

Every configuration keeps every checkpoint (``save_top_k=-1``; ours without ``keep_*``). Runs are
interleaved round-robin (``--rounds`` times) so load from other processes falls on every
configuration alike; a run's overhead is taken against the ``none`` run of the same round, and
the median over rounds is reported. Blocked per save: from the first ``on_train_batch_end``
callback to the LightningModule's ``on_train_batch_end`` hook (Lightning runs checkpoint callbacks
last), measured the same way for every configuration. Wall time covers ``fit()`` (asynchronous
saves are waited for at the end of training); "until on disk" adds an fsync of the files for the
configurations that do not fsync their own.

The last save is two steps before the end of the run (as in any real run, training goes on after a
save); ``--steps``/``--every`` change that.

Run: ``.venv/bin/python benchmarks/bench_e2e_lightning.py`` (under 3 minutes; ``--quick`` for a
smoke run). Writes ``benchmarks/results/e2e_lightning.md`` and ``e2e_lightning.json``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    E2E_COLUMNS,
    OtherLoad,
    file_bytes,
    fsync_tree,
    machine_info,
    md_table,
    median,
    overhead_note,
    publish_e2e,
    scratch_dir,
)

CONFIGS = (
    "none",
    "ModelCheckpoint",
    "ModelCheckpoint + AsyncCheckpointIO",
    "ModelCheckpoint + CheckpointIOPlugin",
    "CheckpointCallback",
)
DEFAULT, OURS = "ModelCheckpoint", "CheckpointCallback"


def _module(quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    import lightning as L

    class GPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers, width = (4, 128) if quick else (16, 256)
            self.model = GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=1024,
                    n_positions=64,
                    n_embd=width,
                    n_layer=layers,
                    n_head=8,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            )
            self.model.loss_type = "ForCausalLM"
            self.stalls: list[float] = []
            self.batch_end_started: float | None = None

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def on_train_batch_end(self, outputs, batch, batch_idx):  # after every callback's, checkpoints last
            if self.batch_end_started is not None and self.trainer.global_step % self.every == 0:
                self.stalls.append(time.perf_counter() - self.batch_end_started)

    return GPT()


def _timer():
    import lightning as L

    class BatchEndTimer(L.Callback):  # runs first among callbacks: checkpoint callbacks are moved last
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.batch_end_started = time.perf_counter()

    return BatchEndTimer()


def run_once(config: str, out: Path, steps: int, every: int, quick: bool) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    import lightning as L
    from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin

    callbacks, plugins = [_timer()], []
    if config.startswith(DEFAULT):
        callbacks.append(ModelCheckpoint(dirpath=out, every_n_train_steps=every, save_top_k=-1))
    if config.endswith("AsyncCheckpointIO"):
        plugins.append(AsyncCheckpointIO())
    if config.endswith("CheckpointIOPlugin"):
        plugins.append(CheckpointIOPlugin(async_save=True))
    if config.startswith(OURS):
        callbacks.append(
            CheckpointCallback(
                out, every_n_train_steps=every, async_save=True, writer="process" if "process" in config else "thread"
            )
        )
    model = _module(quick)
    model.every = every
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 1024, (steps * 4, 64), generator=torch.Generator().manual_seed(0))
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=config != "none",
        callbacks=callbacks,
        plugins=plugins or None,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    gc.collect()
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    wall = time.perf_counter() - t0
    if config != "none" and not config.startswith(OURS) and not config.endswith("CheckpointIOPlugin"):
        fsync_tree(out)  # ours fsync every file before fit() returns; make the others durable too
    durable = time.perf_counter() - t0
    saved = sorted(out.iterdir()) if out.exists() else []
    return {
        "config": config,
        "wall_s": wall,
        "durable_s": durable,
        "cpu_s": time.process_time() - cpu0,
        "stalls_s": model.stalls if config != "none" else [],
        "saves": len(model.stalls) if config != "none" else 0,
        "checkpoints": [p.name for p in saved],
        "checkpoint_bytes": file_bytes(saved[-1]) if saved else 0,
        "state_bytes": sum(p.numel() * p.element_size() for p in model.parameters()) * 3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and one round (smoke test)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--every", type=int, default=4)
    opts = parser.parse_args(argv)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "ckpt_plugins"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # a small shared machine: OpenMP threads would spin against other jobs
    rounds = 1 if opts.quick else opts.rounds
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with OtherLoad() as load, scratch_dir("e2e_lightning") as scratch:
        for config in CONFIGS:  # imports, allocator, caches: first-use costs of every configuration
            run_once(config, scratch / f"warmup-{len(results[config])}-{CONFIGS.index(config)}", 2, 1, opts.quick)
        for r in range(rounds):
            for i, config in enumerate(CONFIGS):
                results[config].append(run_once(config, scratch / f"{i}-{r}", opts.steps, opts.every, opts.quick))
                print(f"round {r}: {config:38} {results[config][-1]['wall_s']:.2f} s", flush=True)
    rows, summary = [], {}
    for config in CONFIGS:
        stalls = [s for x in results[config] for s in x["stalls_s"]]
        paired = median(x["wall_s"] / n["wall_s"] - 1 for x, n in zip(results[config], results["none"], strict=False))
        durable = median(
            x["durable_s"] / n["wall_s"] - 1 for x, n in zip(results[config], results["none"], strict=False)
        )
        summary[config] = {
            "wall_s": median(x["wall_s"] for x in results[config]),
            "overhead": paired,
            "overhead_durable": durable,
            "cpu_s": median(x["cpu_s"] for x in results[config]),
            "saves_per_run": results[config][0]["saves"],
            "stall_median_s": median(stalls) if stalls else None,
            "stall_max_s": max(stalls) if stalls else None,
            "checkpoint_mb": results[config][0]["checkpoint_bytes"] / 1e6,
        }
        s = summary[config]
        rows.append(
            [
                config,
                f"{s['wall_s']:.2f}",
                f"{s['overhead'] * 100:+.1f} %",
                f"{s['overhead_durable'] * 100:+.1f} %",
                f"{s['cpu_s']:.1f}",
                s["saves_per_run"],
                "-" if s["stall_median_s"] is None else f"{s['stall_median_s'] * 1e3:.0f}",
                "-" if s["stall_max_s"] is None else f"{s['stall_max_s'] * 1e3:.0f}",
                "-" if not s["checkpoint_mb"] else f"{s['checkpoint_mb']:.0f}",
            ]
        )
    ours, default = summary[OURS], summary[DEFAULT]
    ratio = ours["overhead_durable"] / default["overhead_durable"] if default["overhead_durable"] > 0 else float("nan")
    headline = [
        {
            "target": "Lightning run: our end-to-end checkpointing overhead at most 1/3 of Lightning's default "
            "(ModelCheckpoint + TorchCheckpointIO) at the same interval, until checkpoints are on disk",
            "measured": f"{ours['overhead_durable'] * 100:+.1f} % vs {default['overhead_durable'] * 100:+.1f} % "
            f"(ratio {ratio:.2f}); blocked per save {ours['stall_median_s'] * 1e3:.0f} ms vs "
            f"{default['stall_median_s'] * 1e3:.0f} ms",
            "met": bool(ratio <= 1 / 3),
        }
    ]
    state_mb = results["none"][0]["state_bytes"] / 1e6
    info = machine_info()
    text = "\n".join(
        [
            "# Lightning end to end: Lightning's checkpointing vs ckpt_plugins",
            "",
            f"GPT-2-style model, {state_mb:.0f} MB of weights + Adam state, {opts.steps} steps, a checkpoint every "
            f"{opts.every} steps (all kept); median of {rounds} interleaved round(s). CPU only "
            f"({info.get('cpu', '?')}, torch threads {torch.get_num_threads()}); other processes used "
            f"{load.other_cores:.1f} cores on average while this ran.",
            "",
            md_table(
                E2E_COLUMNS,
                rows,
            ),
            "",
            f"**Target** (overhead until on disk, ours at most 1/3 of `ModelCheckpoint`'s): "
            f"{headline[0]['measured']} - {'met' if headline[0]['met'] else 'NOT met'}.",
            "",
            overhead_note(
                "an fsync of the checkpoint files after `fit()` returns for Lightning's IO (ours fsync "
                "before `fit()` returns)."
            ),
            "",
            "`TorchCheckpointIO` writes on the training thread and does not fsync; `AsyncCheckpointIO` clones the "
            "state on the training thread into fresh memory at every save, then writes on a thread (not fsynced, "
            "not atomic). Ours copy into reused staging buffers, then write, checksum, fsync and commit by rename "
            "in the background; `CheckpointCallback` also records every generator's state and the data position.",
            "",
            "Command: `.venv/bin/python benchmarks/bench_e2e_lightning.py`",
            "",
        ]
    )
    publish_e2e(
        "e2e_lightning",
        text,
        headline=headline,
        summary=summary,
        runs=results,
        machine=info,
        load=load,
        opts=opts,
        rounds=rounds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
