"""The HF Trainer demo: train, SIGKILL, resume natively, and show that nothing was lost.

1. A reference run of ``run_clm.py`` trains the tiny GPT-2 for 60 steps without checkpoints.
2. The same run with ``CheckpointCallback`` (async saves every 10 steps, ``keep_last=2`` plus the
   best by ``eval_loss``) SIGKILLs itself after step 37, between two saves.
3. The same command again: the Trainer finds the newest ``checkpoint-N`` itself
   (``get_last_checkpoint``) and resumes from it.
4. Which checkpoints were kept and why, how long each save blocked training, and the final
   weights compared with the reference bit for bit.

``main()`` is called by the top-level ``examples/demo.py``; ``python examples/hf/demo.py`` runs it
alone. Runs go to ``demo_runs/hf`` (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
RUNS = REPO / "demo_runs" / "hf"
COMMON = [
    "--max_steps",
    "60",
    "--save_steps",
    "10",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "10",
    "--metric_for_best_model",
    "loss",
    "--logging_steps",
    "10",
    "--seed",
    "7",
    "--use_cpu",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--ckpt_keep_last",
    "2",
]
STALL = re.compile(r"checkpoint step (\d+): training blocked ([\d.]+) ms")


def run(*args: str, expect_kill: bool = False) -> str:
    """Run ``run_clm.py`` with ``args`` in a child process; return its log.

    The child is forked from this process, which has imported transformers already (and run no
    torch computation), so each run costs its training time rather than an interpreter start.
    """
    import run_clm

    print(f"$ python examples/hf/run_clm.py {' '.join(args)}", flush=True)
    log_path = RUNS / f"log-{len(list(RUNS.glob('log-*')))}.txt"
    pid = os.fork()
    if pid == 0:  # the run: its own process, so that SIGKILL ends only it
        code = 1
        try:
            with open(log_path, "w") as log_file:
                os.dup2(log_file.fileno(), 2)
                os.dup2(log_file.fileno(), 1)
                torch.set_num_threads(1)
                run_clm.main(list(args))
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    log = log_path.read_text()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if expect_kill != killed or (not killed and os.WEXITSTATUS(status) != 0):
        sys.exit(f"run_clm.py ended unexpectedly (status {status}):\n{log[-3000:]}")
    for line in log.splitlines():
        if (
            (
                "ckpt_plugins" in line
                and ("WARNING" in line or "blocked" in line or "retention" in line)
                and "will not save" not in line
            )
            or "SIGKILL" in line
            or "resuming from" in line
        ):
            print("   ", line.split(": ", 1)[-1])
    return log


def main() -> None:
    import run_clm  # noqa: F401 - imports transformers once, before the runs are forked
    from safetensors.torch import load_file

    from ckpt_plugins.cli import main as cli

    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    out = RUNS / "clm"

    print("== HF 1. reference run: 60 steps, no checkpoints, no interruption")
    run(
        "--output_dir",
        str(RUNS / "reference"),
        *COMMON,
        "--save_strategy",
        "no",
        "--final_weights",
        str(RUNS / "reference.safetensors"),
    )

    print("\n== HF 2. CheckpointCallback run (async, every 10 steps), SIGKILLed after step 37")
    log_killed = run("--output_dir", str(out), *COMMON, "--die_at_step", "37", expect_kill=True)

    print("\n== HF 3. the same command again: trainer.train(resume_from_checkpoint=<newest checkpoint-N>)")
    log_resumed = run("--output_dir", str(out), *COMMON, "--final_weights", str(RUNS / "resumed.safetensors"))

    print("\n== HF 4. what happened")
    print("checkpoints kept (keep_last=2, and the best by eval_loss, from metric_for_best_model):")
    print(f"$ ckpt-plugins ls {os.path.relpath(out, REPO)} --keep-last 2 --monitor eval_loss")
    cli(["ls", str(out), "--keep-last", "2", "--monitor", "eval_loss"])
    stalls = [(int(s), float(ms)) for s, ms in STALL.findall(log_killed + log_resumed)]
    print("training blocked per save: " + ", ".join(f"step {s}: {ms:.0f} ms" for s, ms in stalls))
    reference = load_file(str(RUNS / "reference.safetensors"))
    resumed = load_file(str(RUNS / "resumed.safetensors"))
    identical = reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    print(f"resumed run == uninterrupted run, bit for bit ({len(reference)} tensors): {identical}")
    if not identical:
        sys.exit("the resumed run diverged from the reference")


if __name__ == "__main__":
    main()
