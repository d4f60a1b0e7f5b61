"""Fine-tune a tiny GPT-2 with LightningCLI and ckpt_plugins' CheckpointCallback.

    python examples/lightning/train.py fit --config examples/lightning/config.yaml
    python examples/lightning/train.py fit --config examples/lightning/config.yaml --ckpt_path last

Everything is in ``config.yaml``: the callback (retention, async saves, activation
checkpointing) under ``trainer.callbacks``, the model and the data. Override any of it from the
command line, e.g. ``--trainer.max_steps 100``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.cli import LightningCLI
from tiny_gpt import TextData, TinyGPT


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` instead of ``sys.argv[1:]`` when given, e.g. from tests)."""
    return LightningCLI(TinyGPT, TextData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
