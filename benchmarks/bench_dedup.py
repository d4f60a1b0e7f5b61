"""dedup=True: bytes written per save and training stall, with and without dedup.

Two workloads, each run twice in the same process (dedup off, then on), same seed:

* **frozen 80%**: a stack of linear layers, the first 80% of the parameter bytes frozen
  (``requires_grad=False``), AdamW on the rest; ``mgr.save(step, {"model": ..., "optimizer": ...})``
  every 5 optimizer steps with ``async_save=True``.
* **LoRA inside Lightning**: a GPT-2 (peft LoRA on ``c_attn``, the base frozen) trained by a real
  ``lightning.Trainer`` with ``CheckpointCallback(every_n_train_steps=5)``; Lightning's checkpoint
  dict holds the whole model.

Figures per save after the first (the first writes everything in both modes):

* **bytes written**: the files the save added (its folder, plus its new shared file with dedup);
* **changed bytes** (the physical floor): the tensor bytes that differ from the previous save, found
  by comparing the no-dedup run's consecutive checkpoints key by key (the state and the per-rank
  files: Lightning's RNG state changes at every save); the manifest counts as overhead;
* **stall**: how long ``save()`` blocked training (the handle's ``stall_s``), median; the anchor is
  the same save without dedup, and the floor a plain copy of the changed tensors (``copy_`` into
  preallocated buffers) measured in the same run.

Target (issue 17): bytes written per save within 10% of the changed bytes.

    .venv/bin/python benchmarks/bench_dedup.py [--saves 6]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from ckpt_plugins import CheckpointManager  # noqa: E402
from ckpt_plugins.files.tensor_file import read_tensor_file  # noqa: E402
from ckpt_plugins.storage import LocalStorage  # noqa: E402
from common import machine_info, md_table, publish  # noqa: E402

EVERY = 5


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint folder: ``step_N`` (the core) or ``...step=N...`` (the Lightning
    callback's ModelCheckpoint-style names)."""
    match = re.search(r"(?:^step_|step=)(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _checkpoints(run: Path) -> list[Path]:
    return sorted((p for p in run.iterdir() if _step_of(p) is not None), key=lambda p: _step_of(p) or 0)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _per_save_written(run: Path, dedup: bool) -> list[int]:
    """Bytes each save added, in step order (its folder; its own new shared file with dedup)."""
    steps = _checkpoints(run)
    shared = run / ".shared"
    out = []
    for folder in steps:
        added = _dir_bytes(folder)
        if dedup and shared.exists():
            step = _step_of(folder)
            added += sum(p.stat().st_size for p in shared.iterdir() if p.name.startswith(f"{step}-"))
        out.append(added)
    return out


def _changed_bytes(run: Path) -> tuple[list[int], list[float]]:
    """Per consecutive pair of the no-dedup run's checkpoints: tensor bytes that differ, and the
    time a plain copy of those tensors takes (the stall floor)."""
    storage = LocalStorage()
    steps = _checkpoints(run)
    previous = None
    changed, floors = [], []
    for folder in steps:
        tensors = {  # the state and each rank's own state (RNG, data position): both are written
            f"{f.name}/{k}": t
            for f in sorted(folder.glob("*.safetensors"))
            for k, t in read_tensor_file(storage, str(f)).items()
        }
        if previous is not None:
            diff = [t for k, t in tensors.items() if k not in previous or not torch.equal(previous[k], t)]
            changed.append(sum(t.numel() * t.element_size() for t in diff))
            buffers = [torch.empty_like(t).copy_(t) for t in diff]  # touched first: the stager reuses its own
            t0 = time.perf_counter()
            for b, t in zip(buffers, diff, strict=True):
                b.copy_(t)
            floors.append(time.perf_counter() - t0)
        previous = tensors
    return changed, floors


# --- workload 1: frozen 80% -------------------------------------------------------------------
def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(1024, 1024) for _ in range(10)]  # 4 MiB each
    for layer in layers[:8]:
        layer.requires_grad_(False)
    return nn.Sequential(*layers)


def _run_frozen(directory: Path, dedup: bool, saves: int) -> list[float]:
    model = _frozen_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(1))
    stalls = []
    with CheckpointManager(directory, async_save=True, dedup=dedup) as mgr:
        for step in range(1, saves * EVERY + 1):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % EVERY == 0:
                handle = mgr.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
                stalls.append(handle.stats["stall_s"])
                handle.wait()
    return stalls


# --- workload 2: LoRA inside Lightning --------------------------------------------------------
def _run_lora(directory: Path, dedup: bool, saves: int) -> list[float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    import lightning as L
    from ckpt_plugins.lightning import CheckpointCallback

    class Lora(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            base = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=4, n_head=4))
            self.net = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.net(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    ids = torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)
    ckpt = CheckpointCallback(directory, every_n_train_steps=EVERY, dedup=dedup)
    trainer = L.Trainer(
        max_steps=saves * EVERY,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        callbacks=[ckpt],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(Lora(), loader)
    return [r["stall_ms"] / 1e3 for r in ckpt.stats.records]


def _measure(name: str, runner, saves: int, scratch: Path) -> dict:
    off, on = scratch / f"{name}-off", scratch / f"{name}-on"
    stalls_off = runner(off, False, saves)
    stalls_on = runner(on, True, saves)
    written_off, written_on = _per_save_written(off, False), _per_save_written(on, True)
    changed, floors = _changed_bytes(off)
    later = slice(1, None)  # the first save writes everything in both modes
    ratios = [w / c for w, c in zip(written_on[later], changed, strict=True)]
    return {
        "name": name,
        "total_bytes": written_off[0],
        "written_off": statistics.median(written_off[later]),
        "written_on": statistics.median(written_on[later]),
        "changed": statistics.median(changed),
        "ratio": max(ratios),
        "stall_off_ms": statistics.median(stalls_off[later]) * 1e3,
        "stall_on_ms": statistics.median(stalls_on[later]) * 1e3,
        "stall_floor_ms": statistics.median(floors) * 1e3,
        "saves": saves,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        results = [
            _measure("frozen 80%", _run_frozen, args.saves, Path(tmp)),
            _measure("LoRA in Lightning", _run_lora, args.saves, Path(tmp)),
        ]
    mib = 2**20
    rows = [
        (
            r["name"],
            f"{r['total_bytes'] / mib:.1f} MiB",
            f"{r['written_off'] / mib:.2f} MiB",
            f"{r['written_on'] / mib:.2f} MiB",
            f"{r['changed'] / mib:.2f} MiB",
            f"{r['ratio']:.3f}",
            f"{r['stall_off_ms']:.1f} ms",
            f"{r['stall_on_ms']:.1f} ms",
            f"{r['stall_floor_ms']:.1f} ms",
        )
        for r in results
    ]
    headline = [
        {
            "target": f"dedup, {r['name']}: bytes written per save <= 1.10x the changed bytes",
            "measured": f"{r['ratio']:.3f}x",
            "met": r["ratio"] <= 1.10,
            "note": f"worst of saves 2..{r['saves']}; without dedup {r['written_off'] / max(r['changed'], 1):.1f}x",
        }
        for r in results
    ]
    text = "\n".join(
        [
            "# dedup=True: bytes written per save and stall",
            "",
            f"Saves every {EVERY} optimizer steps, {args.saves} saves, medians over saves 2..{args.saves} (the first "
            "writes everything in both modes). 'changed' is the physical floor: tensor bytes that differ from the "
            "previous save (compared key by key); 'ratio' is the worst save's bytes written with dedup over its "
            "changed bytes (manifest and file headers included). Stall: how long save() blocked training "
            "(async_save); the floor is a plain copy_ of the changed tensors, measured in the same run.",
            "",
            md_table(
                [
                    "workload",
                    "checkpoint",
                    "written/save, off",
                    "written/save, dedup",
                    "changed/save",
                    "ratio",
                    "stall, off",
                    "stall, dedup",
                    "stall floor",
                ],
                rows,
            ),
            "",
            "Command: `.venv/bin/python benchmarks/bench_dedup.py"
            + (f" --saves {args.saves}" if args.saves != 6 else "")
            + "`",
        ]
    )
    publish(
        "dedup",
        text,
        {
            "headline": headline,
            "results": results,
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "elapsed_s": time.time() - started,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
