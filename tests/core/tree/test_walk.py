"""One walker over nested state: live objects and encoded trees name every leaf the same way."""

from __future__ import annotations

import collections
from collections import OrderedDict

import numpy as np
import pytest
import torch

from ckpt_plugins.files.extra_files import StagedFile, collect_tensors, fill, fill_tensors
from ckpt_plugins.tree.codec import flatten_state, leaf_paths, select_tree
from ckpt_plugins.tree.walk import MISSING, TreeFail, iter_leaves, map_leaves, select

Pair = collections.namedtuple("Pair", "a b")

STATE = {
    "model": OrderedDict([("fc.weight", torch.ones(2, 2)), ("fc.bias", torch.zeros(2))]),
    "optimizer": {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    },
    "sizes": (1, (2, 3)),
    "empty": {},
    "nothing": [],
    "np": np.arange(3),
    "": {"x": 1},
}


def test_live_state_and_its_encoded_tree_have_the_same_key_paths():
    live = [path for path, _ in iter_leaves(STATE)]
    assert live == leaf_paths(flatten_state(STATE).tree)
    assert "optimizer.state.0.exp_avg" in live and "empty" in live and ".x" in live


def test_select_keeps_types_and_matches_the_codec_selection():
    keep = lambda path: path.startswith(("model.", "sizes.1"))  # noqa: E731
    chosen = select(STATE, keep)
    assert type(chosen["model"]) is OrderedDict and chosen["sizes"] == ((2, 3),)
    assert [p for p, _ in iter_leaves(chosen)] == leaf_paths(select_tree(flatten_state(STATE).tree, keep))
    assert select(STATE, lambda p: False) is MISSING and select(STATE, lambda p: False, empty={}) == {}


def test_map_leaves_rebuilds_namedtuples_and_dict_subclasses():
    mapped = map_leaves({"p": Pair(1, [2]), "d": collections.defaultdict(list, a=3)}, lambda v: v * 10)
    assert mapped["p"] == Pair(10, [20]) and type(mapped["p"]) is Pair
    assert mapped["d"] == {"a": 30}


def test_staged_extra_file_tensors_inside_a_namedtuple_are_staged():
    """The old leaf mapping of extra files treated a namedtuple as a leaf: its tensors were handed
    to the writer live instead of staged."""
    live = torch.ones(3)
    tensors, specs = collect_tensors({"x.pt": StagedFile(Pair(live, 1), write=lambda f, tree: None)})
    assert list(tensors) == ["extra/x.pt/0"] and tensors["extra/x.pt/0"] is live
    staged_copy = torch.zeros(3)
    _, skeleton, count, _ = specs["x.pt"]
    rebuilt = fill(skeleton, fill_tensors("x.pt", count, {"extra/x.pt/0": staged_copy}))
    assert type(rebuilt) is Pair and rebuilt.a is staged_copy and rebuilt.b == 1


def test_a_reference_cycle_is_refused_with_its_key_path():
    loop: list = [1]
    loop.append({"again": loop})
    with pytest.raises(TreeFail, match="nested deeper than 256 levels") as info:
        list(iter_leaves({"top": loop}))
    assert str(info.value).startswith("at key path 'top.1.again.1.again")
    assert isinstance(info.value, ValueError)
