"""The Lightning adapter's pure parts: checkpoint dict conversion, RNG state, data position,
triggers, and that ``import ckpt_plugins`` stays free of Lightning."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ckpt_plugins import CheckpointManager, UnsupportedStateError, capture_rng, restore_rng
from ckpt_plugins.lightning.data_position import _Tracked
from ckpt_plugins.lightning.state import explain_unsupported, to_storable
from ckpt_plugins.lightning.triggers import Triggers
from ckpt_plugins.tree.codec import flatten_state


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Opt:
    width: int = 4
    path: Path = Path("/w")


def test_hyper_parameters_are_converted_by_the_documented_table(caplog):
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "epoch": 1,
        "hyper_parameters": {
            "lr": 0.1,
            "dir": Path("/data"),
            "ns": argparse.Namespace(a=1),
            "opt": Opt(),
            "color": Color.RED,
            "sizes": (1, 2),
            "fn": len,
            "nested": {"p": [Path("/a"), 3]},
        },
    }
    warned: set[str] = set()
    state, converted = to_storable(checkpoint, warned)
    hp = state["hyper_parameters"]
    assert hp == {
        "lr": 0.1,
        "dir": "/data",
        "ns": {"a": 1},
        "opt": {"width": 4, "path": "/w"},
        "color": "red",
        "sizes": (1, 2),
        "fn": "<built-in function len>",
        "nested": {"p": ["/a", 3]},
    }
    assert converted == {
        "hyper_parameters.dir": "pathlib.PosixPath",
        "hyper_parameters.ns": "argparse.Namespace",
        "hyper_parameters.opt": f"{__name__}.Opt",
        "hyper_parameters.opt.path": "pathlib.PosixPath",
        "hyper_parameters.color": f"{__name__}.Color",
        "hyper_parameters.fn": "builtins.builtin_function_or_method",
        "hyper_parameters.nested.p.0": "pathlib.PosixPath",
    }
    assert state["state_dict"] is checkpoint["state_dict"] and checkpoint["hyper_parameters"]["dir"] == Path("/data")
    flatten_state(state)  # storable now
    assert [r.getMessage() for r in caplog.records if "hyper-parameter" in r.getMessage()] == [
        "hyper-parameter 'hyper_parameters.fn' is a builtins.builtin_function_or_method, which is not plain data; "
        "it is stored as the string '<built-in function len>'. Pass the object itself to "
        "load_from_checkpoint(..., fn=...) when you load this checkpoint."
    ]
    to_storable(checkpoint, warned)
    assert len([r for r in caplog.records if "hyper-parameter" in r.getMessage()]) == 1  # once per key


@pytest.mark.parametrize(
    "key, origin",
    [
        ("callbacks", "a callback's state_dict() or on_save_checkpoint()"),
        ("optimizer_states", "an optimizer's state_dict()"),
        ("my_extra", "on_save_checkpoint() hook"),
    ],
)
def test_unstorable_state_is_refused_naming_the_key_and_where_it_comes_from(key, origin):
    with pytest.raises(UnsupportedStateError) as raised:
        flatten_state({key: {"x": object()}})
    message = str(explain_unsupported(raised.value))
    assert f"'{key}.x'" in message and origin in message and "Store plain values" in message


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.zeros(1)}, rank_state={"rng": capture_rng()})
        expected = (random.random(), np.random.rand(), torch.rand(3))
        restore_rng(mgr.restore_rank_state(1)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_tracked_sampler_records_the_order_deciding_state_and_skips_once():
    generator = torch.Generator().manual_seed(0)
    tracked = _Tracked(RandomSampler(range(10), generator=generator))
    first = list(tracked)
    start_of_second = generator.get_state()
    second = list(tracked)
    assert torch.equal(tracked.pass_start, start_of_second) and first != second
    generator.set_state(tracked.pass_start)
    tracked.skip = 4
    assert len(tracked) == 10 and list(tracked) == second[4:]  # the same order, the seen part left out
    generator.set_state(tracked.pass_start)
    assert list(tracked) == second  # only one pass skips
    loader = DataLoader(range(10), batch_size=3, sampler=tracked)
    tracked.skip = 6
    assert isinstance(loader.batch_sampler, BatchSampler) and sum(len(b) for b in loader) == 4


def test_triggers_are_checked_like_model_checkpoint():
    assert Triggers().epochs == 1 and Triggers(every_n_train_steps=5).epochs == 0
    with pytest.raises(ValueError, match="every_n_train_steps and train_time_interval are both set"):
        Triggers(every_n_train_steps=5, train_time_interval=10.0)
    with pytest.raises(ValueError, match="every_n_epochs must be a non-negative integer"):
        Triggers(every_n_epochs=-1)
    with pytest.raises(ValueError, match="train_time_interval must be positive"):
        Triggers(train_time_interval=0)


def test_import_ckpt_plugins_and_the_converters_do_not_import_lightning():
    code = (
        "import sys, ckpt_plugins, ckpt_plugins.lightning, ckpt_plugins.lightning.convert; "
        "assert not any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules), 'lightning imported'; "
        "ckpt_plugins.lightning.CheckpointCallback; assert 'lightning.pytorch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
