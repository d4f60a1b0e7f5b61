"""Tests for ckpt_plugins.layout.naming: natural order and the step_<N> folder names."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_plugins.layout import naming
from ckpt_plugins.layout.naming import (
    STEP_PREFIX,
    natural_key,
    natural_sorted,
    parse_step_dir,
    step_dir_name,
)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("step_9", "step_10"),
        ("checkpoint_9", "checkpoint_10"),
        ("step_2", "step_100"),
        ("epoch=2-step=100.ckpt", "epoch=10-step=5.ckpt"),
        ("epoch=2-step=5.ckpt", "epoch=2-step=100.ckpt"),
        ("ckpt_-1.0", "ckpt_0"),
        ("ckpt_0", "ckpt_1e5"),
        ("ckpt_1e5", "ckpt_200000"),
        ("ckpt_-2", "ckpt_-1"),
        ("ckpt_1.5", "ckpt_2"),
        ("ckpt_1e-3", "ckpt_0.01"),
        ("loss=-0.5", "loss=0.1"),
        ("a-1", "a-2"),  # '-' after a letter separates: 1 < 2, not -1 > -2
        ("run2-3", "run2-10"),  # '-' after a digit separates
        ("step_1.ckpt", "step_2.ckpt"),  # '.' without a following digit is text
        ("step", "step_1"),  # a prefix sorts first
        ("step_10", "step_final"),  # numbers sort before text at the same position
        ("step_01", "step_1"),  # equal numbers: the raw name breaks the tie
        ("ckpt_1", "ckpt_1.0"),
        ("", "a"),
        ("9", "a"),
        ("v1.10", "v1.9"),  # documented: 1.10 reads as a decimal
        ("x_1e999999999", "y"),  # a huge exponent is exact and fast (no giant int built)
    ],
)
def test_natural_key_orders_pairs(smaller: str, larger: str) -> None:
    assert natural_key(smaller) < natural_key(larger)
    assert natural_sorted([larger, smaller]) == [smaller, larger]


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("step_10", [(1, "step_"), (0, 10)]),
        ("ckpt_-1.0", [(1, "ckpt_"), (0, -1)]),
        ("epoch=2-step=100.ckpt", [(1, "epoch="), (0, 2), (1, "-step="), (0, 100), (1, ".ckpt")]),
        ("ckpt_1e5", [(1, "ckpt_"), (0, 100000)]),
        ("a--1", [(1, "a-"), (0, -1)]),
        ("-3", [(0, -3)]),
        ("x-", [(1, "x-")]),
        ("1e", [(0, 1), (1, "e")]),
        ("1.2.3", [(0, 1.2), (1, "."), (0, 3)]),
        ("", []),
    ],
)
def test_natural_key_tokens(name: str, parts: list[tuple[int, object]]) -> None:
    key_parts, tie_break = natural_key(name)
    assert [(tag, float(v) if tag == 0 else v) for tag, v in key_parts] == [
        (tag, float(v) if tag == 0 else v) for tag, v in parts
    ]
    assert tie_break == name


def test_natural_key_is_exact_for_large_steps() -> None:
    big = 2**60
    assert natural_sorted([f"step_{big + 1}", f"step_{big}"]) == [f"step_{big}", f"step_{big + 1}"]


def test_natural_sorted_full_listing() -> None:
    expected = ["ckpt_-1.0", "ckpt_0", "ckpt_1.5", "ckpt_2", "ckpt_1e5", "ckpt_200000"]
    shuffled = expected[:]
    random.Random(0).shuffle(shuffled)
    assert natural_sorted(shuffled) == expected
    assert natural_sorted(iter(["step_10", "step_9"])) == ["step_9", "step_10"]
    assert natural_sorted([]) == []


@given(st.lists(st.text(alphabet="ab_-.eE0123456789", max_size=12), max_size=20))
def test_natural_key_total_order_never_raises(names: list[str]) -> None:
    once = natural_sorted(names)
    assert natural_sorted(reversed(once)) == once  # a total order: input order does not matter
    assert sorted(once) == sorted(names)


@pytest.mark.parametrize(("step", "name"), [(0, "step_0"), (7, "step_7"), (12345, "step_12345")])
def test_step_dir_name_round_trips(step: int, name: str) -> None:
    assert step_dir_name(step) == name
    assert name.startswith(STEP_PREFIX)
    assert parse_step_dir(name) == step


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (-1, ValueError, r"step must be a non-negative int, got -1"),
        (True, TypeError, r"got True \(bool\)"),
        (1.0, TypeError, r"got 1\.0 \(float\)"),
        ("3", TypeError, r"got '3' \(str\)"),
    ],
)
def test_step_dir_name_rejects(step: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        step_dir_name(step)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "step_",
        "step_-1",
        "step_+1",
        "step_007",
        "step_00",
        "step_1.5",
        "step_7.tmp",
        "step_7/",
        " step_7",
        "step_7 ",
        ".step_7",
        "Step_7",
        "step7",
        "step_1e3",
        "step_1_000",
        "step_\u0665",
        "ckpt_7",
        "",
        ".hidden",
    ],
)
def test_parse_step_dir_rejects(name: str) -> None:
    assert parse_step_dir(name) is None


@given(st.integers(min_value=0, max_value=10**30))
def test_step_dir_round_trip_property(step: int) -> None:
    assert parse_step_dir(step_dir_name(step)) == step


def test_docstring_examples_run() -> None:
    assert doctest.testmod(naming).failed == 0
