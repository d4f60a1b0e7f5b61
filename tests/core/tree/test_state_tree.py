"""state_tree: exact round trips without pickle, aliasing, errors, hostile trees, tree editing."""

from __future__ import annotations

import collections
import doctest
import json
import math
import random
import struct
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ckpt_plugins.tree.codec as state_tree_module
from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, UnsupportedStateError
from ckpt_plugins.tree.codec import (
    FlatState,
    flatten_state,
    leaf_paths,
    rename_tree,
    select_tree,
    tensor_refs,
    unflatten_state,
)

# ---------------------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, where="state"):
    """Exact equality: same types all the way down, bitwise-equal tensors/arrays/floats."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert torch.equal(_bits(a), _bits(b)), f"{where}: tensor values differ"
        assert not b.requires_grad, f"{where}: restored tensor requires grad"
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: array values differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (a != a and b != b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert_same(a.real, b.real, where)
        assert_same(a.imag, b.imag, where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(state):
    """flatten -> strict JSON text -> parse -> unflatten (the path a real checkpoint takes)."""
    flat = flatten_state(state)
    text = json.dumps(flat.tree, allow_nan=False)
    return unflatten_state(json.loads(text), flat.tensors)


def _plain(obj):
    """What a state comes back as: dict subclasses -> dict, Parameters/grad tensors -> plain tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def _trained():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for opt in (adam, sgd):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    return model, adam, sgd


def _schedulers():
    _, adam, sgd = _trained()
    step = torch.optim.lr_scheduler.StepLR(adam, step_size=2, gamma=0.5)
    cycle = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=1.0, total_steps=10)
    for _ in range(3):
        adam.step(), sgd.step(), step.step(), cycle.step()
    return {"step": step.state_dict(), "one_cycle": cycle.state_dict()}


def _rng():
    rs = np.random.RandomState(1)
    rs.standard_normal()  # has_gauss=1 with a cached float
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "numpy_gauss": rs.get_state(),
        "generator": np.random.default_rng(5).bit_generator.state,
        "python": random.getstate(),
    }


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
_base = torch.linspace(-3, 3, 6).reshape(2, 3)
_grid = torch.arange(24.0).reshape(4, 6)

CASES = {
    "model_state_dict": lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict(),
    "non_contiguous": lambda: {
        "t": _grid.t(),
        "slice": _grid[1:, ::2],
        "expand": torch.ones(3, 1).expand(3, 4),
        "narrow": _grid.narrow(1, 2, 3),
        "neg_stride_like": _grid.flip(0),
    },
    "adam_and_sgd": lambda: {"adam": _trained()[1].state_dict(), "sgd": _trained()[2].state_dict()},
    "schedulers": _schedulers,
    "rng_states": _rng,
    "ints": lambda: [0, -1, 2**53 + 1, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 2**200, -(3**5000)],
    "floats": lambda: [0.0, -0.0, 0.1, 1e-310, 1.7976931348623157e308, math.nan, math.inf, -math.inf, 5e-324],
    "bools_are_not_ints": lambda: [True, 1, False, 0, 1.0, {"flag": True, "n": 1}],
    "strings_bytes_none": lambda: {
        "s": "héllo ✓",
        "empty": "",
        "none": None,
        "b": b"\x00\xffab",
        "ba": bytearray(b"xy"),
        "eb": b"",
        "tag_like": "$t",
    },
    "tuples_vs_lists": lambda: (1, [2, (3,)], (), [], ([],), {"t": (None, "a", 1.5)}),
    "dict_keys": lambda: {"s": 1, 0: 2, -5: 3, True: 4, None: 5, 1.5: 6, (1, "a"): 7, 2**70: 8, (): 9},
    "reserved_keys": lambda: {"$t": 1, "$$t": 2, "$": 3, "": 4, "a$": 5, "$t2": {"$t": "tensor", "key": "x"}},
    "key_order": lambda: {"z": 1, "a": 2, "m": {"y": 0, "b": 1}, 3: "x", 1: "y"},
    "numpy_arrays": lambda: {
        "u32": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "c128": np.array([1 + 2j, -0.0 - 3j]),
        "bool": np.array([True, False]),
        "dt64": np.array(["2020-01-01", "1999-12-31"], dtype="datetime64[s]"),
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 4), np.int16),
        "transposed": np.arange(6.0).reshape(2, 3).T,
        "big_endian": np.arange(3, dtype=">i4"),
        "f16": np.array([0.1, np.nan], np.float16),
        "unicode": np.array(["ab", "xyz"]),
        "bytes": np.array([b"a", b"bc"]),
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    },
    "numpy_scalars": lambda: [
        np.float32(1.5),
        np.float64(math.nan),
        np.int64(-3),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.complex64(1 + 2j),
        np.longdouble(1) / 3,
        np.int8(-1),
        np.datetime64("2020-01-01"),
        np.str_("hi"),
        np.float16(0.1),
        np.float32(-math.inf),
    ],
    "torch_values": lambda: {
        "dtypes": [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.complex64],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
        "sizes": [torch.Size([2, 3]), torch.Size([])],
    },
    "tensor_dtypes": lambda: {str(d): _base.to(d) for d in _DTYPES},
    "zero_dim_and_empty": lambda: [
        torch.tensor(3.5),
        torch.zeros(0),
        torch.zeros(2, 0, 3),
        torch.tensor(True),
        torch.tensor(1 + 1j),
        torch.empty(0, dtype=torch.complex128),
    ],
    "requires_grad_and_parameter": lambda: {
        "p": torch.nn.Parameter(torch.ones(2)),
        "g": torch.ones(3, requires_grad=True),
        "view": torch.ones(4, requires_grad=True)[1:],
    },
    "conj_and_neg_views": lambda: {
        "c": torch.tensor([1 + 2j, 3 - 4j]).conj(),
        "neg": torch.tensor([1 + 2j, 3 - 4j]).conj().imag,
    },
    "sets_and_complex": lambda: {
        "set": {3, 1, 2},
        "fs": frozenset({"a", "b"}),
        "empty": set(),
        "tuples": {(1, 2)},
        "mixed": {1, "a", None},
        "complex": [1 + 2j, complex(math.nan, -0.0)],
    },
}


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_exact(name):
    state = CASES[name]()
    flat = flatten_state(state)
    json.dumps(flat.tree, allow_nan=False)  # strict JSON
    assert_same(_plain(state), roundtrip(state))


def test_parameter_and_grad_come_back_as_plain_tensors():
    out = roundtrip({"p": torch.nn.Parameter(torch.ones(2))})
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad


def test_ordered_dict_comes_back_as_dict_and_loads():
    model, adam, _ = _trained()
    out = roundtrip({"model": model.state_dict(), "opt": adam.state_dict()})
    assert type(out["model"]) is dict
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh.load_state_dict(out["model"])
    opt = torch.optim.Adam(fresh.parameters())
    opt.load_state_dict(out["opt"])
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_rng_states_restore_the_same_streams():
    state = _rng()
    gen = np.random.default_rng()
    gen.bit_generator.state = state["generator"]
    expected = [torch.rand(3), np.random.rand(3), random.random(), gen.random()]
    out = roundtrip(state)
    torch.set_rng_state(out["torch"])
    np.random.set_state(out["numpy"])
    random.setstate(out["python"])
    gen.bit_generator.state = out["generator"]
    assert_same(expected, [torch.rand(3), np.random.rand(3), random.random(), gen.random()])


def test_tied_weights_stored_once_and_identical_after_unflatten():
    net = Net()
    shared = torch.ones(3)
    state = {"model": net.state_dict(), "ema": {"w": net.emb.weight}, "again": shared, "again2": shared}
    flat = flatten_state(state)
    assert "model.head.weight" not in flat.tensors and "ema.w" not in flat.tensors
    assert tensor_refs(flat.tree)["model.head.weight"] == "model.emb.weight"
    out = unflatten_state(flat.tree, flat.tensors)
    assert out["model"]["head.weight"] is out["model"]["emb.weight"] is out["ema"]["w"]
    assert out["again"] is out["again2"]


def test_overlapping_views_become_separate_copies_and_safetensors_accepts_them(tmp_path):
    base = torch.arange(6.0).reshape(2, 3)
    state = {"a": base, "x": base[0], "y": base[1], "xt": base.t(), "x2": base[0]}
    flat = flatten_state(state)
    assert list(flat.tensors) == ["a", "x", "y", "xt"] and tensor_refs(flat.tree)["x2"] == "x"
    ptrs = [t.untyped_storage().data_ptr() for t in flat.tensors.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert flat.tensors["a"] is base  # the first by address is not copied
    save_file(flat.tensors, tmp_path / "t.safetensors")
    out = unflatten_state(flat.tree, load_file(tmp_path / "t.safetensors"))
    assert_same(state, out)
    assert out["x"] is out["x2"]


def test_flatten_references_caller_tensors_in_tree_order():
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    flat = flatten_state({"model": sd})
    assert list(flat.tensors) == [f"model.{k}" for k in sd]
    assert all(flat.tensors[f"model.{k}"] is v for k, v in sd.items())
    assert isinstance(flat, FlatState)


def test_real_safetensors_roundtrip(tmp_path):
    state = {
        name: CASES[name]()
        for name in (
            "model_state_dict",
            "non_contiguous",
            "adam_and_sgd",
            "rng_states",
            "numpy_arrays",
            "tensor_dtypes",
            "zero_dim_and_empty",
        )
    }
    state["tied"] = Net().state_dict()
    flat = flatten_state(state)
    save_file(flat.tensors, tmp_path / "state.safetensors")
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    out = unflatten_state(tree, load_file(tmp_path / "state.safetensors"))
    assert_same(_plain(state), out)
    assert out["tied"]["head.weight"] is out["tied"]["emb.weight"]


def _python_calls(fn, *args) -> int:
    """How many Python-level function calls ``fn(*args)`` makes: a measure of work that does not
    depend on how busy the machine is."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return calls


def test_flatten_500_tensors_does_linear_work_and_copies_nothing():
    def state_dict(layers):
        return torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(layers)]).state_dict()

    sd = state_dict(250)
    flat = flatten_state(sd)
    assert len(sd) == 500 and len(flat.tensors) == 500
    assert all(any(t.data_ptr() == v.data_ptr() for t in flat.tensors.values()) for v in sd.values())
    small, large = _python_calls(flatten_state, state_dict(250)), _python_calls(flatten_state, state_dict(500))
    assert large <= 2 * small + 50, (small, large)  # twice the tensors, at most twice the work


_keys = st.text(alphabet=st.characters(blacklist_characters="."), max_size=5)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**90),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.lists(st.floats(width=32), max_size=4).map(lambda xs: torch.tensor(xs, dtype=torch.float32)),
    st.lists(st.integers(-9, 9), max_size=4).map(lambda xs: np.array(xs, dtype=np.int16)),
)
_nested = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(_keys, kids, max_size=4),
        st.dictionaries(st.integers(-3, 3), kids, max_size=3),
    ),
    max_leaves=25,
)


@settings(max_examples=120, deadline=None, database=None)
@given(_nested)
def test_random_nested_structures_roundtrip(state):
    assert_same(state, roundtrip(state))


# ------------------------------------------------------------------------------- flatten errors


class _Thing:
    pass


@pytest.mark.parametrize(
    "state, match",
    [
        (
            {"scheduler": {"lr_lambdas": [lambda e: 0.9**e]}},
            r"state\['scheduler'\]\['lr_lambdas'\]\[0\] \(key path 'scheduler.lr_lambdas.0'\) is a function, "
            r"which cannot be stored without pickle; remove it from the state or convert it to plain values",
        ),
        ({"obj": _Thing()}, r"state\['obj'\] .* is an object of type .*_Thing, which cannot be stored without pickle"),
        ({"cls": [_Thing]}, r"state\['cls'\]\[0\] .* is the class .*_Thing"),
        (
            {"nt": collections.namedtuple("P", "x y")(1, 2)},
            r"is a namedtuple \(P\), which cannot be stored without pickle; .*\._asdict\(\) gives a dict",
        ),
        ({10**5000: print}, r"state\[<int>\] \(key path '<int of 16610 bits>'\) is a function"),
        ({0: 1, "0": 2}, r"state\['0'\] \(key path '0'\) has the same key path as another entry"),
        ({"a.b": 1, "a": {"b": 2}}, r"key path 'a.b'\) has the same key path"),
        ({"k": {object(): 1}}, r"state\['k'\] .* has the key or set element <object .*keys must be str, int"),
        ({"s": {_Thing()}}, r"state\['s'\] .* has the key or set element"),
        ({"arr": np.array([object()])}, r"state\['arr'\] .* numpy array of dtype object"),
        ({"sp": torch.eye(2).to_sparse()}, r"state\['sp'\] .* is a torch.sparse_coo tensor"),
        ({"m": torch.empty(2, device="meta")}, r"is a meta tensor"),
        (lambda: 1, r"^state is a function"),
    ],
)
def test_unstorable_values_raise_with_the_key_path(state, match):
    with pytest.raises(UnsupportedStateError, match=match):
        flatten_state(state)


def test_reference_cycle_is_refused():
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(UnsupportedStateError, match="nested deeper than 256 levels"):
        flatten_state({"c": cyc})


# ------------------------------------------------------------------------------- hostile trees


def _deep(n):
    node: list = []
    for _ in range(n):
        node = [node]
    return node


T = torch.zeros(2)


@pytest.mark.parametrize(
    "tree, tensors, match",
    [
        ({"$t": "pickle", "v": "x"}, {}, r"at the root: unknown tag 'pickle'"),
        ({"m": {"l": [0, {"$t": "tensor", "key": "nope"}]}}, {}, r"key path 'm.l.1': tensor 'nope' is missing"),
        ({"$t": "tensor", "key": 5}, {}, r"tensor key must be a string"),
        ({"$t": "tensor", "key": "a", "x": 1}, {"a": T}, r"exactly the fields \['key'\]"),
        ({"$t": 3}, {}, r"tag that is not a string"),
        ({"$x": 1}, {}, r"single '\$'"),
        ({"a": {1, 2}}, {}, r"key path 'a': holds a set, which is not a JSON value"),
        ({"$t": "ndarray", "key": "a", "dtype": "O", "shape": [1]}, {"a": T}, r"not a plain"),
        ({"$t": "ndarray", "key": "a", "dtype": "i4,i4", "shape": [1]}, {"a": T}, r"not a plain"),
        (
            {"$t": "ndarray", "key": "a", "dtype": "<i4", "shape": [3]},
            {"a": torch.zeros(4, dtype=torch.uint8)},
            r"not the 12 raw bytes",
        ),
        ({"$t": "ndarray", "key": "a", "dtype": "<i4", "shape": [-1]}, {}, r"invalid shape"),
        ({"$t": "ndarray", "key": "a", "dtype": "nope", "shape": [1]}, {}, r"invalid numpy dtype"),
        ({"$t": "ctensor", "key": "a"}, {"a": torch.zeros(2, dtype=torch.int32)}, r"not the real view of a complex"),
        ({"$t": "tensor", "key": "a"}, {"a": "not a tensor"}, r"is a str, not a tensor"),
        ({"$t": "int", "v": "zz"}, {}, r"invalid hex integer"),
        ({"$t": "int", "v": "-"}, {}, r"invalid hex integer"),
        ({"$t": "float", "v": "NaN!"}, {}, r"invalid float tag value"),
        ({"$t": "bytes", "v": "!!"}, {}, r"invalid base64"),
        ({"$t": "dtype", "v": "__class__"}, {}, r"unknown torch dtype"),
        ({"$t": "device", "v": "banana:x"}, {}, r"invalid torch device"),
        ({"$t": "size", "v": [1, "2"]}, {}, r"invalid shape"),
        ({"$t": "dict", "items": [[[1], 2]]}, {}, r"invalid dict key"),
        ({"$t": "dict", "items": [[1, 2], [1, 3]]}, {}, r"key 1 twice"),
        ({"$t": "dict", "items": [[1]]}, {}, r"\[key, value\] pairs"),
        ({"$t": "tuple", "v": 3}, {}, r"expected a list"),
        ({"$t": "set", "v": [{"$t": "bytes", "v": ""}]}, {}, r"invalid dict key or set element"),
        ({"$t": "npscalar", "dtype": "<i8", "v": 1.5}, {}, r"invalid value 1.5"),
        ({"$t": "npscalar", "dtype": "<i1", "v": 1000}, {}, r"invalid value 1000 for numpy dtype \|i1"),
        ({"$t": "npscalar", "dtype": "<c8", "b64": "AAAA"}, {}, r"needs 8 bytes, got 3"),
        ({"$t": "npscalar", "dtype": "<f4"}, {}, r"one of v/b64"),
        ({"$t": "complex", "v": [1, 2]}, {}, r"two floats"),
        (
            {"$t": "ndarray", "key": "a", "dtype": "<i4", "shape": [2**70, 0]},
            {"a": torch.zeros(0, dtype=torch.uint8)},
            r"invalid shape",
        ),
        (
            {"$t": "ndarray", "key": "a", "dtype": "<i4", "shape": [2**62, 2**62, 0]},
            {"a": torch.zeros(0, dtype=torch.uint8)},
            r"cannot be viewed as a numpy array",
        ),
        (
            {"$t": "ndarray", "key": "a", "dtype": "<f8", "shape": [1]},
            {"a": torch.zeros(16, dtype=torch.uint8)[::2]},
            None,
        ),  # a strided byte tensor is accepted (copied)
        ({"$t": "size", "v": [2**70]}, {}, r"invalid shape"),
        ({"$t": "npscalar", "dtype": "<i8", "v": 2**5000}, {}, r"invalid value \d+\.\.\. for numpy dtype <i8"),
        (_deep(2000), {}, r"nested deeper than 256 levels"),
    ],
)
def test_hostile_trees_raise_corrupt(tree, tensors, match):
    if match is None:
        unflatten_state(tree, tensors)
        return
    with pytest.raises(CorruptCheckpointError, match=match):
        unflatten_state(tree, tensors)


_TOOLS = {
    "leaf_paths": leaf_paths,
    "tensor_refs": tensor_refs,
    "select_tree": lambda t: select_tree(t, bool),
    "rename_tree": lambda t: rename_tree(t, {"a": "b"}),
}


@pytest.mark.parametrize(
    "tool, tree, match",
    [
        *[(name, {"$x": 1}, r"key path '\$x': object key '\$x' starts with a single '\$'") for name in _TOOLS],
        *[(name, {"a": {"$t": "dict", "items": 5}}, r"key path 'a': expected a list") for name in _TOOLS],
        *[(name, _deep(2000), r"nested deeper than 256 levels") for name in _TOOLS],
        ("tensor_refs", {"a": {"$t": "tensor", "key": 1}}, r"key path 'a': tensor key must be a string"),
    ],
)
def test_tree_tools_reject_hostile_trees(tool, tree, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        _TOOLS[tool](tree)


# ---------------------------------------------------------------------------------- tree tools


def _example():
    t, t2 = torch.ones(2), torch.zeros(3)
    return {
        "model": {"layer.0.weight": t, "tied": t},
        "optimizer": {"state": {0: {"exp_avg": t2}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": (np.arange(3, dtype=np.uint32), 1 + 0j),
        "c": torch.ones(1, dtype=torch.complex64),
        "empty": {},
        "scalar": 3,
    }


def test_leaf_paths_and_tensor_refs():
    tree = flatten_state(_example()).tree
    assert leaf_paths(tree) == [
        "model.layer.0.weight",
        "model.tied",
        "optimizer.state.0.exp_avg",
        "optimizer.param_groups.0.lr",
        "optimizer.param_groups.0.params.0",
        "rng.0",
        "rng.1",
        "c",
        "empty",
        "scalar",
    ]
    assert tensor_refs(tree) == {
        "model.layer.0.weight": "model.layer.0.weight",
        "model.tied": "model.layer.0.weight",
        "optimizer.state.0.exp_avg": "optimizer.state.0.exp_avg",
        "rng.0": "rng.0",
        "c": "c",
    }
    assert leaf_paths(flatten_state(5).tree) == [""]


def test_select_tree_keeps_matching_leaves_and_drops_emptied_containers():
    state = _example()
    flat = flatten_state(state)
    sel = select_tree(flat.tree, lambda p: p.startswith("optimizer.state.") or p in ("empty", "rng.1"))
    assert leaf_paths(sel) == ["optimizer.state.0.exp_avg", "rng.0", "empty"]  # rng.1 closed up to rng.0
    needed = {k: flat.tensors[k] for k in set(tensor_refs(sel).values())}
    out = unflatten_state(sel, needed)
    assert_same(
        {
            "optimizer": {"state": {0: {"exp_avg": state["optimizer"]["state"][0]["exp_avg"]}}},
            "rng": (1 + 0j,),
            "empty": {},
        },
        out,
    )
    assert select_tree(flat.tree, lambda p: False) == {}
    assert select_tree([1, [2]], lambda p: False) == []
    assert unflatten_state(select_tree(flatten_state((1, 2)).tree, lambda p: False), {}) == ()
    assert select_tree(flatten_state(5).tree, lambda p: False) == {}
    assert select_tree(flat.tree, lambda p: True) == flat.tree


def test_rename_tree_renames_keys_and_keeps_original_tensor_keys():
    state = _example()
    flat = flatten_state(state)
    renamed = rename_tree(flat.tree, {"model.": "net.", "optimizer.param_groups.0.l": "optimizer.param_groups.0.L"})
    assert tensor_refs(renamed)["net.layer.0.weight"] == "model.layer.0.weight"
    out = unflatten_state(renamed, flat.tensors)
    assert list(out) == ["net", "optimizer", "rng", "c", "empty", "scalar"]
    assert out["net"]["tied"] is out["net"]["layer.0.weight"]
    assert out["optimizer"]["param_groups"][0]["Lr"] == 0.1


@pytest.mark.parametrize(
    "state, mapping, expected",
    [
        ({"module.a.w": 1, "module.b": 2, "head": 3}, {"module.": ""}, {"a.w": 1, "b": 2, "head": 3}),  # strip DDP
        ({"model": {"module.w": 1}}, {"model.module.": "model."}, {"model": {"w": 1}}),
        ({"m.head.w": 1, "m.body.w": 2}, {"m.": "net.", "m.head.": "cls."}, {"cls.w": 1, "net.body.w": 2}),  # longest
        ({"m": {"head": {"w": 1}}}, {"m.": "n.", "m.head.": "m.cls."}, {"n": {"cls": {"w": 1}}}),  # nested compose
        ({"model": 1, "model_ema": 2}, {"model": "net"}, {"net": 1, "net_ema": 2}),  # plain string prefixes
        ({"x": 1, "y": {"z": 2}}, {"x": "$x", "y.": "$y."}, {"$x": 1, "$y": {"z": 2}}),  # '$' keys get escaped
        ({"o": {0: {"w": 1}, "s": 2}}, {"o.s": "o.t"}, {"o": {0: {"w": 1}, "t": 2}}),  # str key in an int-keyed dict
        ({"a": 1}, {}, {"a": 1}),
    ],
)
def test_rename_tree_mappings(state, mapping, expected):
    assert_same(expected, unflatten_state(rename_tree(flatten_state(state).tree, mapping), {}))


@pytest.mark.parametrize(
    "state, mapping, match",
    [
        ({"model": {"encoder": {"w": 1}}}, {"model.encoder.": "encoder."}, r"would move 'model.encoder' out of"),
        ({"model": {"w": 1}}, {"model.": "net"}, r"would merge the container 'model' into its parent"),
        ({"model": {"w": 1}}, {"model.": ""}, r"would merge the container"),
        ({"o": {0: {"w": 1}}}, {"o.0.": "o.1."}, r"list index or a non-str dict key"),
        ({"a": 1, "b": 2}, {"a": "b"}, r"two entries the key path 'b'"),
        ({"x.b": 1, "a": {"b": 2}}, {"x.": "a."}, r"two entries the key path 'a.b'"),
        ({"a": 1}, {"a": 5}, r"str prefixes to str prefixes"),
    ],
)
def test_rename_tree_errors(state, mapping, match):
    with pytest.raises(ConfigError, match=match):
        rename_tree(flatten_state(state).tree, mapping)


def test_docstring_examples_run():
    assert doctest.testmod(state_tree_module).failed == 0
