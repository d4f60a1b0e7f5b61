"""Shared fixtures: deterministic seeds and small, real training states."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout
HELPERS = ROOT / "tests" / "helpers"  # scripts the tests run as real subprocesses

pytest_plugins = [
    "s3_fixtures",
    "memory_shm",
]  # the moto S3 server, buckets and the fault proxy; shm_of (tests/helpers)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (the trainers' steps then do not compete with the 2-core
    machine's other test workers), the previous count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _library_logs(caplog):
    caplog.set_level(logging.INFO, logger="ckpt_plugins")
    yield


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, width)
        self.fc2 = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_training_state(width: int = 16, steps: int = 2):
    """A model + Adam optimizer after a few real steps, and the nested state to save."""
    model = TinyNet(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


@pytest.fixture
def training_state():
    return make_training_state()


def state_of(model, opt, sched):
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "epoch": 3,
    }
