"""Tests for ckpt_plugins.layout.naming: natural order and the step_<N> folder names."""

from __future__ import annotations

import doctest
import os
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


# --- name templates (IOOptions.name_template) ---------------------------------------------------


def test_a_template_formats_versions_and_recognises_only_its_own_names():
    from ckpt_plugins.layout.naming import NameTemplate

    t = NameTemplate("epoch={epoch:02d}-step={step}{version}.ckpt")
    assert t.format(40, {"epoch": 3.0}) == "epoch=03-step=40.ckpt"  # a whole float formats as an int
    assert t.format(40, {"epoch": 3}, version=2) == "epoch=03-step=40-v2.ckpt"
    assert t.match("epoch=03-step=40-v2.ckpt") == (True, 40)
    for other in ("last.ckpt", ".tmp-epoch=03-step=40.ckpt-abc", "epoch=03-step=40.ckpt.damaged-x", "step_40"):
        assert t.match(other)[0] is False, other
    assert NameTemplate("{epoch}{version}.ckpt").match("0-v1.ckpt") == (True, None)  # no {step}: the manifest has it
    assert NameTemplate("acc={val.acc:.1f}-{step}").format(3, {"val.acc": 0.25}) == "acc=0.2-3"  # a dotted metric name


@pytest.mark.parametrize("bad", ["", ".hidden{step}", "a/{step}", "{0}", "{}-{step}", "{step"])
def test_a_bad_template_is_a_config_error_naming_the_option(bad, tmp_path):
    from ckpt_plugins import CheckpointManager
    from ckpt_plugins.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path / "run", name_template=bad)
    assert info.value.option == "name_template" and not (tmp_path / "run").exists()  # before the directory


def test_the_manager_lists_sorts_retains_and_restores_templated_names(tmp_path):
    """Names from a template are step checkpoints: listed by step (from the name, or the manifest
    without {step}), versioned when taken (also by a save still in flight), retained, restored;
    a name the template cannot produce (last.ckpt) stays a named checkpoint outside retention."""
    import torch

    from ckpt_plugins import CheckpointManager

    for template in ("epoch={epoch}-step={step}{version}.ckpt", "epoch={epoch}{version}.ckpt"):
        root = tmp_path / template.split("{")[1].strip("}")
        with CheckpointManager(root, name_template=template, keep_last=3, async_save=True) as mgr:
            for step in range(1, 12):
                mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"epoch": step // 4})
            mgr.save(11, {"w": torch.zeros(2)}, name="last.ckpt")
            mgr.wait()
            assert mgr.steps() == [9, 10, 11]
            assert mgr.restore("latest")["w"][0] == 11 and mgr.restored_step == 11
            assert mgr.restore(9)["w"][0] == 9
        names = sorted(os.listdir(root))
        assert "last.ckpt" in names and len([n for n in names if not n.startswith(".")]) == 4
        with CheckpointManager(root, name_template=template, read_only=True) as again:  # a new process
            assert again.steps() == [9, 10, 11] and again.path_for(10).endswith(
                ("epoch=2-step=10.ckpt", "epoch=2-v2.ckpt")
            )
    assert sorted(n for n in os.listdir(root) if not n.startswith(".")) == [
        "epoch=2-v1.ckpt",
        "epoch=2-v2.ckpt",
        "epoch=2-v3.ckpt",
        "last.ckpt",
    ]
    with CheckpointManager(tmp_path / "plain") as plain:  # the core default is unchanged
        plain.save(3, {"w": torch.ones(1)})
    assert os.listdir(tmp_path / "plain") == ["step_3"]
