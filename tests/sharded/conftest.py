"""The multi-process launches every sharded test reads (tests/helpers/sharded_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import sharded_cases as cases
from ckpt_plugins import CheckpointManager


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    """Every launch, in order: a one-process save, then 2, 3 and 4 ranks (each also runs the
    framework cases of tests/helpers/fsdp_cases.py: FSDP1, HF FSDP2, accelerate on CPU)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sharded")
    model = cases.build("plain")
    opt = cases.optimizer(model)
    cases.train_step(model, opt, seed=0)
    with CheckpointManager(root / "plain") as mgr:
        mgr.save(0, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    save_file(cases.plain_full_state(model, opt), root / "expected_plain.safetensors")
    cases.launch("two_ranks", 2, root)
    cases.launch("three_ranks", 3, root)
    cases.launch("four_ranks", 4, root)
    return root
