"""SIGKILL a Trainer run while it saves, then try ``trainer.train(resume_from_checkpoint=True)``.

For each saving method (the Trainer's own, and ``CheckpointCallback``), ``--trials`` times:

1. a child process trains a GPT-2-style model (~80 MB of weights + Adam state) and saves every
   2 steps. The first save is timed (from the step end that starts it until the checkpoint is
   complete: the Trainer's ``on_save``; for ours, when ``checkpoint-N`` appears, i.e. commits);
2. when the second save starts, the parent waits a uniformly random fraction of that duration
   and SIGKILLs the child. A kill that lands after the save completed does not count and the
   trial is repeated, so every counted kill hit a save in progress;
3. a fresh child builds the same Trainer and calls ``train(resume_from_checkpoint=True)``.

Outcomes: ``crash`` (resume raised), ``silent`` (it resumed from a newest ``checkpoint-N`` that
lacks files the Trainer needs: it continues with a missing optimizer, scheduler or RNG state
without a word), ``ok`` (it resumed from a complete checkpoint).

Children are forked from this process after transformers is imported (and before any torch
compute), so a trial costs its training time, not an interpreter start.

Run: ``.venv/bin/python benchmarks/kill_while_saving_hf.py [--trials 10]``. Writes
``benchmarks/results/kill_while_saving_hf.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import select
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ckpt_plugins.hf import CheckpointCallback
from common import RESULTS, md_table, scratch_dir, write_json, write_text

SAVE_EVERY, MAX_STEPS = 2, 8
NEEDED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 1024, (64, 64), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Report(TrainerCallback):
    """Tells the parent (through a pipe) when each save starts and when it is complete."""

    def __init__(self, fd: int, ours: bool) -> None:
        self.fd, self.ours = fd, ours

    def send(self, *words: object) -> None:
        os.write(self.fd, (" ".join(map(str, words)) + "\n").encode())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % SAVE_EVERY == 0:
            self.send("begin", state.global_step, time.monotonic())
            if self.ours:  # complete = committed: the folder appears under its final name
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                import threading

                def watch() -> None:
                    while not os.path.isdir(folder):
                        time.sleep(0.002)
                    self.send("end", state.global_step, time.monotonic())

                threading.Thread(target=watch, daemon=True).start()

    def on_save(self, args, state, control, **kwargs):
        if not self.ours:
            self.send("end", state.global_step, time.monotonic())


class _StopAfterOneStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def _trainer(out: Path, ours: bool, callbacks: list) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=256, n_layer=8, n_head=8))
    args = TrainingArguments(
        str(out),
        max_steps=MAX_STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        logging_steps=10_000,
    )
    extra = [CheckpointCallback()] if ours else []
    return Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=extra + callbacks)


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            torch.set_num_threads(1)
            logging.disable(logging.CRITICAL)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _train_and_kill(out: Path, ours: bool, rng: random.Random) -> dict | None:
    """Run the training child; SIGKILL it during its second save. None: the kill came too late."""
    read_fd, write_fd = os.pipe()
    pid = _fork(lambda: (os.close(read_fd), _trainer(out, ours, [_Report(write_fd, ours)]).train()))
    os.close(write_fd)
    events: dict[tuple[str, int], float] = {}
    buffer, killed_at, delay = b"", None, None
    while killed_at is None:
        ready, _, _ = select.select([read_fd], [], [], 120)
        if not ready:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            kind, step, when = line.decode().split()
            events[(kind, int(step))] = float(when)
        first, second = SAVE_EVERY, 2 * SAVE_EVERY
        if ("begin", second) in events and ("end", first) in events:
            duration = events[("end", first)] - events[("begin", first)]
            delay = rng.uniform(0.0, duration)
            time.sleep(max(0.0, events[("begin", second)] + delay - time.monotonic()))
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
    os.waitpid(pid, 0)
    # did the second save complete before the kill? then this kill did not hit a save
    more = b""
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        more += chunk
    os.close(read_fd)
    for line in (buffer + more).decode().split("\n"):
        if line.strip():
            kind, step, when = line.split()
            events[(kind, int(step))] = float(when)
    if killed_at is None:
        return None
    completed = events.get(("end", 2 * SAVE_EVERY))
    if completed is not None and completed <= killed_at:
        return None
    return {"delay_s": delay, "save_duration_s": events[("end", SAVE_EVERY)] - events[("begin", SAVE_EVERY)]}


def _try_resume(out: Path, ours: bool) -> dict:
    newest = get_last_checkpoint(str(out))
    newest_files = sorted(os.listdir(newest)) if newest else []
    result_path = out.parent / f"{out.name}.result.json"

    def resume() -> None:
        trainer = _trainer(out, ours, [_StopAfterOneStep()])
        try:
            trainer.train(resume_from_checkpoint=True)
            outcome = {"error": None, "resumed_step": trainer.state.global_step - 1}
        except Exception as exc:
            outcome = {"error": f"{type(exc).__name__}: {str(exc).replace(str(out.parent) + os.sep, '')[:300]}"}
        result_path.write_text(json.dumps(outcome))

    pid = _fork(resume)
    _, status = os.waitpid(pid, 0)
    outcome = json.loads(result_path.read_text()) if result_path.exists() else {"error": f"child died ({status})"}
    resumed_from = get_last_checkpoint(str(out))  # after our guard moved damaged ones aside
    folder_files = sorted(os.listdir(resumed_from)) if resumed_from else []
    has_weights = any(f in folder_files for f in ("model.safetensors", "pytorch_model.bin"))
    incomplete = [f for f in NEEDED if f not in folder_files] + ([] if has_weights else ["model weights"])
    if outcome["error"]:
        verdict = "crash"
    elif incomplete:
        verdict = "silent"
    else:
        verdict = "ok"
    return {
        "verdict": verdict,
        "error": outcome["error"],
        "newest_after_kill": os.path.basename(newest or "-"),
        "newest_files": newest_files,
        "resumed_from": os.path.basename(resumed_from or "-"),
        "missing_in_resumed": incomplete,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    rng = random.Random(opts.seed)
    hf_logging.disable_progress_bar()
    report: dict[str, list[dict]] = {"trainer": [], "ours": []}
    t0 = time.time()
    with scratch_dir("kill_while_saving_hf") as scratch:
        for method in ("trainer", "ours"):
            attempts = 0
            while len(report[method]) < opts.trials and attempts < 4 * opts.trials:
                attempts += 1
                out = scratch / f"{method}-{attempts}"
                kill = _train_and_kill(out, method == "ours", rng)
                if kill is None:
                    continue  # the save had completed: not a kill while saving
                trial = {**kill, **_try_resume(out, method == "ours")}
                report[method].append(trial)
                print(
                    f"{method:8} trial {len(report[method]):2}: killed {trial['delay_s'] * 1e3:5.0f} ms into a "
                    f"{trial['save_duration_s'] * 1e3:.0f} ms save -> {trial['verdict']}"
                    f"{' (' + trial['error'] + ')' if trial['error'] else ''}",
                    flush=True,
                )
    rows = []
    for method, label in (("trainer", "Trainer's own saving"), ("ours", "CheckpointCallback")):
        trials = report[method]
        count = {v: sum(t["verdict"] == v for t in trials) for v in ("crash", "silent", "ok")}
        rows.append([label, len(trials), f"**{count['crash']}**", count["silent"], count["ok"]])
    details = [
        [
            m,
            i + 1,
            f"{t['delay_s'] * 1e3:.0f} / {t['save_duration_s'] * 1e3:.0f}",
            t["newest_after_kill"],
            ", ".join(t["newest_files"]) or "-",
            t["resumed_from"],
            t["verdict"],
            (t["error"] or "")[:90],
        ]
        for m in ("trainer", "ours")
        for i, t in enumerate(report[m])
    ]
    text = "\n".join(
        [
            "# Killed while saving: does `resume_from_checkpoint=True` work afterwards?",
            "",
            f"GPT-2-style model (~80 MB weights + Adam), a save every {SAVE_EVERY} steps; each kill (SIGKILL) lands at "
            "a uniformly random moment inside the second save, then a fresh process calls "
            "`trainer.train(resume_from_checkpoint=True)`. `silent`: resumed from a checkpoint missing files the "
            f"Trainer needs ({', '.join(NEEDED)}), without an error. Took {time.time() - t0:.0f} s.",
            "",
            md_table(
                ["saving", "kills while saving", "resume crashed", "resumed silently incomplete", "resumed OK"], rows
            ),
            "",
            "## Trials",
            "",
            md_table(
                [
                    "saving",
                    "trial",
                    "kill at / save ms",
                    "newest after kill",
                    "its files",
                    "resumed from",
                    "outcome",
                    "error",
                ],
                details,
            ),
            "",
            "Command: `.venv/bin/python benchmarks/kill_while_saving_hf.py --trials 10`",
            "",
        ]
    )
    write_text(RESULTS / "kill_while_saving_hf.md", text)
    write_json(RESULTS / "kill_while_saving_hf.json", {"trials": report, "save_every": SAVE_EVERY, "seed": opts.seed})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
