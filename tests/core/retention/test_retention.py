"""Tests for ckpt_plugins.retention.policy: each rule, their combination, validation, and properties."""

from __future__ import annotations

import dataclasses
import doctest
import math
import random
import re
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.retention import policy as retention
from ckpt_plugins.retention.policy import (
    CheckpointRecord,
    KeepAll,
    KeepBest,
    KeepBestOne,
    KeepEveryNSteps,
    KeepLast,
    KeepLatest,
    KeepProtected,
    KeepTimeInterval,
    RetentionContext,
    RetentionPolicy,
    best_step,
    build_policy,
)

NAN = float("nan")
CTX = RetentionContext(now=1000.0)


def rec(step: int, wall_time: float | None = None, **metrics: float) -> CheckpointRecord:
    return CheckpointRecord(step, float(step * 10) if wall_time is None else wall_time, metrics)


# Steps 1..5 committed at 10..50 s; loss 0.5 0.3 0.4 0.6 0.7 (best min: 2, best max: 5).
FIVE = [rec(s, loss=v) for s, v in zip(range(1, 6), [0.5, 0.3, 0.4, 0.6, 0.7], strict=False)]
ALL_KEEP = {1: ["keep_all"], 2: ["keep_all"], 3: ["keep_all"], 4: ["keep_all"]}


def orders(records: list[CheckpointRecord]) -> list[list[CheckpointRecord]]:
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    return [records, records[::-1], shuffled]


@pytest.mark.parametrize(
    ("options", "protected", "keep", "delete"),
    [
        pytest.param({}, (), {**ALL_KEEP, 5: ["keep_all", "latest"]}, [], id="no-rules-keep-all"),
        pytest.param(
            {"monitor": "loss"},
            (),
            {**ALL_KEEP, 2: ["keep_all", "best"], 5: ["keep_all", "latest"]},
            [],
            id="monitor-alone-keeps-all-and-tags-best",
        ),
        pytest.param(
            {"keep_last": 2},
            (),
            {4: ["keep_last"], 5: ["keep_last", "latest"]},
            [1, 2, 3],
            id="keep_last",
        ),
        pytest.param(
            {"keep_last": 9},
            (),
            {1: ["keep_last"], 2: ["keep_last"], 3: ["keep_last"], 4: ["keep_last"], 5: ["keep_last", "latest"]},
            [],
            id="keep_last-more-than-records",
        ),
        pytest.param(
            {"keep_best": 2, "monitor": "loss"},
            (),
            {2: ["keep_best", "best"], 3: ["keep_best"], 5: ["latest"]},
            [1, 4],
            id="keep_best-min",
        ),
        pytest.param(
            {"keep_best": 2, "monitor": "loss", "mode": "max"},
            (),
            {4: ["keep_best"], 5: ["keep_best", "latest", "best"]},
            [1, 2, 3],
            id="keep_best-max",
        ),
        pytest.param(
            {"keep_every_n_steps": 2},
            (),
            {2: ["keep_every_n_steps"], 4: ["keep_every_n_steps"], 5: ["latest"]},
            [1, 3],
            id="keep_every_n_steps",
        ),
        # t0 = 10 s; buckets of 25 s: {10, 20, 30} -> 0, {40, 50} -> 1.
        pytest.param(
            {"keep_time_interval": 25},
            (),
            {1: ["keep_time_interval"], 4: ["keep_time_interval"], 5: ["latest"]},
            [2, 3],
            id="keep_time_interval-seconds",
        ),
        pytest.param(
            {"keep_time_interval": timedelta(seconds=25)},
            (),
            {1: ["keep_time_interval"], 4: ["keep_time_interval"], 5: ["latest"]},
            [2, 3],
            id="keep_time_interval-timedelta",
        ),
        pytest.param(
            {"keep_time_interval": 10.0},
            (),
            {s: ["keep_time_interval"] for s in range(1, 5)} | {5: ["keep_time_interval", "latest"]},
            [],
            id="keep_time_interval-boundary-starts-new-bucket",
        ),
        pytest.param(
            {"keep_last": 1, "keep_best": 1, "monitor": "loss", "keep_every_n_steps": 4},
            (),
            {2: ["keep_best", "best"], 4: ["keep_every_n_steps"], 5: ["keep_last", "latest"]},
            [1, 3],
            id="combination",
        ),
        pytest.param(
            {"keep_last": 1, "keep_time_interval": 1e9},
            (),
            {1: ["keep_time_interval"], 5: ["keep_last", "latest"]},
            [2, 3, 4],
            id="keep_last-and-interval",
        ),
        pytest.param(
            {"keep_last": 1},
            (1, 3, 99),
            {1: ["protected"], 3: ["protected"], 5: ["keep_last", "latest"]},
            [2, 4],
            id="protected-and-absent-protected-step-ignored",
        ),
        pytest.param(
            {"keep_last": 1},
            (5,),
            {5: ["keep_last", "latest", "protected"]},
            [1, 2, 3, 4],
            id="protected-latest-has-all-reasons",
        ),
    ],
)
def test_decide_table(
    options: dict[str, Any],
    protected: tuple[int, ...],
    keep: dict[int, list[str]],
    delete: list[int],
) -> None:
    policy = build_policy(**options)
    ctx = RetentionContext(now=1000.0, protected_steps=frozenset(protected))
    for records in orders(FIVE):  # input order never matters
        decision = policy.decide(records, ctx)
        assert decision.keep == keep
        assert list(decision.keep) == sorted(decision.keep)  # ascending steps
        assert decision.delete == delete


TIES = [rec(1, loss=0.5), rec(2, loss=0.5), rec(3, loss=0.9), rec(4, loss=0.9)]
WITH_NAN = [rec(1, loss=NAN), rec(2, loss=1.0), rec(3, loss=2.0), rec(4), rec(5, acc=1.0)]


@pytest.mark.parametrize(
    ("records", "monitor", "mode", "expected"),
    [
        pytest.param(FIVE, "loss", "min", 2, id="min"),
        pytest.param(FIVE, "loss", "max", 5, id="max"),
        pytest.param(TIES, "loss", "min", 2, id="tie-min-later-step-wins"),
        pytest.param(TIES, "loss", "max", 4, id="tie-max-later-step-wins"),
        pytest.param(WITH_NAN, "loss", "min", 2, id="nan-worst-in-min"),
        pytest.param(WITH_NAN, "loss", "max", 3, id="nan-worst-in-max"),
        pytest.param([rec(1, loss=NAN), rec(2, loss=NAN), rec(3)], "loss", "min", 2, id="only-nan-later-step"),
        pytest.param([rec(1, loss=math.inf), rec(2, loss=-math.inf)], "loss", "max", 1, id="infinities-are-values"),
        pytest.param(WITH_NAN, "missing", "min", None, id="no-record-has-metric"),
        pytest.param([], "loss", "min", None, id="empty"),
    ],
)
def test_best_step(records: list[CheckpointRecord], monitor: str, mode: str, expected: int | None) -> None:
    for ordered in orders(records):
        assert best_step(ordered, monitor, mode) == expected


@pytest.mark.parametrize(
    ("rule", "records", "expected"),
    [
        (KeepAll(), FIVE, {1, 2, 3, 4, 5}),
        (KeepLatest(), FIVE, {5}),
        (KeepLatest(), [], set()),
        (KeepLast(3), FIVE, {3, 4, 5}),
        (KeepBest(2, "loss"), TIES, {1, 2}),
        (KeepBest(1, "loss"), TIES, {2}),
        (KeepBest(3, "loss", "max"), TIES, {2, 3, 4}),
        (KeepBest(9, "loss"), WITH_NAN, {1, 2, 3}),  # NaN ranked last, missing never ranked
        (KeepBest(2, "loss", "max"), WITH_NAN, {2, 3}),
        (KeepBestOne("acc", "max"), WITH_NAN, {5}),
        (KeepBestOne("loss"), [rec(1), rec(2)], set()),
        (KeepEveryNSteps(3), [rec(0), rec(3), rec(4), rec(6), rec(7)], {0, 3, 6}),
        (KeepEveryNSteps(1), FIVE, {1, 2, 3, 4, 5}),
        # Same wall time: the lower step is "first"; a later bucket with a gap still counts.
        (KeepTimeInterval(60), [rec(1, 100), rec(2, 100), rec(3, 159.9), rec(4, 400)], {1, 4}),
        # Anchored at the oldest record, not at 0 and not at ctx.now.
        (KeepTimeInterval(60), [rec(1, 30), rec(2, 70), rec(3, 95)], {1, 3}),
        (KeepTimeInterval(60), [], set()),
        (KeepProtected(), FIVE, set()),
    ],
)
def test_rule_keep_table(rule: retention.RetentionRule, records: list[CheckpointRecord], expected: set[int]) -> None:
    for ordered in orders(records):
        assert rule.keep(ordered, CTX) == expected


def test_protected_rule_reads_only_the_context() -> None:
    ctx = RetentionContext(now=0.0, protected_steps=frozenset({2, 42}))
    assert KeepProtected().keep(FIVE, ctx) == {2}


def test_time_interval_ignores_now() -> None:
    records = [rec(1, 0), rec(2, 50), rec(3, 130)]
    results = {frozenset(KeepTimeInterval(60).keep(records, RetentionContext(now=n))) for n in (0.0, 1e9, -5.0)}
    assert results == {frozenset({1, 3})}


@pytest.mark.parametrize(
    "policy",
    [
        build_policy(),
        build_policy(keep_last=1, keep_best=2, monitor="loss", keep_time_interval=9),
        RetentionPolicy((KeepEveryNSteps(10),)),
    ],
)
def test_empty_input(policy: RetentionPolicy) -> None:
    decision = policy.decide([], CTX)
    assert (decision.keep, decision.delete) == ({}, [])


def test_custom_policy_still_keeps_latest_and_protected() -> None:
    policy = RetentionPolicy((KeepEveryNSteps(10),))
    assert policy.rules == (KeepEveryNSteps(10),)  # the field is never rewritten
    ctx = RetentionContext(now=0.0, protected_steps=frozenset({2}))
    decision = policy.decide(FIVE, ctx)
    assert decision.keep == {2: ["protected"], 5: ["latest"]}
    assert decision.delete == [1, 3, 4]


def test_build_policy_rule_order_and_no_rewrite() -> None:
    policy = build_policy(
        keep_last=2,
        keep_best=3,
        monitor="acc",
        mode="max",
        keep_every_n_steps=100,
        keep_time_interval=timedelta(hours=1),
    )
    assert policy.rules == (
        KeepLast(2),
        KeepBest(3, "acc", "max"),
        KeepEveryNSteps(100),
        KeepTimeInterval(3600.0),
        KeepLatest(),
        KeepBestOne("acc", "max"),
        KeepProtected(),
    )
    assert policy.effective_rules == policy.rules
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.rules = ()  # type: ignore[misc]


def test_reason_strings_are_stable() -> None:
    rules = [KeepAll, KeepLatest, KeepProtected, KeepLast, KeepBest, KeepBestOne, KeepEveryNSteps, KeepTimeInterval]
    assert {r.reason for r in rules} == {
        "keep_all",
        "latest",
        "protected",
        "keep_last",
        "keep_best",
        "best",
        "keep_every_n_steps",
        "keep_time_interval",
    }


@pytest.mark.parametrize(
    "records",
    [[rec(1), rec(2), rec(1)], [rec(3), rec(3)], [rec(2), rec(1), rec(2), rec(1)]],
)
def test_duplicate_steps_raise(records: list[CheckpointRecord]) -> None:
    dup = sorted({r.step for r in records if sum(o.step == r.step for o in records) > 1})
    with pytest.raises(ValueError, match=re.escape(f"unique steps; duplicated steps: {dup}")):
        build_policy().decide(records, CTX)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"keep_last": 0}, r"keep_last must be a positive integer or None, got 0; use an int"),
        ({"keep_last": -3}, r"keep_last must be a positive integer or None, got -3"),
        ({"keep_last": True}, r"keep_last must be a positive integer or None, got True"),
        ({"keep_last": 2.0}, r"keep_last must be a positive integer or None, got 2\.0"),
        (
            {"keep_best": 2},
            r"keep_best=2 needs monitor, the metric that ranks checkpoints; set it to a logged metric's name",
        ),
        ({"keep_best": 0, "monitor": "loss"}, r"keep_best must be a positive integer or None, got 0"),
        ({"keep_best": False, "monitor": "loss"}, r"keep_best must be a positive integer or None, got False"),
        ({"monitor": ""}, r"monitor must be a metric name \(non-empty str\), got ''"),
        ({"monitor": 3}, r"monitor must be a metric name \(non-empty str\), got 3"),
        ({"mode": "avg"}, r"mode must be 'min' or 'max', got 'avg'; use 'min' when lower"),
        ({"mode": "MAX", "monitor": "acc"}, r"mode must be 'min' or 'max', got 'MAX'"),
        ({"keep_every_n_steps": 0}, r"keep_every_n_steps must be a positive integer or None, got 0"),
        ({"keep_time_interval": 0}, r"keep_time_interval .* positive, finite .* got 0;"),
        ({"keep_time_interval": -5.0}, r"keep_time_interval .* got -5\.0; for example 3600"),
        ({"keep_time_interval": NAN}, r"keep_time_interval .* got nan"),
        ({"keep_time_interval": math.inf}, r"keep_time_interval .* got inf"),
        ({"keep_time_interval": True}, r"keep_time_interval .* got True"),
        ({"keep_time_interval": "60"}, r"keep_time_interval .* got '60'"),
        ({"keep_time_interval": timedelta(0)}, r"keep_time_interval .* got datetime\.timedelta\(0\)"),
        (
            {"keep_time_interval": timedelta(seconds=-1)},
            r"keep_time_interval .* got datetime\.timedelta\(days=-1, seconds=86399\)",
        ),
    ],
)
def test_build_policy_validation(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_policy(**options)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: KeepLast(0), r"keep_last \(KeepLast\.n\) must be a positive integer, got 0"),
        (lambda: KeepBest(1, ""), r"monitor \(KeepBest\) must be a metric name"),
        (lambda: KeepBest(1, "loss", "avg"), r"mode \(KeepBest\) must be 'min' or 'max'"),
        (lambda: KeepBestOne("loss", "up"), r"mode \(KeepBestOne\) must be .* got 'up'"),
        (lambda: KeepEveryNSteps(-1), r"keep_every_n_steps .* got -1"),
        (lambda: KeepTimeInterval(0), r"KeepTimeInterval\.seconds\) must be a positive"),
        (lambda: RetentionPolicy(()), r"non-empty tuple of rules.*use \(KeepAll\(\),\)"),
        (lambda: RetentionPolicy([KeepAll()]), r"non-empty tuple of rules.*got \[KeepAll\(\)\]"),
        (lambda: RetentionPolicy((KeepAll(), "keep_last")), r"non-empty tuple of rules"),
        (lambda: best_step(FIVE, "loss", "avg"), r"mode must be 'min' or 'max', got 'avg'"),
        (lambda: best_step(FIVE, ""), r"monitor must be a metric name"),
    ],
)
def test_direct_validation(make: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        build_policy(keep_last=0)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(retention).failed == 0


# ---- properties ---------------------------------------------------------------------------

metric_values = st.one_of(st.floats(allow_nan=False, width=32), st.just(NAN))


@st.composite
def record_lists(draw: st.DrawFn) -> list[CheckpointRecord]:
    steps = draw(st.lists(st.integers(0, 200), unique=True, max_size=12))
    records = []
    for step in steps:
        metrics = draw(st.dictionaries(st.just("loss"), metric_values, max_size=1))
        wall_time = draw(st.floats(0, 1e5, allow_nan=False))
        records.append(CheckpointRecord(step, wall_time, metrics))
    return records


@st.composite
def policies(draw: st.DrawFn) -> RetentionPolicy:
    monitor = draw(st.sampled_from([None, "loss"]))
    return build_policy(
        keep_last=draw(st.none() | st.integers(1, 5)),
        keep_best=draw(st.none() | st.integers(1, 5)) if monitor else None,
        monitor=monitor,
        mode=draw(st.sampled_from(["min", "max"])),
        keep_every_n_steps=draw(st.none() | st.integers(1, 20)),
        keep_time_interval=draw(st.none() | st.floats(0.5, 5e4)),
    )


custom_rules = st.sampled_from(
    [
        KeepLast(1),
        KeepLast(3),
        KeepBest(2, "loss"),
        KeepBestOne("loss", "max"),
        KeepEveryNSteps(7),
        KeepTimeInterval(1000.0),
        KeepAll(),
    ]
)
custom_policies = st.lists(custom_rules, min_size=1, max_size=3).map(lambda rules: RetentionPolicy(tuple(rules)))


@settings(max_examples=150, deadline=None)
@given(records=record_lists(), policy=policies() | custom_policies, data=st.data())
def test_decide_properties(records: list[CheckpointRecord], policy: RetentionPolicy, data: st.DataObject) -> None:
    steps = {r.step for r in records}
    protected = data.draw(st.frozensets(st.integers(0, 250), max_size=5))
    ctx = RetentionContext(now=2e5, protected_steps=protected)
    decision = policy.decide(records, ctx)

    if records:  # the latest record is always kept
        assert "latest" in decision.keep[max(steps)]
    assert not (protected & set(decision.delete))  # never deletes a protected step
    assert protected & steps <= set(decision.keep)
    # The kept set is the union of what each rule keeps, with reasons in rule order.
    per_rule = [(rule.reason, rule.keep(records, ctx)) for rule in policy.effective_rules]
    assert set(decision.keep) == set().union(*(kept for _, kept in per_rule))
    for step, reasons in decision.keep.items():
        assert reasons == [reason for reason, kept in per_rule if step in kept]
    # Keep and delete partition the steps; both ascending; input order does not matter.
    assert sorted([*decision.keep, *decision.delete]) == sorted(steps)
    assert list(decision.keep) == sorted(decision.keep)
    assert decision.delete == sorted(decision.delete)
    shuffled = data.draw(st.permutations(records))
    assert policy.decide(shuffled, ctx) == decision
    for rule in policy.rules:  # the best step is kept whenever a monitor is set
        if isinstance(rule, KeepBestOne):
            best = best_step(records, rule.monitor, rule.mode)
            assert best is None or "best" in decision.keep[best]
